// Package qemu runs one pod VM as a QEMU process (q35, direct kernel boot) with an optional
// virtiofsd sharing a host directory, and implements hypervisor.Hypervisor over QMP.
package qemu

import (
	"context"
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
	// DefaultVCPUs is the vCPU count of a VM whose Config leaves VCPUs 0.
	DefaultVCPUs = 1
	// DefaultMemoryMiB is the memory of a VM whose Config leaves MemoryMiB 0.
	DefaultMemoryMiB = 512

	defaultFirmware = "/usr/share/qemu/qboot.rom"
	// tcgTranslationCacheMiB caps TCG's translation cache (QEMU reserves 1 GiB by default).
	// A pod's boot and first container fill ~112k blocks; its execs bring it to ~128k, more
	// than 64 MiB holds, and a full cache is flushed whole and translated again (an exec
	// ~20% slower on median; docs/benchmarks.md). QEMU's PSS grows with the cache in use,
	// not with the cap.
	tcgTranslationCacheMiB = 96
	// pageReportingOrder is the smallest free block, as a buddy order, the guest reports to
	// the host (KernelCmdline).
	pageReportingOrder = 3
	// lapicTimerKHz is the input clock of QEMU's local APIC timer (1 GHz; KVM's is the
	// same), which podvm's kernel takes from lapic_timer_khz= instead of calibrating it.
	lapicTimerKHz = 1000000
	// guestHZ is the guest kernel's timer frequency (CONFIG_HZ), which lpj= is counted in:
	// podvm's kernel and Debian's both tick at 250 Hz. TestPodvmDefaultSize checks that the
	// guest's BogoMIPS agree with its TSC.
	guestHZ = 250
	// sunPathMax is the longest unix socket path (sockaddr_un.sun_path minus the NUL).
	sunPathMax = 107

	// ConsoleLogMax is the size at which the console log (and QEMU's own log) is rotated, so
	// a guest that floods its serial console costs the host at most about twice this on disk.
	ConsoleLogMax = 1 << 20

	// consoleFdset is the -add-fd set holding the console pipe; QMP add-fd without an
	// fdset-id (block hot-plug) takes the lowest free id, so it never collides.
	consoleFdset = 1000
)

// The device contract with the guest, and the choices of hypervisor.Config, under the names
// this package's code reads best with.
const (
	AccelAuto       = hypervisor.AccelAuto
	AccelKVM        = hypervisor.AccelKVM
	AccelTCG        = hypervisor.AccelTCG
	TransportVsock  = hypervisor.TransportVsock
	TransportSerial = hypervisor.TransportSerial
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

// Config is hypervisor.Config with QEMU's methods: Resolve fills in the defaults (probing
// the host), Validate checks, Args builds the command line.
type Config hypervisor.Config

// Resolve returns a copy of c with every default filled in, probing the host where needed
// (PATH, /dev/vhost-vsock, firmware and virtiofsd locations, and for accel "auto" the
// accelerator probe's cached result, see CachedAccel). It does not validate.
// ctx bounds the accelerator probe when accel "auto" has to run it.
func (c Config) Resolve(ctx context.Context) (Config, error) {
	if c.Binary == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return c, errors.New("qemu config: Binary: qemu-system-x86_64 not found in PATH; install QEMU (Debian: qemu-system-x86) or set hypervisor.qemu_path")
		}
		c.Binary = p
	}
	if c.AgentTransport == "" || c.AgentTransport == hypervisor.TransportAuto {
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
	if c.RootImage != "" && c.RootImageSize == 0 {
		st, err := os.Stat(c.RootImage)
		if err != nil {
			return c, fmt.Errorf("RootImage: %w; build it with 'podvm image build' (podvm's kernel), or boot from an initrd instead", err)
		}
		c.RootImageSize = st.Size()
	}
	if c.SharedDir != "" && c.VirtiofsdPath == "" {
		c.VirtiofsdPath = findVirtiofsd()
		if c.VirtiofsdPath == "" {
			return c, errors.New("VirtiofsdPath: no virtiofsd in /usr/libexec, PATH or /usr/lib/qemu; install virtiofsd (the Rust one is preferred) or set VirtiofsdPath (or leave SharedDir empty)")
		}
	}
	c.setPureDefaults()
	if c.Accel == "" || c.Accel == AccelAuto {
		if err := c.resolveAutoAccel(ctx); err != nil {
			return c, err
		}
	}
	if c.Accel == AccelTCG && c.TSCkHz == 0 && !c.Templated {
		// A template's boot measures its own: its command line is part of the template's
		// key, which must not change with every measurement.
		c.TSCkHz = hostTSCkHz()
	}
	return c, nil
}

