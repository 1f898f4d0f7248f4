package e2e

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/integration/k8s"
)

// testGuestFrozen (podvm only: runc has no guest to freeze): the pod's VM stops running, as a
// hung guest would look. (QMP's `stop` would do the same, but QMP serves one client and the
// shim is it, so the test sends QEMU SIGSTOP.) An exec probe's ExecSync fails before the
// caller's deadline (it does not hang), and the pod can still be deleted, leaving no QEMU.
func testGuestFrozen(ctx context.Context, t *testing.T, k *kube, _ *k8s.Cluster, env *harness.Env) {
	if k.rc != "podvm" {
		t.Logf("podvm only: %s has no guest to freeze", k.rc)
		return
	}
	p := k.run(ctx, t, k.pod("frozen", sleeper))
	sbs := podSandboxes(ctx, t, env, string(p.UID))
	if len(sbs) != 1 {
		t.Fatalf("%d sandboxes, want 1", len(sbs))
	}
	id := sbs[0].Id
	pid := sandboxProcess(ctx, t, env, k.rc, id)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// A frozen QEMU that outlives the test must not stay frozen (the teardown SIGKILLs it).
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	// An exec probe's call: ExecSync with its timeout must come back, with an error.
	ectx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	start := time.Now()
	_, _, err := env.Runtime.ExecSync(ectx, containerStatus(p, "c").ContainerID[len("containerd://"):], []string{"true"}, 5*time.Second)
	took := time.Since(start)
	switch {
	case err == nil:
		t.Errorf("ExecSync in a frozen guest succeeded after %v", took)
	case ectx.Err() != nil:
		t.Errorf("ExecSync (timeout 5s) in a frozen guest hung until the caller gave up after %v: %v", took, err)
	}
	k.measure("frozen guest: ExecSync fails", took)
	// Deletion: the kubelet's CRI calls have a 2 minute deadline; a pod whose guest hangs must
	// still go within about that, not after retries of it.
	dctx, dcancel := context.WithTimeout(ctx, 3*time.Minute)
	defer dcancel()
	d, err := k.delete(dctx, "frozen")
	if err != nil {
		t.Fatalf("delete the frozen pod: %v; events:\n%s", err, k.events("frozen"))
	}
	k.measure("frozen guest: delete", d)
	if n := countQEMU(id); n != 0 {
		t.Errorf("%d QEMU processes of the deleted frozen pod left", n)
	}
}
