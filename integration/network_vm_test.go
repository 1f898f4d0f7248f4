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
	"strconv"
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
	ctx, stateDir := vmTest(t, 3*time.Minute)
	t.Cleanup(func() {
		if left := nettest.Leftovers(); len(left) > 0 {
			t.Errorf("netns left behind: %v", left)
		}
	})
	n := newVMNet(t)
	n.serveHTTP(t)
	nics, setup := n.attach(t, ctx)
	g := bootVMWith(t, ctx, stateDir, vmOptions{NetDevices: nics, Setup: setup})
	t.Logf("agent ready %s after QEMU start", g.bootTime.Round(time.Millisecond))

	t.Run("peer pings the second interface's address in the guest", func(t *testing.T) {
		n.ping(t, ctx, 3, vmNetPod2IP)
	})
	t.Run("peer pings the pod IP in the guest", func(t *testing.T) {
		out := n.ping(t, ctx, 5, vmNetPodIP)
		rtt := regexp.MustCompile(`round-trip min/avg/max = \S+`).FindString(string(out))
		t.Logf("ping %s: %s", vmNetPodIP, rtt)
		// The answer came from the guest's NIC, which carries eth0's MAC; the pod netns never
		// sees the request (its ingress is redirected to the tap).
		neighs, _ := n.hpeer.NeighList(n.peer0.Attrs().Index, netlink.FAMILY_V4)
		for _, nb := range neighs {
			if nb.IP.String() == vmNetPodIP && nb.HardwareAddr.String() != n.eth0.Attrs().HardwareAddr.String() {
				t.Errorf("peer resolved %s to %s, want eth0's MAC %s", vmNetPodIP, nb.HardwareAddr, n.eth0.Attrs().HardwareAddr)
			}
		}
	})
	t.Run("container reaches the peer's server through the default route", func(t *testing.T) {
		n.testContainerReachesServer(t, ctx, g)
	})
}

// The addresses of TestNetworkVM: the pod's and its gateway's on eth0, the server's on the
// peer's lo (outside the pod subnet), a second interface's pair, and a permanent neighbour.
const (
	vmNetPodIP, vmNetGatewayIP, vmNetServerIP = "10.123.9.2", "10.123.9.1", "10.124.0.1"
	vmNetPod2IP, vmNetPeer2IP                 = "10.125.0.2", "10.125.0.1"
	vmNetStaticIP, vmNetStaticMAC             = "10.123.9.250", "02:aa:bb:cc:dd:ee"
)

// vmNet is TestNetworkVM's pod netns and its peer, wired as a CNI bridge plugin would.
type vmNet struct {
	podNS, peerNS string
	eth0, peer0   netlink.Link
	hp, hpeer     *netlink.Handle
}

// newVMNet makes the two netns, the veth pairs between them (eth0 and net1, as a second CNI
// plugin would add it: it becomes a second guest NIC), the pod's default route and permanent
// neighbour, and the server's address on the peer's lo: the guest reaches it only through its
// default route via the gateway.
func newVMNet(t *testing.T) *vmNet {
	n := &vmNet{podNS: nettest.Netns(t), peerNS: nettest.Netns(t)}
	n.eth0, n.peer0 = nettest.Veth(t,
		nettest.End{Netns: n.podNS, Name: "eth0", Addr: vmNetPodIP + "/24", MTU: 1400},
		nettest.End{Netns: n.peerNS, Name: "peer0", Addr: vmNetGatewayIP + "/24", MTU: 1400})
	nettest.Veth(t,
		nettest.End{Netns: n.podNS, Name: "net1", Addr: vmNetPod2IP + "/24", MTU: 1400},
		nettest.End{Netns: n.peerNS, Name: "peer1", Addr: vmNetPeer2IP + "/24", MTU: 1400})
	n.hp, n.hpeer = nettest.Handle(t, n.podNS), nettest.Handle(t, n.peerNS)
	if err := n.hp.RouteAdd(&netlink.Route{LinkIndex: n.eth0.Attrs().Index, Gw: net.ParseIP(vmNetGatewayIP)}); err != nil {
		t.Fatal(err)
	}
	mac, _ := net.ParseMAC(vmNetStaticMAC)
	if err := n.hp.NeighAdd(&netlink.Neigh{LinkIndex: n.eth0.Attrs().Index, IP: net.ParseIP(vmNetStaticIP),
		HardwareAddr: mac, State: netlink.NUD_PERMANENT}); err != nil {
		t.Fatal(err)
	}
	lo, err := n.hpeer.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.hpeer.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(vmNetServerIP), Mask: net.CIDRMask(32, 32)}}); err != nil {
		t.Fatal(err)
	}
	return n
}

