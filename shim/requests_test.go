package shim

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
)

func TestUpdateResizeCloseIOConnect(t *testing.T) {
	r := newRig(t)
	r.running()
	limit := int64(64 << 20)
	res, err := typeurl.MarshalAnyToProto(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}, CPU: &specs.LinuxCPU{Cpus: "0-3"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.svc.Update(r.ctx, &taskAPI.UpdateTaskRequest{ID: "c1", Resources: res}); err != nil {
		t.Fatal(err)
	}
	var sent specs.LinuxResources
	if err := json.Unmarshal(r.agent.Resources("c1"), &sent); err != nil || sent.Memory == nil || *sent.Memory.Limit != limit || sent.CPU.Cpus != "" {
		t.Errorf("the guest got resources %s (%v), want the memory limit and no host cpuset", r.agent.Resources("c1"), err)
	}
	if _, err := r.svc.Update(r.ctx, &taskAPI.UpdateTaskRequest{ID: "c1"}); err != nil {
		t.Errorf("update without resources: %v", err)
	}
	wrong, _ := typeurl.MarshalAnyToProto(&specs.Process{})
	if _, err := r.svc.Update(r.ctx, &taskAPI.UpdateTaskRequest{ID: "c1", Resources: wrong}); !errdefs.IsInvalidArgument(native(err)) {
		t.Errorf("update with a process spec: %v, want invalid argument", err)
	}
	if _, err := r.svc.Update(r.ctx, &taskAPI.UpdateTaskRequest{ID: "c1", Resources: &anypb.Any{TypeUrl: "nonsense"}}); !errdefs.IsInvalidArgument(native(err)) {
		t.Errorf("update with an unknown type: %v, want invalid argument", err)
	}

	if _, err := r.svc.ResizePty(r.ctx, &taskAPI.ResizePtyRequest{ID: "c1", Width: 80, Height: 24}); err != nil {
		t.Fatal(err)
	}
	if w, h := r.agent.PtySize("c1", ""); w != 80 || h != 24 {
		t.Errorf("pty %dx%d, want 80x24", w, h)
	}
	if _, err := r.svc.CloseIO(r.ctx, &taskAPI.CloseIORequest{ID: "c1", Stdin: true}); err != nil {
		t.Errorf("close stdin: %v", err)
	}
	if _, err := r.svc.CloseIO(r.ctx, &taskAPI.CloseIORequest{ID: "c1", ExecID: "nope"}); !errdefs.IsNotFound(native(err)) {
		t.Errorf("close stdin of an unknown exec: %v", err)
	}
	c, err := r.svc.Connect(r.ctx, &taskAPI.ConnectRequest{ID: "c1"})
	if err != nil || c.ShimPid != uint32(os.Getpid()) || c.TaskPid != r.state("c1", "").Pid {
		t.Errorf("connect: %+v %v", c, err)
	}
	for name, call := range map[string]func() error{
		"update": func() error { _, err := r.svc.Update(r.ctx, &taskAPI.UpdateTaskRequest{ID: "x"}); return err },
		"resize": func() error { _, err := r.svc.ResizePty(r.ctx, &taskAPI.ResizePtyRequest{ID: "x"}); return err },
		"pause":  func() error { _, err := r.svc.Pause(r.ctx, &taskAPI.PauseRequest{ID: "x"}); return err },
		"resume": func() error { _, err := r.svc.Resume(r.ctx, &taskAPI.ResumeRequest{ID: "x"}); return err },
		"exec":   func() error { _, err := r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: "x"}); return err },
		"kill":   func() error { _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "x"}); return err },
	} {
		if err := call(); !errdefs.IsNotFound(native(err)) {
			t.Errorf("%s of an unknown container: %v, want not found", name, err)
		}
	}
}

