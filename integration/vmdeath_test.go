package integration

import (
	"context"
	"os"
	"os/exec"
	"strconv"
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

	out, _ := exec.Command("pgrep", "-f", "qemu-system-x86_64 -name podvm-"+pod.ID).Output()
	pids := strings.Fields(string(out))
	if len(pids) != 1 {
		t.Fatalf("found %d QEMU processes for pod %s, want 1", len(pids), pod.ID)
	}
	qemu, _ := strconv.Atoi(pids[0])
	if err := syscall.Kill(qemu, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}

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
