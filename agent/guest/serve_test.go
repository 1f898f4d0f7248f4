package guest

import (
	"context"
	"errors"
	"net"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/mdlayher/vsock"
)

func TestHandlerPanicBecomesError(t *testing.T) {
	panicky := func(ctx context.Context, unmarshal func(any) error) (any, error) {
		var m map[string]int
		m["boom"]++ //nolint:govet,staticcheck // nilness, SA5000: a runtime panic from a nil map write is the point
		return nil, nil
	}
	_, err := toGRPCErrors(context.Background(), nil, &ttrpc.UnaryServerInfo{FullMethod: "/podvm.agent.v1.Agent/Stats"}, panicky)
	if err == nil {
		t.Fatal("a panicking handler returned no error")
	}
	if native := errgrpc.ToNative(err); !errdefs.IsUnknown(native) {
		t.Fatalf("error %v does not map to unknown", native)
	}
}

// TestHostOnlyServesOnlyTheHost: the agent's vsock listener hands on the host's connections
// (CID 2) and closes those from the guest itself (loopback CID 1, the guest's own CID) or of
// an address that is not vsock at all.
func TestHostOnlyServesOnlyTheHost(t *testing.T) {
	conns := []*fakeConn{
		{remote: &vsock.Addr{ContextID: vsock.Local, Port: 4000}},
		{remote: &vsock.Addr{ContextID: 7, Port: 4001}},
		{remote: &net.UnixAddr{Name: "@x", Net: "unix"}},
		{remote: &vsock.Addr{ContextID: vsock.Host, Port: 4002}},
	}
	fl := &fakeListener{conns: conns}
	l := &hostOnly{Listener: fl, log: log.L}
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if c != conns[3] {
		t.Fatalf("accepted %v, want the host's connection", c.RemoteAddr())
	}
	for i, fc := range conns[:3] {
		if !fc.closed {
			t.Errorf("connection %d from %v was not closed", i, fc.remote)
		}
	}
	if conns[3].closed {
		t.Error("the host's connection was closed")
	}
	if n := l.refused.Load(); n != 3 {
		t.Errorf("refused %d, want 3", n)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept on an exhausted listener: %v, want its error", err)
	}
}

type fakeConn struct {
	net.Conn
	remote net.Addr
	closed bool
}

func (c *fakeConn) RemoteAddr() net.Addr { return c.remote }
func (c *fakeConn) Close() error         { c.closed = true; return nil }

type fakeListener struct {
	net.Listener
	conns []*fakeConn
}

func (l *fakeListener) Accept() (net.Conn, error) {
	if len(l.conns) == 0 {
		return nil, net.ErrClosed
	}
	c := l.conns[0]
	l.conns = l.conns[1:]
	return c, nil
}

func TestParseKernelFlags(t *testing.T) {
	for _, tt := range []struct {
		cmdline string
		want    KernelFlags
	}{
		{"console=ttyS0 quiet", KernelFlags{}},
		{"console=ttyS0 podvm.agent=serial quiet", KernelFlags{Transport: "serial"}},
		{"podvm.agent=vsock podvm.debug init=/init", KernelFlags{Debug: true, Transport: "vsock"}},
		{"podvm.debug=1 podvm.agent=carrier-pigeon", KernelFlags{Debug: true}},
		{"xpodvm.agent=serial podvm.debugx", KernelFlags{}},
	} {
		if got := parseKernelFlags(tt.cmdline); got != tt.want {
			t.Errorf("%q: %+v, want %+v", tt.cmdline, got, tt.want)
		}
	}
}
