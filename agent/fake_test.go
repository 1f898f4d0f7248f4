package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/agent/api"
)

// TestFakeServesEveryRPC calls every method of api.AgentService on the fake, found by
// reflection, so an RPC added to the proto without a fake behaviour fails here. Each call
// must return without panicking, be recorded, and fail with what FailOn injected.
func TestFakeServesEveryRPC(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	iface := reflect.TypeOf((*api.AgentService)(nil)).Elem()
	if iface.NumMethod() == 0 {
		t.Fatal("api.AgentService has no methods")
	}
	injected := errors.New("injected")
	for i := 0; i < iface.NumMethod(); i++ {
		m := iface.Method(i)
		t.Run(m.Name, func(t *testing.T) {
			f := NewFake()
			defer f.Close()
			// A short deadline: calls that wait for an event (WaitProcess, GetOOMEvent …)
			// end with it rather than hang.
			cctx, ccancel := context.WithTimeout(ctx, 20*time.Millisecond)
			defer ccancel()
			_ = callRPC(cctx, t, f, m) // success or a typed error; no panic
			if calls := f.Calls(); len(calls) == 0 || !strings.HasPrefix(calls[len(calls)-1], m.Name) {
				t.Errorf("%s was not recorded: %q", m.Name, calls)
			}
			f.FailOn(m.Name, injected)
			if err := callRPC(ctx, t, f, m); !errors.Is(err, injected) {
				t.Errorf("%s with an injected error returned %v", m.Name, err)
			}
			f.FailOn(m.Name, nil)
		})
	}
}

// callRPC calls method m of f with a zero request of its type and returns its error.
func callRPC(ctx context.Context, t *testing.T, f *Fake, m reflect.Method) error {
	t.Helper()
	meth := reflect.ValueOf(f).MethodByName(m.Name)
	if !meth.IsValid() {
		t.Fatalf("Fake has no method %s", m.Name)
	}
	req := reflect.New(m.Type.In(1).Elem())
	out := meth.Call([]reflect.Value{reflect.ValueOf(ctx), req})
	if len(out) != 2 {
		t.Fatalf("%s returns %d values", m.Name, len(out))
	}
	err, _ := out[1].Interface().(error)
	if err == nil && out[0].IsNil() {
		t.Errorf("%s returned neither a reply nor an error", m.Name)
	}
	return err
}

