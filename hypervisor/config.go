package hypervisor

import (
	"context"
	"fmt"
	"os"
	"slices"
)

// What host and guest agree on about the VM's devices. The guest agent finds its transports
// and the share by these, whatever the VMM.
const (
	// SharedFSTag is the virtio-fs tag the guest mounts the pod's share by.
	SharedFSTag = "podvm"
	// AgentVsockPort is the vsock port the guest agent listens on.
	AgentVsockPort = 1024
	// AgentSerialPort is the name of the virtio-serial port the guest agent listens on
	// (guest: /sys/class/virtio-ports/*/name).
	AgentSerialPort = "podvm.agent"
)

// Accelerators.
const (
	// AccelAuto is KVM when it boots the guest and is not slower than TCG (the driver probes
	// once per node), else TCG (emulation).
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Agent transports.
const (
	// TransportAuto is vsock when the host has /dev/vhost-vsock, else virtio-serial.
	TransportAuto   = "auto"
	TransportVsock  = "vsock"
	TransportSerial = "serial"
)

// MaxHotplugSlots is the most hot-plug slots a VM may ask for.
const MaxHotplugSlots = 30

// The uid range VMM processes drop to (Config.UIDBase, UIDCount).
const (
	// DefaultUIDBase and DefaultUIDCount: far above login users (1000+), nobody (65534) and
	// the ranges user namespaces are usually given, below 2^31 so that no tool reads them
	// as negative.
	DefaultUIDBase  = 2_000_000_000
	DefaultUIDCount = 1 << 20
	// MinUIDBase keeps the range clear of root and the system users (uids below 1000).
	MinUIDBase = 1000
	// maxUID is the largest uid a range may include: (uid_t)-1 means "unchanged" to set*uid.
	maxUID = 1<<32 - 2
)

// Config describes one pod VM, whatever the VMM. The node config decides most of it, the pod
// its size, network devices and share. A Driver's New resolves the "auto" choices and
// defaults and validates the rest.
type Config struct {
	// ID names the VM; letters, digits, '-', '_' and '.'.
	ID string
	// StateDir is the VM's own directory (sockets, logs, pidfiles); no guest writes to it.
	StateDir string
	// Binary is the VMM executable; empty means the driver's default, looked up in PATH.
	Binary string
	// Accel is AccelAuto (or ""), AccelKVM or AccelTCG.
	Accel string
	// CPU is the guest CPU model under KVM; empty means the driver's choice (QEMU: the one its
	// accelerator probe found working, else "host"). Ignored under TCG.
	CPU string
	// TSCkHz is the guest's TSC frequency in kHz, which the guest kernel is given instead of
	// measuring it at boot; 0: the kernel measures it. QEMU's Resolve sets the host's under
	// TCG, where the guest's TSC is the host's. Used under TCG only.
	TSCkHz int
	// VCPUs and MemoryMiB size the VM; 0 means the driver's default.
	VCPUs     int
	MemoryMiB int
	// Kernel (required) and Initrd are booted directly; KernelParams are appended to the
	// driver's command line, so a later parameter overrides a default one.
	Kernel string
	Initrd string
	// RootImage, instead of Initrd, is a read-only ext4 image the guest boots from as its
	// root: mapped, not copied, so every VM shares the host's page cache of it (QEMU:
	// virtio-pmem, mounted with DAX). Its size must be a multiple of 2 MiB.
	RootImage string
	// RootImageSize is RootImage's size in bytes; 0 means the driver stats the file.
	RootImageSize int64
	KernelParams  []string
	// Debug makes the guest verbose (no "quiet"; the agent logs at debug level).
	Debug bool
	// Firmware is the VM's firmware; empty means the driver's default.
	Firmware string

	// SharedDir is exported to the guest over virtio-fs (tag SharedFSTag); empty means none.
	// Mounts made under it later reach the guest only if it is a mount with shared
	// propagation (rootfs.CreateShare makes it one).
	SharedDir string
	// SharedDirNS runs a function in the mount namespace SharedDir is mounted in, when that
	// is not the caller's (rootfs.Share keeps its own): the virtio-fs daemon is started by
	// it, so that it is born there. nil means the caller's namespace.
	SharedDirNS func(func() error) error
	// VirtiofsdPath is the virtio-fs daemon; empty means the driver's search.
	VirtiofsdPath string
	// VirtiofsCache is "keep" (default), "auto", "always" or "never" (docs/storage.md).
	VirtiofsCache string

	// AgentTransport is TransportAuto (or ""), TransportVsock or TransportSerial.
	// VsockCID (>= 3, unique on the host) is required with vsock.
	AgentTransport string
	VsockCID       uint32

	// NetDevices are attached at boot; the VM takes over their tap files.
	NetDevices []*NetDevice
	// HotplugSlots is how many devices can be hot-plugged at once (0: none).
	HotplugSlots int

	// Templated makes the VM a VM template or a clone of one (templating.go): no virtio-fs
	// device and no NIC on its command line, PCIe root ports reserved for hot-plugging them
	// instead, and guest RAM in MemoryFile. A template and its clones have the same devices.
	Templated bool
	// MemoryFile is the guest RAM: a file the caller opened read-write, MemoryMiB long. A
	// templated VM's is a template's memory or a clone's copy of it; a booted VM has one when
	// its kernel was copied into it ahead (KernelStub). The VM takes it over.
	MemoryFile *os.File
	// KernelStub, with MemoryFile on a booted VM, is what the VMM loads as its kernel
	// instead of Kernel, whose segments are in MemoryFile already: the kernel's entry note
	// and first page only (the qemu driver's preload.go). The VM takes it over.
	KernelStub *os.File
	// MemoryFill, if set, fills MemoryFile (a clone's copy of the template's memory): the VM
	// runs it while its VMM starts and waits for it before restoring Incoming.
	MemoryFill func() error
	// Incoming, with Templated, is a template's saved device state the VM is restored from
	// instead of booting; SharedDir and NetDevices are then hot-plugged before the guest
	// runs again. The VM takes it over.
	Incoming *os.File

	// UIDBase and UIDCount are the range the VMM process's unprivileged uid (and gid) is
	// picked from by ID; 0 means DefaultUIDBase and DefaultUIDCount.
	UIDBase  uint32
	UIDCount uint32
}

// ValidateUIDRange checks a uid range for VMM processes (Config.UIDBase, UIDCount); the error
// says what to change.
func ValidateUIDRange(base, count uint64) error {
	switch {
	case base < MinUIDBase:
		return fmt.Errorf("uid base %d: must be at least %d (root and system users are below), e.g. %d", base, MinUIDBase, uint64(DefaultUIDBase))
	case count < 1:
		return fmt.Errorf("uid count %d: must be at least 1, e.g. %d", count, uint64(DefaultUIDCount))
	case base+count-1 > maxUID:
		return fmt.Errorf("uid range %d..%d: ends above %d (the largest uid); lower the base or the count", base, base+count-1, uint64(maxUID))
	case base <= 65534 && 65534 <= base+count-1:
		return fmt.Errorf("uid range %d..%d: includes 65534 (nobody, also the overflow uid); start above it, e.g. %d", base, base+count-1, uint64(DefaultUIDBase))
	}
	return nil
}

// Driver is one VMM implementation, chosen by Kind (the node config's hypervisor.kind). It
// makes VMs, and cleans up after a VM whose owner died from the VM's state dir alone.
type Driver struct {
	// Kind names the implementation ("qemu"); it is kept in the sandbox's crash record.
	Kind string
	// New checks cfg and returns a VM that is not started yet; ctx bounds what it probes.
	New func(ctx context.Context, cfg Config) (Hypervisor, error)
	// Cleanup stops what a VM with this state dir left behind when its owner died. It is
	// idempotent and does not remove the state dir.
	Cleanup func(ctx context.Context, stateDir string) error
	// ConsolePath is where a VM with this state dir writes its guest's console log.
	ConsolePath func(stateDir string) string
	// Template finds the template for VMs like cfg (its size, kernel, initrd, machine; its
	// ID, state dir, share and NICs do not matter) in dir, or builds it there first (under a
	// lock: concurrent callers wait for one build). nil: the driver has no templating.
	Template func(ctx context.Context, cfg Config, dir string) (Template, error)
}

// Drivers are the VMM implementations a program has, by kind.
type Drivers map[string]Driver

// NewDrivers indexes ds by kind.
func NewDrivers(ds ...Driver) Drivers {
	m := Drivers{}
	for _, d := range ds {
		m[d.Kind] = d
	}
	return m
}

// Get returns the driver of kind, or an error that names the kinds there are.
func (ds Drivers) Get(kind string) (Driver, error) {
	if d, ok := ds[kind]; ok {
		return d, nil
	}
	kinds := make([]string, 0, len(ds))
	for k := range ds {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	return Driver{}, fmt.Errorf("hypervisor kind %q is not built into this binary (it has %q); set hypervisor.kind in the node config to one of them", kind, kinds)
}
