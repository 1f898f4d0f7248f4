package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/rootfs"
)

func wantFailedPrecondition(t *testing.T, what string, err error, words string) {
	t.Helper()
	if !errdefs.IsFailedPrecondition(native(err)) || !strings.Contains(err.Error(), words) {
		t.Errorf("%s: %v, want failed precondition saying %q", what, err, words)
	}
}

func TestPauseResume(t *testing.T) {
	r := newRig(t)
	r.running()
	r.mustExec("c1", "e1")
	r.mustStart("c1", "e1")
	if _, err := r.svc.Pause(r.ctx, &taskAPI.PauseRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if !r.agent.Paused("c1") {
		t.Error("the guest's container is not paused")
	}
	for _, id := range []string{"", "e1"} {
		if st := r.state("c1", id); st.Status != task.Status_PAUSED {
			t.Errorf("c1 %q is %v after pause, want paused", id, st.Status)
		}
	}
	_, err := r.svc.Pause(r.ctx, &taskAPI.PauseRequest{ID: "c1"})
	wantFailedPrecondition(t, "second pause", err, "it is paused; cannot pause it")
	_, err = r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"})
	wantFailedPrecondition(t, "delete of a paused task", err, "kill it first")
	_, err = r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e2", Spec: execSpec(t)})
	wantFailedPrecondition(t, "exec in a paused container", err, "is paused; exec needs it running")

	if _, err := r.svc.Resume(r.ctx, &taskAPI.ResumeRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if st := r.state("c1", "e1"); st.Status != task.Status_RUNNING || r.agent.Paused("c1") {
		t.Errorf("after resume: exec %v, guest paused %v; want running, not paused", st.Status, r.agent.Paused("c1"))
	}
	_, err = r.svc.Resume(r.ctx, &taskAPI.ResumeRequest{ID: "c1"})
	wantFailedPrecondition(t, "second resume", err, "it is running; cannot resume it")
	r.published("TaskPaused", func(e any) bool { p, ok := e.(*eventstypes.TaskPaused); return ok && p.ContainerID == "c1" })
	r.published("TaskResumed", func(e any) bool { p, ok := e.(*eventstypes.TaskResumed); return ok && p.ContainerID == "c1" })

	// A guest that fails to pause leaves the container running.
	r.agent.FailOn("PauseContainer", errors.New("freezer: device busy"))
	if _, err := r.svc.Pause(r.ctx, &taskAPI.PauseRequest{ID: "c1"}); err == nil || !strings.Contains(err.Error(), "device busy") {
		t.Errorf("pause the guest refused: %v", err)
	}
	if st := r.state("c1", ""); st.Status != task.Status_RUNNING {
		t.Errorf("c1 is %v after a failed pause, want running", st.Status)
	}
	// A paused container can still be killed; its exit ends the pause.
	r.agent.FailOn("PauseContainer", nil)
	if _, err := r.svc.Pause(r.ctx, &taskAPI.PauseRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); err != nil {
		t.Fatal(err)
	}
	r.agent.Exit("c1", "e1", 137) // its exec dies with it
	if w := r.wait("c1", ""); w.ExitStatus != 137 {
		t.Errorf("paused c1 killed: exit %d, want 137", w.ExitStatus)
	}
	_, err = r.svc.Pause(r.ctx, &taskAPI.PauseRequest{ID: "c1"})
	wantFailedPrecondition(t, "pause of a stopped task", err, "it is stopped")
}

func TestPauseOfACreatedTaskFails(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	_, err := r.svc.Pause(r.ctx, &taskAPI.PauseRequest{ID: "pod1"})
	wantFailedPrecondition(t, "pause before start", err, "it is created; cannot pause it")
	_, err = r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: "pod1", ExecID: "e1", Spec: execSpec(t)})
	wantFailedPrecondition(t, "exec before start", err, "is created; exec needs it running")
}

