package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	cgroupstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/podvm/podvm/agent/api"
)

// lrig is a Server on a fakeRuntime.
type lrig struct {
	t       *testing.T
	ctx     context.Context
	s       *Server
	rt      *fakeRuntime
	powered chan struct{}
}

func newLRig(t *testing.T) *lrig {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	rt := newFakeRuntime()
	r := &lrig{t: t, ctx: ctx, s: newServer(rt), rt: rt, powered: make(chan struct{})}
	r.s.powerOff = func() { close(r.powered) }
	return r
}

func specJSON(t *testing.T, args ...string) []byte {
	t.Helper()
	b, err := json.Marshal(&specs.Spec{Root: &specs.Root{Path: "/rootfs"}, Process: &specs.Process{Args: args}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func processJSON(t *testing.T, args ...string) []byte {
	t.Helper()
	b, err := json.Marshal(&specs.Process{Args: args})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// create makes and starts container id and returns the runtime's container.
func (r *lrig) create(id string, stdio *api.Stdio) *fakeContainer {
	r.t.Helper()
	resp, err := r.s.CreateContainer(r.ctx, &api.CreateContainerRequest{ContainerId: id, Spec: specJSON(r.t, "sh"), Stdio: stdio})
	if err != nil {
		r.t.Fatalf("create %s: %v", id, err)
	}
	c := r.rt.get(id)
	if c == nil || resp.Pid != uint32(c.init.pid) {
		r.t.Fatalf("create %s: pid %d, runtime has %v", id, resp.Pid, c)
	}
	if _, err := r.s.StartProcess(r.ctx, &api.ProcessRequest{ContainerId: id}); err != nil {
		r.t.Fatalf("start %s: %v", id, err)
	}
	return c
}

// exec adds and starts exec eid in container cid and returns the runtime's process.
func (r *lrig) exec(cid, eid string, stdio *api.Stdio) *fakeProcess {
	r.t.Helper()
	if _, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: cid, ExecId: eid, Process: processJSON(r.t, "true"), Stdio: stdio}); err != nil {
		r.t.Fatalf("exec %s: %v", eid, err)
	}
	resp, err := r.s.StartProcess(r.ctx, &api.ProcessRequest{ContainerId: cid, ExecId: eid})
	if err != nil {
		r.t.Fatalf("start exec %s: %v", eid, err)
	}
	c := r.rt.get(cid)
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.execs[len(c.execs)-1]
	if resp.Pid != uint32(p.pid) {
		r.t.Fatalf("exec %s: pid %d, runtime's is %d", eid, resp.Pid, p.pid)
	}
	return p
}

func (r *lrig) wait(cid, eid string) uint32 {
	r.t.Helper()
	resp, err := r.s.WaitProcess(r.ctx, &api.ProcessRequest{ContainerId: cid, ExecId: eid})
	if err != nil {
		r.t.Fatalf("wait %s/%s: %v", cid, eid, err)
	}
	if resp.ExitedAtUnixNano == 0 {
		r.t.Errorf("wait %s/%s: no exit time", cid, eid)
	}
	return resp.ExitStatus
}

func (r *lrig) read(cid, eid string) (string, bool) {
	r.t.Helper()
	resp, err := r.s.ReadStdio(r.ctx, &api.ReadStdioRequest{ContainerId: cid, ExecId: eid, Stream: api.StdioStream_STDOUT})
	if err != nil {
		r.t.Fatalf("read %s/%s: %v", cid, eid, err)
	}
	return string(resp.Data), resp.Eof
}

// code is the status code the host sees for err (what the agent's interceptor sends).
func code(err error) codes.Code {
	return status.Code(errgrpc.ToGRPC(err))
}

func TestContainerLifecycle(t *testing.T) {
	r := newLRig(t)
	c := r.create("c1", &api.Stdio{Stdout: true})
	if _, err := c.init.out.WriteString("hello"); err != nil {
		t.Fatal(err)
	}
	if got, eof := r.read("c1", ""); got != "hello" || eof {
		t.Fatalf("init stdout = %q, eof=%v", got, eof)
	}

	e := r.exec("c1", "e1", &api.Stdio{Stdin: true, Stdout: true})
	if _, err := r.s.WriteStdin(r.ctx, &api.WriteStdinRequest{ContainerId: "c1", ExecId: "e1", Data: []byte("in")}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.s.CloseStdin(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e1"}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	if n, _ := e.in.Read(buf); string(buf[:n]) != "in" {
		t.Fatalf("exec read %q from stdin", buf[:n])
	}
	if n, err := e.in.Read(buf); n != 0 || err == nil {
		t.Fatalf("stdin after CloseStdin: %d bytes, %v; want EOF", n, err)
	}
	ps, err := r.s.ListProcesses(r.ctx, &api.ContainerRequest{ContainerId: "c1"})
	if err != nil || len(ps.Processes) != 2 || ps.Processes[1].ExecId != "e1" || ps.Processes[1].Pid != uint32(e.pid) {
		t.Fatalf("processes = %v, %v", ps, err)
	}
	if _, err := r.s.RemoveProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e1"}); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("remove a running exec: %v, want failed precondition", err)
	}
	if _, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: "c1", ExecId: "e1", Signal: uint32(unix.SIGTERM)}); err != nil {
		t.Fatal(err)
	}
	if st := r.wait("c1", "e1"); st != 128+uint32(unix.SIGTERM) {
		t.Fatalf("exec status %d", st)
	}
	if _, eof := r.read("c1", "e1"); !eof {
		t.Fatal("exec stdout not at EOF after its exit")
	}
	if _, err := r.s.RemoveProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.s.WaitProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e1"}); !errdefs.IsNotFound(err) {
		t.Fatalf("wait for a removed exec: %v", err)
	}
	r.killAndRemove("c1")
}

