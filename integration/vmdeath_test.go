package integration

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// TestPodvmQEMUKilled kills a running pod's QEMU, as the host's OOM killer might. What kubelet
// sees must be what it sees when a runc pod's sandbox dies: the sandbox NOTREADY by the time its
// containers are reported exited (so kubelet recreates the sandbox once, rather than first
// restarting a container in the dead one), one clear log line that the VM died, and kubelet's
// usual StopPodSandbox/RemovePodSandbox taking the pod down with nothing left behind.
func TestPodvmQEMUKilled(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vmdeath", Namespace: "it", Handler: "podvm"})
	ctr := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	events := watchContainerEvents(t, ctx, env)

	signalQEMU(t, pod.ID, syscall.SIGKILL)

	st, err := env.WaitContainerState(ctx, ctr, runtimeapi.ContainerState_CONTAINER_EXITED)
	if err != nil {
		t.Fatalf("the container of the pod whose VM died: %v", err)
	}
	t.Logf("container exited: code %d reason %q message %q", st.ExitCode, st.Reason, st.Message)
	checkStoppedWithSandbox(t, ctx, events, ctr)
	if sb, err := env.Runtime.PodSandboxStatus(ctx, pod.ID, false); err != nil || sb.Status.State != runtimeapi.PodSandboxState_SANDBOX_NOTREADY {
		t.Errorf("sandbox after its VM died: %v %v, want NOTREADY", sb.GetStatus().GetState(), err)
	}

	// kubelet takes the pod down and makes a new sandbox.
	stopAndRemovePod(t, ctx, env, pod.ID)
	again := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vmdeath", Namespace: "it", Handler: "podvm"})
	startContainer(t, ctx, env, again, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	stopAndRemovePod(t, ctx, env, again.ID)

	log, _ := os.ReadFile(env.ContainerdLog)
	if n := strings.Count(string(log), "the pod VM died"); n != 1 {
		t.Errorf("containerd's log says %d times that the pod VM died, want once", n)
	}
	if strings.Contains(string(log), "can't find shim") {
		t.Errorf("containerd's log has \"can't find shim\": the dead VM's shim went before containerd was done with it")
	}
	env.AssertNoLeaks(t)
}

// TestPodvmHungGuestFoundByPings freezes a running pod's QEMU (SIGSTOP, as a hung guest
// looks) and makes no call into the pod. The shim's pings (agent_ping_interval 1s here) find
// it: the container is reported exited with the sandbox NOTREADY, so kubelet makes the pod
// anew, as after a VM's death; containerd's log says once why; the pod comes down and nothing
// is left behind.
func TestPodvmHungGuestFoundByPings(t *testing.T) {
	env, ctx, pod := pingedPod(t, "hung")
	ctr := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	events := watchContainerEvents(t, ctx, env)
	time.Sleep(3 * time.Second) // pinged and answering: nothing happens
	if st, err := env.Runtime.ContainerStatus(ctx, ctr, false); err != nil || st.Status.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Fatalf("the container of a guest that answers its pings: %v %v, want running", st.GetStatus().GetState(), err)
	}

	signalQEMU(t, pod.ID, syscall.SIGSTOP)
	start := time.Now()
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	st, err := env.WaitContainerState(wctx, ctr, runtimeapi.ContainerState_CONTAINER_EXITED)
	wcancel()
	if err != nil {
		t.Fatalf("the container of a frozen guest nobody calls into: %v", err)
	}
	t.Logf("container reported exited %v after the guest froze: code %d", time.Since(start).Round(time.Millisecond), st.ExitCode)
	checkStoppedWithSandbox(t, ctx, events, ctr)
	stopAndRemovePod(t, ctx, env, pod.ID)

	log, _ := os.ReadFile(env.ContainerdLog)
	if n := strings.Count(string(log), "stopped answering (3 pings in a row"); n != 1 {
		t.Errorf("containerd's log says %d times that the guest stopped answering its pings, want once", n)
	}
	env.AssertNoLeaks(t)
}

// signalQEMU sends sig to the QEMU of the pod's VM. A QEMU it stops (SIGSTOP) is continued
// when the test ends: whatever happens, a stopped QEMU must not outlive the test stopped.
func signalQEMU(t *testing.T, podID string, sig syscall.Signal) {
	t.Helper()
	pids := harness.QEMUs(podID)
	if len(pids) != 1 {
		t.Fatalf("found QEMU processes %v for pod %s, want 1", pids, podID)
	}
	qemu := pids[0]
	if err := syscall.Kill(qemu, sig); err != nil {
		t.Fatal(err)
	}
	if sig == syscall.SIGSTOP {
		t.Cleanup(func() { _ = syscall.Kill(qemu, syscall.SIGCONT) })
	}
}

