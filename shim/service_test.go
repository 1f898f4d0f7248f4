package shim

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/podvm/podvm/hypervisor"
)

func TestSandboxBootsVMAndWiresThePod(t *testing.T) {
	r := newRig(t)
	ann := sandboxAnnotations("pod1")
	ann["podvm.io/memory"] = "768Mi"
	ann["podvm.io/vcpus"] = "2"
	before := time.Now()
	r.mustCreate("pod1", ann)
	if started, _, _ := r.vm.State(); !started {
		t.Fatal("the VM was not started")
	}
	if r.vmCfg.MemoryMiB != 768 || r.vmCfg.VCPUs != 2 || len(r.vmCfg.NetDevices) != 1 {
		t.Errorf("VM config: %d MiB, %d vCPUs, %d NICs; want 768, 2, 1", r.vmCfg.MemoryMiB, r.vmCfg.VCPUs, len(r.vmCfg.NetDevices))
	}
	setup := r.agent.Setup()
	if setup == nil || setup.Hostname != "pod-host" || setup.SharedFsTag != hypervisor.SharedFSTag ||
		len(setup.Interfaces) != 1 || setup.Interfaces[0].Mac != "02:00:00:00:00:01" || setup.Interfaces[0].GuestMac != "" || len(setup.Routes) != 1 {
		t.Errorf("SetupSandbox = %+v", setup)
	}
	// The guest is given the host's clock, as it was when the request left.
	if sent := time.Unix(0, setup.GetRealtimeNs()); sent.Before(before) || sent.After(time.Now()) {
		t.Errorf("SetupSandbox's clock %v, want the host's while the sandbox was created (after %v)", sent, before)
	}
	if st := r.state("pod1", ""); st.Status != task.Status_CREATED || st.Pid == 0 {
		t.Errorf("state after create: %v pid %d", st.Status, st.Pid)
	}
	if _, err := os.Stat(filepath.Join(r.stateDir, "pod1", recordFile)); err != nil {
		t.Errorf("no recovery record in the state dir: %v", err)
	}
}

// The VM owner's container (the pod sandbox) is made while the guest is set up, and tells the
// agent so; the pod's later containers come once the guest is ready.
func TestSandboxMadeAlongsideGuestSetup(t *testing.T) {
	r := newRig(t)
	r.running()
	if !r.agent.CreatedAlongsideSetup("pod1") {
		t.Error("the sandbox's CreateContainer did not say it ran alongside SetupSandbox")
	}
	if r.agent.CreatedAlongsideSetup("c1") {
		t.Error("a workload's CreateContainer said it ran alongside SetupSandbox")
	}
}

func TestLifecycleEventsAndExitOrder(t *testing.T) {
	r := newRig(t)
	r.running()
	if st := r.state("c1", ""); st.Status != task.Status_RUNNING {
		t.Fatalf("c1 is %v, want running", st.Status)
	}
	r.mustExec("c1", "e1")
	r.mustStart("c1", "e1")

	// The init dies: its exec dies with it, and is reported first.
	r.agent.Exit("c1", "", 137)
	r.agent.Exit("c1", "e1", 137)
	if w := r.wait("c1", ""); w.ExitStatus != 137 {
		t.Errorf("c1 exit %d, want 137", w.ExitStatus)
	}
	// Events go out asynchronously, in order.
	var exits []string
	r.pub.waitFor(5*time.Second, func(events []any) bool {
		exits = nil
		for _, e := range events {
			if x, ok := e.(*eventstypes.TaskExit); ok {
				exits = append(exits, x.ID)
			}
		}
		return len(exits) >= 2
	})
	if len(exits) != 2 || exits[0] != "e1" || exits[1] != "c1" {
		t.Errorf("exit events %v, want the exec's before the init's: [e1 c1]", exits)
	}

	// Kill of a stopped task succeeds (StopPodSandbox retries), Delete works once.
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); err != nil {
		t.Errorf("kill of a stopped task: %v", err)
	}
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Errorf("delete exec: %v", err)
	}
	d, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"})
	if err != nil || d.ExitStatus != 137 {
		t.Errorf("delete c1: %v, exit %d", err, d.GetExitStatus())
	}
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"}); !errdefs.IsNotFound(native(err)) {
		t.Errorf("second delete: %v, want not found", err)
	}
	if got := r.share.Released(); len(got) != 1 || got[0] != "c1" {
		t.Errorf("released filesystems %v, want [c1]", got)
	}

	// The sandbox: kill, wait, delete stops the VM and removes its state.
	r.deleteSandbox("pod1")
	if _, err := os.Stat(filepath.Join(r.stateDir, "pod1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir left: %v", err)
	}
	if r.nic.Attached() != r.nic.Detached() {
		t.Error("pod interface still attached")
	}
	if netns, closed := r.ports.state(); netns != podNetns.Path || closed != 1 {
		t.Errorf("port forwarder: started for %q, closed %d times; want %s, once", netns, closed, podNetns.Path)
	}
}