// killAndRemove kills a container's init, waits for it and removes the container.
func (r *lrig) killAndRemove(id string) {
	r.t.Helper()
	if _, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: id, Signal: uint32(unix.SIGKILL)}); err != nil {
		r.t.Fatal(err)
	}
	if st := r.wait(id, ""); st != 137 {
		r.t.Fatalf("%s: init status %d, want 137", id, st)
	}
	if _, err := r.s.RemoveContainer(r.ctx, &api.RemoveContainerRequest{ContainerId: id}); err != nil {
		r.t.Fatal(err)
	}
	if r.rt.get(id) != nil {
		r.t.Fatalf("%s: runtime still holds it", id)
	}
	if _, err := r.s.Stats(r.ctx, &api.ContainerRequest{ContainerId: id}); !errdefs.IsNotFound(err) {
		r.t.Fatalf("%s after remove: %v, want not found", id, err)
	}
}

func TestSignalAllAndForceRemove(t *testing.T) {
	r := newLRig(t)
	r.create("c1", nil)
	e := r.exec("c1", "e1", nil)
	if _, err := r.s.RemoveContainer(r.ctx, &api.RemoveContainerRequest{ContainerId: "c1"}); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("remove a running container: %v, want failed precondition", err)
	}
	if _, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: "c1", Signal: uint32(unix.SIGTERM), All: true}); err != nil {
		t.Fatal(err)
	}
	if !e.exited() || r.wait("c1", "") != 143 {
		t.Fatal("signal all did not reach every process")
	}
	// A second container is removed with force while it runs.
	c2 := r.create("c2", nil)
	r.exec("c2", "e1", &api.Stdio{Stdout: true})
	if _, err := r.s.RemoveContainer(r.ctx, &api.RemoveContainerRequest{ContainerId: "c2", Force: true}); err != nil {
		t.Fatal(err)
	}
	if !c2.init.exited() || r.rt.get("c2") != nil {
		t.Fatal("force remove left the container")
	}
}