// An exec's Delete answers without waiting for the guest to forget the exec (CRI's ExecSync
// answers only after that Delete); a new exec of the same ID starts only once the guest has
// forgotten the old one, and the container is removed from the guest only after its execs.
func TestExecDeleteDoesNotWaitForTheGuest(t *testing.T) {
	r := newRig(t)
	r.running()
	exited := func(execID string) {
		t.Helper()
		r.mustExec("c1", execID)
		r.mustStart("c1", execID)
		r.agent.Exit("c1", execID, 0)
		r.wait("c1", execID)
	}
	deleteExec := func(execID string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		defer cancel()
		if _, err := r.svc.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1", ExecID: execID}); err != nil {
			t.Fatalf("delete of exec %s while the guest holds its removal: %v", execID, err)
		}
	}
	called := func(call string) bool { return slices.Contains(r.agent.Calls(), call) }
	gate := make(chan struct{})
	r.agent.RemoveGate = gate
	exited("e1")
	deleteExec("e1")

	r.mustExec("c1", "e1")
	started := make(chan error, 1)
	go func() {
		_, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"})
		started <- err
	}()
	select {
	case err := <-started:
		t.Fatalf("exec e1 again started before the guest forgot the first e1: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(gate)
	if err := <-started; err != nil {
		t.Fatalf("exec e1 again, once the guest forgot the first: %v", err)
	}
	r.agent.Exit("c1", "e1", 0)
	r.wait("c1", "e1")

	gate = make(chan struct{})
	r.agent.RemoveGate = gate
	deleteExec("e1")
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); err != nil {
		t.Fatal(err)
	}
	r.wait("c1", "")
	deleted := make(chan error, 1)
	go func() {
		_, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"})
		deleted <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if called("RemoveContainer c1") {
		t.Error("container c1 removed from the guest before its exec e1")
	}
	close(gate)
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	if !called("RemoveContainer c1") {
		t.Error("container c1 never removed from the guest")
	}
}

func TestExecLifecycle(t *testing.T) {
	r := newRig(t)
	r.running()
	if _, err := r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "bad"}); !errdefs.IsInvalidArgument(native(err)) {
		t.Errorf("exec without a spec: %v", err)
	}
	if _, err := r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "bad", Spec: &anypb.Any{Value: []byte("{")}}); !errdefs.IsInvalidArgument(native(err)) {
		t.Errorf("exec with a broken spec: %v", err)
	}
	r.mustExec("c1", "e1")
	if _, err := r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: execSpec(t)}); !errdefs.IsAlreadyExists(native(err)) {
		t.Errorf("second exec e1: %v", err)
	}
	// Killed before it started, it never runs.
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "c1", ExecID: "e1", Signal: 15}); err != nil {
		t.Fatal(err)
	}
	if w := r.wait("c1", "e1"); w.ExitStatus != 128+15 {
		t.Errorf("exec killed before start: exit %d, want 143", w.ExitStatus)
	}
	_, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"})
	wantFailedPrecondition(t, "start of a killed exec", err, "it is stopped; cannot start it")
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}

	// Deleted before it started: exit 137, and gone.
	r.mustExec("c1", "e2")
	d, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1", ExecID: "e2"})
	if err != nil || d.ExitStatus != killedBeforeStart {
		t.Errorf("delete of an exec never started: %v, exit %d", err, d.GetExitStatus())
	}
	if _, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: "c1", ExecID: "e2"}); !errdefs.IsNotFound(native(err)) {
		t.Errorf("deleted exec still known: %v", err)
	}

	// A guest that fails to start the exec (the agent then forgets it) leaves it created.
	r.mustExec("c1", "e3")
	r.agent.FailOn("ExecProcess", errors.New("exec format error"))
	if _, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e3"}); err == nil || !strings.Contains(err.Error(), "exec format error") {
		t.Errorf("start refused by the guest: %v", err)
	}
	r.agent.FailOn("ExecProcess", nil)
	if st := r.state("c1", "e3"); st.Status != task.Status_CREATED {
		t.Errorf("exec that failed to start is %v, want created", st.Status)
	}

	// Started, it runs until it exits; then a running exec of a dead init is reported first.
	// The guest creates and starts it in one call.
	r.mustStart("c1", "e3")
	for _, call := range r.agent.Calls() {
		if strings.HasPrefix(call, "StartProcess c1/e") || strings.HasPrefix(call, "RemoveProcess c1/e") {
			t.Errorf("agent call %q: an exec takes one ExecProcess, and one that failed to start is not removed", call)
		}
	}
	// Events reach containerd through a queue: wait for this one before counting.
	r.published("TaskExecStarted e3", func(e any) bool {
		x, ok := e.(*eventstypes.TaskExecStarted)
		return ok && x.ExecID == "e3"
	})
	var started []string
	for _, e := range r.pub.list() {
		if x, ok := e.(*eventstypes.TaskExecStarted); ok {
			started = append(started, x.ExecID)
		}
	}
	if sort.Strings(started); strings.Join(started, ",") != "e3" {
		t.Errorf("TaskExecStarted for %v, want [e3]", started)
	}
	r.agent.Exit("c1", "e3", 0)
	if w := r.wait("c1", "e3"); w.ExitStatus != 0 {
		t.Errorf("exec exit %d", w.ExitStatus)
	}
}
