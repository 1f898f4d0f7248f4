package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/integration/k8s"
)

// testShimKilledBooting: the pod's shim dies (SIGKILL) while RunPodSandbox is still in it:
// podvm's once the VM's QEMU runs but before the guest answered, runc's as soon as it exists
// (before its `runc create` of the pause container is done). The kubelet's RunPodSandbox
// fails, its retry makes a new sandbox that runs the pod, and when the pod is deleted the node
// is as it was: nothing of the killed attempt (QEMU, virtiofsd, shim, taps, mounts, cgroups,
// netns, state dir) is left.
func testShimKilledBooting(ctx context.Context, t *testing.T, k *kube, _ *k8s.Cluster, env *harness.Env) {
	// Warm-up, as the soak's: what a first pod makes for good (CNI's bridge) is no leak.
	if err := soakCycle(ctx, k, "shim-killed-booting-0"); err != nil {
		t.Fatal(err)
	}
	settle(ctx, t, env)
	before := nodeCounts(t, env, k.stateDir)
	seen := map[int]bool{}
	for _, sh := range env.Shims(k.rc) {
		seen[sh.PID] = true
	}
	const name = "shim-killed-booting"
	k.create(ctx, t, k.pod(name, sleeper))
	id, pid := bootingShim(ctx, t, k, env, seen)
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("killing shim %d of sandbox %s: %v", pid, id, err)
	}
	t.Logf("killed shim %d of sandbox %s while it booted (%s)", pid, id, k.rc)
	p := k.wait(ctx, t, name, 3*time.Minute, running)
	k.measure("shim killed booting → Running", time.Since(start))
	ev := k.events(name)
	if !strings.Contains(ev, "FailedCreatePodSandBox") {
		t.Errorf("no FailedCreatePodSandBox event: the kill did not land in RunPodSandbox; events:\n%s", ev)
	}
	for _, s := range podSandboxes(ctx, t, env, string(p.UID)) {
		if s.Id == id {
			t.Errorf("the killed attempt's sandbox %s is still listed (%s)", id, s.State)
		}
	}
	if k.rc == "podvm" {
		if n := countQEMU(id); n != 0 {
			t.Errorf("%d QEMU processes of the killed attempt left", n)
		}
		if _, err := os.Stat(filepath.Join(k.stateDir, id)); !os.IsNotExist(err) {
			t.Errorf("state dir of the killed attempt left: %v", err)
		}
	}
	if out := k.mustExec(ctx, t, name, "c", "echo", "alive"); out != "alive\n" {
		t.Errorf("exec in the recovered pod: %q", out)
	}
	if _, err := k.delete(ctx, name); err != nil {
		t.Fatal(err)
	}
	settle(ctx, t, env)
	after := nodeCounts(t, env, k.stateDir)
	t.Logf("shim killed booting: node counts before → after:\n%s", countsTable(before, after))
	if diff := countsDiff(before, after); diff != "" {
		t.Errorf("the node changed: %s", diff)
	}
}

// bootingShim waits for the shim of the pod's first sandbox (one not in seen) and returns its
// sandbox id and pid once the sandbox is booting: for podvm when the VM's QEMU, the shim's
// child, runs; for runc at once (its RunPodSandbox takes a few hundred ms, this polls every
// few).
func bootingShim(ctx context.Context, t *testing.T, k *kube, env *harness.Env, seen map[int]bool) (string, int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		for _, sh := range env.Shims(k.rc) {
			if seen[sh.PID] {
				continue
			}
			if k.rc != "podvm" || sh.RunsQEMU() {
				return sh.ID, sh.PID
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("no %s shim booting a sandbox within a minute; events:\n%s", k.rc, k.events("shim-killed-booting"))
	return "", 0
}