func TestPauseResume(t *testing.T) {
	r := newLRig(t)
	c := r.create("c1", nil)
	req := &api.ContainerRequest{ContainerId: "c1"}
	if _, err := r.s.PauseContainer(r.ctx, req); err != nil || !c.isPaused() {
		t.Fatalf("pause: %v, paused=%v", err, c.isPaused())
	}
	if _, err := r.s.PauseContainer(r.ctx, req); code(err) != codes.FailedPrecondition {
		t.Fatalf("pause twice: %v, want FailedPrecondition", err)
	}
	if _, err := r.s.ResumeContainer(r.ctx, req); err != nil || c.isPaused() {
		t.Fatalf("resume: %v, paused=%v", err, c.isPaused())
	}
	if _, err := r.s.ResumeContainer(r.ctx, req); code(err) != codes.FailedPrecondition {
		t.Fatalf("resume a running container: %v, want FailedPrecondition", err)
	}
	for _, call := range []func(context.Context, *api.ContainerRequest) (*api.Empty, error){r.s.PauseContainer, r.s.ResumeContainer} {
		if _, err := call(r.ctx, &api.ContainerRequest{ContainerId: "nope"}); code(err) != codes.NotFound {
			t.Errorf("pause/resume of an unknown container: %v", err)
		}
	}
}

