package guest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// ModulesList is the initrd file that lists the kernel modules to load, one absolute path per
// line, each after its dependencies (written by rootfs/guestimage).
const ModulesList = "/lib/modules/podvm.modules"

// Init is PID 1 of the guest. From the initramfs it mounts the kernel filesystems, loads the
// modules and moves onto a root of its own (runc's pivot_root cannot leave an initramfs
// root); then it mounts the rest, starts the agent server as its child (from the same file as
// itself, /init) and reaps every orphan. It never returns: when the server dies the guest
// powers off.
func Init() {
	ctx := context.Background()
	if err := moveToOwnRoot(ctx); err != nil {
		fatal(ctx, fmt.Errorf("init: %w", err))
	}
	if err := mountStage2(); err != nil {
		fatal(ctx, fmt.Errorf("init: %w", err))
	}
	setPageReportingOrder(ctx)
	phases := bootPhases{initMain: processStart, initDone: sinceBoot()}
	child, err := startServer(phases)
	if err != nil {
		fatal(ctx, fmt.Errorf("init: start agent server: %w", err))
	}
	reap(ctx, child)
}

func fatal(ctx context.Context, err error) {
	log.G(ctx).WithError(err).Error("podvm-agent: fatal, powering off")
	PowerOff()
}

// PowerOff stops the guest; QEMU runs with -no-reboot, so it exits.
func PowerOff() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// Without ACPI power-off the kernel halts; the host quits QEMU itself.
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

func mountStage2() error {
	if err := mountAll([]mnt{
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
		{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	}); err != nil {
		return err
	}
	for name, target := range map[string]string{"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx"} {
		_ = os.Remove(name)
		if err := os.Symlink(target, name); err != nil {
			return err
		}
	}
	if err := os.MkdirAll("/etc", 0o755); err != nil {
		return err
	}
	// Hand every controller down so containers' cgroups can use them.
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
	return nil
}

// setPageReportingOrder applies the kernel command line's free page reporting order (see
// applyPageReportingOrder). Memory handed back later is all it changes, so a failure is
// logged, not fatal.
func setPageReportingOrder(ctx context.Context) {
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err == nil {
		_, err = applyPageReportingOrder("/", string(cmdline))
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("podvm-agent: free page reporting keeps the kernel's order")
	}
}

// startServer runs the agent server as PID 1's child, so its own process waits are never
// raced by the reaper.
func startServer(phases bootPhases) (*os.Process, error) {
	cmd := exec.Command("/init", "serve")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin", phases.env())
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return cmd.Process, nil
}

// reap collects every child and orphan; the guest powers off when the server exits.
func reap(ctx context.Context, server *os.Process) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if pid == server.Pid {
			log.G(ctx).Errorf("podvm-agent: server exited (%v), powering off", exitStatus(ws))
			PowerOff()
		}
	}
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

// DebugFromCmdline reports whether the kernel command line asks for agent debug logs
// (podvm.debug).
func DebugFromCmdline() bool {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return false
	}
	for _, f := range strings.Fields(string(b)) {
		if f == "podvm.debug" || f == "podvm.debug=1" {
			return true
		}
	}
	return false
}
