package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
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
	settle(ctx, t, k, env)
	before := nodeCounts(t, env, k.stateDir)
	seen := map[int]bool{}
	for _, pid := range shimPIDs(env, k.rc) {
		seen[pid] = true
	}
	const name = "shim-killed-booting"
	k.create(ctx, t, k.pod(name, sleeper))
	id, pid := bootingShim(ctx, t, k, env, seen)
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
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
	settle(ctx, t, k, env)
	after := nodeCounts(t, env, k.stateDir)
	t.Logf("shim killed booting: node counts before → after:\n%s", countsTable(before, after))
	if diff := countsDiff(before, after); diff != "" {
		t.Errorf("the node changed: %s", diff)
	}
}

// bootingShim waits for the shim of the pod's first sandbox (one not in seen) and returns its
// sandbox id and pid once the sandbox is booting: for podvm when the VM's QEMU runs, for runc
// at once (its RunPodSandbox takes a few hundred ms, this polls every few).
func bootingShim(ctx context.Context, t *testing.T, k *kube, env *harness.Env, seen map[int]bool) (string, int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		for _, pid := range shimPIDs(env, k.rc) {
			if seen[pid] {
				continue
			}
			id := argAfter(cmdline(pid), "-id")
			if k.rc != "podvm" || countQEMU(id) > 0 {
				return id, pid
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("no %s shim booting a sandbox within a minute; events:\n%s", k.rc, k.events("shim-killed-booting"))
	return "", 0
}

// shimPIDs lists the serving shims (not `start` or `delete` runs) of runtime class rc that
// the suite's containerd started.
func shimPIDs(env *harness.Env, rc string) []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil {
			continue
		}
		args := cmdline(pid)
		if len(args) < 2 || filepath.Base(args[0]) != "containerd-shim-"+rc+"-v2" {
			continue
		}
		if last := args[len(args)-1]; last == "start" || last == "delete" {
			continue
		}
		if strings.Contains(argAfter(args, "-address"), env.RunDir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func cmdline(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// argAfter returns the argument after flag in args, or "".
func argAfter(args []string, flag string) string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			return args[i+1]
		}
	}
	return ""
}