func TestFakeProcessLifecycle(t *testing.T) {
	ctx := context.Background()
	f := NewFake()
	if _, err := f.CreateContainer(ctx, &api.CreateContainerRequest{ContainerId: "c"}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.CreateContainer(ctx, &api.CreateContainerRequest{ContainerId: "c"}); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second create: %v, want already exists", err)
	}
	if _, err := f.ExecProcess(ctx, &api.ExecProcessRequest{ContainerId: "nope", ExecId: "e"}); !errdefs.IsNotFound(err) {
		t.Fatalf("exec in unknown container: %v", err)
	}
	if _, err := f.ExecProcess(ctx, &api.ExecProcessRequest{ContainerId: "c", ExecId: "e"}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.StartProcess(ctx, &api.ProcessRequest{ContainerId: "c", ExecId: "e"}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ResizePty(ctx, &api.ResizePtyRequest{ContainerId: "c", ExecId: "e", Width: 80, Height: 24}); err != nil {
		t.Fatal(err)
	}
	if w, h := f.PtySize("c", "e"); w != 80 || h != 24 {
		t.Errorf("pty size %dx%d", w, h)
	}
	if _, err := f.WriteStdin(ctx, &api.WriteStdinRequest{ContainerId: "c", ExecId: "e", Data: []byte("hi")}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.CloseStdin(ctx, &api.ProcessRequest{ContainerId: "c", ExecId: "e"}); err != nil {
		t.Fatal(err)
	}
	if in, closed := f.Stdin("c", "e"); string(in) != "hi" || !closed {
		t.Errorf("stdin %q closed=%v", in, closed)
	}
	if _, err := f.WriteStdin(ctx, &api.WriteStdinRequest{ContainerId: "c", ExecId: "e", Data: []byte("x")}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("write after close: %v", err)
	}
	if _, err := f.SignalProcess(ctx, &api.SignalProcessRequest{ContainerId: "c", ExecId: "e", Signal: 9}); err != nil {
		t.Fatal(err)
	}
	w, err := f.WaitProcess(ctx, &api.ProcessRequest{ContainerId: "c", ExecId: "e"})
	if err != nil || w.ExitStatus != 137 {
		t.Fatalf("wait = %v, %v; want 137", w, err)
	}
	if _, err := f.SignalProcess(ctx, &api.SignalProcessRequest{ContainerId: "c", ExecId: "e", Signal: 9}); !errdefs.IsNotFound(err) {
		t.Errorf("signal of an exited process: %v", err)
	}
	for _, call := range []func() (*api.Empty, error){
		func() (*api.Empty, error) { return f.PauseContainer(ctx, &api.ContainerRequest{ContainerId: "c"}) },
		func() (*api.Empty, error) { return f.PauseContainer(ctx, &api.ContainerRequest{ContainerId: "c"}) },
	} {
		if _, err := call(); err != nil {
			t.Fatal(err)
		}
	}
	if !f.Paused("c") {
		t.Error("not paused")
	}
	if _, err := f.ResumeContainer(ctx, &api.ContainerRequest{ContainerId: "c"}); err != nil || f.Paused("c") {
		t.Errorf("resume: %v, paused=%v", err, f.Paused("c"))
	}
	if _, err := f.UpdateContainer(ctx, &api.UpdateContainerRequest{ContainerId: "c", Resources: []byte(`{}`)}); err != nil || string(f.Resources("c")) != "{}" {
		t.Errorf("update: %v, resources %q", err, f.Resources("c"))
	}
	if _, err := f.RemoveContainer(ctx, &api.RemoveContainerRequest{ContainerId: "c"}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.PauseContainer(ctx, &api.ContainerRequest{ContainerId: "c"}); !errdefs.IsNotFound(err) {
		t.Errorf("pause after remove: %v", err)
	}
}

func TestFakeOOMAndShutdown(t *testing.T) {
	ctx := context.Background()
	f := NewFake()
	f.OOM("c1")
	if ev, err := f.GetOOMEvent(ctx, &api.Empty{}); err != nil || ev.ContainerId != "c1" {
		t.Fatalf("oom = %v, %v", ev, err)
	}
	if _, err := f.Shutdown(ctx, &api.Empty{}); err != nil || !f.IsShutdown() {
		t.Fatalf("shutdown: %v", err)
	}
	f.Close()
	if _, err := f.GetOOMEvent(ctx, &api.Empty{}); err == nil {
		t.Fatal("GetOOMEvent after Close returned no error")
	}
	<-f.Done()
}

func TestFakePortForward(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		_, _ = c.Write(append(b, '!'))
	}()
	f := NewFake()
	pc, err := DialPort(ctx, f, uint32(l.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pc.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if err := pc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(pc)
	if err != nil || string(got) != "ping!" {
		t.Fatalf("read %q, %v", got, err)
	}
	if err := pc.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadConn(ctx, &api.ReadConnRequest{ConnId: pc.ID()}); !errdefs.IsNotFound(err) {
		t.Errorf("read after close: %v", err)
	}
	if _, err := f.DialPort(ctx, &api.DialPortRequest{Port: 70000}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("port 70000: %v", err)
	}
	free, _ := net.Listen("tcp4", "127.0.0.1:0")
	port := uint32(free.Addr().(*net.TCPAddr).Port)
	free.Close()
	if _, err := f.DialPort(ctx, &api.DialPortRequest{Port: port}); !errdefs.IsUnavailable(err) {
		t.Errorf("closed port: %v, want unavailable", err)
	}
	// A read that its context ends returns without data.
	l2, _ := net.Listen("tcp4", "127.0.0.1:0")
	defer l2.Close()
	r, err := f.DialPort(ctx, &api.DialPortRequest{Port: uint32(l2.Addr().(*net.TCPAddr).Port)})
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithCancel(ctx)
	rcancel()
	if _, err := f.ReadConn(rctx, &api.ReadConnRequest{ConnId: r.ConnId}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled read: %v", err)
	}
}
