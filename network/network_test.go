package network_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/network"
	"github.com/podvm/podvm/network/nettest"
)

// podNetns is a pod netns as a bridge CNI plugin leaves it: eth0 (10.123.1.2/24, MTU 1400)
// and net1 (a second plugin's interface) are veths whose peers sit in a second netns standing
// in for the bridge side.
type podNetns struct {
	pod, peer        string
	eth0, net1       netlink.Link
	peer0            netlink.Link
	gatewayMAC       net.HardwareAddr
	staticNeighMAC   net.HardwareAddr
	wantRoutes       []*api.Route
	wantNeighbors    []*api.Neighbor
	wantEth0, wantN1 *api.Interface
}

func setup(t *testing.T) *podNetns {
	t.Helper()
	nettest.Require(t)
	t.Cleanup(func() {
		if left := nettest.Leftovers(); len(left) > 0 {
			t.Errorf("netns left behind: %v", left)
		}
	})
	p := &podNetns{pod: nettest.Netns(t), peer: nettest.Netns(t)}
	p.eth0, p.peer0 = nettest.Veth(t,
		nettest.End{Netns: p.pod, Name: "eth0", Addr: "10.123.1.2/24", MTU: 1400},
		nettest.End{Netns: p.peer, Name: "peer0", Addr: "10.123.1.1/24", MTU: 1400})
	p.net1, _ = nettest.Veth(t,
		nettest.End{Netns: p.pod, Name: "net1", Addr: "10.123.2.2/24"},
		nettest.End{Netns: p.peer, Name: "peer1", Addr: "10.123.2.1/24"})
	h := nettest.Handle(t, p.pod)
	v6, _ := netlink.ParseAddr("fd00:123::2/64")
	v6.Flags |= unix.IFA_F_NODAD
	must(t, h.AddrAdd(p.net1, v6))
	// Not a pod interface: a bridge.
	must(t, h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}))

	_, extra, _ := net.ParseCIDR("10.200.0.0/16")
	_, ll, _ := net.ParseCIDR("169.254.1.1/32")
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: p.eth0.Attrs().Index, Dst: ll, Scope: netlink.SCOPE_LINK}))
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: p.eth0.Attrs().Index, Gw: net.ParseIP("10.123.1.1")}))
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: p.net1.Attrs().Index, Dst: extra, Gw: net.ParseIP("10.123.2.1"), Priority: 50}))
	p.gatewayMAC = p.peer0.Attrs().HardwareAddr
	p.staticNeighMAC = net.HardwareAddr{0x02, 0xee, 0xee, 0xee, 0xee, 0xee}
	must(t, h.NeighAdd(&netlink.Neigh{LinkIndex: p.eth0.Attrs().Index, IP: net.ParseIP("169.254.1.1"),
		HardwareAddr: p.staticNeighMAC, State: netlink.NUD_PERMANENT}))
	// A learned entry is not carried.
	must(t, h.NeighAdd(&netlink.Neigh{LinkIndex: p.eth0.Attrs().Index, IP: net.ParseIP("10.123.1.77"),
		HardwareAddr: net.HardwareAddr{2, 1, 1, 1, 1, 1}, State: netlink.NUD_REACHABLE}))

	p.wantEth0 = &api.Interface{Mac: p.eth0.Attrs().HardwareAddr.String(), Name: "eth0", Mtu: 1400, Addresses: []string{"10.123.1.2/24"}}
	p.wantN1 = &api.Interface{Mac: p.net1.Attrs().HardwareAddr.String(), Name: "net1", Mtu: 1500,
		Addresses: []string{"10.123.2.2/24", "fd00:123::2/64"}}
	p.wantRoutes = []*api.Route{
		{Destination: "169.254.1.1/32", Device: "eth0", Scope: uint32(netlink.SCOPE_LINK), Family: unix.AF_INET},
		{Gateway: "10.123.1.1", Device: "eth0", Family: unix.AF_INET},
		{Destination: "10.200.0.0/16", Gateway: "10.123.2.1", Device: "net1", Metric: 50, Family: unix.AF_INET},
	}
	p.wantNeighbors = []*api.Neighbor{{Ip: "169.254.1.1", Mac: p.staticNeighMAC.String(), Device: "eth0"}}
	return p
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestDiscover(t *testing.T) {
	p := setup(t)
	pod, err := network.Discover(context.Background(), p.pod)
	if err != nil {
		t.Fatal(err)
	}
	if len(pod.Endpoints) != 2 {
		t.Fatalf("got %d endpoints, want eth0 and net1", len(pod.Endpoints))
	}
	for i, want := range []*api.Interface{p.wantEth0, p.wantN1} {
		ep := pod.Endpoints[i]
		got := ep.Guest()
		if ep.Name() != want.Name || got.Mac != want.Mac || got.Name != want.Name || got.Mtu != want.Mtu ||
			!reflect.DeepEqual(got.Addresses, want.Addresses) {
			t.Errorf("endpoint %d: %q %v; want %v", i, ep.Name(), got, want)
		}
	}
	if !equalRoutes(pod.Routes, p.wantRoutes) {
		t.Errorf("routes:\n got %v\nwant %v", pod.Routes, p.wantRoutes)
	}
	if len(pod.Neighbors) != 1 || pod.Neighbors[0].String() != p.wantNeighbors[0].String() {
		t.Errorf("neighbours: got %v, want %v", pod.Neighbors, p.wantNeighbors)
	}

	if _, err := network.Discover(context.Background(), "/run/netns/podvm-no-such-netns"); err == nil ||
		!strings.Contains(err.Error(), "podvm-no-such-netns") {
		t.Errorf("Discover of a missing netns: %v; want an error naming it", err)
	}
}