func TestStatsAndUpdate(t *testing.T) {
	r := newLRig(t)
	c := r.create("c1", nil)
	r.exec("c1", "e1", nil)
	resp, err := r.s.Stats(r.ctx, &api.ContainerRequest{ContainerId: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	var m cgroupstats.Metrics
	if err := proto.Unmarshal(resp.Cgroup2Metrics, &m); err != nil || m.Pids.GetCurrent() != 2 {
		t.Fatalf("stats: %v, pids %d", err, m.Pids.GetCurrent())
	}
	limit := int64(64 << 20)
	res, _ := json.Marshal(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})
	if _, err := r.s.UpdateContainer(r.ctx, &api.UpdateContainerRequest{ContainerId: "c1", Resources: res}); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	got := c.resources
	c.mu.Unlock()
	if got == nil || got.Memory == nil || *got.Memory.Limit != limit {
		t.Fatalf("runtime got resources %+v", got)
	}
	if _, err := r.s.UpdateContainer(r.ctx, &api.UpdateContainerRequest{ContainerId: "c1", Resources: []byte("{")}); code(err) != codes.InvalidArgument {
		t.Fatalf("update with bad JSON: %v", err)
	}
}

func TestOOMEventDelivery(t *testing.T) {
	r := newLRig(t)
	c1 := r.create("c1", nil)
	c2 := r.create("c2", nil)
	c2.oom()
	c1.oom()
	for _, want := range []string{"c2", "c1"} {
		ev, err := r.s.GetOOMEvent(r.ctx, &api.Empty{})
		if err != nil || ev.ContainerId != want {
			t.Fatalf("oom event = %v, %v; want %s", ev, err, want)
		}
	}
	// A burst beyond the queue does not block the watcher; the host still learns of it.
	for i := 0; i < 3*cap(r.s.oom); i++ {
		c1.oom()
	}
	if ev, err := r.s.GetOOMEvent(r.ctx, &api.Empty{}); err != nil || ev.ContainerId != "c1" {
		t.Fatalf("after a burst: %v, %v", ev, err)
	}
	// No OOM watch is not a failed create.
	r.rt.failOn(opWatchOOM, errors.New("no memory.events"))
	r.create("c3", nil)
}

func TestTerminal(t *testing.T) {
	r := newLRig(t)
	c := r.create("t1", &api.Stdio{Terminal: true, Stdin: true, Stdout: true, Width: 80, Height: 24})
	if _, err := r.s.ResizePty(r.ctx, &api.ResizePtyRequest{ContainerId: "t1", Width: 100, Height: 40}); err != nil {
		t.Fatal(err)
	}
	ws, err := unix.IoctlGetWinsize(int(c.init.out.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col != 100 || ws.Row != 40 {
		t.Fatalf("terminal size %+v, %v; want 100x40", ws, err)
	}
	if _, err := c.init.out.WriteString("prompt$ "); err != nil {
		t.Fatal(err)
	}
	if got, _ := r.read("t1", ""); got != "prompt$ " {
		t.Fatalf("terminal output %q", got)
	}
	if _, err := r.s.CloseStdin(r.ctx, &api.ProcessRequest{ContainerId: "t1"}); err != nil {
		t.Fatalf("CloseStdin of a terminal: %v", err)
	}
	if _, err := r.s.ResizePty(r.ctx, &api.ResizePtyRequest{ContainerId: "nope"}); code(err) != codes.NotFound {
		t.Fatalf("resize of an unknown container: %v", err)
	}
	r.killAndRemove("t1")
}

func TestConcurrentCreateDeleteOfDifferentIDs(t *testing.T) {
	r := newLRig(t)
	var wg sync.WaitGroup
	errc := make(chan error, 32)
	for i := 0; i < 32; i++ {
		id := fmt.Sprintf("c%d", i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- r.createAndForceRemove(id)
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Error(err)
		}
	}
	if n := r.rt.count(); n != 0 {
		t.Fatalf("%d containers left in the runtime", n)
	}
	if len(r.s.containers) != 0 {
		t.Fatalf("%d containers left in the server", len(r.s.containers))
	}
}

func (r *lrig) createAndForceRemove(id string) error {
	if _, err := r.s.CreateContainer(r.ctx, &api.CreateContainerRequest{ContainerId: id, Spec: specJSON(r.t, "sh")}); err != nil {
		return err
	}
	if _, err := r.s.StartProcess(r.ctx, &api.ProcessRequest{ContainerId: id}); err != nil {
		return err
	}
	if _, err := r.s.Stats(r.ctx, &api.ContainerRequest{ContainerId: id}); err != nil {
		return err
	}
	_, err := r.s.RemoveContainer(r.ctx, &api.RemoveContainerRequest{ContainerId: id, Force: true})
	return err
}

// TestConcurrentCreateOfOneID holds a create in the runtime and checks what other calls for
// that id see meanwhile: a second create is refused, every other call finds nothing.
func TestConcurrentCreateOfOneID(t *testing.T) {
	r := newLRig(t)
	inCreate, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	r.rt.beforeCreate = func(string) {
		once.Do(func() {
			close(inCreate)
			<-release
		})
	}
	first := make(chan error, 1)
	go func() {
		_, err := r.s.CreateContainer(r.ctx, &api.CreateContainerRequest{ContainerId: "c1", Spec: specJSON(t, "sh")})
		first <- err
	}()
	<-inCreate
	if _, err := r.s.CreateContainer(r.ctx, &api.CreateContainerRequest{ContainerId: "c1", Spec: specJSON(t, "sh")}); code(err) != codes.AlreadyExists {
		t.Errorf("second create while the first runs: %v, want AlreadyExists", err)
	}
	if _, err := r.s.RemoveContainer(r.ctx, &api.RemoveContainerRequest{ContainerId: "c1", Force: true}); code(err) != codes.NotFound {
		t.Errorf("remove while being created: %v, want NotFound", err)
	}
	if _, err := r.s.WaitProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1"}); code(err) != codes.NotFound {
		t.Errorf("wait while being created: %v, want NotFound", err)
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatalf("the first create failed: %v", err)
	}
	if _, err := r.s.CreateContainer(r.ctx, &api.CreateContainerRequest{ContainerId: "c1", Spec: specJSON(t, "sh")}); code(err) != codes.AlreadyExists {
		t.Errorf("create of an existing id: %v, want AlreadyExists", err)
	}
}

// TestRemoveSandboxWithWorkloadsLeft removes the pod's first (sandbox) container while
// workloads run: they stay usable, and Shutdown then kills them all and powers off.
func TestRemoveSandboxWithWorkloadsLeft(t *testing.T) {
	r := newLRig(t)
	r.create("pod", nil)
	w1 := r.create("w1", nil)
	w2 := r.create("w2", nil)
	if _, err := r.s.RemoveContainer(r.ctx, &api.RemoveContainerRequest{ContainerId: "pod", Force: true}); err != nil {
		t.Fatal(err)
	}
	e := r.exec("w1", "e1", nil)
	if _, err := r.s.Stats(r.ctx, &api.ContainerRequest{ContainerId: "w2"}); err != nil {
		t.Fatalf("a workload after its sandbox went: %v", err)
	}
	if _, err := r.s.Shutdown(r.ctx, &api.Empty{}); err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]*fakeProcess{"w1": w1.init, "w2": w2.init, "w1 exec": e} {
		select {
		case <-p.done:
		case <-r.ctx.Done():
			t.Fatalf("%s still runs after Shutdown", name)
		}
	}
	select {
	case <-r.powered:
	case <-r.ctx.Done():
		t.Fatal("Shutdown did not power off")
	}
}

// TestRuntimeErrorsSurface checks that a failing runtime call reaches the host with the
// code its errdefs class names (Unknown for an unclassified error), and leaves the server
// consistent: a failed create frees its id, a failed exec start is an exited exec.
func TestRuntimeErrorsSurface(t *testing.T) {
	plain := errors.New("runtime broke")
	for _, tc := range []struct {
		op   string
		err  error
		want codes.Code
		call func(r *lrig) error
	}{
		{opCreate, fmt.Errorf("exists: %w", errdefs.ErrAlreadyExists), codes.AlreadyExists, createC1},
		{opCreate, plain, codes.Unknown, createC1},
		{opPid, plain, codes.Unknown, createC1},
		{opStart, fmt.Errorf("not created: %w", errdefs.ErrFailedPrecondition), codes.FailedPrecondition, func(r *lrig) error {
			if err := createC1(r); err != nil {
				return err
			}
			_, err := r.s.StartProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1"})
			return err
		}},
		{opExec, plain, codes.Unknown, startExec},
		{opSignalAll, fmt.Errorf("cgroup: %w", errdefs.ErrNotFound), codes.NotFound, func(r *lrig) error {
			r.create("c1", nil)
			_, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: "c1", Signal: 9, All: true})
			return err
		}},
		{opProcesses, plain, codes.Unknown, containerCall((*Server).ListProcesses)},
		{opPause, fmt.Errorf("frozen: %w", errdefs.ErrUnavailable), codes.Unavailable, containerCall((*Server).PauseContainer)},
		{opResume, plain, codes.Unknown, containerCall((*Server).ResumeContainer)},
		{opStats, plain, codes.Unknown, containerCall((*Server).Stats)},
		{opUpdate, fmt.Errorf("bad limit: %w", errdefs.ErrInvalidArgument), codes.InvalidArgument, func(r *lrig) error {
			r.create("c1", nil)
			_, err := r.s.UpdateContainer(r.ctx, &api.UpdateContainerRequest{ContainerId: "c1", Resources: []byte("{}")})
			return err
		}},
	} {
		t.Run(fmt.Sprintf("%s %v", tc.op, tc.want), func(t *testing.T) {
			r := newLRig(t)
			r.rt.failOn(tc.op, tc.err)
			err := tc.call(r)
			if !errors.Is(err, tc.err) || code(err) != tc.want {
				t.Fatalf("err = %v (code %v), want %v wrapping %v", err, code(err), tc.want, tc.err)
			}
			r.rt.failOn(tc.op, nil)
			if tc.op == opCreate || tc.op == opPid {
				r.create("c1", nil) // the id is free again
				if tc.op == opPid && r.rt.count() != 1 {
					t.Fatal("a create that failed after the runtime made it left the container")
				}
			}
			if tc.op == opExec {
				if st := r.wait("c1", "e1"); st != 255 {
					t.Fatalf("an exec that failed to start has status %d, want 255", st)
				}
			}
		})
	}
}

