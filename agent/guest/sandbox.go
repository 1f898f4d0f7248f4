package guest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

func setupSandbox(ctx context.Context, req *api.SetupSandboxRequest) error {
	sys := realRestoreSys()
	if err := setHostClock(req, sys); err != nil {
		return err
	}
	if req.Hostname != "" {
		if err := unix.Sethostname([]byte(req.Hostname)); err != nil {
			return fmt.Errorf("set hostname %q: %w", req.Hostname, err)
		}
	}
	// The network first: a restored VM's first NIC came with its template, while the guest
	// may still be probing the share's hot-plugged device.
	nicWait, err := waitNICs(ctx, req, sys)
	if err != nil {
		return err
	}
	if err := setupNetwork(ctx, req); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	if req.SharedFsTag != "" {
		fsWait, err := waitShare(ctx, req, sys)
		if err != nil {
			return err
		}
		if req.HotPlugged {
			log.G(ctx).Infof("hot-plugged devices: %d NICs present after %s, virtio-fs after %s more",
				len(req.Interfaces), nicWait.Round(time.Microsecond), fsWait.Round(time.Microsecond))
		}
		if err := os.MkdirAll(agent.GuestSharedDir, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(req.SharedFsTag, agent.GuestSharedDir, "virtiofs", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount virtio-fs %q on %s: %w", req.SharedFsTag, agent.GuestSharedDir, err)
		}
	}
	return nil
}

// setupNetwork configures the guest NICs the host describes: each is found by its MAC, renamed,
// given its MTU and addresses and brought up; then routes and neighbours are added.
func setupNetwork(ctx context.Context, req *api.SetupSandboxRequest) error {
	links, err := netlink.LinkList()
	if err != nil {
		return err
	}
	for _, l := range links {
		// Up since the agent's start (LoopbackUp), but for a race with it.
		if l.Attrs().Name == "lo" && l.Attrs().Flags&net.FlagUp == 0 {
			_ = netlink.LinkSetUp(l)
		}
	}
	for _, ifc := range req.Interfaces {
		mac, err := net.ParseMAC(ifc.Mac)
		if err != nil {
			return fmt.Errorf("interface %s: bad MAC %q: %w", ifc.Name, ifc.Mac, errdefs.ErrInvalidArgument)
		}
		has, err := guestMAC(ifc)
		if err != nil {
			return err
		}
		var link netlink.Link
		for _, l := range links {
			if l.Attrs().HardwareAddr.String() == has.String() {
				link = l
			}
		}
		if link == nil {
			return fmt.Errorf("interface %s: no guest NIC has MAC %s: %w", ifc.Name, has, errdefs.ErrNotFound)
		}
		if err := netlink.LinkSetDown(link); err != nil {
			return err
		}
		if has.String() != mac.String() {
			if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
				return fmt.Errorf("interface %s: set MAC %s (was %s): %w", ifc.Name, mac, has, err)
			}
		}
		if ifc.Name != "" && link.Attrs().Name != ifc.Name {
			if err := netlink.LinkSetName(link, ifc.Name); err != nil {
				return fmt.Errorf("rename %s to %s: %w", link.Attrs().Name, ifc.Name, err)
			}
		}
		if ifc.Mtu > 0 {
			if err := netlink.LinkSetMTU(link, int(ifc.Mtu)); err != nil {
				return fmt.Errorf("interface %s: mtu %d: %w", ifc.Name, ifc.Mtu, err)
			}
		}
		for _, a := range ifc.Addresses {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				return fmt.Errorf("interface %s: bad address %q: %w", ifc.Name, a, errdefs.ErrInvalidArgument)
			}
			if err := netlink.AddrReplace(link, addr); err != nil {
				return fmt.Errorf("interface %s: add %s: %w", ifc.Name, a, err)
			}
		}
		if err := netlink.LinkSetUp(link); err != nil {
			return err
		}
	}
	for _, r := range req.Routes {
		route, err := toRoute(r)
		if err != nil {
			return err
		}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("route %s via %s dev %s: %w", r.Destination, r.Gateway, r.Device, err)
		}
	}
	for _, n := range req.Neighbors {
		link, err := netlink.LinkByName(n.Device)
		if err != nil {
			return fmt.Errorf("neighbour %s: device %s: %w", n.Ip, n.Device, err)
		}
		mac, err := net.ParseMAC(n.Mac)
		ip := net.ParseIP(n.Ip)
		if err != nil || ip == nil {
			return fmt.Errorf("neighbour %s lladdr %s: %w", n.Ip, n.Mac, errdefs.ErrInvalidArgument)
		}
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: link.Attrs().Index, IP: ip, HardwareAddr: mac,
			State: netlink.NUD_PERMANENT}); err != nil {
			return fmt.Errorf("neighbour %s: %w", n.Ip, err)
		}
	}
	if len(req.Interfaces) > 0 {
		log.G(ctx).Infof("network: %d interfaces, %d routes", len(req.Interfaces), len(req.Routes))
	}
	return nil
}

func toRoute(r *api.Route) (*netlink.Route, error) {
	route := &netlink.Route{Scope: netlink.Scope(r.Scope), Priority: int(r.Metric), Family: int(r.Family)}
	if r.Device != "" {
		link, err := netlink.LinkByName(r.Device)
		if err != nil {
			return nil, fmt.Errorf("route device %s: %w", r.Device, err)
		}
		route.LinkIndex = link.Attrs().Index
	}
	if r.Destination != "" {
		_, dst, err := net.ParseCIDR(r.Destination)
		if err != nil {
			return nil, fmt.Errorf("route destination %q: %w", r.Destination, errdefs.ErrInvalidArgument)
		}
		route.Dst = dst
	}
	if r.Gateway != "" {
		if route.Gw = net.ParseIP(r.Gateway); route.Gw == nil {
			return nil, fmt.Errorf("route gateway %q: %w", r.Gateway, errdefs.ErrInvalidArgument)
		}
	}
	if r.Source != "" {
		route.Src = net.ParseIP(r.Source)
	}
	return route, nil
}

// LoopbackUp brings the guest's loopback up, as every pod has it. The agent does it at its
// start, beside its first calls: a VM template is saved with it up, so a clone's setup (where
// under TCG each netlink call's code runs for the first time) is one step shorter.
func LoopbackUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}
