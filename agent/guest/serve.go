package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/mdlayher/vsock"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// Serve runs the agent API on every transport the guest has (vsock port hypervisor.AgentVsockPort, the
// virtio-serial port hypervisor.AgentSerialPort) until ctx ends or no transport is left.
func Serve(ctx context.Context, svc api.AgentService) error {
	phases := bootPhasesFromEnv()
	phases.serverMain = processStart
	srv, err := ttrpc.NewServer(serverOptions(svc)...)
	if err != nil {
		return err
	}
	api.RegisterAgentService(srv, svc)

	var listeners []net.Listener
	if l, err := vsock.Listen(hypervisor.AgentVsockPort, nil); err == nil {
		listeners = append(listeners, l)
	} else {
		log.G(ctx).WithError(err).Debug("no vsock")
	}
	if dev, err := findSerialPort("/sys/class/virtio-ports", hypervisor.AgentSerialPort); err == nil {
		listeners = append(listeners, newSerialListener(dev))
	} else {
		log.G(ctx).WithError(err).Debug("no virtio-serial port")
	}
	if len(listeners) == 0 {
		return errors.New("no agent transport: the VM has neither vsock nor the virtio-serial port " + hypervisor.AgentSerialPort)
	}
	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		log.G(ctx).Infof("podvm-agent: serving on %s", l.Addr())
		go func() { errc <- srv.Serve(ctx, l) }()
	}
	phases.ready = sinceBoot()
	log.G(ctx).Infof("podvm-agent: ready, %s", phases)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return srv.Close()
	}
}

// serverOptions are the ttrpc options of the agent's server. A *Server learns through the
// handshake when host connections close, to close the port connections they leave behind.
func serverOptions(svc api.AgentService) []ttrpc.ServerOpt {
	opts := []ttrpc.ServerOpt{ttrpc.WithUnaryServerInterceptor(toGRPCErrors)}
	if s, ok := svc.(*Server); ok {
		opts = append(opts, ttrpc.WithServerHandshaker(handshaker(s.ports.track)))
	}
	return opts
}

type handshaker func(ctx context.Context, conn net.Conn) (net.Conn, any, error)

func (h handshaker) Handshake(ctx context.Context, conn net.Conn) (net.Conn, any, error) {
	return h(ctx, conn)
}

// toGRPCErrors converts errdefs errors into status codes at the API edge, so the host can
// tell "not found" from "failed".
// A panic in a handler becomes an error reply: a bug behind one request must not take the
// whole pod down with the agent.
func toGRPCErrors(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			log.G(ctx).Errorf("%s panicked: %v\n%s", info.FullMethod, r, debug.Stack())
			resp, err = nil, errgrpc.ToGRPC(fmt.Errorf("%s: internal error in the agent: %v: %w", info.FullMethod, r, errdefs.ErrUnknown))
		}
	}()
	resp, err = method(ctx, unmarshal)
	if err != nil {
		log.G(ctx).WithError(err).Debugf("%s failed", info.FullMethod)
		return resp, errgrpc.ToGRPC(err)
	}
	return resp, nil
}

// findSerialPort returns the /dev node of the virtio-serial port with the given name; the guest
// has no udev to make /dev/virtio-ports links.
func findSerialPort(sysClass, name string) (string, error) {
	entries, err := os.ReadDir(sysClass)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sysClass, e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + e.Name(), nil
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %q", name)
}

// serialListener turns a virtio-serial port into a listener of one connection at a time.
// The port can be open only once, so Accept waits for the previous connection to close.
type serialListener struct {
	path   string
	closed chan struct{}
	once   sync.Once
	// free holds a token while no connection is open.
	free chan struct{}
}

func newSerialListener(path string) *serialListener {
	l := &serialListener{path: path, closed: make(chan struct{}), free: make(chan struct{}, 1)}
	l.free <- struct{}{}
	return l
}

func (l *serialListener) Accept() (net.Conn, error) {
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	case <-l.free:
	}
	select {
	case <-l.closed: // both were ready: closed wins
		l.free <- struct{}{}
		return nil, net.ErrClosed
	default:
	}
	f, err := os.OpenFile(l.path, os.O_RDWR, 0)
	if err != nil {
		l.free <- struct{}{}
		return nil, err
	}
	return &serialConn{f: f, l: l, closing: make(chan struct{})}, nil
}

func (l *serialListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *serialListener) Addr() net.Addr { return serialAddr(l.path) }

type serialAddr string

func (a serialAddr) Network() string { return "virtio-serial" }
func (a serialAddr) String() string  { return string(a) }

// hostPoll is how often a connection without a host on the other end reads the port again.
const hostPoll = 10 * time.Millisecond

// serialConn is one host connection on the port. While the host end is not connected, reads
// on the port return EOF at once; until its first byte arrives, the connection keeps the port
// open and reads again every hostPoll. It must not close the port then: bytes the host sends
// while the port is open are queued in the guest, and closing the port discards them, so a
// host that connected just after an EOF would wait forever for the answer to a request the
// guest dropped (seen on VMs restored from a template, whose agent polls an idle port). After
// the first byte, EOF means the host went away, and the connection ends.
type serialConn struct {
	f         *os.File
	l         *serialListener
	read      bool
	closing   chan struct{}
	closeOnce sync.Once
}

func (c *serialConn) Read(b []byte) (int, error) {
	for {
		n, err := c.f.Read(b)
		if n > 0 {
			c.read = true
			return n, err
		}
		if errors.Is(err, os.ErrClosed) {
			// Close ran while Read waited in the file: report it as a closed connection,
			// as a net.Conn does, not as a closed file.
			return 0, net.ErrClosed
		}
		if c.read || err == nil || !errors.Is(err, io.EOF) {
			return n, err
		}
		select {
		case <-c.closing:
			return 0, net.ErrClosed
		case <-c.l.closed:
			return 0, net.ErrClosed
		case <-time.After(hostPoll):
		}
	}
}

func (c *serialConn) Write(b []byte) (int, error) { return c.f.Write(b) }
func (c *serialConn) Close() error {
	err := c.f.Close()
	c.closeOnce.Do(func() {
		close(c.closing)
		c.l.free <- struct{}{}
	})
	return err
}
func (c *serialConn) LocalAddr() net.Addr                { return c.l.Addr() }
func (c *serialConn) RemoteAddr() net.Addr               { return serialAddr("host") }
func (c *serialConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *serialConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *serialConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }
