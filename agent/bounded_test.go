package agent

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"

	"github.com/podvm/podvm/agent/api"
)

// frozenGuest answers Version, then nothing: a guest whose vCPUs stopped after boot.
type frozenGuest struct {
	*Fake
	release chan struct{}
}

func (g frozenGuest) SignalProcess(ctx context.Context, _ *api.SignalProcessRequest) (*api.Empty, error) {
	<-g.release
	return &api.Empty{}, nil
}

func (g frozenGuest) WaitProcess(ctx context.Context, _ *api.ProcessRequest) (*api.WaitProcessResponse, error) {
	<-g.release
	return &api.WaitProcessResponse{}, nil
}

// connectFrozen serves a frozen guest over a pipe and connects a client to it; the listener's
// hangUp closes the guest's end of the connection under the client, as a dying guest's QEMU
// does.
func connectFrozen(t *testing.T, timeout time.Duration) (*Client, *pipeListener) {
	t.Helper()
	g := frozenGuest{Fake: NewFake(), release: make(chan struct{})}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	api.RegisterAgentService(srv, g)
	l := newPipeListener()
	go func() { _ = srv.Serve(context.Background(), l) }()
	t.Cleanup(func() { close(g.release); _ = srv.Close() })
	old := callTimeout
	callTimeout = timeout
	t.Cleanup(func() { callTimeout = old })
	c, err := Connect(context.Background(), l.dial, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, l
}

// A control call into a frozen guest fails with a deadline error that says what happened,
// instead of hanging the shim's caller; a call that waits for the workload is left to its
// caller.
func TestCallIntoFrozenGuestFails(t *testing.T) {
	c, _ := connectFrozen(t, 200*time.Millisecond)
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		_, err := c.SignalProcess(context.Background(), &api.SignalProcessRequest{ContainerId: "c", Signal: 9})
		errc <- err
	}()
	var err error
	select {
	case err = <-errc:
	case <-time.After(10 * time.Second):
		t.Fatal("SignalProcess into a frozen guest still hangs after 10s")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("SignalProcess into a frozen guest: %v, want a deadline error", err)
	}
	t.Logf("error: %v", err)

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = c.WaitProcess(ctx, &api.ProcessRequest{ContainerId: "c"})
	if err == nil || ctx.Err() == nil {
		t.Fatalf("WaitProcess returned %v (%T) after %v, want its caller's deadline", err, err, time.Since(start))
	}
}

// pipeListener hands out in-memory connections.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}

	mu     sync.Mutex
	served []net.Conn // the server's ends, for hangUp
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	select {
	case <-l.done:
	default:
		close(l.done)
	}
	return nil
}

func (l *pipeListener) Addr() net.Addr { return &net.UnixAddr{Name: "pipe", Net: "unix"} }

func (l *pipeListener) dial(ctx context.Context) (net.Conn, error) {
	a, b := net.Pipe()
	select {
	case l.conns <- a:
		l.mu.Lock()
		l.served = append(l.served, a)
		l.mu.Unlock()
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// hangUp closes the server's end of every connection, whatever the server is doing.
func (l *pipeListener) hangUp() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.served {
		_ = c.Close()
	}
}

// A call whose connection closes under it (the guest died: QEMU exited, its socket closed)
// fails with ttrpc.ErrClosed, not an unknown error of the agent's: the shim tells a lost
// guest from a failed request by it, and then shows the guest's console.
func TestCallIntoDyingGuestSaysClosed(t *testing.T) {
	c, l := connectFrozen(t, time.Minute)
	errc := make(chan error, 1)
	go func() {
		_, err := c.WaitProcess(context.Background(), &api.ProcessRequest{ContainerId: "c"})
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond) // the call is in flight
	l.hangUp()
	var err error
	select {
	case err = <-errc:
	case <-time.After(10 * time.Second):
		t.Fatal("WaitProcess still hangs 10s after its connection closed")
	}
	if !errors.Is(err, ttrpc.ErrClosed) {
		t.Fatalf("WaitProcess over a closed connection: %v (%T), want ttrpc.ErrClosed", err, err)
	}
}