func (c *Config) setPureDefaults() {
	if c.VCPUs == 0 {
		c.VCPUs = DefaultVCPUs
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	if c.SharedDir != "" && c.VirtiofsCache == "" {
		c.VirtiofsCache = "keep"
	}
	if c.UIDBase == 0 {
		c.UIDBase = hypervisor.DefaultUIDBase
	}
	if c.UIDCount == 0 {
		c.UIDCount = hypervisor.DefaultUIDCount
	}
}

// RunAs is the uid and gid QEMU runs as after start-up: UIDBase plus a hash (FNV-1a) of ID
// modulo UIDCount, so a VM keeps its uid across shim restarts and two VMs rarely share one
// (with the default range, about 1 in 10,000 for 150 VMs on a node).
func (c *Config) RunAs() (uid, gid uint32) {
	base, count := c.UIDBase, c.UIDCount
	if base == 0 {
		base = hypervisor.DefaultUIDBase
	}
	if count == 0 {
		count = hypervisor.DefaultUIDCount
	}
	h := fnv.New32a()
	h.Write([]byte(c.ID))
	uid = base + h.Sum32()%count
	return uid, uid
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
	defer func() { _ = unix.Close(fd) }() // only probed

	const kvmCreateVM = 0xAE01 // _IO(KVMIO, 0x01)
	vm, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmCreateVM, 0)
	if errno != 0 {
		return AccelTCG
	}
	_ = unix.Close(int(vm)) // created only to see that it can be
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
	var p problems
	c.validateMachine(&p)
	c.validateBoot(&p)
	c.validateSharedDir(&p)
	c.validateAgentTransport(&p)
	if err := hypervisor.ValidateUIDRange(uint64(c.UIDBase), uint64(c.UIDCount)); err != nil {
		p.add("UIDBase/UIDCount: %w", err)
	}
	if c.HotplugSlots < 0 || c.HotplugSlots > hypervisor.MaxHotplugSlots {
		p.add("HotplugSlots %d: must be between 0 and %d (root ports on the root bus)", c.HotplugSlots, hypervisor.MaxHotplugSlots)
	}
	validateNetDevices(&p, c.NetDevices)
	c.validateTemplate(&p)
	if len(p) > 0 {
		return fmt.Errorf("invalid qemu config: %w", errors.Join(p...))
	}
	return nil
}

// problems collects what Validate finds wrong, in the order it checks.
type problems []error

func (p *problems) add(format string, a ...any) { *p = append(*p, fmt.Errorf(format, a...)) }

// validateMachine checks the VM's identity, state dir, QEMU binary, accelerator and size.
func (c *Config) validateMachine(p *problems) {
	if !validID(c.ID) {
		p.add("ID %q: must be non-empty and use only letters, digits, '-', '_' and '.'", c.ID)
	}
	if !filepath.IsAbs(c.StateDir) {
		p.add("StateDir %q: must be an absolute path (e.g. /run/podvm/<id>)", c.StateDir)
	} else if n := len(filepath.Join(c.StateDir, VirtiofsdSocket)); n > sunPathMax {
		p.add("StateDir %q: too long for unix sockets in it (%d > %d bytes); use a shorter path", c.StateDir, n, sunPathMax)
	}
	if c.Binary == "" {
		p.add("Binary: empty; set it or call Resolve")
	}
	switch c.Accel {
	case AccelKVM, AccelTCG:
	default:
		p.add("Accel %q: must be %q, %q or %q (auto is resolved by Resolve/New)", c.Accel, AccelAuto, AccelKVM, AccelTCG)
	}
	if c.TSCkHz < 0 || c.TSCkHz > 20e6 {
		p.add("TSCkHz %d: must be 0 (the guest kernel measures it) or the TSC's frequency in kHz, up to 20000000", c.TSCkHz)
	}
	if c.CPU != "" && !validCPUModel(c.CPU) {
		p.add("CPU %q: not a QEMU CPU model (letters, digits and '-', '_', '.', then ',feature=on|off' options), e.g. %q or %q", c.CPU, CPUHost, "qemu64")
	}
	if c.VCPUs < 1 || c.VCPUs > 255 {
		p.add("VCPUs %d: must be between 1 and 255", c.VCPUs)
	}
	if c.MemoryMiB < 64 {
		p.add("MemoryMiB %d: must be at least 64", c.MemoryMiB)
	}
}