func equalRoutes(a, b []*api.Route) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].String() != b[i].String() {
			return false
		}
	}
	return true
}

// TestAttachDetach wires eth0 to a tap and plays the guest on the tap's fd itself: the peer's
// ARP request and ping reach the tap (and the netns does not answer them), and the answers
// written into the tap reach the peer.
func TestAttachDetach(t *testing.T) {
	p := setup(t)
	ctx := context.Background()
	pod, err := network.Discover(ctx, p.pod)
	if err != nil {
		t.Fatal(err)
	}
	ep := pod.Endpoints[0]
	if err := ping(p.peer, "10.123.1.2"); err != nil {
		t.Fatalf("before Attach, the netns should answer for its own address: %v", err)
	}
	flushNeigh(t, p.peer, p.peer0)

	nd, err := ep.Attach(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range nd.TapFiles {
			f.Close()
		}
	}()
	if len(nd.TapFiles) != 1 || nd.MAC.String() != p.wantEth0.Mac || nd.MTU != 1400 || nd.ID == "" {
		t.Errorf("NetDevice %+v; want one tap file, MAC %s, MTU 1400", nd, p.wantEth0.Mac)
	}
	if _, err := os.Stat("/dev/vhost-net"); (err == nil) != nd.VhostNet {
		t.Errorf("VhostNet %v with /dev/vhost-net stat error %v", nd.VhostNet, err)
	}
	h := nettest.Handle(t, p.pod)
	tap, err := h.LinkByName("tap0_podvm")
	if err != nil {
		t.Fatalf("tap: %v", err)
	}
	if tap.Type() != "tuntap" || tap.Attrs().MTU != 1400 || tap.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("tap: type %s mtu %d flags %v; want an up tuntap with MTU 1400", tap.Type(), tap.Attrs().MTU, tap.Attrs().Flags)
	}
	checkRedirect(t, h, p.eth0, tap)
	checkRedirect(t, h, tap, p.eth0)
	out := tcShow(t, p.pod, "eth0")
	if !strings.Contains(out, "mirred (Egress Redirect to device tap0_podvm) stolen") {
		t.Errorf("tc filter show dev eth0 ingress:\n%s", out)
	}
	if _, err := ep.Attach(ctx); err == nil || !strings.Contains(err.Error(), "tap0_podvm") {
		t.Errorf("second Attach: %v; want an error about the existing tap", err)
	}

	// Nobody reads the tap yet: the netns must not answer in the guest's place.
	if err := ping(p.peer, "10.123.1.2"); err == nil {
		t.Fatal("the pod netns answered a ping for the pod IP; it must go to the tap")
	}
	// Now answer ARP and ping on the tap, as the guest would.
	tapCtx, stop := context.WithCancel(ctx)
	done := make(chan int)
	go func() { done <- playGuest(tapCtx, nd.TapFiles[0], nd.MAC, net.ParseIP("10.123.1.2")) }()
	err = ping(p.peer, "10.123.1.2")
	stop()
	if n := <-done; err != nil || n == 0 {
		t.Errorf("ping through the tap: %v (%d echo requests answered on the tap)", err, n)
	}

	if err := ep.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ep.Detach(ctx); err != nil {
		t.Errorf("second Detach: %v", err)
	}
	checkClean(t, h, p.eth0)
	if addrs, _ := h.AddrList(p.eth0, netlink.FAMILY_V4); len(addrs) != 1 {
		t.Errorf("eth0 addresses after Detach: %v; want 10.123.1.2/24 kept", addrs)
	}
}

