package network_test

import (
	"context"
	"io"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/podvm/podvm/network"
	"github.com/podvm/podvm/network/nettest"
)

// forwardPortsNetns skips without root or iptables and returns a new pod netns.
func forwardPortsNetns(t *testing.T) string {
	t.Helper()
	nettest.Require(t)
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("no iptables")
	}
	return nettest.Netns(t)
}

// forwarding starts port-forward in a new pod netns to a guestStandIn.
func forwarding(ctx context.Context, t *testing.T) (pod string, _ *network.PortForwarder, dialled chan uint16) {
	t.Helper()
	pod = forwardPortsNetns(t)
	dial, dialled := guestStandIn()
	f, err := network.ForwardPorts(ctx, pod, dial)
	if err != nil {
		t.Fatal(err)
	}
	return pod, f, dialled
}

// guestStandIn answers every dial with the line "guest port ok" and reports the port it was
// dialled for on dialled.
func guestStandIn() (dial network.GuestDialer, dialled chan uint16) {
	dialled = make(chan uint16, 10)
	return func(ctx context.Context, port uint16) (network.GuestConn, error) {
		dialled <- port
		a, b := net.Pipe()
		go func() {
			defer b.Close()
			_, _ = io.WriteString(b, "guest port ok\n")
		}()
		return pipeConn{a}, nil
	}, dialled
}

// dialIn does what containerd does: dial addr from inside the pod netns, and read to EOF.
func dialIn(pod, addr string) (string, error) {
	var got string
	err := nettest.Do(pod, func() error {
		c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		got = string(b)
		return err
	})
	return got, err
}

// noMoreDials checks that the guest was dialled no more than the test has seen.
func noMoreDials(t *testing.T, dialled chan uint16) {
	t.Helper()
	select {
	case p := <-dialled:
		t.Errorf("unexpected guest dial for port %d", p)
	default:
	}
}

// TestForwardPorts checks the netns half of port-forward for real: loopback TCP in the pod netns
// reaches the guest dialer with its original port, pod traffic is not redirected, and Cleanup
// leaves no rule.
func TestForwardPorts(t *testing.T) {
	ctx := context.Background()
	pod, f, dialled := forwarding(ctx, t)
	defer f.Close(ctx)
	rules, err := network.PortForwardRules(pod)
	if err != nil || len(rules) != 1 {
		t.Fatalf("rules after ForwardPorts: %q, %v; want one", rules, err)
	}

	got, err := dialIn(pod, "127.0.0.1:8080")
	if err != nil || got != "guest port ok\n" {
		t.Fatalf("127.0.0.1:8080 in the pod netns: %q, %v", got, err)
	}
	if p := <-dialled; p != 8080 {
		t.Errorf("guest dialled on port %d, want 8080", p)
	}
	checkOwnAddressNotRedirected(t, pod)

	// Cleanup (a restarted shim's delete) removes the rule without the forwarder's help.
	if err := network.Cleanup(ctx, pod); err != nil {
		t.Fatal(err)
	}
	if rules, err := network.PortForwardRules(pod); err != nil || len(rules) != 0 {
		t.Errorf("rules after Cleanup: %q, %v", rules, err)
	}
	if _, err := dialIn(pod, "127.0.0.1:8080"); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("127.0.0.1:8080 after Cleanup: %v, want refused", err)
	}
	if err := f.Close(ctx); err != nil {
		t.Errorf("Close after Cleanup: %v", err)
	}
	noMoreDials(t, dialled)
}

// checkOwnAddressNotRedirected: only loopback addresses are redirected, the netns's own
// non-loopback address is not.
func checkOwnAddressNotRedirected(t *testing.T, pod string) {
	t.Helper()
	h := nettest.Handle(t, pod)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 123, 9, 1), Mask: net.CIDRMask(32, 32)}}); err != nil {
		t.Fatal(err)
	}
	local := nettest.Listen(t, pod, "10.123.9.1:8080")
	go func() {
		if c, err := local.Accept(); err == nil {
			_, _ = io.WriteString(c, "netns\n")
			c.Close()
		}
	}()
	if got, err := dialIn(pod, "10.123.9.1:8080"); err != nil || got != "netns\n" {
		t.Errorf("10.123.9.1:8080 in the pod netns: %q, %v; want the netns's own listener", got, err)
	}
}

// TestForwardPortsCloseRemovesRule: Close removes the forwarder's rule.
func TestForwardPortsCloseRemovesRule(t *testing.T) {
	ctx := context.Background()
	pod, f, dialled := forwarding(ctx, t)
	if err := f.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if rules, err := network.PortForwardRules(pod); err != nil || len(rules) != 0 {
		t.Errorf("rules after Close: %q, %v", rules, err)
	}
	noMoreDials(t, dialled)
}

// pipeConn gives net.Pipe's end a CloseWrite, which it lacks.
type pipeConn struct{ net.Conn }

func (p pipeConn) CloseWrite() error { return nil }