// A node where port-forward cannot be set up (no iptables) still runs pods.
func TestPortForwardFailureDoesNotFailThePod(t *testing.T) {
	r := newRig(t)
	r.ports.startErr = errors.New("port-forward needs iptables in PATH")
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	if _, closed := r.ports.state(); closed != 0 {
		t.Errorf("closed %d times a forwarder that never started", closed)
	}
}

// The port forwarder is set up while the guest sets itself up; a guest that fails its setup
// fails the pod and leaves no forwarder (its iptables rule and listener) behind.
func TestGuestSetupFailureClosesPortForward(t *testing.T) {
	r := newRig(t)
	r.agent.FailOn("SetupSandbox", errors.New("mount virtio-fs: no such device"))
	if _, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns); err == nil || !strings.Contains(err.Error(), "no such device") {
		t.Fatalf("create: %v, want the guest's setup error", err)
	}
	if netns, closed := r.ports.state(); netns != "" && closed != 1 {
		t.Errorf("port forwarder started for %q and closed %d times; want closed once", netns, closed)
	}
}

func TestRunningProcessCannotBeDeleted(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); !errdefs.IsFailedPrecondition(native(err)) {
		t.Errorf("delete of a running task: %v, want failed precondition", err)
	}
	if _, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: "pod1"}); !errdefs.IsFailedPrecondition(native(err)) {
		t.Errorf("second start: %v, want failed precondition", err)
	}
}

func TestCreateFailuresLeaveNothing(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ann   map[string]string
		netns *specs.LinuxNamespace
		setup func(r *rig)
		want  func(error) bool
	}{
		{"bad memory annotation", map[string]string{"podvm.io/memory": "abc"}, podNetns, nil, errdefs.IsInvalidArgument},
		{"host network", nil, nil, nil, errdefs.IsInvalidArgument},
		{"VM does not start", nil, podNetns, func(r *rig) { r.vm.StartErr = errors.New("qemu: boom") }, errdefs.IsUnknown},
		{"network discovery fails", nil, podNetns, func(r *rig) { r.discoverErr = errors.New("no netns") }, errdefs.IsUnknown},
		{"agent refuses the container", nil, podNetns, func(r *rig) { r.agent.CreateErr = errdefs.ErrInvalidArgument }, errdefs.IsInvalidArgument},
		// The sandbox's container was made alongside the failed setup: it is removed again.
		{"guest setup fails", nil, podNetns, func(r *rig) { r.agent.FailOn("SetupSandbox", errors.New("mount virtio-fs: no such device")) }, errdefs.IsUnknown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.maxParallelStarts = 1
			if tc.setup != nil {
				tc.setup(r)
			}
			ann := sandboxAnnotations("pod1")
			for k, v := range tc.ann {
				ann[k] = v
			}
			_, err := r.create("pod1", ann, tc.netns)
			if err == nil || !tc.want(native(err)) {
				t.Fatalf("create: %v", err)
			}
			if left := stateLeft(r.stateDir); len(left) != 0 {
				t.Errorf("state left behind: %v", left)
			}
			// The turn to start the VM, if it came to that, ended with the failure.
			if !slotFree(t, r.stateDir) {
				t.Error("the node's start slot is still held")
			}
			if r.nic.Attached() != r.nic.Detached() {
				t.Error("pod interface left attached")
			}
			if started, stopped, _ := r.vm.State(); started && !stopped {
				t.Error("VM left running")
			}
			if _, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: "pod1"}); !errdefs.IsNotFound(native(err)) {
				t.Errorf("failed container still known: %v", err)
			}
			if left := r.agent.Containers(); len(left) != 0 {
				t.Errorf("containers left in the guest: %v", left)
			}
		})
	}
}

