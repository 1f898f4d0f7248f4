// Package agent holds what host and guest share about the guest agent: the ttrpc API (api/),
// the host-side client (this package) and the agent itself (guest/).
package agent

// Port is the vsock port the agent listens on.
const Port = 1024

// SerialPortName is the virtio-serial port name the agent listens on.
const SerialPortName = "podvm.agent"

// GuestSharedDir is where the agent mounts the sandbox's virtio-fs share in the guest.
const GuestSharedDir = "/run/podvm/shared"

// Version is the agent API version the host and guest must agree on.
const Version = "podvm-agent/2"
