package network

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// PortForwardComment marks podvm's port-forward rule in the pod netns's nat OUTPUT chain;
// Close and Cleanup find the rule by it.
const PortForwardComment = "podvm-portforward"

// GuestConn is a TCP connection to a port on the guest's loopback (agent.PortConn).
type GuestConn interface {
	io.ReadWriteCloser
	// CloseWrite shuts down writing; the guest side reads EOF.
	CloseWrite() error
}

// GuestDialer connects to 127.0.0.1:port in the guest.
type GuestDialer func(ctx context.Context, port uint16) (GuestConn, error)

// PortForwarder makes TCP connections to the pod netns's loopback reach the same port on the
// guest's loopback, which is what CRI PortForward needs: containerd enters the pod netns on
// the node and dials localhost:<port> there. It owns a listener on 127.0.0.1 inside the pod
// netns and one iptables rule there that redirects every other loopback TCP connection to it:
//
//	iptables -t nat -A OUTPUT -o lo -d 127.0.0.0/8 -p tcp ! --dport <L> \
//	    -m comment --comment podvm-portforward -j REDIRECT --to-ports <L>
//
// Traffic of the pod (through eth0 and the tap) never passes the netns's OUTPUT chain, so only
// connections made inside the pod netns to its loopback are touched. Each accepted connection's
// original port comes from SO_ORIGINAL_DST; the forwarder dials it in the guest and copies both
// ways, half-closes included. A port nothing listens on in the guest resets the connection.
type PortForwarder struct {
	netns string
	ln    *net.TCPListener
	dial  GuestDialer
	// origPort tells which port a redirected connection was made to.
	origPort func(*net.TCPConn) (uint16, error)
	log      *log.Entry

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	closed bool
	conns  map[io.Closer]struct{}
}

// ForwardPorts starts forwarding the loopback of the pod netns at netnsPath to the guest. It
// needs iptables (with the nat table and the REDIRECT and comment matches) in PATH. Close stops
// it; Cleanup removes its rule when the shim could not.
func ForwardPorts(ctx context.Context, netnsPath string, dial GuestDialer) (_ *PortForwarder, retErr error) {
	var ln *net.TCPListener
	err := inNetns(netnsPath, func() error {
		var err error
		// The socket is made on this thread, so it lives in the pod netns.
		ln, err = net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("port-forward listener in netns %s: %w", netnsPath, err)
	}
	defer func() {
		if retErr != nil {
			_ = ln.Close()
		}
	}()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	if err := iptables(netnsPath, "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-d", "127.0.0.0/8", "-p", "tcp",
		"!", "--dport", port, "-m", "comment", "--comment", PortForwardComment,
		"-j", "REDIRECT", "--to-ports", port); err != nil {
		return nil, fmt.Errorf("port-forward rule in netns %s: %w", netnsPath, err)
	}
	f := newPortForwarder(ctx, ln, dial, originalPort)
	f.netns = netnsPath
	f.log = f.log.WithField("netns", netnsPath)
	return f, nil
}

func newPortForwarder(ctx context.Context, ln *net.TCPListener, dial GuestDialer, origPort func(*net.TCPConn) (uint16, error)) *PortForwarder {
	fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f := &PortForwarder{
		ln: ln, dial: dial, origPort: origPort, log: log.G(ctx),
		ctx: fctx, cancel: cancel, conns: map[io.Closer]struct{}{},
	}
	f.wg.Add(1)
	go f.serve()
	return f
}

// Addr is the listener's address inside the pod netns.
func (f *PortForwarder) Addr() *net.TCPAddr { return f.ln.Addr().(*net.TCPAddr) }

func (f *PortForwarder) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.AcceptTCP()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				f.log.WithError(err).Warn("port-forward: accept failed; port-forward to this pod stops working")
			}
			return
		}
		if !f.track(c) {
			_ = c.Close()
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer f.untrack(c)
			f.handle(c)
		}()
	}
}

// track remembers c so Close can end it; false once the forwarder is closed.
func (f *PortForwarder) track(c io.Closer) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *PortForwarder) untrack(c io.Closer) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	_ = c.Close()
}

