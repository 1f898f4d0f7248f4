package harness

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// netNS is the network namespace the harness creates for containerd, its CNI bridge, the test
// registry and the CRI streaming server. Nothing the tests do leaves it, so tests never send
// traffic to the host's networks.
type netNS struct {
	name string
	path string
}

func createNetNS(ctx context.Context, name string) (*netNS, error) {
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	n := &netNS{name: name, path: "/run/netns/" + name}
	if out, err := exec.CommandContext(ctx, "ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		_ = n.delete(ctx)
		return nil, fmt.Errorf("ip -n %s link set lo up: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return n, nil
}

func (n *netNS) delete(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, "ip", "netns", "del", n.name).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip netns del %s: %w: %s", n.name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// do runs fn on an OS thread that has joined the namespace. Sockets and processes created by fn
// stay in the namespace after do returns. If the thread cannot return to the original namespace
// it is left locked, so the Go runtime throws it away instead of reusing it.
func (n *netNS) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer func() { _ = orig.Close() }()
		target, err := netns.GetFromPath(n.path)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", n.path, err)
			return
		}
		defer func() { _ = target.Close() }()
		if err := netns.Set(target); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", n.name, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("leave netns %s: %w (after: %v)", n.name, err, ferr)
			return // thread stays locked and dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// listen opens a TCP listener inside the namespace.
func (n *netNS) listen(addr string) (net.Listener, error) {
	var l net.Listener
	err := n.do(func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	})
	return l, err
}

// dialContext connects to addr from inside the namespace.
func (n *netNS) dialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}
