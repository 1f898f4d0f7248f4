// Package qemu runs one pod VM as a QEMU process (q35, direct kernel boot) with an optional
// virtiofsd sharing a host directory, and implements hypervisor.Hypervisor over QMP.
package qemu

import (
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/hypervisor"
)

const (
	// SharedFSTag is the virtio-fs tag the guest mounts the shared directory by.
	SharedFSTag = "podvm"
	// AgentPortName is the virtio-serial port name of the agent (guest:
	// /sys/class/virtio-ports/*/name).
	AgentPortName = "podvm.agent"
	// AgentVsockPort is the vsock port the guest agent listens on.
	AgentVsockPort = 1024

	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"

	TransportVsock  = "vsock"
	TransportSerial = "serial"

	// DefaultHotplugSlots is how many PCIe root ports are created for hot-plug when
	// Config.HotplugSlots is 0.
	DefaultHotplugSlots = 2
	DefaultVCPUs        = 1
	DefaultMemoryMiB    = 512

	defaultFirmware = "/usr/share/qemu/qboot.rom"
	// tcgTranslationCacheMiB caps TCG's translation cache (QEMU reserves 1 GiB by default;
	// a guest at idle uses ~30-40 MiB).
	tcgTranslationCacheMiB = 64
	// sunPathMax is the longest unix socket path (sockaddr_un.sun_path minus the NUL).
	sunPathMax = 107

	// DefaultUIDBase and DefaultUIDCount are the range QEMU's unprivileged uid and gid are
	// chosen from when Config leaves them 0: far above login users (1000+), nobody (65534)
	// and the ranges user namespaces are usually given, below 2^31 so that no tool reads
	// them as negative.
	DefaultUIDBase  = 2_000_000_000
	DefaultUIDCount = 1 << 20
	// MinUIDBase keeps the range clear of root and the system users (uids below 1000).
	MinUIDBase = 1000
	// maxUID is the largest uid a range may include: (uid_t)-1 means "unchanged" to set*uid.
	maxUID = 1<<32 - 2

	// consoleFdset is the -add-fd set holding the console pipe; QMP add-fd without an
	// fdset-id (block hot-plug) takes the lowest free id, so it never collides.
	consoleFdset = 1000
)

// Files in Config.StateDir.
const (
	QMPSocket       = "qmp.sock"
	ConsoleLog      = "console.log"
	QEMULog         = "qemu.log"
	QEMUPidFile     = "qemu.pid"
	AgentSocket     = "agent.sock"
	VirtiofsdSocket = "virtiofsd.sock"
	VirtiofsdLog    = "virtiofsd.log"
	VirtiofsdPid    = "virtiofsd.pid"
	// ChrootDir is the empty, root-owned directory QEMU chroots into once it has opened
	// everything it needs (-chroot).
	ChrootDir = "root"
)

