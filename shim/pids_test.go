package shim

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// fakeVMPid is the host pid of the rig's fake VM.
const fakeVMPid = 4242

// Every task of the pod reports the VM's host pid to containerd: a host tool acting on a
// task pid then reaches the pod, never an unrelated host process with the guest's number.
func TestTaskPidsAreTheVMsHostPid(t *testing.T) {
	r := newRig(t)
	r.running()
	for _, id := range []string{"pod1", "c1"} {
		if st := r.state(id, ""); st.Pid != fakeVMPid {
			t.Errorf("State(%s).Pid = %d, want the VM's %d", id, st.Pid, fakeVMPid)
		}
	}
	r.mustExec("c1", "e1")
	resp, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Pid != fakeVMPid {
		t.Errorf("Start(exec).Pid = %d, want %d", resp.Pid, fakeVMPid)
	}
	r.published("TaskExecStarted with the VM's pid", func(e any) bool {
		ev, ok := e.(*eventstypes.TaskExecStarted)
		return ok && ev.ExecID == "e1" && ev.Pid == fakeVMPid
	})
	c, err := r.svc.Connect(r.ctx, &taskAPI.ConnectRequest{ID: "c1"})
	if err != nil || c.TaskPid != fakeVMPid {
		t.Errorf("Connect(c1) = %v, %v; want TaskPid %d", c, err, fakeVMPid)
	}
}

// CRI writes /proc/<sandbox task pid>/ns/* into a workload's spec; the guest gets the paths of
// the sandbox's process in the guest. A path naming any other process is refused.
func TestWorkloadNamespacesPointAtTheSandboxInTheGuest(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	sandboxGuestPid := r.service.pod.sandbox.nsPid.Load()
	if sandboxGuestPid == 0 || sandboxGuestPid == fakeVMPid {
		t.Fatalf("sandbox guest pid %d", sandboxGuestPid)
	}
	ns := []specs.LinuxNamespace{
		{Type: specs.IPCNamespace, Path: fmt.Sprintf("/proc/%d/ns/ipc", fakeVMPid)},
		{Type: specs.PIDNamespace, Path: fmt.Sprintf("/proc/%d/ns/pid", fakeVMPid)},
		{Type: specs.MountNamespace},
	}
	if _, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: r.nsBundle("c1", ns)}); err != nil {
		t.Fatal(err)
	}
	var got specs.Spec
	if err := json.Unmarshal(r.agent.Spec("c1"), &got); err != nil {
		t.Fatal(err)
	}
	want := map[specs.LinuxNamespaceType]string{
		specs.IPCNamespace: fmt.Sprintf("/proc/%d/ns/ipc", sandboxGuestPid),
		specs.PIDNamespace: fmt.Sprintf("/proc/%d/ns/pid", sandboxGuestPid),
	}
	for _, n := range got.Linux.Namespaces {
		if w, ok := want[n.Type]; ok && n.Path != w {
			t.Errorf("%s namespace path %q in the guest, want %q", n.Type, n.Path, w)
		}
	}

	foreign := []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: "/proc/1/ns/ipc"}}
	_, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "c2", Bundle: r.nsBundle("c2", foreign)})
	if !errors.Is(native(err), errdefs.ErrInvalidArgument) {
		t.Errorf("create with a foreign namespace path: %v, want invalid argument", err)
	}
	if r.agent.Spec("c2") != nil {
		t.Error("the refused container reached the guest")
	}
}

// nsBundle writes a workload bundle of pod1 with the given namespaces (and the pod netns).
func (r *rig) nsBundle(id string, ns []specs.LinuxNamespace) string {
	dir := r.bundle(id, workloadAnnotations("pod1"), podNetns)
	spec, err := readSpec(dir)
	if err != nil {
		r.t.Fatal(err)
	}
	spec.Linux.Namespaces = append(ns, *podNetns)
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		r.t.Fatal(err)
	}
	return dir
}

// kubectl debug --target: CRI gives the ephemeral container the PID namespace path of its
// target's task pid, which is the VM's pid like every other. In a pod whose containers have PID
// namespaces of their own, that path names the one such container; with several it cannot, and
// the container gets the pod's.
func TestDebugTargetJoinsTheTargetsPIDNamespace(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	sandboxGuestPid := r.service.pod.sandbox.nsPid.Load()
	r.mustCreate("c1", workloadAnnotations("pod1"))
	r.mustStart("c1", "")
	c1 := r.service.pod.sandbox.ownPIDNS["c1"]
	if c1 == 0 || c1 == sandboxGuestPid {
		t.Fatalf("c1's guest pid %d (sandbox %d)", c1, sandboxGuestPid)
	}
	target := []specs.LinuxNamespace{{Type: specs.PIDNamespace, Path: fmt.Sprintf("/proc/%d/ns/pid", fakeVMPid)}}
	pidPath := func(id string) string {
		t.Helper()
		if _, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: r.nsBundle(id, target)}); err != nil {
			t.Fatal(err)
		}
		var got specs.Spec
		if err := json.Unmarshal(r.agent.Spec(id), &got); err != nil {
			t.Fatal(err)
		}
		for _, n := range got.Linux.Namespaces {
			if n.Type == specs.PIDNamespace {
				return n.Path
			}
		}
		return ""
	}
	if got, want := pidPath("debug1"), fmt.Sprintf("/proc/%d/ns/pid", c1); got != want {
		t.Errorf("debug container targeting c1 got PID namespace %q, want c1's %q", got, want)
	}
	r.mustCreate("c2", workloadAnnotations("pod1"))
	if got, want := pidPath("debug2"), fmt.Sprintf("/proc/%d/ns/pid", sandboxGuestPid); got != want {
		t.Errorf("with two possible targets got PID namespace %q, want the pod's %q", got, want)
	}
	// An exited container is no target.
	r.agent.Exit("c2", "", 0)
	r.wait("c2", "")
	if got, want := pidPath("debug3"), fmt.Sprintf("/proc/%d/ns/pid", c1); got != want {
		t.Errorf("after c2 exited got PID namespace %q, want c1's %q", got, want)
	}
}
