package guest

import (
	"context"
	"net"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// inNewNetns runs fn on a thread moved into a network namespace of its own (which goes with
// the thread), as root; elsewhere it skips, and under CI fails.
func inNewNetns(t *testing.T, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (a network namespace of its own)")
		}
		t.Skip("needs root (a network namespace of its own)")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Error(err)
			return
		}
		fn()
	}()
	<-done
}

// TestSetupNetworkTemplateNIC: a NIC found by the MAC it has in the guest (a clone's, which
// came with its template) gets the pod's MAC, name, MTU and addresses and goes up; a NIC
// without guest_mac is found by the pod's MAC; the loopback, down in a new namespace, is up.
func TestSetupNetworkTemplateNIC(t *testing.T) {
	inNewNetns(t, func() {
		// veths, for their MAC (the test machine's kernel may have no dummy links).
		for name, mac := range map[string]string{"tmpl0": "02:70:6f:64:76:6d", "hot0": "02:00:00:00:00:02"} {
			hw, _ := net.ParseMAC(mac)
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: hw}, PeerName: name + "p"}); err != nil {
				t.Error(err)
				return
			}
		}
		req := &api.SetupSandboxRequest{Interfaces: []*api.Interface{
			{Name: "eth0", Mac: "02:00:00:00:00:01", GuestMac: "02:70:6f:64:76:6d", Mtu: 1400, Addresses: []string{"10.88.0.5/24"}},
			{Name: "net1", Mac: "02:00:00:00:00:02", Addresses: []string{"10.99.0.5/24"}},
		}}
		if err := setupNetwork(context.Background(), req); err != nil {
			t.Error(err)
			return
		}
		for _, ifc := range req.Interfaces {
			l, err := netlink.LinkByName(ifc.Name)
			if err != nil {
				t.Errorf("%s: %v", ifc.Name, err)
				continue
			}
			a := l.Attrs()
			if a.HardwareAddr.String() != ifc.Mac || a.Flags&net.FlagUp == 0 || (ifc.Mtu != 0 && a.MTU != int(ifc.Mtu)) {
				t.Errorf("%s: MAC %s, MTU %d, flags %v; want MAC %s, MTU %d, up", ifc.Name, a.HardwareAddr, a.MTU, a.Flags, ifc.Mac, ifc.Mtu)
			}
			addrs, _ := netlink.AddrList(l, unix.AF_INET)
			if len(addrs) != 1 || addrs[0].IPNet.String() != ifc.Addresses[0] {
				t.Errorf("%s: addresses %v, want %s", ifc.Name, addrs, ifc.Addresses[0])
			}
		}
		if lo, err := netlink.LinkByName("lo"); err != nil || lo.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("lo is not up after the setup: %v", err)
		}
		// The template's MAC is gone: asked again for it, no NIC has it.
		if err := setupNetwork(context.Background(), req); err == nil {
			t.Error("a second setup found a NIC with the template's MAC")
		}
	})
}

// TestLoopbackUp: what the agent does at its start.
func TestLoopbackUp(t *testing.T) {
	inNewNetns(t, func() {
		if err := LoopbackUp(); err != nil {
			t.Error(err)
			return
		}
		if lo, err := netlink.LinkByName("lo"); err != nil || lo.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("lo is not up: %v", err)
		}
	})
}