// pingedPod starts a podvm pod named name on a node whose shims ping their guests every
// second (sandbox.agent_ping_interval), for the tests of what the pings find and mend.
func pingedPod(t *testing.T, name string) (*harness.Env, context.Context, *harness.Pod) {
	t.Helper()
	opts := podvmOptions(t)
	setSandboxOption(t, opts.PodvmConfigPath, "agent_ping_interval", `"1s"`)
	env := harness.Start(t, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	t.Cleanup(cancel)
	return env, ctx, runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: name, Namespace: "it", Handler: "podvm"})
}

// setSandboxOption sets key = value (TOML) in the [sandbox] table of the node config at path.
func setSandboxOption(t *testing.T, path, key, value string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(b), "[sandbox]\n", "[sandbox]\n"+key+" = "+value+"\n", 1)
	if s == string(b) {
		t.Fatalf("%s has no [sandbox] table", path)
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// watchContainerEvents streams containerd's CRI container events (kubelet's evented PLEG).
func watchContainerEvents(t *testing.T, ctx context.Context, env *harness.Env) <-chan *runtimeapi.ContainerEventResponse {
	t.Helper()
	ch := make(chan *runtimeapi.ContainerEventResponse, 100)
	ready := make(chan struct{})
	go func() {
		_ = env.Runtime.GetContainerEvents(ctx, ch, func(runtimeapi.RuntimeService_GetContainerEventsClient) { close(ready) })
	}()
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		t.Fatal("GetContainerEvents did not connect")
	}
	return ch
}

// checkStoppedWithSandbox waits for the container's stopped event and checks the sandbox
// status it carries is NOTREADY.
func checkStoppedWithSandbox(t *testing.T, ctx context.Context, events <-chan *runtimeapi.ContainerEventResponse, ctr string) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.ContainerId != ctr || ev.ContainerEventType != runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT {
				continue
			}
			if s := ev.GetPodSandboxStatus().GetState(); s != runtimeapi.PodSandboxState_SANDBOX_NOTREADY {
				t.Errorf("the container's stopped event came with the sandbox %v, want NOTREADY", s)
			}
			return
		case <-timeout:
			t.Error("no CONTAINER_STOPPED event for the container of the dead VM")
			return
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
}

// TestPodvmFrozenGuest stops a running pod's QEMU (SIGSTOP: its vCPUs and devices stop, as a
// hung guest looks). CRI calls into the pod fail with an error instead of hanging, kubelet's
// StopPodSandbox and RemovePodSandbox take the pod down within kubelet's 2-minute request
// timeout, the shim says once why it stopped the VM, and nothing is left behind.
func TestPodvmFrozenGuest(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "frozen", Namespace: "it", Handler: "podvm"})
	ctr := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))

	signalQEMU(t, pod.ID, syscall.SIGSTOP)

	kubelet := 2 * time.Minute // kubelet's runtime request timeout
	cctx, cancel := context.WithTimeout(ctx, kubelet)
	start := time.Now()
	_, _, err := env.Runtime.ExecSync(cctx, ctr, []string{"true"}, 5*time.Second)
	late := cctx.Err()
	cancel()
	if err == nil || late != nil {
		t.Errorf("ExecSync into a frozen guest: %v after %v, want an error before kubelet's timeout", err, time.Since(start))
	}
	t.Logf("ExecSync into the frozen guest failed after %v: %v", time.Since(start).Round(time.Millisecond), err)

	// kubelet stops the container with a grace period, then the pod.
	cctx, cancel = context.WithTimeout(ctx, kubelet)
	start = time.Now()
	err = env.Runtime.StopContainer(cctx, ctr, 2)
	late = cctx.Err()
	cancel()
	t.Logf("StopContainer after %v: %v", time.Since(start).Round(time.Millisecond), err)
	if late != nil {
		t.Errorf("StopContainer of a frozen guest's container hung until kubelet's timeout")
	}
	start = time.Now()
	stopAndRemovePod(t, ctx, env, pod.ID)
	t.Logf("StopPodSandbox + RemovePodSandbox of the frozen pod took %v", time.Since(start).Round(time.Millisecond))

	log, _ := os.ReadFile(env.ContainerdLog)
	if n := strings.Count(string(log), "guest stopped answering"); n != 1 {
		t.Errorf("containerd's log says %d times that the guest stopped answering, want once", n)
	}
	env.AssertNoLeaks(t)
}
