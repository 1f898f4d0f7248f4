// Package agent holds what host and guest share about the guest agent: the ttrpc API (api/),
// the host-side client (this package) and the agent itself (guest/).
package agent

// The agent's vsock port and virtio-serial port name, and the virtio-fs tag, are the VM's
// device contract: hypervisor.AgentVsockPort, AgentSerialPort and SharedFSTag.

// GuestSharedDir is where the agent mounts the sandbox's virtio-fs share in the guest.
const GuestSharedDir = "/run/podvm/shared"

// GuestPodTmpfsDir holds the pod's tmpfs in the guest (memory-backed emptyDirs), one
// directory per volume, mounted by the agent when the first container using it is created.
const GuestPodTmpfsDir = "/run/podvm/tmpfs"

// Version is the agent API version the host and guest must agree on.
const Version = "podvm-agent/2"