// Config describes one VM. New resolves the environment-dependent defaults (see Resolve)
// and validates it.
type Config struct {
	// ID names the VM (QEMU's -name podvm-<ID>); letters, digits, '-', '_' and '.'.
	ID string
	// StateDir is the VM's own directory (created by Start): sockets, logs, pidfiles.
	StateDir string
	// QEMUPath is the qemu-system-x86_64 binary; default: looked up in PATH.
	QEMUPath string
	// Accel is "auto" (or ""), "kvm" or "tcg". auto is kvm when /dev/kvm works, else tcg.
	Accel string
	// VCPUs defaults to 1, MemoryMiB to 512.
	VCPUs     int
	MemoryMiB int
	// Kernel (required) and Initrd are booted directly; KernelParams are appended to
	// "console=ttyS0 panic=-1 reboot=k cryptomgr.notests" (+ "quiet" unless Debug), so a
	// later parameter overrides a default one.
	Kernel       string
	Initrd       string
	KernelParams []string
	Debug        bool
	// Firmware defaults to /usr/share/qemu/qboot.rom when it exists, else QEMU's SeaBIOS.
	Firmware string

	// SharedDir is shared with the guest over virtio-fs (tag SharedFSTag); empty = none.
	SharedDir string
	// VirtiofsdPath defaults to the first of VirtiofsdSearchPath (the Rust virtiofsd's
	// places first, then QEMU's C one in /usr/lib/qemu). Both are supported; either runs
	// without CAP_MKNOD and CAP_SETFCAP.
	VirtiofsdPath string
	// VirtiofsCache is "auto" (default), "always" or "never".
	VirtiofsCache string

	// AgentTransport is "vsock", "serial", or "" for vsock when /dev/vhost-vsock exists
	// and serial otherwise. VsockCID (>= 3, unique on the host) is required with vsock.
	AgentTransport string
	VsockCID       uint32

	// NetDevices are cold-plugged at boot; their tap files are passed to QEMU and closed
	// in this process once QEMU has started.
	NetDevices []*hypervisor.NetDevice
	// HotplugSlots is how many PCIe root ports to create for hot-plugged devices:
	// 0 = DefaultHotplugSlots, negative = none.
	HotplugSlots int

	// UIDBase and UIDCount are the range QEMU's uid (and its gid, the same number) is picked
	// from by ID (see RunAs): after opening its devices, memory, sockets and console, QEMU
	// drops to that uid/gid with no capabilities (-runas) and chroots into the empty
	// StateDir/root (-chroot). 0 = DefaultUIDBase, DefaultUIDCount.
	UIDBase  uint32
	UIDCount uint32
}

// Resolve returns a copy of c with every default filled in, probing the host where needed
// (PATH, /dev/kvm, /dev/vhost-vsock, firmware and virtiofsd locations). It does not validate.
func (c Config) Resolve() (Config, error) {
	if c.QEMUPath == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return c, fmt.Errorf("QEMUPath: qemu-system-x86_64 not found in PATH; install QEMU (Debian: qemu-system-x86) or set QEMUPath")
		}
		c.QEMUPath = p
	}
	if c.Accel == "" || c.Accel == AccelAuto {
		c.Accel = DetectAccel()
	}
	if c.AgentTransport == "" || c.AgentTransport == AccelAuto {
		c.AgentTransport = TransportSerial
		if _, err := os.Stat("/dev/vhost-vsock"); err == nil {
			c.AgentTransport = TransportVsock
		}
	}
	if c.Firmware == "" {
		if _, err := os.Stat(defaultFirmware); err == nil {
			c.Firmware = defaultFirmware
		}
	}
	if c.SharedDir != "" && c.VirtiofsdPath == "" {
		c.VirtiofsdPath = findVirtiofsd()
		if c.VirtiofsdPath == "" {
			return c, errors.New("VirtiofsdPath: no virtiofsd in /usr/libexec, PATH or /usr/lib/qemu; install virtiofsd (the Rust one is preferred) or set VirtiofsdPath (or leave SharedDir empty)")
		}
	}
	c.setPureDefaults()
	return c, nil
}

