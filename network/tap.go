package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// tapEndpoint is a pod interface joined to a tap by tc mirred redirects (see the package doc).
type tapEndpoint struct {
	netns  string // path of the pod netns
	name   string // pod interface, e.g. eth0
	tap    string // tap<N>_podvm
	id     string // NetDevice ID
	mac    net.HardwareAddr
	mtu    int
	addrs  []string
	queues int
}

func (e *tapEndpoint) Name() string { return e.name }

func (e *tapEndpoint) Guest() *api.Interface {
	return &api.Interface{Mac: e.mac.String(), Name: e.name, Mtu: uint32(e.mtu), Addresses: append([]string(nil), e.addrs...)}
}

func (e *tapEndpoint) Attach(ctx context.Context) (*hypervisor.NetDevice, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("attach %s in netns %s: %w", e.name, e.netns, err)
	}
	nd, err := e.attach()
	if err != nil {
		return nil, fmt.Errorf("attach %s in netns %s: %w", e.name, e.netns, err)
	}
	return nd, nil
}

func (e *tapEndpoint) attach() (_ *hypervisor.NetDevice, err error) {
	h, err := openHandle(e.netns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	link, err := h.LinkByName(e.name)
	if err != nil {
		return nil, fmt.Errorf("find interface: %w", err)
	}
	if _, err := h.LinkByName(e.tap); err == nil {
		return nil, fmt.Errorf("tap %s already exists (left by an earlier VM? network.Cleanup removes it)", e.tap)
	}
	files, err := createTap(e.netns, e.tap, e.queues)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			for _, f := range files {
				_ = f.Close()
			}
			_ = unwire(h, link)
			if tap, lerr := h.LinkByName(e.tap); lerr == nil {
				_ = h.LinkDel(tap)
			}
		}
	}()
	tap, err := h.LinkByName(e.tap)
	if err != nil {
		return nil, fmt.Errorf("find tap %s: %w", e.tap, err)
	}
	if err := h.LinkSetMTU(tap, e.mtu); err != nil {
		return nil, fmt.Errorf("tap %s: set mtu %d: %w", e.tap, e.mtu, err)
	}
	if err := h.LinkSetUp(tap); err != nil {
		return nil, fmt.Errorf("tap %s: set up: %w", e.tap, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("set up: %w", err)
	}
	if err := redirect(h, link, tap); err != nil {
		return nil, err
	}
	if err := redirect(h, tap, link); err != nil {
		return nil, err
	}
	_, verr := os.Stat("/dev/vhost-net")
	return &hypervisor.NetDevice{ID: e.id, MAC: e.mac, MTU: e.mtu, TapFiles: files, VhostNet: verr == nil}, nil
}

func (e *tapEndpoint) Detach(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("detach %s in netns %s: %w", e.name, e.netns, err)
	}
	if err := e.detach(); err != nil {
		return fmt.Errorf("detach %s in netns %s: %w", e.name, e.netns, err)
	}
	return nil
}

func (e *tapEndpoint) detach() error {
	h, err := openHandle(e.netns)
	if err != nil {
		if netnsGone(err) {
			return nil
		}
		return err
	}
	defer h.Close()
	var errs []error
	if link, err := h.LinkByName(e.name); err == nil {
		if err := unwire(h, link); err != nil {
			errs = append(errs, err)
		}
	} else if !linkNotFound(err) {
		errs = append(errs, fmt.Errorf("find interface: %w", err))
	}
	if tap, err := h.LinkByName(e.tap); err == nil {
		if err := h.LinkDel(tap); err != nil && !linkNotFound(err) {
			errs = append(errs, fmt.Errorf("delete tap %s: %w", e.tap, err))
		}
	} else if !linkNotFound(err) {
		errs = append(errs, fmt.Errorf("find tap %s: %w", e.tap, err))
	}
	return errors.Join(errs...)
}

