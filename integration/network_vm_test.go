package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/vishvananda/netlink"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/network"
	"github.com/podvm/podvm/network/nettest"
)

// TestNetworkVM boots a real VM whose NIC is wired by package network to a veth in a pod
// netns, the veth's peer sitting in a second netns that plays the node's bridge side. The peer
// pings the pod IP (the guest kernel answers), and a container in the guest fetches a page from
// an HTTP server in the peer netns on an address outside the pod subnet (through the default
// route the guest got from the netns) and reports the NIC's MTU and MAC.
func TestNetworkVM(t *testing.T) {
	nettest.Require(t)
	require(t, needFile("/bin/busybox"), needCmd("ip"))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	stateDir := vmStateDir(t)
	t.Cleanup(func() {
		if left := nettest.Leftovers(); len(left) > 0 {
			t.Errorf("netns left behind: %v", left)
		}
	})

	const podIP, gatewayIP, serverIP = "10.123.9.2", "10.123.9.1", "10.124.0.1"
	podNS, peerNS := nettest.Netns(t), nettest.Netns(t)
	eth0, peer0 := nettest.Veth(t,
		nettest.End{Netns: podNS, Name: "eth0", Addr: podIP + "/24", MTU: 1400},
		nettest.End{Netns: peerNS, Name: "peer0", Addr: gatewayIP + "/24", MTU: 1400})
	// A second interface, as a second CNI plugin would add: it becomes a second guest NIC.
	const pod2IP, peer2IP = "10.125.0.2", "10.125.0.1"
	nettest.Veth(t,
		nettest.End{Netns: podNS, Name: "net1", Addr: pod2IP + "/24", MTU: 1400},
		nettest.End{Netns: peerNS, Name: "peer1", Addr: peer2IP + "/24", MTU: 1400})
	hp, hpeer := nettest.Handle(t, podNS), nettest.Handle(t, peerNS)
	if err := hp.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP(gatewayIP)}); err != nil {
		t.Fatal(err)
	}
	staticMAC := "02:aa:bb:cc:dd:ee"
	mac, _ := net.ParseMAC(staticMAC)
	if err := hp.NeighAdd(&netlink.Neigh{LinkIndex: eth0.Attrs().Index, IP: net.ParseIP("10.123.9.250"),
		HardwareAddr: mac, State: netlink.NUD_PERMANENT}); err != nil {
		t.Fatal(err)
	}
	// The server's address lives on the peer's lo: the guest reaches it only through its
	// default route via the gateway.
	lo, err := hpeer.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := hpeer.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(serverIP), Mask: net.CIDRMask(32, 32)}}); err != nil {
		t.Fatal(err)
	}
	ln := nettest.Listen(t, peerNS, serverIP+":8080")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/big": // segmentation and checksum offload through the tap, towards the guest
			_, _ = w.Write(make([]byte, 4<<20))
		case "/count": // and from the guest
			n, err := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "received=%d err=%v\n", n, err)
		default:
			fmt.Fprintf(w, "hello from the peer netns to %s\n", r.RemoteAddr)
		}
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })

	pod, err := network.Discover(ctx, podNS)
	if err != nil {
		t.Fatal(err)
	}
	if len(pod.Endpoints) != 2 {
		t.Fatalf("discovered %d endpoints, want eth0 and net1", len(pod.Endpoints))
	}
	setup := &api.SetupSandboxRequest{Routes: pod.Routes, Neighbors: pod.Neighbors}
	var nics []*hypervisor.NetDevice
	for _, ep := range pod.Endpoints {
		nd, err := ep.Attach(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := ep.Detach(context.Background()); err != nil {
				t.Errorf("detach: %v", err)
			}
			links, _ := hp.LinkList()
			for _, l := range links {
				if network.IsTap(l.Attrs().Name) {
					t.Errorf("tap %s left in the pod netns", l.Attrs().Name)
				}
			}
		})
		nics = append(nics, nd)
		setup.Interfaces = append(setup.Interfaces, ep.Guest())
	}
	t.Logf("guest interfaces %v, routes %v, neighbours %v", setup.Interfaces, setup.Routes, setup.Neighbors)

	g := bootVMWith(t, ctx, stateDir, vmOptions{NetDevices: nics, Setup: setup})
	t.Logf("agent ready %s after QEMU start", g.bootTime.Round(time.Millisecond))

	t.Run("peer pings the second interface's address in the guest", func(t *testing.T) {
		out, err := exec.CommandContext(ctx, "ip", "netns", "exec", filepath.Base(peerNS),
			"/bin/busybox", "ping", "-c", "3", "-i", "0.2", "-W", "5", pod2IP).CombinedOutput()
		if err != nil {
			t.Fatalf("ping %s from the peer netns: %v\n%s", pod2IP, err, out)
		}
	})

	t.Run("peer pings the pod IP in the guest", func(t *testing.T) {
		out, err := exec.CommandContext(ctx, "ip", "netns", "exec", filepath.Base(peerNS),
			"/bin/busybox", "ping", "-c", "5", "-i", "0.2", "-W", "5", podIP).CombinedOutput()
		if err != nil {
			t.Fatalf("ping %s from the peer netns: %v\n%s", podIP, err, out)
		}
		rtt := regexp.MustCompile(`round-trip min/avg/max = \S+`).FindString(string(out))
		t.Logf("ping %s: %s", podIP, rtt)
		// The answer came from the guest's NIC, which carries eth0's MAC; the pod netns never
		// sees the request (its ingress is redirected to the tap).
		neighs, _ := hpeer.NeighList(peer0.Attrs().Index, netlink.FAMILY_V4)
		for _, n := range neighs {
			if n.IP.String() == podIP && n.HardwareAddr.String() != eth0.Attrs().HardwareAddr.String() {
				t.Errorf("peer resolved %s to %s, want eth0's MAC %s", podIP, n.HardwareAddr, eth0.Attrs().HardwareAddr)
			}
		}
	})

	t.Run("container reaches the peer's server through the default route", func(t *testing.T) {
		c := g.agent
		root := busyboxRootfs(t, g, "net1")
		// busybox-static's wget crashes (glibc NSS in a static binary); nc speaks HTTP/1.0 fine.
		script := "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 " + serverIP + " 8080 && " +
			"echo mtu=$(cat /sys/class/net/eth0/mtu) mac=$(cat /sys/class/net/eth0/address) && " +
			"ip route && cat /proc/net/arp && ip -4 addr show net1 && " +
			"echo big=$(printf 'GET /big HTTP/1.0\\r\\n\\r\\n' | nc -w 10 " + serverIP + " 8080 | wc -c) && " +
			"(printf 'POST /count HTTP/1.0\\r\\nContent-Length: 4194304\\r\\n\\r\\n'; head -c 4194304 /dev/zero) | nc -w 10 " + serverIP + " 8080"
		spec := defaultSpec(t, "net1", root, oci.WithHostNamespace(specs.NetworkNamespace),
			oci.WithProcessArgs("sh", "-c", script))
		if _, err := c.CreateContainer(ctx, &api.CreateContainerRequest{ContainerId: "net1", Spec: spec,
			Stdio: &api.Stdio{Stdout: true, Stderr: true}}); err != nil {
			t.Fatalf("create: %v", err)
		}
		out := collect(ctx, c, "net1", "", api.StdioStream_STDOUT, api.StdioStream_STDERR)
		if _, err := c.StartProcess(ctx, &api.ProcessRequest{ContainerId: "net1"}); err != nil {
			t.Fatalf("start: %v", err)
		}
		code := wait(t, ctx, c, "net1", "")
		stdout, stderr := out.wait(t)
		t.Logf("container output:\n%s%s", stdout, stderr)
		if code != 0 {
			t.Errorf("exit status %d", code)
		}
		for _, want := range []string{
			"hello from the peer netns to " + podIP + ":",
			fmt.Sprintf("mtu=1400 mac=%s", eth0.Attrs().HardwareAddr),
			"default via " + gatewayIP + " dev eth0",
			"10.123.9.250",
			"received=4194304 err=<nil>",
			"inet " + pod2IP + "/24",
		} {
			if !strings.Contains(stdout, want) {
				t.Errorf("container output lacks %q", want)
			}
		}
		if m := regexp.MustCompile(`big=(\d+)`).FindStringSubmatch(stdout); m == nil || len(m[1]) < 7 || m[1] < "4194304" {
			t.Errorf("download of 4 MiB: got %v bytes with headers", m)
		}
		if !strings.Contains(stdout, staticMAC) {
			t.Errorf("the permanent neighbour %s did not reach the guest", staticMAC)
		}
		if _, err := c.RemoveContainer(ctx, &api.RemoveContainerRequest{ContainerId: "net1"}); err != nil {
			t.Error(err)
		}
	})
}