func createC1(r *lrig) error {
	_, err := r.s.CreateContainer(r.ctx, &api.CreateContainerRequest{ContainerId: "c1", Spec: specJSON(r.t, "sh")})
	return err
}

func startExec(r *lrig) error {
	r.create("c1", nil)
	if _, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c1", ExecId: "e1", Process: processJSON(r.t, "true")}); err != nil {
		return err
	}
	_, err := r.s.StartProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e1"})
	return err
}

func containerCall[T any](call func(*Server, context.Context, *api.ContainerRequest) (T, error)) func(*lrig) error {
	return func(r *lrig) error {
		r.create("c1", nil)
		_, err := call(r.s, r.ctx, &api.ContainerRequest{ContainerId: "c1"})
		return err
	}
}

// TestRequestErrors checks the server's own refusals and their codes.
func TestRequestErrors(t *testing.T) {
	r := newLRig(t)
	r.create("c1", nil)
	r.exec("c1", "e1", nil)
	for name, tc := range map[string]struct {
		call func() error
		want codes.Code
	}{
		"start twice": {func() error {
			_, err := r.s.StartProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1"})
			return err
		}, codes.FailedPrecondition},
		"exec id taken": {func() error {
			_, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c1", ExecId: "e1", Process: processJSON(t, "true")})
			return err
		}, codes.AlreadyExists},
		"exec without id": {func() error {
			_, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c1", Process: processJSON(t, "true")})
			return err
		}, codes.InvalidArgument},
		"exec bad JSON": {func() error {
			_, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c1", ExecId: "e2", Process: []byte("{")})
			return err
		}, codes.InvalidArgument},
		"exec without args": {func() error {
			_, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c1", ExecId: "e2", Process: []byte("{}")})
			return err
		}, codes.InvalidArgument},
		"unknown exec": {func() error {
			_, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: "c1", ExecId: "nope", Signal: 9})
			return err
		}, codes.NotFound},
		"remove the init as a process": {func() error {
			_, err := r.s.RemoveProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1"})
			return err
		}, codes.InvalidArgument},
		"read an unknown stream": {func() error {
			_, err := r.s.ReadStdio(r.ctx, &api.ReadStdioRequest{ContainerId: "c1"})
			return err
		}, codes.InvalidArgument},
		"read stdout nobody asked for": {func() error {
			_, err := r.s.ReadStdio(r.ctx, &api.ReadStdioRequest{ContainerId: "c1", Stream: api.StdioStream_STDOUT})
			return err
		}, codes.NotFound},
		"write stdin nobody asked for": {func() error {
			_, err := r.s.WriteStdin(r.ctx, &api.WriteStdinRequest{ContainerId: "c1", Data: []byte("x")})
			return err
		}, codes.FailedPrecondition},
		"resize without a terminal": {func() error {
			_, err := r.s.ResizePty(r.ctx, &api.ResizePtyRequest{ContainerId: "c1", Width: 1, Height: 1})
			return err
		}, codes.FailedPrecondition},
	} {
		if err := tc.call(); code(err) != tc.want {
			t.Errorf("%s: %v (code %v), want %v", name, err, code(err), tc.want)
		}
	}
}