// validateBoot checks the kernel, initrd, firmware and kernel parameters.
func (c *Config) validateBoot(p *problems) {
	if c.Kernel == "" {
		p.add("Kernel: required; set it to the guest kernel image (e.g. /usr/share/podvm/vmlinuz)")
	} else if !filepath.IsAbs(c.Kernel) {
		p.add("Kernel %q: must be an absolute path", c.Kernel)
	}
	if c.Initrd != "" && !filepath.IsAbs(c.Initrd) {
		p.add("Initrd %q: must be an absolute path", c.Initrd)
	}
	c.validateRootImage(p)
	if c.Firmware != "" && !filepath.IsAbs(c.Firmware) {
		p.add("Firmware %q: must be an absolute path", c.Firmware)
	}
	for _, kp := range c.KernelParams {
		if kp == "" || strings.ContainsAny(kp, " \t\n") {
			p.add("KernelParams: %q is not one kernel parameter (empty or contains whitespace); give one parameter per element", kp)
		}
	}
}

// rootImageAlign is what a root image's size must be a multiple of: the guest maps
// virtio-pmem memory in 2 MiB sections.
const rootImageAlign = 2 << 20

// validateRootImage checks the root image, if there is one.
func (c *Config) validateRootImage(p *problems) {
	if c.RootImage == "" {
		return
	}
	if !filepath.IsAbs(c.RootImage) {
		p.add("RootImage %q: must be an absolute path", c.RootImage)
	}
	if c.Initrd != "" {
		p.add("RootImage %q and Initrd %q: the guest boots from one of them; leave Initrd empty", c.RootImage, c.Initrd)
	}
	if c.RootImageSize <= 0 || c.RootImageSize%rootImageAlign != 0 {
		p.add("RootImage %q: its size, %d bytes, is not a positive multiple of 2 MiB (the guest maps it in 2 MiB sections); build it with 'podvm image build'", c.RootImage, c.RootImageSize)
	}
}

// validateSharedDir checks the virtio-fs share, if there is one.
func (c *Config) validateSharedDir(p *problems) {
	if c.SharedDir == "" {
		return
	}
	if !filepath.IsAbs(c.SharedDir) {
		p.add("SharedDir %q: must be an absolute path", c.SharedDir)
	}
	if c.VirtiofsdPath == "" {
		p.add("VirtiofsdPath: empty with SharedDir set; set it or call Resolve")
	}
	switch c.VirtiofsCache {
	case "keep", "auto", "always", "never":
	default:
		p.add("VirtiofsCache %q: must be keep, auto, always or never", c.VirtiofsCache)
	}
}

// validateAgentTransport checks how the shim reaches the guest agent.
func (c *Config) validateAgentTransport(p *problems) {
	switch c.AgentTransport {
	case TransportSerial:
	case TransportVsock:
		if c.VsockCID < 3 || c.VsockCID == 0xFFFFFFFF {
			p.add("VsockCID %d: AgentTransport vsock needs a host-unique guest CID >= 3", c.VsockCID)
		}
	default:
		p.add("AgentTransport %q: must be %q or %q (or empty to detect)", c.AgentTransport, TransportVsock, TransportSerial)
	}
}

// validateTemplate checks a templated VM's memory, state and device count.
func (c *Config) validateTemplate(p *problems) {
	if !c.Templated {
		if c.Incoming != nil {
			p.add("Incoming: set without Templated; it is a VM template's clone's")
		}
		if (c.MemoryFile == nil) != (c.KernelStub == nil) {
			p.add("MemoryFile/KernelStub: a booted VM has both (its kernel preloaded into its memory) or neither")
		}
		return
	}
	if c.KernelStub != nil {
		p.add("KernelStub: set with Templated; a VM template's kernel is QEMU's to load")
	}
	if c.MemoryFile == nil {
		p.add("MemoryFile: required with Templated (the guest RAM file)")
	}
	if len(c.NetDevices) > hypervisor.TemplateNICs {
		p.add("NetDevices: %d NICs; a VM restored from a template can have at most %d", len(c.NetDevices), hypervisor.TemplateNICs)
	}
	if len(c.NetDevices) > 0 && c.NetDevices[0] != nil && len(c.NetDevices[0].TapFiles) > 1 {
		p.add("NetDevices[0]: %d tap queues; a templated VM's first NIC is the template's, which has one", len(c.NetDevices[0].TapFiles))
	}
	if c.Incoming == nil && (c.SharedDir != "" || len(c.NetDevices) > 1) {
		p.add("SharedDir/NetDevices: a VM template has no share and only its own NIC (its clones get the rest hot-plugged)")
	}
}