func (c *Config) setPureDefaults() {
	if c.VCPUs == 0 {
		c.VCPUs = DefaultVCPUs
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	if c.HotplugSlots == 0 {
		c.HotplugSlots = DefaultHotplugSlots
	}
	if c.SharedDir != "" && c.VirtiofsCache == "" {
		c.VirtiofsCache = "auto"
	}
	if c.UIDBase == 0 {
		c.UIDBase = DefaultUIDBase
	}
	if c.UIDCount == 0 {
		c.UIDCount = DefaultUIDCount
	}
}

// RunAs is the uid and gid QEMU runs as after start-up: UIDBase plus a hash (FNV-1a) of ID
// modulo UIDCount, so a VM keeps its uid across shim restarts and two VMs rarely share one
// (with the default range, about 1 in 10,000 for 150 VMs on a node).
func (c *Config) RunAs() (uid, gid uint32) {
	base, count := c.UIDBase, c.UIDCount
	if base == 0 {
		base = DefaultUIDBase
	}
	if count == 0 {
		count = DefaultUIDCount
	}
	h := fnv.New32a()
	h.Write([]byte(c.ID))
	uid = base + h.Sum32()%count
	return uid, uid
}

// ValidateUIDRange checks a uid range for QEMU (see Config.UIDBase); the error says what to
// change. The node config uses it too.
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

// VirtiofsdSearchPath is where Resolve looks for virtiofsd when VirtiofsdPath is empty, in
// order; "virtiofsd" (no slash) is looked up in PATH. The Rust virtiofsd (Debian/Ubuntu's
// virtiofsd package and Fedora put it in /usr/libexec; cargo installs into PATH) comes
// before the C one QEMU up to 7.2 ships in /usr/lib/qemu.
var VirtiofsdSearchPath = []string{"/usr/libexec/virtiofsd", "virtiofsd", "/usr/lib/qemu/virtiofsd"}

// FindVirtiofsd returns the first usable virtiofsd of VirtiofsdSearchPath, or "". access
// and lookPath are unix.Access and exec.LookPath, or fakes in tests.
func FindVirtiofsd(access func(path string, mode uint32) error, lookPath func(file string) (string, error)) string {
	for _, p := range VirtiofsdSearchPath {
		if !strings.Contains(p, "/") {
			if found, err := lookPath(p); err == nil {
				return found
			}
			continue
		}
		if access(p, unix.X_OK) == nil {
			return p
		}
	}
	return ""
}

func findVirtiofsd() string { return FindVirtiofsd(unix.Access, exec.LookPath) }

// DetectAccel returns "kvm" when /dev/kvm opens read-write and KVM_CREATE_VM succeeds,
// else "tcg".
func DetectAccel() string {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return AccelTCG
	}
	defer unix.Close(fd)
	const kvmCreateVM = 0xAE01 // _IO(KVMIO, 0x01)
	vm, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmCreateVM, 0)
	if errno != 0 {
		return AccelTCG
	}
	unix.Close(int(vm))
	return AccelKVM
}

// validID reports whether s is usable inside QEMU option values and names.
func validID(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// Validate checks a resolved Config (see Resolve). Each error names the field and says how
// to fix it. It only looks at the values, not at the files they name.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if !validID(c.ID) {
		bad("ID %q: must be non-empty and use only letters, digits, '-', '_' and '.'", c.ID)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("StateDir %q: must be an absolute path (e.g. /run/podvm/<id>)", c.StateDir)
	} else if n := len(filepath.Join(c.StateDir, VirtiofsdSocket)); n > sunPathMax {
		bad("StateDir %q: too long for unix sockets in it (%d > %d bytes); use a shorter path", c.StateDir, n, sunPathMax)
	}
	if c.QEMUPath == "" {
		bad("QEMUPath: empty; set it or call Resolve")
	}
	switch c.Accel {
	case AccelKVM, AccelTCG:
	default:
		bad("Accel %q: must be %q, %q or %q (auto is resolved by Resolve/New)", c.Accel, AccelAuto, AccelKVM, AccelTCG)
	}
	if c.VCPUs < 1 || c.VCPUs > 255 {
		bad("VCPUs %d: must be between 1 and 255", c.VCPUs)
	}
	if c.MemoryMiB < 64 {
		bad("MemoryMiB %d: must be at least 64", c.MemoryMiB)
	}
	if c.Kernel == "" {
		bad("Kernel: required; set it to the guest kernel image (e.g. /usr/share/podvm/vmlinuz)")
	} else if !filepath.IsAbs(c.Kernel) {
		bad("Kernel %q: must be an absolute path", c.Kernel)
	}
	if c.Initrd != "" && !filepath.IsAbs(c.Initrd) {
		bad("Initrd %q: must be an absolute path", c.Initrd)
	}
	if c.Firmware != "" && !filepath.IsAbs(c.Firmware) {
		bad("Firmware %q: must be an absolute path", c.Firmware)
	}
	for _, p := range c.KernelParams {
		if p == "" || strings.ContainsAny(p, " \t\n") {
			bad("KernelParams: %q is not one kernel parameter (empty or contains whitespace); give one parameter per element", p)
		}
	}
	if c.SharedDir != "" {
		if !filepath.IsAbs(c.SharedDir) {
			bad("SharedDir %q: must be an absolute path", c.SharedDir)
		}
		if c.VirtiofsdPath == "" {
			bad("VirtiofsdPath: empty with SharedDir set; set it or call Resolve")
		}
		switch c.VirtiofsCache {
		case "auto", "always", "never":
		default:
			bad("VirtiofsCache %q: must be auto, always or never", c.VirtiofsCache)
		}
	}
	switch c.AgentTransport {
	case TransportSerial:
	case TransportVsock:
		if c.VsockCID < 3 || c.VsockCID == 0xFFFFFFFF {
			bad("VsockCID %d: AgentTransport vsock needs a host-unique guest CID >= 3", c.VsockCID)
		}
	default:
		bad("AgentTransport %q: must be %q or %q (or empty to detect)", c.AgentTransport, TransportVsock, TransportSerial)
	}
	if err := ValidateUIDRange(uint64(c.UIDBase), uint64(c.UIDCount)); err != nil {
		bad("UIDBase/UIDCount: %w", err)
	}
	if c.HotplugSlots > 30 {
		bad("HotplugSlots %d: at most 30 root ports fit on the root bus", c.HotplugSlots)
	}
	seen := map[string]bool{}
	for i, nd := range c.NetDevices {
		switch {
		case nd == nil:
			bad("NetDevices[%d]: nil", i)
			continue
		case !validID(nd.ID):
			bad("NetDevices[%d].ID %q: must be non-empty and use only letters, digits, '-', '_' and '.'", i, nd.ID)
		case seen[nd.ID]:
			bad("NetDevices[%d].ID %q: duplicate", i, nd.ID)
		}
		seen[nd.ID] = true
		if len(nd.TapFiles) == 0 {
			bad("NetDevices[%d].TapFiles: at least one tap file (one per queue) is required", i)
		}
		for j, f := range nd.TapFiles {
			if f == nil {
				bad("NetDevices[%d].TapFiles[%d]: nil", i, j)
			}
		}
		if nd.MAC != nil && len(nd.MAC) != 6 {
			bad("NetDevices[%d].MAC %q: must be a 6-byte Ethernet address", i, nd.MAC)
		}
		if nd.MTU != 0 && (nd.MTU < 68 || nd.MTU > 65535) {
			bad("NetDevices[%d].MTU %d: must be 0 (default) or between 68 and 65535", i, nd.MTU)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid qemu config: %w", errors.Join(errs...))
	}
	return nil
}

