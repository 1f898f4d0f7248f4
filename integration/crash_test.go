package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/network"
)

// TestPodvmShimKilled kills a running pod's shim with SIGKILL, as the OOM killer or an operator
// might. Its VM must die with it, containerd's clean-up (`containerd-shim-podvm-v2 delete`) must
// remove the taps, mounts and state from what is on disk, and kubelet's usual calls must then
// take the pod down cleanly.
func TestPodvmShimKilled(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "crash", Namespace: "it", Handler: "podvm"})
	startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	nsPath, err := env.PodNetNSPath(ctx, pod.ID)
	if err != nil {
		t.Fatal(err)
	}
	// Keep the pod netns open, so the tap check below sees it after containerd lets go.
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if n := podvmTaps(t, ns); n != 1 {
		t.Fatalf("pod netns has %d podvm taps before the crash, want 1", n)
	}
	stateDir := filepath.Join(podvmStateDir, pod.ID)

	pids := env.ShimPIDs("podvm", pod.ID)
	if len(pids) != 1 {
		t.Fatalf("found shims %v for pod %s, want 1", pids, pod.ID)
	}
	shimPid := pids[0]
	if err := syscall.Kill(shimPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed shim %d", shimPid)

	// The VM dies with its shim, and containerd's dead-shim clean-up runs `delete`.
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		_, stateErr := os.Stat(stateDir)
		if countQEMU(pod.ID) == 0 && os.IsNotExist(stateErr) && podvmTaps(t, ns) == 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if n := countQEMU(pod.ID); n != 0 {
		t.Errorf("%d QEMU processes outlived the killed shim", n)
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Errorf("state dir %s left after the shim was killed: %v", stateDir, err)
	}
	if n := podvmTaps(t, ns); n != 0 {
		t.Errorf("%d podvm taps left in the pod netns after the shim was killed", n)
	}

	// kubelet then stops and removes the pod, retrying as it does: containerd's CRI marks the
	// containers exited once its own retry of the dead shim's exit events succeeds.
	var lastErr error
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		if lastErr = env.Runtime.StopPodSandbox(ctx, pod.ID); lastErr != nil {
			continue
		}
		if lastErr = env.Runtime.RemovePodSandbox(ctx, pod.ID); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("removing the pod after the crash: %v", lastErr)
	}
	env.AssertNoLeaks(t)
}

func podvmTaps(t *testing.T, ns netns.NsHandle) int {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return 0 // the netns is gone: no taps
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range links {
		if network.IsTap(l.Attrs().Name) {
			n++
		}
	}
	return n
}

// TestPodvmShimKilledBooting kills the shim (SIGKILL) while RunPodSandbox is in it: the VM's
// QEMU runs, the guest has not answered yet. RunPodSandbox fails; nothing of the attempt (QEMU,
// state dir) outlives containerd's clean-up; kubelet's retry, the same sandbox config again,
// runs the pod; and once it is removed nothing is left on the machine.
func TestPodvmShimKilledBooting(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	opts := harness.PodOptions{Name: "boot-crash", Namespace: "it", Handler: "podvm", UID: "uid-boot-crash"}
	killed := make(chan string, 1)
	go func() { killed <- killShimWhenQEMURuns(ctx, env) }()
	if pod, err := env.RunPod(ctx, opts); err == nil {
		t.Fatalf("RunPodSandbox returned sandbox %s although its shim was killed booting", pod.ID)
	} else {
		t.Logf("RunPodSandbox with its shim killed: %v", err)
	}
	id := <-killed
	if id == "" {
		t.Fatal("no podvm shim with a running QEMU seen while RunPodSandbox ran")
	}
	if n := countQEMU(id); n != 0 {
		t.Errorf("%d QEMU processes of the killed attempt left", n)
	}
	if _, err := os.Stat(filepath.Join(podvmStateDir, id)); !os.IsNotExist(err) {
		t.Errorf("state dir of the killed attempt left: %v", err)
	}
	pod := runPodWithBusybox(ctx, t, env, opts)
	startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	if err := env.RemoveAllPods(ctx); err != nil {
		t.Fatal(err)
	}
	env.AssertNoLeaks(t)
}

// killShimWhenQEMURuns waits for a podvm shim of env's containerd whose sandbox's QEMU, its
// child, runs, SIGKILLs the shim and returns the sandbox id ("" if none came before ctx
// ended).
func killShimWhenQEMURuns(ctx context.Context, env *harness.Env) string {
	for ctx.Err() == nil {
		for _, sh := range env.Shims("podvm") {
			if !sh.RunsQEMU() {
				continue
			}
			if syscall.Kill(sh.PID, syscall.SIGKILL) == nil {
				return sh.ID
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return ""
}

// TestShimDeleteBesideTheLiveShim runs `containerd-shim-podvm-v2 delete` for a running
// container while its pod's shim lives, as containerd does whenever its connection for the
// container closes (a lost connection, and every delete). The container's files are the live
// shim's: afterwards the container must still see its rootfs, and the pod must still come
// down without leaks.
func TestShimDeleteBesideTheLiveShim(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "delete-beside", Namespace: "it", Handler: "podvm"})
	ctr := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	if got := execOK(ctx, t, env, ctr, "ls /bin/busybox"); !strings.Contains(got, "/bin/busybox") {
		t.Fatalf("before shim delete: ls /bin/busybox printed %q", got)
	}
	bundle := filepath.Join(env.RunDir, "state", "io.containerd.runtime.v2.task", "k8s.io", ctr)
	cmd := exec.CommandContext(ctx, filepath.Join(os.Getenv("PODVM_BIN"), "containerd-shim-podvm-v2"),
		"-namespace", "k8s.io", "-id", ctr, "-address", filepath.Join(env.RunDir, "c.sock"), "delete")
	cmd.Dir = bundle
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("shim delete of %s: %v\n%s", ctr, err, out)
	}
	t.Logf("shim delete of the running container took %v", time.Since(start).Round(time.Millisecond))
	// The guest may answer from its cache of the share for up to a second (cache "keep").
	time.Sleep(2 * time.Second)
	if got := execOK(ctx, t, env, ctr, "ls /bin/busybox && cat /etc/hostname"); !strings.Contains(got, "/bin/busybox") {
		t.Fatalf("after shim delete beside the live shim the container lost its rootfs: ls printed %q", got)
	}
	if err := env.RemoveAllPods(ctx); err != nil {
		t.Fatal(err)
	}
	env.AssertNoLeaks(t)
}
