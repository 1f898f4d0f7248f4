package guest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"sync/atomic"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/mdlayher/vsock"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// Serve runs the agent API on transport (hypervisor.TransportVsock: port
// hypervisor.AgentVsockPort; hypervisor.TransportSerial: the virtio-serial port
// hypervisor.AgentSerialPort; "": each of them the guest has) until ctx ends or no transport
// is left. The host says which it uses (podvm.agent= on the kernel command line): the other
// is not listened on, and a vsock listener is one more way into the agent for the guest's
// own processes (hostOnly).
func Serve(ctx context.Context, svc api.AgentService, transport string) error {
	phases := bootPhasesFromEnv()
	phases.serverMain = processStart
	go warmUp()
	srv, err := ttrpc.NewServer(serverOptions(svc)...)
	if err != nil {
		return err
	}
	api.RegisterAgentService(srv, svc)

	var listeners []net.Listener
	if transport != hypervisor.TransportSerial {
		if l, err := vsock.Listen(hypervisor.AgentVsockPort, nil); err == nil {
			listeners = append(listeners, &hostOnly{Listener: l, log: log.G(ctx)})
		} else {
			log.G(ctx).WithError(err).Debug("no vsock")
		}
	}
	if transport != hypervisor.TransportVsock {
		if dev, err := findSerialPort("/sys/class/virtio-ports", hypervisor.AgentSerialPort); err == nil {
			listeners = append(listeners, newSerialListener(dev))
		} else {
			log.G(ctx).WithError(err).Debug("no virtio-serial port")
		}
	}
	if len(listeners) == 0 {
		if transport != "" {
			return fmt.Errorf("no agent transport: the host uses %s (podvm.agent= on the kernel command line) and the VM has none", transport)
		}
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

// hostOnly is the agent's vsock listener: it serves only connections from the host
// (vsock.Host, CID 2). Any process in the guest, a container's included, unprivileged and
// in any network namespace, can reach the agent's port through vsock loopback (CID 1, or
// the guest's own CID), and the agent, root in the guest, does what it is asked. Guest
// processes cannot connect from CID 2: the transport sets a connection's source.
// (virtio-serial needs no such check: the port is the agent's, opened once, and no
// container has its device node.)
type hostOnly struct {
	net.Listener
	log     *log.Entry
	refused atomic.Int64
}

// Accept returns the next connection from the host, closing those from anywhere else. The
// first refusal is a warning, later ones debug lines: a process that dials in a loop must
// not fill the console.
func (l *hostOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		a, ok := c.RemoteAddr().(*vsock.Addr)
		if ok && a.ContextID == vsock.Host {
			return c, nil
		}
		_ = c.Close()
		entry := l.log.WithField("peer", c.RemoteAddr().String())
		if l.refused.Add(1) == 1 {
			entry.Warn("refused a vsock connection that is not the host's: only the host drives the agent (later refusals are logged at debug level)")
		} else {
			entry.Debug("refused a vsock connection that is not the host's")
		}
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
	e, err := sysfsEntry(sysClass, "name", name)
	if err != nil {
		return "", err
	}
	if e != "" {
		return "/dev/" + e, nil
	}
	return "", fmt.Errorf("no virtio-serial port named %q", name)
}
