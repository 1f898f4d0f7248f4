package guest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/hypervisor"
)

// ModulesList is the initrd file that lists the kernel modules to load, one absolute path per
// line, each after its dependencies (written by rootfs/guestimage).
const ModulesList = "/lib/modules/podvm.modules"

// RootReadyEnv tells the agent binary's C PID 1 (cmd/podvm-agent/pid1.go) that the guest's root
// is a root of its own although it is an initramfs's: Init has moved onto it.
const RootReadyEnv = "PODVM_ROOT_READY"

// Init is PID 1 of a guest that boots from an initramfs (Debian's kernel, its modules in the
// initrd); the agent binary's C PID 1 takes over wherever the root is already a root of its own
// (podvm's root image). Init mounts the kernel filesystems, loads the modules and moves onto a
// root of its own (runc's pivot_root cannot leave an initramfs root), then execs the agent
// binary again as PID 1, with RootReadyEnv set, for the C PID 1 to mount the rest, start the
// server and reap. It never returns.
func Init() {
	ctx := context.Background()
	if err := moveToOwnRoot(ctx); err != nil {
		fatal(ctx, fmt.Errorf("init: %w", err))
	}
	env := append(os.Environ(), RootReadyEnv+"=1")
	err := unix.Exec("/init", []string{"/init"}, env)
	fatal(ctx, fmt.Errorf("init: exec /init on the new root: %w", err))
}

func fatal(ctx context.Context, err error) {
	log.G(ctx).WithError(err).Error("podvm-agent: fatal, powering off")
	PowerOff()
}

// q35's reset control register and the value that resets the machine (cmd/podvm-agent/pid1.go
// uses them too).
const (
	resetControlPort = 0xcf9
	resetControlHard = 0x06
)

// PowerOff stops the guest: it resets it through q35's reset control register, and QEMU runs
// with -no-reboot, so a reset ends it. The kernel's power-off only halts the CPUs of a guest
// without ACPI (the default), and both it and the kernel's restart first shut the devices
// down, where virtio-pmem's flush waits for an interrupt such a guest cannot route.
func PowerOff() {
	unix.Sync()
	if f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0); err == nil {
		_, _ = f.WriteAt([]byte{resetControlHard}, resetControlPort)
		_ = f.Close()
	}
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// Should neither come, the host quits QEMU itself.
	for {
		time.Sleep(time.Hour)
	}
}

type mnt struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

func mountAll(ms []mnt) error {
	for _, m := range ms {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	return nil
}

const newRoot = "/newroot"

func moveToOwnRoot(ctx context.Context) error {
	start := time.Now()
	if err := mountAll([]mnt{
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	}); err != nil {
		return err
	}
	n, err := LoadModules(ctx, ModulesList)
	if err != nil {
		return err
	}
	if n == 0 {
		log.G(ctx).Debug("podvm-agent: no kernel modules to load (the kernel has everything built in)")
	} else {
		log.G(ctx).Infof("podvm-agent: loaded %d modules in %s", n, time.Since(start).Round(time.Millisecond))
	}

	// A root image (virtio-pmem) is a mount of its own already, and read-only.
	if onInitramfs, err := rootIsInitramfs(); err != nil || !onInitramfs {
		return err
	}

	// Move onto a root that is a mount of its own (runc's pivot_root cannot leave the
	// initramfs's root mount): a bind mount of one of the initramfs's directories, holding
	// this binary. Renaming the binary there instead of copying it onto a new tmpfs keeps its
	// pages: the server and every runc init start from the very pages PID 1 runs from, so
	// they neither copy 10 MB at boot nor, under TCG, translate the same code again.
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.Rename(self, filepath.Join(newRoot, "init")); err != nil {
		return fmt.Errorf("move the agent into the new root: %w", err)
	}
	if err := unix.Mount(newRoot, newRoot, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind the new root: %w", err)
	}
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		if err := os.MkdirAll(newRoot+d, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(d, newRoot+d, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s: %w", d, err)
		}
	}
	// Free the initramfs: everything but the new root.
	entries, _ := os.ReadDir("/")
	for _, e := range entries {
		if "/"+e.Name() != newRoot {
			_ = os.RemoveAll("/" + e.Name())
		}
	}
	if err := unix.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the new root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return err
	}
	// No re-exec: every new process starts from /init, the file this process runs.
	return unix.Chdir("/")
}

// rootIsInitramfs tells whether / is the kernel's initramfs (a ramfs or tmpfs) rather than a
// root filesystem the kernel mounted from a device.
func rootIsInitramfs() (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err != nil {
		return false, fmt.Errorf("statfs /: %w", err)
	}
	return st.Type == unix.RAMFS_MAGIC || st.Type == unix.TMPFS_MAGIC, nil
}

// SetUpKernel makes the kernel ready for the server's work: it hands every cgroup controller
// down so containers' cgroups can use them, and applies the kernel command line's free page
// reporting order (see applyPageReportingOrder), which the balloon driver's probe has reset by
// now. The server runs it at its start, before it serves.
func SetUpKernel(ctx context.Context) error {
	ctrls, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers")
	if err != nil {
		return err
	}
	var enable []string
	for _, c := range strings.Fields(string(ctrls)) {
		enable = append(enable, "+"+c)
	}
	if len(enable) > 0 {
		if err := os.WriteFile("/sys/fs/cgroup/cgroup.subtree_control", []byte(strings.Join(enable, " ")), 0); err != nil {
			return fmt.Errorf("enable cgroup controllers: %w", err)
		}
	}
	// Memory handed back later is all the order changes, so a failure is logged, not fatal.
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err == nil {
		_, err = applyPageReportingOrder("/", string(cmdline))
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("podvm-agent: free page reporting keeps the kernel's order")
	}
	return nil
}

// LoadModules loads the modules listed in the file at path, in order. A missing or empty list is
// not an error: a kernel with everything built in (podvm's own, `make kernel`) needs none, and its
// image carries an empty list.
func LoadModules(ctx context.Context, path string) (int, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		p := strings.TrimSpace(sc.Text())
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		if err := loadModule(p); err != nil {
			return n, fmt.Errorf("load module %s: %w", p, err)
		}
		n++
	}
	return n, sc.Err()
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		if errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("%w: this kernel cannot load modules (CONFIG_MODULES is off); build the image with no modules for it", err)
		}
		return err
	}
	return nil
}

// exitStatus is the shell's view of a wait status: the exit code, or 128 + the signal.
func exitStatus(ws unix.WaitStatus) uint32 {
	if ws.Signaled() {
		return 128 + uint32(ws.Signal())
	}
	return uint32(ws.ExitStatus())
}

// KernelFlags are what the host tells the agent on the kernel command line.
type KernelFlags struct {
	// Debug: the agent logs at debug level (podvm.debug).
	Debug bool
	// Transport is the one agent transport the host uses (podvm.agent=serial or vsock); ""
	// (not said) serves both.
	Transport string
}

// FlagsFromCmdline reads the agent's flags from the kernel command line.
func FlagsFromCmdline() KernelFlags {
	b, _ := os.ReadFile("/proc/cmdline") // without it (never in a guest), the defaults
	return parseKernelFlags(string(b))
}

func parseKernelFlags(cmdline string) KernelFlags {
	var k KernelFlags
	for _, f := range strings.Fields(cmdline) {
		switch f {
		case "podvm.debug", "podvm.debug=1":
			k.Debug = true
		case "podvm.agent=" + hypervisor.TransportSerial, "podvm.agent=" + hypervisor.TransportVsock:
			k.Transport = strings.TrimPrefix(f, "podvm.agent=")
		}
	}
	return k
}