// Many containers created, started, killed and deleted at once, each created twice at the
// same time and deleted three times at once: every successful create is matched by exactly
// one successful delete, and the shim ends with only the sandbox.
func TestConcurrentCreateDelete(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, 8*n)
	var mu sync.Mutex
	created, deleted := map[string]int{}, map[string]int{}
	count := func(m map[string]int, id string) {
		mu.Lock()
		m[id]++
		mu.Unlock()
	}
	lifecycle := func(id, bundle string) {
		defer wg.Done()
		_, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle})
		switch {
		case errdefs.IsAlreadyExists(native(err)):
			return // the other create won
		case err != nil && strings.Contains(err.Error(), errAbandoned.Error()):
			// This create began after the other's container was deleted, and one of that
			// container's later Deletes found it in flight: containerd giving up on it.
			return
		}
		if err != nil {
			errs <- fmt.Errorf("create %s: %w", id, err)
			return
		}
		count(created, id)
		// State, Kill, Delete race with each other and with the create's own goroutines.
		var inner sync.WaitGroup
		for j := 0; j < 3; j++ {
			inner.Add(1)
			go func() {
				defer inner.Done()
				_, _ = r.svc.State(r.ctx, &taskAPI.StateRequest{ID: id})
				_, _ = r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: id, Signal: 9})
				_, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: id})
				switch {
				case err == nil:
					count(deleted, id)
				case errdefs.IsNotFound(native(err)):
				default:
					errs <- fmt.Errorf("delete %s: %w", id, err)
				}
			}()
		}
		inner.Wait()
	}
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("c%d", i)
		bundle := r.bundle(id, workloadAnnotations("pod1"), podNetns)
		wg.Add(2)
		go lifecycle(id, bundle)
		go lifecycle(id, bundle)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("c%d", i)
		if created[id] == 0 || created[id] != deleted[id] {
			t.Errorf("%s created %d times, deleted %d times", id, created[id], deleted[id])
		}
	}
	if got := r.service.pod.size(); got != 1 {
		t.Errorf("%d containers left, want only the sandbox", got)
	}
	if got := r.share.Prepared(); len(got) != 1 || got[0] != "pod1" {
		t.Errorf("filesystems still prepared: %v, want [pod1]", got)
	}
}

func TestOnlyOneVMOwnerAtATime(t *testing.T) {
	r := newRig(t)
	var wg sync.WaitGroup
	results := make([]error, 2)
	for i := range results {
		id := fmt.Sprintf("solo%d", i)
		bundle := r.bundle(id, nil, podNetns)
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, results[i] = r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle})
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range results {
		if err == nil {
			ok++
		} else if !errdefs.IsAlreadyExists(native(err)) {
			t.Errorf("second VM owner: %v, want already exists", err)
		}
	}
	if ok != 1 {
		t.Errorf("%d of two standalone containers got the shim's VM, want 1", ok)
	}
}

// Deleting the sandbox first stops the VM: what was left reports exit 255 and can still be
// deleted, after which the shim shuts down.
func TestSandboxDeleteWithWorkloadsLeft(t *testing.T) {
	r := newRig(t)
	r.running()
	r.deleteSandbox("pod1")
	if w := r.wait("c1", ""); w.ExitStatus != 255 {
		t.Errorf("c1 exit %d after its VM stopped, want 255", w.ExitStatus)
	}
	r.published("TaskExit of c1", func(e any) bool { x, ok := e.(*eventstypes.TaskExit); return ok && x.ID == "c1" })
	_, err := r.svc.Pids(r.ctx, &taskAPI.PidsRequest{ID: "c1"})
	wantFailedPrecondition(t, "pids of a container whose VM stopped", err, "pod VM pod1 is stopped")
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); err != nil {
		t.Errorf("kill of c1: %v", err)
	}
	r.shutdownRefused("the shim shut down while it still had c1")
	if d, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"}); err != nil || d.ExitStatus != 255 {
		t.Fatalf("delete c1: %v, exit %d", err, d.GetExitStatus())
	}
	// (r.ctx ends with the shutdown, and with it the call's context, as in containerd.)
	_, _ = r.svc.Shutdown(r.ctx, &taskAPI.ShutdownRequest{})
	select {
	case <-r.sd.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the shim did not shut down without containers")
	}
}

