// Package hypervisor defines what podvm needs from a virtual machine monitor: one VM per pod,
// started and stopped, with devices added while it runs and a connection to the guest agent.
// Config and Driver are neutral: callers (the shim) pick a Driver by kind and never see the
// VMM behind it. The QEMU implementation lives in hypervisor/qemu; hypervisor/qmp is its
// monitor protocol.
package hypervisor

import (
	"context"
	"errors"
	"net"
	"os"
)

// Hypervisor is one virtual machine.
type Hypervisor interface {
	// Start spawns the VM (and its helpers such as virtiofsd) and completes the monitor
	// handshake. On error nothing is left running.
	Start(ctx context.Context) error
	// Stop asks the VM to quit, then kills it when ctx ends; it also stops the helpers.
	// Stop on a VM that is not running is a no-op.
	Stop(ctx context.Context) error
	// Done is closed when the VM process has exited.
	Done() <-chan struct{}
	// Hotplug adds a device to the running VM.
	Hotplug(ctx context.Context, d Device) error
	// Unplug removes a device added by Hotplug, by its ID.
	Unplug(ctx context.Context, id string) error
	// DialAgent opens one connection to the guest agent's transport (vsock, or the
	// virtio-serial socket). It does not wait for the agent to be ready.
	DialAgent(ctx context.Context) (net.Conn, error)
	// ConsolePath is the file the guest's console is logged to (capped; read its end only).
	ConsolePath() string
	// Pid is the host pid of the VM process (the VMM), 0 before Start.
	Pid() int
}

// Device is something that can be hot-plugged into a VM: *BlockDevice or *NetDevice.
type Device interface {
	DeviceID() string
}

// BlockDevice is a host block device or disk image file given to the guest as virtio-blk.
// The guest finds it by Serial (at most 20 bytes, virtio-blk's limit), which defaults to ID.
//
// File is the device or image, opened by the caller (read-write unless ReadOnly) and checked
// through that handle: the hypervisor is given the descriptor, never the path, so a path an
// attacker can rewrite (a pod's volume directory) cannot redirect it. Path only names it in
// messages. The caller keeps ownership of File and may close it once Hotplug returns.
type BlockDevice struct {
	ID       string
	File     *os.File
	Path     string // what File is, for messages
	Format   string // "raw" (default) or "qcow2"
	ReadOnly bool
	Serial   string
	// Cache is "none" (O_DIRECT, the default) or "writeback".
	Cache string
	// AIO is "io_uring" (default; "threads" where the host refuses it), "threads" or "native".
	AIO string
}

// DeviceID implements Device.
func (d *BlockDevice) DeviceID() string { return d.ID }

// NetDevice is a guest NIC backed by tap file descriptors the caller opened.
type NetDevice struct {
	ID       string
	MAC      net.HardwareAddr
	MTU      int
	TapFiles []*os.File // one per queue; handed to the VM and owned by it afterwards
	VhostNet bool       // use vhost-net (only where /dev/vhost-net exists)
}

// DeviceID implements Device.
func (d *NetDevice) DeviceID() string { return d.ID }

// TemplateNICs is how many NICs a VM restored from a template can get (Config.Templated).
// The first is part of the template: the template VM boots with it (on a tap that leads
// nowhere), and a clone gets it on the pod's first tap with the device state the guest saved,
// MAC included (TemplateNICMAC) until the agent sets the pod's (api.Interface.guest_mac). The
// others are hot-plugged into root ports the template reserves for them.
const TemplateNICs = 2

// TemplateNICMAC is the MAC a VM template's NIC has, in the template and, until the agent
// gives it the pod's, in each clone: locally administered, unicast.
const TemplateNICMAC = "02:70:6f:64:76:6d"

// ErrRestore marks a VM that its VMM could not restore from a template's saved state: the
// template is broken (or of another VMM build), not the pod.
var ErrRestore = errors.New("the VM template's saved state does not restore")

// Template is a saved, booted VM a driver restores pod VMs from (Driver.Template): templated
// start. A restored guest is a copy of the template's, so the caller makes it the pod's own
// (the agent's PrepareRestored) before anything runs in it.
type Template interface {
	// Key names the template: a hash of everything that shapes the VM.
	Key() string
	// Clone makes cfg (the pod's VM, with its share and NICs) a clone of the template: it
	// sets Templated, MemoryFile (a private copy of the template's memory) and Incoming.
	Clone(ctx context.Context, cfg *Config) error
	// Discard removes the template, e.g. after a restore from it failed, so that the next
	// Driver.Template builds it anew.
	Discard(ctx context.Context) error
}