// serveHTTP serves on the server address in the peer netns until the test ends: a greeting
// naming the client, 4 MiB at /big and a byte count of what is POSTed to /count.
func (n *vmNet) serveHTTP(t *testing.T) {
	ln := nettest.Listen(t, n.peerNS, vmNetServerIP+":8080")
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
}

// attach discovers the pod netns as the shim does and attaches each endpoint, detached (and
// checked for taps left) at cleanup; it returns the VM's NICs and the agent's setup request.
func (n *vmNet) attach(t *testing.T, ctx context.Context) ([]*hypervisor.NetDevice, *api.SetupSandboxRequest) {
	pod, err := network.Discover(ctx, n.podNS)
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
			links, _ := n.hp.LinkList()
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
	return nics, setup
}

// ping pings ip count times from the peer netns and fails t unless it answers.
func (n *vmNet) ping(t *testing.T, ctx context.Context, count int, ip string) []byte {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", filepath.Base(n.peerNS),
		"/bin/busybox", "ping", "-c", strconv.Itoa(count), "-i", "0.2", "-W", "5", ip).CombinedOutput()
	if err != nil {
		t.Fatalf("ping %s from the peer netns: %v\n%s", ip, err, out)
	}
	return out
}

// vmNetScript is what the guest container runs: it fetches the server's page, reports eth0's
// MTU and MAC, its routes, neighbours and net1's address, downloads 4 MiB and uploads 4 MiB.
// busybox-static's wget crashes (glibc NSS in a static binary); nc speaks HTTP/1.0 fine.
const vmNetScript = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 " + vmNetServerIP + " 8080 && " +
	"echo mtu=$(cat /sys/class/net/eth0/mtu) mac=$(cat /sys/class/net/eth0/address) && " +
	"ip route && cat /proc/net/arp && ip -4 addr show net1 && " +
	"echo big=$(printf 'GET /big HTTP/1.0\\r\\n\\r\\n' | nc -w 10 " + vmNetServerIP + " 8080 | wc -c) && " +
	"(printf 'POST /count HTTP/1.0\\r\\nContent-Length: 4194304\\r\\n\\r\\n'; head -c 4194304 /dev/zero) | nc -w 10 " + vmNetServerIP + " 8080"

// testContainerReachesServer runs vmNetScript in a container of the guest's netns and checks
// what it saw.
func (n *vmNet) testContainerReachesServer(t *testing.T, ctx context.Context, g *guestVM) {
	c := g.agent
	root := busyboxRootfs(t, g, "net1")
	spec := defaultSpec(t, "net1", root, oci.WithHostNamespace(specs.NetworkNamespace),
		oci.WithProcessArgs("sh", "-c", vmNetScript))
	stdout, stderr, code := runGuestContainer(t, ctx, c, "net1", spec)
	t.Logf("container output:\n%s%s", stdout, stderr)
	if code != 0 {
		t.Errorf("exit status %d", code)
	}
	for _, want := range []string{
		"hello from the peer netns to " + vmNetPodIP + ":",
		fmt.Sprintf("mtu=1400 mac=%s", n.eth0.Attrs().HardwareAddr),
		"default via " + vmNetGatewayIP + " dev eth0",
		vmNetStaticIP,
		"received=4194304 err=<nil>",
		"inet " + vmNetPod2IP + "/24",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("container output lacks %q", want)
		}
	}
	if m := regexp.MustCompile(`big=(\d+)`).FindStringSubmatch(stdout); m == nil || len(m[1]) < 7 || m[1] < "4194304" {
		t.Errorf("download of 4 MiB: got %v bytes with headers", m)
	}
	if !strings.Contains(stdout, vmNetStaticMAC) {
		t.Errorf("the permanent neighbour %s did not reach the guest", vmNetStaticMAC)
	}
	removeGuestContainer(t, ctx, c, "net1")
}