func TestWorkloadNeedsItsSandbox(t *testing.T) {
	r := newRig(t)
	_, err := r.create("c1", workloadAnnotations("elsewhere"), podNetns)
	if !errdefs.IsFailedPrecondition(native(err)) {
		t.Fatalf("create: %v, want failed precondition", err)
	}
}

func TestCheckpointIsNotSupported(t *testing.T) {
	r := newRig(t)
	if _, err := r.svc.Checkpoint(r.ctx, &taskAPI.CheckpointTaskRequest{ID: "x"}); !errdefs.IsNotImplemented(native(err)) {
		t.Fatalf("checkpoint: %v", err)
	}
}

func TestVMDeathEndsProcesses(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	r.agent.Close() // the guest is gone
	r.vm.Exit()
	if w := r.wait("pod1", ""); w.ExitStatus != 255 {
		t.Errorf("exit status after VM death: %d, want 255", w.ExitStatus)
	}
}

// When the VM dies, the sandbox's exit is published first, and its containers' once containerd
// deleted the sandbox: containerd's CRI marks the sandbox not ready at that delete, so it has
// the sandbox not ready when it reports them exited, and kubelet recreates the pod.
func TestVMDeathReportsTheSandboxFirst(t *testing.T) {
	r := newRig(t)
	r.running()
	r.agent.Close()
	r.vm.Exit()
	exits := func() []string {
		var ids []string
		r.pub.mu.Lock()
		defer r.pub.mu.Unlock()
		for _, e := range r.pub.events {
			if x, ok := e.(*eventstypes.TaskExit); ok {
				ids = append(ids, x.ContainerID)
			}
		}
		return ids
	}
	r.published("the sandbox's TaskExit", func(e any) bool {
		x, ok := e.(*eventstypes.TaskExit)
		return ok && x.ContainerID == "pod1"
	})
	time.Sleep(100 * time.Millisecond)
	if got := exits(); !slices.Equal(got, []string{"pod1"}) {
		t.Fatalf("exits before the sandbox was deleted: %v, want only pod1", got)
	}
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); err != nil {
		t.Fatal(err)
	}
	r.published("the container's TaskExit", func(e any) bool {
		x, ok := e.(*eventstypes.TaskExit)
		return ok && x.ContainerID == "c1"
	})
	if got := exits(); !slices.Equal(got, []string{"pod1", "c1"}) {
		t.Errorf("exits %v, want pod1 then c1", got)
	}
}

func TestAdaptSpecForGuest(t *testing.T) {
	cpus := "0-3"
	spec := &specs.Spec{
		Hooks:   &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/bin/nvidia-hook"}}},
		Process: &specs.Process{ApparmorProfile: "cri-default", SelinuxLabel: "x"},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: "/var/run/netns/x"},
				{Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"}},
			Devices:     []specs.LinuxDevice{{Path: "/dev/sda", Type: "b", Major: 8}},
			Resources:   &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: cpus}},
			MaskedPaths: []string{"/proc/kcore"},
		},
	}
	adaptSpecForGuest(spec)
	if spec.Hooks != nil || spec.Process.ApparmorProfile != "" || len(spec.Linux.Devices) != 0 || spec.Linux.Resources.CPU.Cpus != "" {
		t.Errorf("host-only settings survived: %+v", spec)
	}
	want := []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"}, {Type: specs.CgroupNamespace}}
	if len(spec.Linux.Namespaces) != 2 || spec.Linux.Namespaces[0] != want[0] || spec.Linux.Namespaces[1] != want[1] {
		t.Errorf("namespaces %+v, want %+v", spec.Linux.Namespaces, want)
	}
}

func TestContainerBeingCreatedIsNotFound(t *testing.T) {
	r := newRig(t)
	if _, err := r.service.pod.reserve("pod1", true, func(error) {}); err != nil { // what Create holds while the VM boots
		t.Fatal(err)
	}
	for name, call := range map[string]func() error{
		"state": func() error { _, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: "pod1"}); return err },
		"kill":  func() error { _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "pod1", Signal: 9}); return err },
		"wait": func() error {
			_, err := r.svc.Wait(r.ctx, &taskAPI.WaitRequest{ID: "pod1"})
			return err
		},
		"delete": func() error { _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); return err },
	} {
		if err := call(); !errdefs.IsNotFound(native(err)) {
			t.Errorf("%s of a container being created: %v, want not found", name, err)
		}
	}
	r.shutdownRefused("Shutdown ended a shim that is still creating a container")
}