// dyingAgent is a guest whose VM dies while it creates a container.
type dyingAgent struct {
	*agent.Fake
	vm   *hypervisor.Fake
	only string
}

func (a *dyingAgent) CreateContainer(ctx context.Context, r *api.CreateContainerRequest) (*api.CreateContainerResponse, error) {
	if r.ContainerId != a.only {
		return a.Fake.CreateContainer(ctx, r)
	}
	a.vm.Exit()
	a.Fake.Close()
	return nil, errors.New("ttrpc: closed")
}

func TestVMDiesDuringCreate(t *testing.T) {
	for _, id := range []string{"pod1", "c1"} {
		t.Run(id, func(t *testing.T) {
			r := newRig(t)
			r.wrapAgent = func(f *agent.Fake) agentConn { return &dyingAgent{Fake: f, vm: r.vm, only: id} }
			if id == "c1" {
				r.mustCreate("pod1", sandboxAnnotations("pod1"))
				r.mustStart("pod1", "")
			}
			ann := sandboxAnnotations("pod1")
			if id == "c1" {
				ann = workloadAnnotations("pod1")
			}
			_, err := r.create(id, ann, podNetns)
			if err == nil || !strings.Contains(err.Error(), "create container "+id+" in the VM") {
				t.Fatalf("create: %v, want it to say the guest create failed", err)
			}
			if _, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: id}); !errdefs.IsNotFound(native(err)) {
				t.Errorf("%s still known: %v", id, err)
			}
			if got := r.share.Released(); len(got) == 0 || got[len(got)-1] != id {
				t.Errorf("released %v, want %s's filesystems released", got, id)
			}
			if id == "pod1" {
				if left := stateLeft(r.stateDir); len(left) != 0 {
					t.Errorf("state left behind: %v", left)
				}
				return
			}
			// The sandbox learns that its VM is gone.
			if w := r.wait("pod1", ""); w.ExitStatus != 255 {
				t.Errorf("pod1 exit %d, want 255", w.ExitStatus)
			}
		})
	}
}

// oopsInSetup is a guest whose kernel dies while it is set up: the console says why, and the
// agent's connection closes under the call.
type oopsInSetup struct {
	*agent.Fake
	vm      *hypervisor.Fake
	console string
}

const oops = "[    0.432039] int3: 0000 [#1] SMP NOPTI\n[    0.435612] Kernel panic - not syncing: Fatal exception in interrupt\n"

func (a *oopsInSetup) SetupSandbox(ctx context.Context, r *api.SetupSandboxRequest) (*api.Empty, error) {
	if err := os.WriteFile(a.console, []byte("[    0.430057] loop: module loaded\n"+oops), 0o600); err != nil {
		return nil, err
	}
	a.vm.Exit()
	a.Fake.Close()
	return nil, ttrpc.ErrClosed
}

// A guest that dies before its pod is ready takes its console log with it (the state dir
// goes), so the error containerd and kubelet show must carry its end.
func TestGuestDiesDuringSetupSaysWhy(t *testing.T) {
	r := newRig(t)
	r.wrapAgent = func(f *agent.Fake) agentConn {
		return &oopsInSetup{Fake: f, vm: r.vm, console: filepath.Join(r.stateDir, "pod1", "console.log")}
	}
	_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
	if err == nil || !strings.Contains(err.Error(), "set up the guest") || !strings.Contains(err.Error(), "Kernel panic - not syncing") {
		t.Fatalf("create: %v, want the setup's failure and the end of the guest's console", err)
	}
	if left := stateLeft(r.stateDir); len(left) != 0 {
		t.Errorf("state left behind: %v", left)
	}
}

// blockShare attaches two disks to every workload; blockVM fails to plug the second.
type blockShare struct{ *rootfs.Fake }

