package guest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// TestPortForwardOverTTRPC drives DialPort … CloseConn through the real ttrpc stack and the
// host's agent.PortConn. A listener of the test process stands in for a server in the guest.
func TestPortForwardOverTTRPC(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s := NewServer()
	f := &portFixture{s: s, reads: make(chan uint64, 1)}
	f.c = serveOverTTRPC(ctx, t, s, readSignal{Server: s, reads: f.reads})
	f.accepted, f.port = guestService(t)

	t.Run("echo with half-close", func(t *testing.T) { f.echo(ctx, t) })
	t.Run("refused", func(t *testing.T) { f.refused(ctx, t) })
	t.Run("a blocked read ends with Close", func(t *testing.T) { f.blockedRead(ctx, t) })
	t.Run("host connection gone closes everything", func(t *testing.T) { f.hostGone(ctx, t) })
}

// portFixture is an agent served over ttrpc (c), telling on its reads, and a guest service
// on port that hands out the connections it accepts.
type portFixture struct {
	s        *Server
	c        *agent.Client
	reads    chan uint64
	accepted <-chan net.Conn
	port     uint32
}

func (f *portFixture) echo(ctx context.Context, t *testing.T) {
	pc, err := agent.DialPort(ctx, f.c, f.port)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	guest := <-f.accepted
	go func() {
		defer guest.Close()
		b, _ := io.ReadAll(guest) // until the host's CloseWrite
		if _, err := guest.Write(append(b, "bye"...)); err != nil {
			t.Errorf("guest side write: %v", err)
		}
	}()
	// More than one chunk each way, to exercise the pull loop.
	payload := bytes.Repeat([]byte("0123456789abcdef"), 20000)
	if _, err := pc.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := pc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(pc)
	if err != nil {
		t.Fatal(err)
	}
	if want := append(payload, "bye"...); !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes back, want %d", len(got), len(want))
	}
	if err := pc.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.c.ReadConn(ctx, &api.ReadConnRequest{ConnId: pc.ID()}); !errdefs.IsNotFound(err) {
		t.Errorf("ReadConn after Close: %v, want not found", err)
	}
}

func (f *portFixture) refused(ctx context.Context, t *testing.T) {
	c := f.c
	free, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := uint32(free.Addr().(*net.TCPAddr).Port)
	free.Close()
	if _, err := agent.DialPort(ctx, c, p); !errdefs.IsUnavailable(err) {
		t.Errorf("DialPort to a closed port: %v, want unavailable", err)
	}
	if _, err := c.DialPort(ctx, &api.DialPortRequest{Port: 70000}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("DialPort 70000: %v, want invalid argument", err)
	}
	for name, call := range map[string]func() error{
		"read":  func() error { _, err := c.ReadConn(ctx, &api.ReadConnRequest{ConnId: 999}); return err },
		"write": func() error { _, err := c.WriteConn(ctx, &api.WriteConnRequest{ConnId: 999}); return err },
		"close": func() error { _, err := c.CloseConn(ctx, &api.CloseConnRequest{ConnId: 999}); return err },
	} {
		if err := call(); !errdefs.IsNotFound(err) {
			t.Errorf("%s of an unknown connection: %v, want not found", name, err)
		}
	}
}

func (f *portFixture) blockedRead(ctx context.Context, t *testing.T) {
	pc, err := agent.DialPort(ctx, f.c, f.port)
	if err != nil {
		t.Fatal(err)
	}
	guest := <-f.accepted
	defer guest.Close()
	for len(f.reads) > 0 {
		<-f.reads // earlier subtests' reads
	}
	errc := make(chan error, 1)
	go func() {
		_, err := pc.Read(make([]byte, 10))
		errc <- err
	}()
	if id := <-f.reads; id != pc.ID() {
		t.Fatalf("the agent got a read of connection %d, want %d", id, pc.ID())
	}
	if err := pc.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Error("Read after Close returned no error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read still blocked after Close")
	}
	expectEOF(t, guest)
}

func (f *portFixture) hostGone(ctx context.Context, t *testing.T) {
	if _, err := agent.DialPort(ctx, f.c, f.port); err != nil {
		t.Fatal(err)
	}
	guest := <-f.accepted
	defer guest.Close()
	f.c.Close()
	expectEOF(t, guest)
	f.s.ports.mu.Lock()
	n := len(f.s.ports.conns)
	f.s.ports.mu.Unlock()
	if n != 0 {
		t.Errorf("%d port connections left after the host left", n)
	}
}

// expectEOF checks that the guest-side peer of a port connection sees it closed.
func expectEOF(t *testing.T, conn net.Conn) {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := conn.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("guest side read %d bytes, %v; want EOF", n, err)
	}
}

// readSignal tells on reads: each ReadConn the agent gets puts its connection id on reads
// (if there is room) before it is served.
type readSignal struct {
	*Server
	reads chan uint64
}

func (r readSignal) ReadConn(ctx context.Context, req *api.ReadConnRequest) (*api.ReadConnResponse, error) {
	select {
	case r.reads <- req.ConnId:
	default:
	}
	return r.Server.ReadConn(ctx, req)
}

// serveOverTTRPC serves svc with s's server options on a unix socket and returns a host
// client connected to it; both end with the test.
func serveOverTTRPC(ctx context.Context, t *testing.T, s *Server, svc api.AgentService) *agent.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer(serverOptions(s)...)
	if err != nil {
		t.Fatal(err)
	}
	api.RegisterAgentService(srv, svc)
	// Serve returns ttrpc.ErrServerClosed once the test closes srv; any other failure shows up
	// as the test's calls failing.
	go func() { _ = srv.Serve(context.Background(), l) }()
	t.Cleanup(func() { srv.Close() })
	c, err := agent.Connect(ctx, func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// guestService listens on the test's loopback, standing in for a server in the guest, and
// hands out the connections it accepts.
func guestService(t *testing.T) (<-chan net.Conn, uint32) {
	t.Helper()
	svc, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			conn, err := svc.Accept()
			if err != nil {
				return
			}
			accepted <- conn
		}
	}()
	return accepted, uint32(svc.Addr().(*net.TCPAddr).Port)
}