// validateNetDevices checks each network device and that their IDs are unique.
func validateNetDevices(p *problems, devs []*hypervisor.NetDevice) {
	seen := map[string]bool{}
	for i, nd := range devs {
		switch {
		case nd == nil:
			p.add("NetDevices[%d]: nil", i)
			continue
		case !validID(nd.ID):
			p.add("NetDevices[%d].ID %q: must be non-empty and use only letters, digits, '-', '_' and '.'", i, nd.ID)
		case seen[nd.ID]:
			p.add("NetDevices[%d].ID %q: duplicate", i, nd.ID)
		}
		seen[nd.ID] = true
		if len(nd.TapFiles) == 0 {
			p.add("NetDevices[%d].TapFiles: at least one tap file (one per queue) is required", i)
		}
		for j, f := range nd.TapFiles {
			if f == nil {
				p.add("NetDevices[%d].TapFiles[%d]: nil", i, j)
			}
		}
		if nd.MAC != nil && len(nd.MAC) != 6 {
			p.add("NetDevices[%d].MAC %q: must be a 6-byte Ethernet address", i, nd.MAC)
		}
		if nd.MTU != 0 && (nd.MTU < 68 || nd.MTU > 65535) {
			p.add("NetDevices[%d].MTU %d: must be 0 (default) or between 68 and 65535", i, nd.MTU)
		}
	}
}

// withoutACPI says the guest boots without ACPI: every VM but a template and its clones,
// whose devices are hot-plugged at restore, where ACPI's hot-plug is the quicker. The kernel
// command line and QEMU's hot-plug setting follow it together.
func (c *Config) withoutACPI() bool { return !c.Templated }

// deviceMemory is where q35 maps the memory devices (the root image's pmem): the first
// GiB boundary above the RAM that lies above 4 GiB, as large as maxmem exceeds the RAM
// (QEMU 7.2's pc_memory_init; q35 keeps RAM below 4 GiB up to 2.75 GiB, else 2 GiB).
func (c *Config) deviceMemory() (base, size int64) {
	if c.RootImage == "" {
		return 0, 0
	}
	const gib = int64(1) << 30
	ram := int64(c.MemoryMiB) << 20
	lowmem := int64(0xb0000000)
	if ram >= lowmem {
		lowmem = 0x80000000
	}
	above := max(ram-lowmem, 0)
	base = (4*gib + above + gib - 1) / gib * gib
	return base, c.RootImageSize
}

// opt escapes a value for a QEMU -opt list, where ',' must be doubled.
func opt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func (c *Config) path(name string) string { return filepath.Join(c.StateDir, name) }