func (s blockShare) Prepare(ctx context.Context, id, bundle string, spec *specs.Spec, m []mount.Mount) (*rootfs.Attachment, error) {
	att, err := s.Fake.Prepare(ctx, id, bundle, spec, m)
	if err == nil && id != "pod1" {
		att.BlockDevices = []*hypervisor.BlockDevice{{ID: id + "-d1", Path: "/dev/pvc1"}, {ID: id + "-d2", Path: "/dev/pvc2"}}
	}
	return att, err
}

type blockVM struct{ *hypervisor.Fake }

func (v blockVM) Hotplug(ctx context.Context, d hypervisor.Device) error {
	if strings.HasSuffix(d.DeviceID(), "-d2") {
		return errors.New("device_add: bus full")
	}
	return v.Fake.Hotplug(ctx, d)
}

func TestHotplugFailureLeavesNothing(t *testing.T) {
	r := newRig(t)
	r.wrapShare = func(f *rootfs.Fake) rootfs.Provider { return blockShare{f} }
	r.wrapVM = func(f *hypervisor.Fake) hypervisor.Hypervisor { return blockVM{f} }
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	_, err := r.create("c1", workloadAnnotations("pod1"), podNetns)
	if err == nil || !strings.Contains(err.Error(), "hot-plug /dev/pvc2") || !strings.Contains(err.Error(), "bus full") {
		t.Fatalf("create: %v, want the hot-plug failure", err)
	}
	if _, _, devices := r.vm.State(); len(devices) != 0 {
		t.Errorf("devices left plugged: %v", devices)
	}
	if got := r.share.Prepared(); len(got) != 1 || got[0] != "pod1" {
		t.Errorf("prepared %v, want only pod1", got)
	}
	for _, c := range r.agent.Calls() {
		if c == "CreateContainer c1" {
			t.Error("the guest was asked to create c1 without its disks")
		}
	}
	if _, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: "c1"}); !errdefs.IsNotFound(native(err)) {
		t.Errorf("c1 still known: %v", err)
	}
}

// Shutdown does nothing while a VM runs a container; the shim's exit (signal, or Shutdown
// once empty) stops the VM and cleans its state.
func TestShutdownWithALiveVM(t *testing.T) {
	r := newRig(t)
	r.running()
	r.shutdownRefused("Shutdown ended a shim that still runs containers")
	if _, stopped, _ := r.vm.State(); stopped {
		t.Fatal("Shutdown stopped a VM that still runs containers")
	}
	r.sd.Shutdown() // what a SIGTERM to the shim does
	<-r.sd.Done()
	if _, stopped, _ := r.vm.State(); !stopped {
		t.Error("the shim's exit left the VM running")
	}
	if !r.agent.IsShutdown() {
		t.Error("the guest was not asked to shut down")
	}
	if _, err := os.Stat(filepath.Join(r.stateDir, "pod1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir left: %v", err)
	}
	r.service.events.publish(&eventstypes.TaskOOM{ContainerID: "late"}) // dropped, not a panic
}

// Errors cross the ttrpc edge as status codes with the shim's message.
func TestErrorsBecomeStatusCodesAtTheEdge(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"not found", func() error { _, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: "nope"}); return err }, codes.NotFound},
		{"failed precondition", func() error {
			_, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1", ExecID: "e9"})
			return err
		}, codes.NotFound},
		{"already exists", func() error { _, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns); return err }, codes.AlreadyExists},
		{"not implemented", func() error {
			_, err := r.svc.Checkpoint(r.ctx, &taskAPI.CheckpointTaskRequest{ID: "pod1"})
			return err
		}, codes.Unimplemented},
		{"invalid argument", func() error {
			_, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "x", Bundle: r.bundle("x", nil, podNetns), Checkpoint: "/cp"})
			return err
		}, codes.InvalidArgument},
	} {
		err := tc.call()
		if st, ok := grpcstatus.FromError(err); !ok || st.Code() != tc.code || st.Message() == "" {
			t.Errorf("%s: %v, want status %v with a message", tc.name, err, tc.code)
		}
	}
}