func (f *PortForwarder) handle(c *net.TCPConn) {
	port, err := f.origPort(c)
	if err != nil {
		f.log.WithError(err).Warn("port-forward: no original destination; closing the connection")
		reset(c)
		return
	}
	dctx, cancel := context.WithTimeout(f.ctx, 30*time.Second)
	g, err := f.dial(dctx, port)
	cancel()
	if err != nil {
		// The client sees a reset, the nearest thing to "connection refused" once its
		// connection has been accepted here.
		f.log.WithError(err).WithField("port", port).Info("port-forward: cannot connect in the guest")
		reset(c)
		return
	}
	if !f.track(g) {
		_ = g.Close()
		return
	}
	defer f.untrack(g)

	errc := make(chan error, 2)
	go func() {
		_, err := io.Copy(g, c)
		if err == nil {
			err = g.CloseWrite()
		}
		errc <- err
	}()
	go func() {
		_, err := io.Copy(c, g)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	for i := 0; i < 2; i++ {
		if err := <-errc; err != nil {
			// One side broke: end both, which also ends the other copy.
			f.log.WithError(err).WithField("port", port).Debug("port-forward: connection ended")
			_ = c.Close()
			_ = g.Close()
		}
	}
}

// reset closes c with a RST instead of a FIN.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// Close removes the rule, stops accepting and ends every forwarded connection. It is
// idempotent, and a netns that has already gone is not an error.
func (f *PortForwarder) Close(ctx context.Context) error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	conns := f.conns
	f.conns = map[io.Closer]struct{}{}
	f.mu.Unlock()
	var err error
	if f.netns != "" {
		err = removePortForwardRules(f.netns)
	}
	_ = f.ln.Close()
	f.cancel()
	for c := range conns {
		_ = c.Close()
	}
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		err = errors.Join(err, fmt.Errorf("port-forward connections still closing: %w", ctx.Err()))
	}
	return err
}

// originalPort is the port a connection was made to before REDIRECT changed it.
func originalPort(c *net.TCPConn) (uint16, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var port uint16
	var gerr error
	err = raw.Control(func(fd uintptr) {
		// SO_ORIGINAL_DST fills a sockaddr_in; IPv6Mreq is a 20-byte buffer that holds it.
		var m *unix.IPv6Mreq
		m, gerr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
		if gerr == nil {
			port = uint16(m.Multiaddr[2])<<8 | uint16(m.Multiaddr[3])
		}
	})
	if err != nil {
		return 0, err
	}
	if gerr != nil {
		return 0, fmt.Errorf("SO_ORIGINAL_DST: %w", gerr)
	}
	return port, nil
}

// PortForwardRules lists podvm's port-forward rules in the netns at netnsPath, as
// `iptables -t nat -S OUTPUT` prints them.
func PortForwardRules(netnsPath string) ([]string, error) {
	out, err := iptablesOutput(netnsPath, "-t", "nat", "-S", "OUTPUT")
	if err != nil {
		return nil, err
	}
	var rules []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "-A OUTPUT ") && strings.Contains(line, "--comment "+PortForwardComment) {
			rules = append(rules, line)
		}
	}
	return rules, sc.Err()
}

// removePortForwardRules deletes every podvm port-forward rule from the netns. A netns that has
// gone, or a node without iptables (which cannot have the rules), is not an error.
func removePortForwardRules(netnsPath string) error {
	rules, err := PortForwardRules(netnsPath)
	if err != nil {
		if netnsGone(err) || errors.Is(err, exec.ErrNotFound) {
			return nil
		}
		return err
	}
	var errs []error
	for _, r := range rules {
		args := append([]string{"-t", "nat", "-D"}, strings.Fields(strings.TrimPrefix(r, "-A "))...)
		if err := iptables(netnsPath, args...); err != nil && !netnsGone(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func iptables(netnsPath string, args ...string) error {
	_, err := iptablesOutput(netnsPath, args...)
	return err
}

// iptablesOutput runs iptables in the netns: the child inherits the netns of the OS thread
// that starts it.
func iptablesOutput(netnsPath string, args ...string) ([]byte, error) {
	path, err := exec.LookPath("iptables")
	if err != nil {
		return nil, fmt.Errorf("port-forward needs iptables in PATH: %w", err)
	}
	args = append([]string{"-w"}, args...)
	var out, stderr bytes.Buffer
	err = inNetns(netnsPath, func() error {
		cmd := exec.Command(path, args...)
		cmd.Stdout, cmd.Stderr = &out, &stderr
		return cmd.Run()
	})
	if err != nil {
		return nil, fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out.Bytes(), nil
}