// KernelCmdline is the kernel command line Args passes with -append.
func (c *Config) KernelCmdline() string {
	params := []string{"console=ttyS0", "panic=-1", "reboot=k", "cryptomgr.notests",
		// Free page reporting (the balloon's free-page-reporting=on) hands free blocks of
		// 2^3 pages (32 KiB) and up back to the host instead of only whole 2 MiB blocks:
		// an idle pod's QEMU measured ~4 MiB smaller (docs/benchmarks.md). Linux 6.1's
		// balloon driver overwrites the boot value when it probes; the agent writes it
		// again (agent/guest: applyPageReportingOrder).
		"page_reporting.page_reporting_order=" + strconv.Itoa(pageReportingOrder),
		// The guest's network namespace is the pod's, so the dummy0 a built-in dummy driver
		// makes at boot would show in every pod (a runc pod has lo and eth0); a pod that
		// wants dummy devices still creates them with `ip link add`. ~10 ms of TCG boot too.
		"dummy.numdummies=0",
		// No bounce buffer for DMA above 4 GiB: a guest whose RAM reaches past it (more than
		// ~2.75 GiB on q35) would otherwise set 64 MiB of it aside and zero it at boot, and
		// the host would hold those pages for the pod's life. No device of a pod VM needs
		// it: virtio devices without VIRTIO_F_ACCESS_PLATFORM (QEMU's default) reach all of
		// guest RAM and skip the DMA API. A 4 GiB guest: 65 MiB less of the host's memory
		// and ~0.35 s less boot under TCG (docs/benchmarks.md).
		"swiotlb=noforce",
	}
	if c.RootImage != "" {
		// The first pmem device, ext4 read-only, its pages mapped straight from the host
		// (DAX) instead of copied into the guest's page cache.
		params = append(params, "root=/dev/pmem0", "rootfstype=ext4", "rootflags=dax=always", "ro", "init=/init")
	}
	if c.withoutACPI() {
		// No ACPI: the kernel spends ~0.1 s of a TCG boot loading and walking q35's AML
		// tables (docs/kernel.md). It finds the CPUs and the I/O APIC in qboot's MP table,
		// and block devices are hot-plugged into the root ports natively (pciehp; Args
		// turns QEMU's ACPI hot-plug off to match). A template keeps ACPI: its clones get
		// their devices hot-plugged at restore, where ACPI's hot-plug is the quicker.
		params = append(params, "acpi=off")
		if base, size := c.deviceMemory(); size > 0 {
			// Without the host bridge's ACPI resources the kernel would put 64-bit BARs
			// at the first free address above 4 GiB, which is where QEMU maps the root
			// image's memory device; reserved in the memory map, the window stays the
			// pmem device's.
			params = append(params, fmt.Sprintf("memmap=%#x$%#x", size, base))
		}
	}
	// The agent listens only where the host will connect: a vsock listener the host does
	// not use would be one more way into the agent for the guest's own processes.
	params = append(params, "podvm.agent="+c.AgentTransport)
	if c.Debug {
		// The guest agent logs at debug level too.
		params = append(params, "podvm.debug")
	} else {
		params = append(params, "quiet")
	}
	if c.Accel == AccelTCG {
		// TCG's CPUs have no TSC-deadline timer, so a kernel calibrates the local APIC
		// timer against the PIT, ~0.1 s of boot. podvm's kernel (kernel/patches) takes the
		// timer's clock from the command line instead: QEMU's counts at 1 GHz.
		//
		// Not noapictimer: the HPET would drive the ticks, and its absolute comparator
		// loses deadlines whenever the vCPU is held up between reading the counter and
		// writing the comparator. Linux raises the device's minimum delta each time and,
		// past 1/HZ, stops programming it: the guest never gets a timer interrupt again
		// (docs/kernel.md).
		params = append(params, "lapic_timer_khz="+strconv.Itoa(lapicTimerKHz))
		// The TSC's frequency, so the kernel does not fall back to timing the TSC against
		// the HPET when its quick measurement against the emulated PIT fails (~110 ms; 6 of
		// 30 pods on the test machine). It still refines it against the HPET a second
		// after boot.
		if c.TSCkHz > 0 {
			params = append(params, "tsc_early_khz="+strconv.Itoa(c.TSCkHz))
		}
		// podvm's kernel then keeps its init sections instead of poisoning
		// them: stores to pages TCG has translated code from take its self-modifying-code
		// path, ~0.2 s of boot for 0.8 MiB. Other kernels ignore it.
		params = append(params, "keep_initmem")
		// A kernel that boots on one CPU rewrites every LOCK prefix of its text (the SMP
		// alternatives) before the initcalls; under TCG each rewritten page drops its
		// translations, and the pass took ~0.1 s of boot (docs/kernel.md). The prefixes
		// stay: on one vCPU they cost TCG next to nothing.
		params = append(params, "noreplace-smp")
		// The kernel checks that the I/O APIC delivers the timer's interrupt by waiting for
		// several ticks through it (~20 ms under TCG); QEMU's does, and the local APIC
		// timer takes over the ticks right after. Kata passes it to every guest.
		params = append(params, "no_timer_check")
		// TCG executes nothing speculatively, so the CPU vulnerability mitigations built
		// into podvm's kernel (kernel/config/mitigations.config) guard against nothing
		// here and only cost. Turned off, the kernel would still rewrite the ~40k calls
		// of its retpoline and return thunks at boot (~65 ms under TCG); podvm's kernel
		// leaves them alone with keep_thunks, which it ignores unless no mitigation needs
		// the thunks. A VM template's guest rewrites them, once, as it boots: its clones
		// resume with the rewritten text and pay neither the rewriting nor the extra jump
		// of every indirect call and return (docs/templating.md). Under KVM the
		// mitigations stay on.
		params = append(params, "mitigations=off")
		if !c.Templated {
			params = append(params, "keep_thunks")
		}
		if c.VCPUs > 1 {
			// TCG's CPU models have no invariant TSC and say they are AMD's, and a kernel
			// assumes an AMD machine with several CPUs and no invariant TSC has unsynchronized
			// TSCs, without testing them: it marks the TSC unstable and keeps time on the
			// jiffies clocksource, so no high-resolution timers and no idle ticks off (a
			// 2-vCPU idle pod burnt 4-5x the CPU of a 1-vCPU one; docs/kernel.md). QEMU
			// derives every vCPU's TSC from one host clock: told to say Intel, where the
			// kernel does test them at CPU bring-up, the guest found no warp.
			params = append(params, "tsc=reliable")
			// Each CPU after the first times its delay loop against jiffies (the boot CPU
			// takes it from the TSC's frequency; the others would copy it only from a CPU
			// with a constant TSC, which TCG's models lack): ~80 ms per vCPU under TCG.
			// lpj= is the value the boot CPU computes, TSC cycles per tick, for every CPU.
			if c.TSCkHz > 0 {
				params = append(params, "lpj="+strconv.Itoa(c.TSCkHz*1000/guestHZ))
			}
		}
	}
	return strings.Join(append(params, c.KernelParams...), " ")
}