// TestExecStartedInOneCall: ExecProcess with start runs the exec at once; one that cannot
// start is forgotten, so its ID is free again and nothing is left to remove.
func TestExecStartedInOneCall(t *testing.T) {
	r := newLRig(t)
	r.create("c1", nil)
	execStart := func(eid string) error {
		_, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c1", ExecId: eid, Process: processJSON(t, "true"), Start: true})
		return err
	}
	if err := execStart("e1"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.s.StartProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e1"}); code(err) != codes.FailedPrecondition {
		t.Errorf("StartProcess of an exec started with ExecProcess: %v, want FailedPrecondition", err)
	}
	c := r.rt.get("c1")
	c.mu.Lock()
	p := c.execs[len(c.execs)-1]
	c.mu.Unlock()
	_ = p.Signal(unix.SIGTERM)
	if st := r.wait("c1", "e1"); st != 128+15 {
		t.Errorf("exec exit %d, want 143", st)
	}
	if _, err := r.s.RemoveProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e1"}); err != nil {
		t.Fatal(err)
	}

	r.rt.failOn(opExec, errors.New("exec format error"))
	if err := execStart("e2"); err == nil || !strings.Contains(err.Error(), "exec format error") {
		t.Errorf("exec that cannot start: %v", err)
	}
	for name, err := range map[string]error{
		"wait": func() error {
			_, err := r.s.WaitProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e2"})
			return err
		}(),
		"remove": func() error {
			_, err := r.s.RemoveProcess(r.ctx, &api.ProcessRequest{ContainerId: "c1", ExecId: "e2"})
			return err
		}(),
	} {
		if code(err) != codes.NotFound {
			t.Errorf("%s of an exec that could not start: %v, want NotFound", name, err)
		}
	}
	r.rt.failOn(opExec, nil)
	if err := execStart("e2"); err != nil {
		t.Errorf("the ID of an exec that could not start, again: %v", err)
	}
}

