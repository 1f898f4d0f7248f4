// Package network wires a pod's network namespace into its VM, whatever CNI plugin built it.
//
// containerd creates the pod netns and runs CNI before the shim starts the VM. Discover reads
// what CNI left there: every Ethernet-like interface (veth, macvlan, ipvlan, vlan, a physical
// device) with its MAC, MTU and addresses, the main-table routes through those interfaces and the
// permanent neighbour entries. Each interface becomes an Endpoint. Attach creates a tap inside
// the netns and joins it to the interface with tc, the way Kata Containers' "tcfilter" model
// does; the tap's file descriptors go to QEMU as a virtio-net NIC. The guest agent then gives
// that NIC the interface's name, MAC, MTU, addresses, routes and neighbours (Guest, Pod.Routes,
// Pod.Neighbors), so the VM owns the pod IP.
//
// # Objects per endpoint
//
// For an interface eth0 (the "pod interface") at position N, Attach creates, all inside the pod
// netns:
//
//   - a tap tapN_podvm (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, plus IFF_MULTI_QUEUE with more than one
//     queue), not persistent: it disappears when its last file descriptor, QEMU's, closes. Its MTU
//     is eth0's, IPv6 is disabled on it (so the netns sends no DAD/RS/MLD into the guest), and it
//     is up;
//   - an ingress qdisc (handle ffff:) on eth0 and on the tap, unless one is already there;
//   - on each of the two, a u32 match-all filter with priority FilterPriority, protocol all,
//     whose single action is "mirred egress redirect" to the other device (TC_ACT_STOLEN):
//     everything arriving on eth0 leaves through the tap into the guest, everything the guest
//     sends leaves through eth0.
//
// In tc terms:
//
//	tc qdisc add dev eth0 ingress
//	tc filter add dev eth0 parent ffff: prio 1700 protocol all u32 match u32 0 0 action mirred egress redirect dev tap0_podvm
//	tc qdisc add dev tap0_podvm ingress
//	tc filter add dev tap0_podvm parent ffff: prio 1700 protocol all u32 match u32 0 0 action mirred egress redirect dev eth0
//
// Detach and Cleanup remove the filters of that priority, the ingress qdisc when no other filter
// is left on it, and the taps (any interface named tap<digits>_podvm).
//
// QEMU takes the tap as "-netdev tap,fd=N" (or fds=N:M:… for multi-queue). QEMU probes the
// fd for IFF_VNET_HDR itself (TUNGETIFF) and rejects an explicit vnet_hdr= together with fd=, so
// the tap is opened with IFF_VNET_HDR and the command line says nothing about it. vhost-net is
// asked for only where /dev/vhost-net exists.
//
// # The pod IP: who owns it, and why the interface keeps its addresses
//
// The guest NIC gets eth0's MAC, so CNI rules keyed on it (bridge FDB, anti-spoofing, a MAC
// the IPAM handed out) keep matching, and eth0's addresses, so the guest answers for the pod
// IP. eth0 itself is left exactly as CNI configured it: same MAC, same addresses, same routes.
// That is safe and it is what keeps the rest of the system working:
//
//   - (a) Traffic to the pod IP reaches the guest: the ingress filter on eth0 runs before the
//     netns's IP and ARP stack sees a frame, and steals every frame for the tap.
//   - (b) The netns does not answer ARP or ICMP for the pod IP in the guest's place: it never
//     receives a frame from eth0 at all, so the address left on eth0 is inert for traffic that
//     comes from outside. (Only processes inside the pod netns itself would still talk to the
//     netns's own copy of the IP; podvm runs nothing there.) The tap carries no address and no
//     IPv6, so the netns sends nothing into the guest either.
//   - (c) CNI DEL keeps working: it finds eth0 with its addresses and deletes it; plugins such as
//     bridge read the addresses from the interface on DEL to tear down their masquerade rules,
//     which would leak if podvm had flushed them. Deleting eth0 also drops its qdisc and
//     filters; the tap goes with QEMU or with Cleanup. And a restarted shim can Discover the
//     same netns again.
//
// Routes are the main table's routes through the endpoints, minus what the guest kernel makes
// by itself (proto kernel prefix routes, IPv6 link-local and multicast); multipath routes are
// not carried. Link-scope routes come before routes through a gateway so the agent can add them
// in order. Only permanent neighbour entries are carried (static entries a CNI plugin set up on
// purpose, e.g. a gateway MAC): the agent installs neighbours as permanent, and an entry the
// netns merely learned could go stale in the guest forever.
//
// All netlink work uses handles bound to the pod netns (netlink.NewHandleAt). The only code that
// enters the netns is the tap creation and the port forwarder's listener and iptables calls: a
// fresh goroutine locks its OS thread, setns()es into the pod netns, opens /dev/net/tun and
// issues TUNSETIFF (or creates the listening socket, or starts iptables, which inherits the
// thread's netns), and restores its netns; if it cannot restore it, the thread stays locked and
// the Go runtime discards it.
//
// # Port-forward
//
// ForwardPorts makes loopback TCP in the pod netns (where containerd's CRI PortForward dials)
// reach the same port in the guest; see PortForwarder and docs/networking.md.
//
// hostNetwork pods have no netns of their own and nothing of this applies to them.
package network