// hungAgent is a guest that stops answering once hang is set: its calls fail as the agent
// client's deadline makes them fail.
type hungAgent struct {
	*agent.Fake
	hang atomic.Bool
}

func (a *hungAgent) SignalProcess(ctx context.Context, r *api.SignalProcessRequest) (*api.Empty, error) {
	if a.hang.Load() {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return a.Fake.SignalProcess(ctx, r)
}

// runHangingPod runs pod1 with a container c1 on an agent that stops answering once its
// hang is set.
func runHangingPod(r *rig) *hungAgent {
	r.t.Helper()
	hung := &hungAgent{Fake: r.agent}
	r.wrapAgent = func(*agent.Fake) agentConn { return hung }
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	r.mustCreate("c1", workloadAnnotations("pod1"))
	r.mustStart("c1", "")
	return hung
}

// deadPodExits checks what follows a VM's death in pod1 with c1: containerd deletes the dead
// sandbox's task on its exit (255); the container's exit (255) follows.
func (r *rig) deadPodExits() {
	r.t.Helper()
	if w := r.wait("pod1", ""); w.ExitStatus != 255 {
		r.t.Errorf("pod1 exited %d, want 255", w.ExitStatus)
	}
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); err != nil {
		r.t.Fatal(err)
	}
	if w := r.wait("c1", ""); w.ExitStatus != 255 {
		r.t.Errorf("c1 exited %d, want 255", w.ExitStatus)
	}
}

func (a *hungAgent) Version(ctx context.Context, r *api.VersionRequest) (*api.VersionResponse, error) {
	if a.hang.Load() {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return a.Fake.Version(ctx, r)
}

// A guest that stops answering while nobody calls into it (a hung kernel) is found by the
// shim's pings: after three unanswered in a row the VM is stopped and the pod's processes are
// reported exited, the sandbox first, as after a VM's death; kubelet then makes the pod anew.
// A guest that answers is pinged and left alone.
func TestUnansweredPingsStopHungGuest(t *testing.T) {
	r := newRig(t)
	r.pingInterval = 100 * time.Millisecond
	hung := runHangingPod(r)
	time.Sleep(5 * r.pingInterval)
	if _, stopped, _ := r.vm.State(); stopped {
		t.Fatal("the shim stopped the VM of a guest that answers its pings")
	}
	pings := 0
	for _, c := range r.agent.Calls() {
		if c == "Version" {
			pings++
		}
	}
	if pings < 3 {
		t.Errorf("the agent answered %d Version calls in %v of pinging every %v", pings, 5*r.pingInterval, r.pingInterval)
	}
	start := time.Now()
	hung.hang.Store(true)
	for deadline := time.Now().Add(10 * r.pingInterval); ; time.Sleep(10 * time.Millisecond) {
		if _, stopped, _ := r.vm.State(); stopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the VM of a guest that answers no ping still runs after %v", time.Since(start))
		}
	}
	if took := time.Since(start); took < 3*r.pingInterval {
		t.Errorf("the VM was stopped %v after the guest stopped answering, before three pings could go unanswered", took)
	}
	r.deadPodExits()
}