func TestCleanup(t *testing.T) {
	p := setup(t)
	ctx := context.Background()
	pod, err := network.Discover(ctx, p.pod, network.WithQueues(2))
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range pod.Endpoints {
		nd, err := ep.Attach(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(nd.TapFiles) != 2 {
			t.Errorf("%s: %d tap files, want 2 queues", ep.Name(), len(nd.TapFiles))
		}
		// Held open, as a running QEMU would, until the test ends.
		t.Cleanup(func() {
			for _, f := range nd.TapFiles {
				_ = f.Close()
			}
		})
	}
	// Another party's ingress filter on net1 must survive.
	h := nettest.Handle(t, p.pod)
	other := &netlink.U32{FilterAttrs: netlink.FilterAttrs{LinkIndex: p.net1.Attrs().Index, Parent: netlink.HANDLE_INGRESS,
		Priority: 10, Protocol: unix.ETH_P_IP}, ClassId: netlink.MakeHandle(1, 1)}
	must(t, h.FilterAdd(other))

	// A restarted shim, without any state: Discover again finds the same two pod interfaces.
	again, err := network.Discover(ctx, p.pod)
	if err != nil || len(again.Endpoints) != 2 {
		t.Fatalf("Discover with taps attached: %v, %v; want eth0 and net1 only", again, err)
	}
	if err := network.Cleanup(ctx, p.pod); err != nil {
		t.Fatal(err)
	}
	if err := network.Cleanup(ctx, p.pod); err != nil {
		t.Errorf("second Cleanup: %v", err)
	}
	links, _ := h.LinkList()
	for _, l := range links {
		if network.IsTap(l.Attrs().Name) {
			t.Errorf("tap %s left", l.Attrs().Name)
		}
	}
	checkClean(t, h, p.eth0)
	fs, _ := h.FilterList(p.net1, netlink.HANDLE_INGRESS)
	if len(fs) == 0 {
		t.Error("Cleanup removed another party's filter on net1")
	}
	for _, f := range fs {
		if f.Attrs().Priority == network.FilterPriority {
			t.Errorf("podvm filter left on net1: %+v", f)
		}
	}
	if err := network.Cleanup(ctx, filepath.Join(nettest.NetnsDir, "podvm-no-such-netns")); err != nil {
		t.Errorf("Cleanup of a netns that has gone: %v", err)
	}
	if err := pod.Endpoints[0].Detach(ctx); err != nil {
		t.Errorf("Detach after Cleanup: %v", err)
	}
}

func checkRedirect(t *testing.T, h *netlink.Handle, from, to netlink.Link) {
	t.Helper()
	qs, err := h.QdiscList(from)
	if err != nil {
		t.Fatal(err)
	}
	hasIngress := false
	for _, q := range qs {
		hasIngress = hasIngress || q.Type() == "ingress"
	}
	if !hasIngress {
		t.Errorf("%s: no ingress qdisc in %v", from.Attrs().Name, qs)
	}
	fs, err := h.FilterList(from, netlink.HANDLE_INGRESS)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fs {
		if u, ok := f.(*netlink.U32); ok && f.Attrs().Priority == network.FilterPriority {
			for _, a := range u.Actions {
				if m, ok := a.(*netlink.MirredAction); ok && m.Ifindex == to.Attrs().Index &&
					m.MirredAction == netlink.TCA_EGRESS_REDIR && m.Attrs().Action == netlink.TC_ACT_STOLEN {
					return
				}
			}
		}
	}
	t.Errorf("%s: no u32 mirred egress redirect to %s among %d filters", from.Attrs().Name, to.Attrs().Name, len(fs))
}

func checkClean(t *testing.T, h *netlink.Handle, link netlink.Link) {
	t.Helper()
	if _, err := h.LinkByName("tap0_podvm"); err == nil {
		t.Error("tap0_podvm left")
	}
	qs, _ := h.QdiscList(link)
	for _, q := range qs {
		if q.Type() == "ingress" {
			t.Errorf("%s: ingress qdisc left", link.Attrs().Name)
		}
	}
}

func tcShow(t *testing.T, ns, dev string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", filepath.Base(ns), "tc", "filter", "show", "dev", dev, "ingress").CombinedOutput()
	if err != nil {
		t.Fatalf("tc filter show: %v\n%s", err, out)
	}
	return string(out)
}

func ping(ns, ip string) error {
	out, err := exec.Command("ip", "netns", "exec", filepath.Base(ns), "/bin/busybox", "ping", "-c", "1", "-W", "2", ip).CombinedOutput()
	if err != nil {
		return errors.New(strings.TrimSpace(string(out)))
	}
	return nil
}

func flushNeigh(t *testing.T, ns string, link netlink.Link) {
	t.Helper()
	h := nettest.Handle(t, ns)
	ns4, _ := h.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
	for _, n := range ns4 {
		_ = h.NeighDel(&n)
	}
}

// playGuest answers ARP requests for ip and ICMP echo requests on a tap file opened with
// IFF_VNET_HDR, until ctx ends; it returns how many echo requests it answered.
func playGuest(ctx context.Context, tap *os.File, mac net.HardwareAddr, ip net.IP) int {
	const vnetHdr = 10
	fd := int(tap.Fd())
	_ = unix.SetNonblock(fd, true)
	ip4 := ip.To4()
	buf := make([]byte, 65536)
	answered := 0
	for ctx.Err() == nil {
		n, err := unix.Read(fd, buf)
		if err != nil {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		if n < vnetHdr+14 {
			continue
		}
		frame := buf[vnetHdr:n]
		src := net.HardwareAddr(frame[6:12])
		var reply []byte
		switch binary.BigEndian.Uint16(frame[12:14]) {
		case 0x0806:
			arp := frame[14:]
			if len(arp) < 28 || binary.BigEndian.Uint16(arp[6:8]) != 1 || !bytes.Equal(arp[24:28], ip4) {
				continue
			}
			reply = ether(src, mac, 0x0806, concat([]byte{0, 1, 8, 0, 6, 4, 0, 2}, mac, ip4, arp[8:14], arp[14:18]))
		case 0x0800:
			pkt := append([]byte(nil), frame[14:]...)
			ihl := int(pkt[0]&0xf) * 4
			if len(pkt) < ihl+8 || pkt[9] != 1 || pkt[ihl] != 8 || !bytes.Equal(pkt[16:20], ip4) {
				continue
			}
			s := append([]byte(nil), pkt[12:16]...)
			copy(pkt[12:16], pkt[16:20])
			copy(pkt[16:20], s)
			pkt[ihl] = 0 // echo reply
			pkt[ihl+2], pkt[ihl+3] = 0, 0
			binary.BigEndian.PutUint16(pkt[ihl+2:], checksum(pkt[ihl:]))
			pkt[10], pkt[11] = 0, 0
			binary.BigEndian.PutUint16(pkt[10:], checksum(pkt[:ihl]))
			reply = ether(src, mac, 0x0800, pkt)
			answered++
		default:
			continue
		}
		_, _ = unix.Write(fd, append(make([]byte, vnetHdr), reply...))
	}
	return answered
}

func ether(dst, src net.HardwareAddr, typ uint16, payload []byte) []byte {
	return concat(dst, src, []byte{byte(typ >> 8), byte(typ)}, payload)
}

func concat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