// TestExecLifecycleEdges covers an exec signalled before its start, one started in a dead
// container, and signals to processes that already exited.
func TestExecLifecycleEdges(t *testing.T) {
	r := newLRig(t)
	r.create("c1", nil)
	if _, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c1", ExecId: "e1", Process: processJSON(t, "true")}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: "c1", ExecId: "e1", Signal: 15}); code(err) != codes.FailedPrecondition {
		t.Errorf("signal an exec not started: %v, want FailedPrecondition", err)
	}
	r.killAndRemove("c1")

	r.create("c2", nil)
	if _, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: "c2", Signal: 9}); err != nil {
		t.Fatal(err)
	}
	r.wait("c2", "")
	if _, err := r.s.SignalProcess(r.ctx, &api.SignalProcessRequest{ContainerId: "c2", Signal: 9}); code(err) != codes.NotFound {
		t.Errorf("signal an exited init: %v, want NotFound", err)
	}
	if _, err := r.s.ExecProcess(r.ctx, &api.ExecProcessRequest{ContainerId: "c2", ExecId: "e1", Process: processJSON(t, "true")}); code(err) != codes.FailedPrecondition {
		t.Errorf("exec in an exited container: %v, want FailedPrecondition", err)
	}
	ctx, cancel := context.WithCancel(r.ctx)
	cancel()
	r.create("c3", nil)
	if _, err := r.s.WaitProcess(ctx, &api.ProcessRequest{ContainerId: "c3"}); !errors.Is(err, context.Canceled) {
		t.Errorf("wait with an ended context: %v", err)
	}
	// A destroy failure is logged, not returned: the container is gone for the host.
	r.rt.failOn(opDestroy, errors.New("busy"))
	if _, err := r.s.RemoveContainer(r.ctx, &api.RemoveContainerRequest{ContainerId: "c2"}); err != nil {
		t.Errorf("remove with a failing destroy: %v", err)
	}
}

// specSysctls is the sysctls of the spec in b.
func specSysctls(t *testing.T, b []byte) map[string]string {
	t.Helper()
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	if spec.Linux == nil {
		return nil
	}
	return spec.Linux.Sysctl
}

