package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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

	out, _ := exec.Command("pgrep", "-f", "containerd-shim-podvm-v2 .*-id "+pod.ID).Output()
	pids := strings.Fields(string(out))
	if len(pids) != 1 {
		t.Fatalf("found %d shims for pod %s, want 1", len(pids), pod.ID)
	}
	shimPid, _ := strconv.Atoi(pids[0])
	if err := syscall.Kill(shimPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed shim %d", shimPid)

	// The VM dies with its shim, and containerd's dead-shim clean-up runs `delete`.
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		_, stateErr := os.Stat(stateDir)
		if countQEMU(t, pod.ID) == 0 && os.IsNotExist(stateErr) && podvmTaps(t, ns) == 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if n := countQEMU(t, pod.ID); n != 0 {
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
