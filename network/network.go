package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// Endpoint is one pod interface wired into the VM. An Endpoint is not safe for concurrent use.
type Endpoint interface {
	// Name is the pod interface's name in the netns (e.g. eth0); the guest NIC gets the same.
	Name() string
	// Attach creates the tap inside the netns and redirects traffic between it and the pod
	// interface with tc. It returns the NIC for the VM, holding the tap's file descriptors
	// (one per queue), which the caller hands to the VM. On error nothing is left behind.
	Attach(ctx context.Context) (*hypervisor.NetDevice, error)
	// Detach removes the tap and the qdiscs and filters Attach added. It is idempotent, and a
	// netns or pod interface that has already gone is not an error.
	Detach(ctx context.Context) error
	// Guest describes the NIC for the guest agent: MAC, name, MTU and addresses.
	Guest() *api.Interface
}

// Pod is what Discover found in a pod's netns.
type Pod struct {
	Endpoints []Endpoint
	// Routes through the endpoints, with the guest's device names, link-scope routes first.
	Routes []*api.Route
	// Neighbors are the permanent neighbour entries on the endpoints.
	Neighbors []*api.Neighbor
}

// FilterPriority is the tc filter priority (preference) of podvm's redirect filters; Detach
// and Cleanup recognise podvm's filters by it.
const FilterPriority = 1700

// tapName is the name of the tap for the endpoint at index i; tapPattern recognises them.
func tapName(i int) string { return "tap" + strconv.Itoa(i) + "_podvm" }

// IsTap reports whether name is one of podvm's taps (tap<digits>_podvm).
func IsTap(name string) bool {
	n, ok := strings.CutPrefix(name, "tap")
	if !ok {
		return false
	}
	n, ok = strings.CutSuffix(n, "_podvm")
	if !ok || n == "" {
		return false
	}
	for _, c := range n {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// isEndpointType says which link types become endpoints: Ethernet devices CNI plugins put in a
// pod netns. Tunnel fallback devices (tunl0, gretap0, …), bridges, dummies and other taps are
// not the pod's interfaces.
func isEndpointType(t string) bool {
	switch t {
	case "veth", "macvlan", "ipvlan", "vlan", "device":
		return true
	}
	return false
}

// Option changes how Discover sets endpoints up.
type Option func(*options)

type options struct {
	queues int
}

// WithQueues gives each tap n queues (multi-queue virtio-net, one file descriptor per queue);
// the default is 1.
func WithQueues(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.queues = n
		}
	}
}

// Discover lists the pod interfaces in the netns at netnsPath, with their routes and permanent
// neighbours. A netns without any such interface gives a Pod without endpoints.
func Discover(ctx context.Context, netnsPath string, opts ...Option) (*Pod, error) {
	o := options{queues: 1}
	for _, opt := range opts {
		opt(&o)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("discover netns %s: %w", netnsPath, err)
	}
	pod, err := discover(netnsPath, o)
	if err != nil {
		return nil, fmt.Errorf("discover netns %s: %w", netnsPath, err)
	}
	return pod, nil
}

func discover(netnsPath string, o options) (*Pod, error) {
	h, err := openHandle(netnsPath)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	sort.Slice(links, func(i, j int) bool { return links[i].Attrs().Index < links[j].Attrs().Index })
	pod := &Pod{}
	names := map[int]string{} // link index → name, for the endpoints
	for _, l := range links {
		a := l.Attrs()
		if !isEndpointType(l.Type()) || a.Flags&net.FlagLoopback != 0 || IsTap(a.Name) || len(a.HardwareAddr) != 6 {
			continue
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("interface %s: list addresses: %w", a.Name, err)
		}
		ep := &tapEndpoint{
			netns: netnsPath, name: a.Name, tap: tapName(len(pod.Endpoints)),
			id: "net" + strconv.Itoa(len(pod.Endpoints)), mac: a.HardwareAddr, mtu: a.MTU, queues: o.queues,
		}
		for _, ad := range addrs {
			if ad.IP.IsGlobalUnicast() && ad.IPNet != nil {
				ep.addrs = append(ep.addrs, ad.IPNet.String())
			}
		}
		pod.Endpoints = append(pod.Endpoints, ep)
		names[a.Index] = a.Name

		neighs, err := h.NeighList(a.Index, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("interface %s: list neighbours: %w", a.Name, err)
		}
		for _, n := range neighs {
			if n.State&netlink.NUD_PERMANENT == 0 || n.IP == nil || n.IP.IsMulticast() || len(n.HardwareAddr) != 6 {
				continue
			}
			pod.Neighbors = append(pod.Neighbors, &api.Neighbor{Ip: n.IP.String(), Mac: n.HardwareAddr.String(), Device: a.Name})
		}
	}
	if len(pod.Endpoints) == 0 {
		return pod, nil
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if ar := guestRoute(r, names); ar != nil {
			pod.Routes = append(pod.Routes, ar)
		}
	}
	sort.SliceStable(pod.Routes, func(i, j int) bool {
		return pod.Routes[i].Gateway == "" && pod.Routes[j].Gateway != ""
	})
	return pod, nil
}

// guestRoute converts a netns route through an endpoint into the agent's form, or returns nil
// for a route the guest does not need or that cannot be carried.
func guestRoute(r netlink.Route, names map[int]string) *api.Route {
	dev, ok := names[r.LinkIndex]
	if !ok || len(r.MultiPath) > 0 || r.Type != unix.RTN_UNICAST || r.Protocol == unix.RTPROT_KERNEL {
		return nil
	}
	if r.Dst != nil && r.Dst.IP.To4() == nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast()) {
		return nil
	}
	ar := &api.Route{Device: dev, Scope: uint32(r.Scope), Metric: uint32(r.Priority), Family: uint32(routeFamily(r))}
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones != 0 || !r.Dst.IP.IsUnspecified() {
			ar.Destination = r.Dst.String()
		}
	}
	if r.Gw != nil {
		ar.Gateway = r.Gw.String()
	}
	if r.Src != nil {
		ar.Source = r.Src.String()
	}
	return ar
}

func routeFamily(r netlink.Route) int {
	for _, ip := range []net.IP{r.Gw, r.Src} {
		if ip != nil {
			return family(ip)
		}
	}
	if r.Dst != nil {
		return family(r.Dst.IP)
	}
	return netlink.FAMILY_V4
}

func family(ip net.IP) int {
	if ip.To4() != nil {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// openHandle returns a netlink handle bound to the netns at path.
func openHandle(path string) (*netlink.Handle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns: %w", err)
	}
	defer func() { _ = ns.Close() }()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in netns: %w", err)
	}
	return h, nil
}

// netnsGone reports whether err says the netns path no longer exists (or is no longer a
// netns bind mount).
func netnsGone(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL)
}

func linkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}