// fakeProcSys is a /proc/sys with a file for each sysctl of the spec in b: the agent writes
// the pod's net.* sysctls there, and a unit test must not set the host's.
func fakeProcSys(t *testing.T, b []byte) string {
	t.Helper()
	dir := t.TempDir()
	for k := range specSysctls(t, b) {
		p := filepath.Join(dir, strings.ReplaceAll(k, ".", "/"))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// checkNetSysctls checks that the net.* sysctls of the spec in b were written in procSys.
func checkNetSysctls(t *testing.T, procSys string, b []byte) {
	t.Helper()
	for k, v := range specSysctls(t, b) {
		if !strings.HasPrefix(k, "net.") {
			continue
		}
		got, err := os.ReadFile(filepath.Join(procSys, strings.ReplaceAll(k, ".", "/")))
		if err != nil || string(got) != v {
			t.Errorf("sysctl %s: %q, %v; want %q", k, got, err, v)
		}
	}
}

// A create sent alongside the guest's setup (the VM owner's container) is made at once only if
// it is a pod sandbox that a holder keeps; anything else waits for SetupSandbox, and fails if
// the setup failed.
func TestCreateAlongsideSetup(t *testing.T) {
	sandboxSpec := func(sysctl map[string]string) []byte {
		b, err := json.Marshal(&specs.Spec{Root: &specs.Root{Path: "/rootfs"}, Process: &specs.Process{Args: []string{"pause"}},
			Annotations: map[string]string{annotationContainerType: containerTypeSandbox},
			Linux:       &specs.Linux{Sysctl: sysctl, Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}}}})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name     string
		spec     []byte
		waits    bool
		setupErr error
	}{
		{"held sandbox", sandboxSpec(map[string]string{"kernel.shm_rmid_forced": "1"}), false, nil},
		// containerd's CRI gives every pod these two (enable_unprivileged_ports and _icmp).
		{"sandbox with netns-wide sysctls", sandboxSpec(map[string]string{
			"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647"}), false, nil},
		{"sandbox with a NIC's sysctl", sandboxSpec(map[string]string{"net.ipv4.conf.eth0.forwarding": "1"}), true, nil},
		// default.* applies to NICs made after it is written: runc's pod has its NIC by then.
		{"sandbox with a default NIC sysctl", sandboxSpec(map[string]string{"net.ipv6.conf.default.accept_ra": "0"}), true, nil},
		{"sandbox with a neighbour table sysctl", sandboxSpec(map[string]string{"net.ipv4.neigh.eth0.gc_stale_time": "60"}), true, nil},
		{"container", specJSON(t, "sh"), true, nil},
		{"container, setup fails", specJSON(t, "sh"), true, errors.New("mount virtio-fs: no such device")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newLRig(t)
			r.s.procSys = fakeProcSys(t, tc.spec)
			release := make(chan struct{})
			r.s.setup = func(context.Context, *api.SetupSandboxRequest) error {
				<-release
				return tc.setupErr
			}
			created := make(chan error, 1)
			go func() {
				_, err := r.s.CreateContainer(r.ctx, &api.CreateContainerRequest{ContainerId: "c1", Spec: tc.spec, AlongsideSetup: true})
				created <- err
			}()
			setupErr := make(chan error, 1)
			go func() {
				_, err := r.s.SetupSandbox(r.ctx, &api.SetupSandboxRequest{})
				setupErr <- err
			}()
			select {
			case err := <-created:
				if tc.waits {
					t.Fatalf("created before the setup ended: %v", err)
				}
				if err != nil {
					t.Fatalf("create: %v", err)
				}
			case <-time.After(200 * time.Millisecond):
				if !tc.waits {
					t.Fatal("the create waited for the setup")
				}
			}
			close(release)
			if err := <-setupErr; (err != nil) != (tc.setupErr != nil) {
				t.Fatalf("setup: %v, want %v", err, tc.setupErr)
			}
			if !tc.waits {
				checkNetSysctls(t, r.s.procSys, tc.spec)
				return
			}
			err := <-created
			if tc.setupErr == nil && err != nil {
				t.Fatalf("create after the setup: %v", err)
			}
			if tc.setupErr == nil {
				checkNetSysctls(t, r.s.procSys, tc.spec)
			}
			if tc.setupErr != nil {
				if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "no such device") {
					t.Fatalf("create after a failed setup: %v, want failed precondition with the setup's error", err)
				}
				if r.rt.get("c1") != nil {
					t.Error("the container was made although the guest's setup failed")
				}
			}
		})
	}
}