// ExtraFiles are the files QEMU inherits, in the order Args numbers them from fd 3: the
// guest memory (MemoryFile), a booted VM's kernel stub, then for a templated VM the tap of
// its first NIC (the template's; a clone gets the others hot-plugged), else the tap files
// of NetDevices. The console pipe's write end follows them (ConsoleFD).
func (c *Config) ExtraFiles() []*os.File {
	files := c.leadingFiles()
	if c.Templated {
		if len(c.NetDevices) > 0 && c.NetDevices[0] != nil {
			files = append(files, c.NetDevices[0].TapFiles...)
		}
		return files
	}
	for _, nd := range c.NetDevices {
		if nd != nil {
			files = append(files, nd.TapFiles...)
		}
	}
	return files
}

// leadingFiles are the first of ExtraFiles: MemoryFile and KernelStub, each if set.
func (c *Config) leadingFiles() []*os.File {
	var files []*os.File
	for _, f := range []*os.File{c.MemoryFile, c.KernelStub} {
		if f != nil {
			files = append(files, f)
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
	var a []string
	for _, part := range [][]string{
		c.machineArgs(),
		c.bootArgs(),
		c.controlArgs(),
		c.agentArgs(),
		c.sharedDirArgs(),
		c.netArgs(),
		c.hotplugArgs(),
		c.templateArgs(),
		c.confinementArgs(),
	} {
		a = append(a, part...)
	}
	return a, nil
}

// machineArgs name the VM and give it its machine type, accelerator, vCPUs and memory.
func (c *Config) machineArgs() []string {
	machine := "q35,sata=off,smbus=off,vmport=off,smm=off,i8042=off"
	var hotplug []string
	if c.withoutACPI() {
		// The guest runs without ACPI (KernelCmdline), so QEMU builds no ACPI tables for
		// it (~15 ms of QEMU's start here, before the guest runs), and its root ports
		// hot-plug natively.
		machine += ",acpi=off"
		hotplug = []string{"-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"}
	}
	a := append([]string{
		"-name", "podvm-" + c.ID + ",debug-threads=on",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-machine", machine,
	}, hotplug...)
	if c.Accel == AccelKVM {
		a = append(a, "-accel", "kvm", "-cpu", c.kvmCPU())
	} else {
		a = append(a, "-accel", "tcg,tb-size="+strconv.Itoa(tcgTranslationCacheMiB))
	}
	mem := strconv.Itoa(c.MemoryMiB) + "M"
	backend := "memory-backend-memfd,id=mem,size=" + mem + ",share=on"
	if c.MemoryFile != nil {
		// The memory file ExtraFiles passes first, opened anew through /proc before QEMU
		// chroots; shared, so virtiofsd can map it and x-ignore-shared leaves it out of a
		// template's saved state.
		backend = "memory-backend-file,id=mem,size=" + mem + ",mem-path=/proc/self/fd/3,share=on"
	}
	m := mem
	if c.RootImage != "" {
		// The root image is a memory device: room for it above the RAM.
		m += ",maxmem=" + strconv.FormatInt(int64(c.MemoryMiB)<<20+c.RootImageSize, 10)
	}
	return append(a,
		"-smp", strconv.Itoa(c.VCPUs),
		"-m", m,
		"-object", backend,
		"-numa", "node,memdev=mem",
	)
}

// bootArgs are the firmware, kernel, initrd or root image, and kernel command line.
func (c *Config) bootArgs() []string {
	var a []string
	if c.Firmware != "" {
		a = append(a, "-bios", opt(c.Firmware))
	}
	kernel := c.Kernel
	if c.KernelStub != nil {
		// The loader stub, the last of ExtraFiles' leading files (preload.go).
		kernel = "/proc/self/fd/" + strconv.Itoa(2+len(c.leadingFiles()))
	}
	a = append(a, "-kernel", opt(kernel))
	if c.Initrd != "" {
		a = append(a, "-initrd", opt(c.Initrd))
	}
	if c.RootImage != "" {
		// Mapped from the host's page cache, shared with every VM (share=on) and read-only:
		// QEMU opens it O_RDONLY and maps it PROT_READ, so no guest can change the image
		// another VM boots from; a guest's stores to it are dropped. share=on also keeps
		// it out of a template's saved state (x-ignore-shared).
		a = append(a,
			"-object", "memory-backend-file,id=rootimg,mem-path="+opt(c.RootImage)+
				",size="+strconv.FormatInt(c.RootImageSize, 10)+",share=on,readonly=on",
			"-device", "virtio-pmem-pci,id=rootimg,memdev=rootimg")
	}
	return append(a, "-append", c.KernelCmdline())
}

// controlArgs are the serial console, the QMP monitor, the pidfile and QEMU's own messages,
// and the devices every VM has: an RNG, and a balloon whose free page reporting hands the
// pages the guest frees back to the host (the kernel's initrd copy and unpacked initramfs,
// exited containers' memory), so the VM's host memory follows what the guest uses.
func (c *Config) controlArgs() []string {
	return []string{
		// The console goes into a pipe the VM drains into a size-capped log (the guest
		// controls what it writes); QEMU gets the write end as a descriptor.
		"-add-fd", fmt.Sprintf("fd=%d,set=%d,opaque=console", c.ConsoleFD(), consoleFdset),
		// append=on: without it QEMU truncates, which a pipe refuses.
		"-chardev", fmt.Sprintf("file,id=console,path=/dev/fdset/%d,append=on", consoleFdset),
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,path=" + opt(c.path(QMPSocket)) + ",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-pidfile", c.path(QEMUPidFile),
		"-msg", "timestamp=on",
		"-device", "virtio-rng-pci,id=rng",
		"-device", "virtio-balloon-pci,id=balloon,free-page-reporting=on",
	}
}

// agentArgs are the device the guest agent is reached through.
func (c *Config) agentArgs() []string {
	switch c.AgentTransport {
	case TransportSerial:
		return []string{
			"-device", "virtio-serial-pci,id=vser",
			"-chardev", "socket,id=agent,path=" + opt(c.path(AgentSocket)) + ",server=on,wait=off",
			"-device", "virtserialport,bus=vser.0,chardev=agent,name=" + hypervisor.AgentSerialPort,
		}
	case TransportVsock:
		return []string{"-device", "vhost-vsock-pci,id=vsock,guest-cid=" + strconv.FormatUint(uint64(c.VsockCID), 10)}
	}
	return nil
}

// sharedDirArgs connect virtiofsd's socket as a virtio-fs device, with SharedDir set.
func (c *Config) sharedDirArgs() []string {
	if c.SharedDir == "" || c.Templated {
		return nil
	}
	return []string{
		"-chardev", "socket,id=fs,path=" + opt(c.path(VirtiofsdSocket)),
		"-device", "vhost-user-fs-pci,id=fs,chardev=fs,tag=" + hypervisor.SharedFSTag,
	}
}

// netArgs are a tap netdev and a virtio-net device per NetDevice, the tap files numbered as
// ExtraFiles passes them (after its leading files). A templated VM's come with templateArgs.
func (c *Config) netArgs() []string {
	if c.Templated {
		return nil
	}
	var a []string
	fd := 3 + len(c.leadingFiles())
	for _, nd := range c.NetDevices {
		fds := make([]string, len(nd.TapFiles))
		for i := range nd.TapFiles {
			fds[i] = strconv.Itoa(fd)
			fd++
		}
		netdev, dev := netDeviceArgs(nd, fds)
		a = append(a, "-netdev", netdev, "-device", dev)
	}
	return a
}

// netDeviceArgs are the -netdev and -device values of one NetDevice whose tap files QEMU
// has as descriptors fds. No option ROM: nothing in a pod VM boots from the network, and
// QEMU would otherwise load iPXE's 249 KiB ROM into memory of each VM's own.
func netDeviceArgs(nd *hypervisor.NetDevice, fds []string) (netdev, dev string) {
	vhost := "off"
	if nd.VhostNet {
		vhost = "on"
	}
	netdev = "tap,id=net-" + nd.ID + ",vhost=" + vhost
	dev = "virtio-net-pci,id=nic-" + nd.ID + ",netdev=net-" + nd.ID + ",romfile="
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
	return netdev, dev
}

// templateNICArgs are a templated VM's first NIC, the same device in the template and in
// every clone (the migrated state must find it where the template had it): a fixed id, MAC
// (hypervisor.TemplateNICMAC) and root port, no MTU (the agent sets the pod's), single
// queue; its tap is the one ExtraFiles passes after the memory file, the pod's first or
// one that leads nowhere (Start makes it). A NIC the template booted with is already probed
// by the guest when a clone resumes: only the others are hot-plugged.
func (c *Config) templateNICArgs() []string {
	vhost := "off"
	if len(c.NetDevices) > 0 && c.NetDevices[0] != nil && c.NetDevices[0].VhostNet {
		vhost = "on"
	}
	fd := 3 + len(c.leadingFiles()) // after the memory file, as ExtraFiles passes them
	return []string{
		"-netdev", "tap,id=" + templateNetdev + ",vhost=" + vhost + ",fd=" + strconv.Itoa(fd),
		"-device", "virtio-net-pci,id=" + templateNIC + ",netdev=" + templateNetdev + ",bus=" + templatePort(1) +
			",mac=" + hypervisor.TemplateNICMAC + ",romfile=",
	}
}

// The template's NIC's QEMU ids.
const (
	templateNetdev = "net-template"
	templateNIC    = "nic-template"
)

// hotplugArgs are the empty PCIe root ports block devices are hot-plugged into.
func (c *Config) hotplugArgs() []string {
	var a []string
	for i := 0; i < c.HotplugSlots; i++ {
		a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", rootPort(i), i+1))
	}
	return a
}

// confinementArgs: once QEMU has opened everything (memory, kernel, devices, sockets, the
// console), it chroots into an empty root-owned directory and drops to an unprivileged
// uid/gid, which leaves it no capabilities. QEMU 7.2 installs its seccomp filter before
// it drops privileges, so elevateprivileges=deny would kill it at its own setgid();
// allow is safe after the drop (all its uids are the unprivileged one, so set*id cannot
// gain anything) and spawn=deny still forbids exec.
func (c *Config) confinementArgs() []string {
	uid, gid := c.RunAs()
	return []string{
		"-runas", fmt.Sprintf("%d:%d", uid, gid),
		"-chroot", c.path(ChrootDir),
		"-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
	}
}

func rootPort(i int) string { return "hp" + strconv.Itoa(i) }

// templatePort is the root port a templated VM's virtio-fs device (i = 0) or NIC i-1 is
// hot-plugged into.
func templatePort(i int) string { return "tp" + strconv.Itoa(i) }

// templateArgs are a templated VM's root ports for the devices a clone gets hot-plugged
// (chassis numbers after the block ports'), and for a clone the deferred restore: QEMU
// waits for the saved state (migrate-incoming) and stays paused (-S) until the devices are
// in.
func (c *Config) templateArgs() []string {
	if !c.Templated {
		return nil
	}
	var a []string
	for i := 0; i <= hypervisor.TemplateNICs; i++ {
		a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", templatePort(i), hypervisor.MaxHotplugSlots+1+i))
	}
	a = append(a, c.templateNICArgs()...)
	if c.Incoming != nil {
		a = append(a, "-incoming", "defer", "-S")
	}
	return a
}