// opt escapes a value for a QEMU -opt list, where ',' must be doubled.
func opt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func (c *Config) path(name string) string { return filepath.Join(c.StateDir, name) }

// KernelCmdline is the kernel command line Args passes with -append.
func (c *Config) KernelCmdline() string {
	params := []string{"console=ttyS0", "panic=-1", "reboot=k", "cryptomgr.notests"}
	if c.Debug {
		// The guest agent logs at debug level too.
		params = append(params, "podvm.debug")
	} else {
		params = append(params, "quiet")
	}
	return strings.Join(append(params, c.KernelParams...), " ")
}

// ExtraFiles are the files QEMU inherits, in the order Args numbers them from fd 3: the tap
// files of NetDevices. The console pipe's write end follows them (ConsoleFD).
func (c *Config) ExtraFiles() []*os.File {
	var files []*os.File
	for _, nd := range c.NetDevices {
		if nd != nil {
			files = append(files, nd.TapFiles...)
		}
	}
	return files
}

// ConsoleFD is the descriptor number QEMU inherits the console pipe's write end as: the one
// after ExtraFiles.
func (c *Config) ConsoleFD() int { return 3 + len(c.ExtraFiles()) }

// Args builds QEMU's argv (without argv[0]) from a resolved Config. It is pure: it reads no
// files and probes nothing, so it gives the same command line on any host.
func (c Config) Args() ([]string, error) {
	c.setPureDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	a := []string{
		"-name", "podvm-" + c.ID + ",debug-threads=on",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-machine", "q35,sata=off,smbus=off,vmport=off,smm=off,i8042=off",
	}
	if c.Accel == AccelKVM {
		a = append(a, "-accel", "kvm", "-cpu", "host")
	} else {
		a = append(a, "-accel", "tcg,tb-size="+strconv.Itoa(tcgTranslationCacheMiB))
	}
	mem := strconv.Itoa(c.MemoryMiB) + "M"
	a = append(a,
		"-smp", strconv.Itoa(c.VCPUs),
		"-m", mem,
		"-object", "memory-backend-memfd,id=mem,size="+mem+",share=on",
		"-numa", "node,memdev=mem",
	)
	if c.Firmware != "" {
		a = append(a, "-bios", opt(c.Firmware))
	}
	a = append(a, "-kernel", opt(c.Kernel))
	if c.Initrd != "" {
		a = append(a, "-initrd", opt(c.Initrd))
	}
	a = append(a, "-append", c.KernelCmdline())
	a = append(a,
		// The console goes into a pipe the VM drains into a size-capped log (the guest
		// controls what it writes); QEMU gets the write end as a descriptor.
		"-add-fd", fmt.Sprintf("fd=%d,set=%d,opaque=console", c.ConsoleFD(), consoleFdset),
		// append=on: without it QEMU truncates, which a pipe refuses.
		"-chardev", fmt.Sprintf("file,id=console,path=/dev/fdset/%d,append=on", consoleFdset),
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,path="+opt(c.path(QMPSocket))+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-pidfile", c.path(QEMUPidFile),
		"-msg", "timestamp=on",
		"-device", "virtio-rng-pci,id=rng",
	)
	switch c.AgentTransport {
	case TransportSerial:
		a = append(a,
			"-device", "virtio-serial-pci,id=vser",
			"-chardev", "socket,id=agent,path="+opt(c.path(AgentSocket))+",server=on,wait=off",
			"-device", "virtserialport,bus=vser.0,chardev=agent,name="+AgentPortName,
		)
	case TransportVsock:
		a = append(a, "-device", "vhost-vsock-pci,id=vsock,guest-cid="+strconv.FormatUint(uint64(c.VsockCID), 10))
	}
	if c.SharedDir != "" {
		a = append(a,
			"-chardev", "socket,id=fs,path="+opt(c.path(VirtiofsdSocket)),
			"-device", "vhost-user-fs-pci,id=fs,chardev=fs,tag="+SharedFSTag,
		)
	}
	fd := 3
	for _, nd := range c.NetDevices {
		fds := make([]string, len(nd.TapFiles))
		for i := range nd.TapFiles {
			fds[i] = strconv.Itoa(fd)
			fd++
		}
		vhost := "off"
		if nd.VhostNet {
			vhost = "on"
		}
		netdev := "tap,id=net-" + nd.ID + ",vhost=" + vhost
		dev := "virtio-net-pci,id=nic-" + nd.ID + ",netdev=net-" + nd.ID
		if len(fds) == 1 {
			netdev += ",fd=" + fds[0]
		} else {
			netdev += ",fds=" + strings.Join(fds, ":")
			dev += ",mq=on,vectors=" + strconv.Itoa(2*len(fds)+2)
		}
		if nd.MAC != nil {
			dev += ",mac=" + nd.MAC.String()
		}
		if nd.MTU != 0 {
			dev += ",host_mtu=" + strconv.Itoa(nd.MTU)
		}
		a = append(a, "-netdev", netdev, "-device", dev)
	}
	for i := 0; i < c.HotplugSlots; i++ {
		a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", rootPort(i), i+1))
	}
	// Confinement: once QEMU has opened everything (memory, kernel, devices, sockets, the
	// console), it chroots into an empty root-owned directory and drops to an unprivileged
	// uid/gid, which leaves it no capabilities. QEMU 7.2 installs its seccomp filter before
	// it drops privileges, so elevateprivileges=deny would kill it at its own setgid();
	// allow is safe after the drop (all its uids are the unprivileged one, so set*id cannot
	// gain anything) and spawn=deny still forbids exec.
	uid, gid := c.RunAs()
	a = append(a,
		"-runas", fmt.Sprintf("%d:%d", uid, gid),
		"-chroot", c.path(ChrootDir),
		"-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
	)
	return a, nil
}

func rootPort(i int) string { return "hp" + strconv.Itoa(i) }