// redirect makes every frame arriving on from leave through to: an ingress qdisc on from (kept
// if there is one) and a u32 match-all filter at FilterPriority with a mirred egress redirect.
func redirect(h *netlink.Handle, from, to netlink.Link) error {
	q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: from.Attrs().Index, Parent: netlink.HANDLE_INGRESS, Handle: netlink.MakeHandle(0xffff, 0),
	}}
	if err := h.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("%s: add ingress qdisc: %w", from.Attrs().Name, err)
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from.Attrs().Index, Parent: netlink.HANDLE_INGRESS,
			Priority: FilterPriority, Protocol: unix.ETH_P_ALL,
		},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR,
			Ifindex:      to.Attrs().Index,
		}},
	}
	if err := h.FilterAdd(f); err != nil {
		return fmt.Errorf("%s: add u32 filter redirecting to %s: %w", from.Attrs().Name, to.Attrs().Name, err)
	}
	return nil
}

// unwire removes podvm's redirect filters from link's ingress, and the ingress qdisc when no
// filter is left on it. A link without them is left alone.
func unwire(h *netlink.Handle, link netlink.Link) error {
	name := link.Attrs().Name
	filters, err := h.FilterList(link, netlink.HANDLE_INGRESS)
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) || linkNotFound(err) {
			return nil // no ingress qdisc, or the link has gone
		}
		return fmt.Errorf("%s: list ingress filters: %w", name, err)
	}
	others := 0
	ours := false
	for _, f := range filters {
		if isOurFilter(f) {
			ours = true
		} else if f.Attrs().Priority != FilterPriority {
			others++
		}
	}
	if !ours {
		return nil
	}
	del := &netlink.U32{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: link.Attrs().Index, Parent: netlink.HANDLE_INGRESS, Priority: FilterPriority,
	}}
	if err := h.FilterDel(del); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("%s: delete u32 filter prio %d: %w", name, FilterPriority, err)
	}
	if others > 0 {
		return nil
	}
	q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: link.Attrs().Index, Parent: netlink.HANDLE_INGRESS, Handle: netlink.MakeHandle(0xffff, 0),
	}}
	if err := h.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("%s: delete ingress qdisc: %w", name, err)
	}
	return nil
}

// isOurFilter recognises podvm's redirect filter: u32 at FilterPriority with a mirred action.
func isOurFilter(f netlink.Filter) bool {
	u, ok := f.(*netlink.U32)
	if !ok || f.Attrs().Priority != FilterPriority {
		return false
	}
	for _, a := range u.Actions {
		if _, ok := a.(*netlink.MirredAction); ok {
			return true
		}
	}
	return false
}

// createTap creates the tap called name inside the netns at nsPath and returns one open file
// per queue. The tap is not persistent: it goes away when the last file is closed.
func createTap(nsPath, name string, queues int) ([]*os.File, error) {
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if queues > 1 {
		flags |= unix.IFF_MULTI_QUEUE
	}
	var files []*os.File
	err := inNetns(nsPath, func() error {
		for q := 0; q < queues; q++ {
			fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open /dev/net/tun: %w", err)
			}
			f := os.NewFile(uintptr(fd), "/dev/net/tun:"+name)
			files = append(files, f)
			ifr, err := unix.NewIfreq(name)
			if err != nil {
				return fmt.Errorf("tap name %q: %w", name, err)
			}
			ifr.SetUint16(flags)
			if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
				return fmt.Errorf("create tap %s (TUNSETIFF, queue %d): %w", name, q, err)
			}
		}
		// The netns would otherwise send IPv6 DAD, router solicitations and MLD reports from
		// the tap into the guest. The sysctl file belongs to the opening thread's netns.
		p := filepath.Join("/proc/sys/net/ipv6/conf", name, "disable_ipv6")
		if err := os.WriteFile(p, []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("tap %s: disable IPv6: %w", name, err)
		}
		return nil
	})
	if err != nil {
		for _, f := range files {
			_ = f.Close()
		}
		return nil, err
	}
	return files, nil
}

// inNetns runs fn on a fresh OS thread switched into the netns at path. The thread goes back to
// its own netns afterwards; if it cannot, it stays locked and the Go runtime discards it.
func inNetns(path string, fn func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer func() { _ = target.Close() }()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get thread netns: %w", err)
			return
		}
		defer func() { _ = orig.Close() }()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return from netns: %w", err)) // thread stays locked
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