// A SIGKILL the guest does not take (a frozen VM) stops the VM instead of failing, so
// StopPodSandbox, which needs every container's SIGKILL to succeed, can delete the pod; the
// containers are reported exited, the sandbox first, as after a VM's death.
func TestSIGKILLToHungGuestStopsVM(t *testing.T) {
	old := signalTimeout
	signalTimeout = 300 * time.Millisecond
	t.Cleanup(func() { signalTimeout = old })
	r := newRig(t)
	hung := runHangingPod(r)
	hung.hang.Store(true)

	ctx, cancel := context.WithTimeout(r.ctx, 3*signalTimeout)
	defer cancel()
	if _, err := r.svc.Kill(ctx, &taskAPI.KillRequest{ID: "c1", Signal: 15}); err == nil {
		t.Error("SIGTERM into a hung guest succeeded")
	}
	if _, stopped, _ := r.vm.State(); stopped {
		t.Fatal("a SIGTERM the guest did not take stopped the VM")
	}
	if _, err := r.svc.Kill(ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); err != nil {
		t.Fatalf("SIGKILL into a hung guest: %v", err)
	}
	if _, stopped, _ := r.vm.State(); !stopped {
		t.Fatal("the hung guest's VM still runs")
	}
	if _, err := r.svc.Kill(ctx, &taskAPI.KillRequest{ID: "pod1", Signal: 9}); err != nil {
		t.Fatalf("SIGKILL to the sandbox after its VM stopped: %v", err)
	}
	r.deadPodExits()
}

// A guest whose agent never answers (its kernel stopped on the way) gets the same: the create
// error says the agent failed and ends with the console's last lines.
func TestAgentNeverAnswersSaysWhy(t *testing.T) {
	r := newRig(t)
	r.beforeConnect = func(context.Context) error {
		if err := os.WriteFile(filepath.Join(r.stateDir, "pod1", "console.log"), []byte(oops), 0o600); err != nil {
			return err
		}
		return context.DeadlineExceeded
	}
	_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
	if err == nil || !strings.Contains(err.Error(), "guest agent: ") || !strings.Contains(err.Error(), "Kernel panic - not syncing") {
		t.Fatalf("create: %v, want the agent's failure and the end of the guest's console", err)
	}
	if left := stateLeft(r.stateDir); len(left) != 0 {
		t.Errorf("state left behind: %v", left)
	}
}

// The VM owner's filesystems are made ready on the host while its guest boots, not after the
// agent answers: the guest's boot is the host's idle time, and the owner's create is on the
// pod's path to ready.
func TestOwnerPreparedWhileGuestBoots(t *testing.T) {
	r := newRig(t)
	r.beforeConnect = func(ctx context.Context) error {
		if !r.preparedWithin("pod1", 5*time.Second) {
			return errors.New("the owner's filesystems were not prepared while the guest booted")
		}
		return nil
	}
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	if got := r.share.Prepared(); len(got) != 1 || got[0] != "pod1" {
		t.Fatalf("prepared: %v, want pod1 once", got)
	}
	var spec specs.Spec
	if err := json.Unmarshal(r.agent.Spec("pod1"), &spec); err != nil || spec.Root == nil || spec.Root.Path != filepath.Join(agent.GuestSharedDir, "pod1", "rootfs") {
		t.Fatalf("the guest's container spec: %+v (%v), want the prepared rootfs", spec.Root, err)
	}
	r.deleteSandbox("pod1")
}

// A guest that never answers after the owner was prepared ahead leaves nothing of it: its
// filesystems are released, and the share is closed.
func TestOwnerPreparedAheadReleasedWhenBootFails(t *testing.T) {
	r := newRig(t)
	r.beforeConnect = func(ctx context.Context) error {
		r.preparedWithin("pod1", 5*time.Second)
		return context.DeadlineExceeded
	}
	if _, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns); err == nil {
		t.Fatal("create of a guest that never answered succeeded")
	}
	if got := r.share.Prepared(); len(got) != 0 {
		t.Errorf("still prepared: %v", got)
	}
	if got := r.share.Released(); !slices.Contains(got, "pod1") {
		t.Errorf("released: %v, want pod1", got)
	}
	if !r.share.Closed() {
		t.Error("the share was not closed")
	}
	if left := stateLeft(r.stateDir); len(left) != 0 {
		t.Errorf("state left behind: %v", left)
	}
}

// preparedWithin reports whether the share has container id prepared within timeout.
func (r *rig) preparedWithin(id string, timeout time.Duration) bool {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if slices.Contains(r.share.Prepared(), id) {
			return true
		}
	}
	return false
}
