package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// virtiofsdFlavor is which virtiofsd implementation a binary is; their command lines differ.
type virtiofsdFlavor int

const (
	// virtiofsdC is the C virtiofsd shipped with QEMU up to 7.2 (-o source=... style).
	virtiofsdC virtiofsdFlavor = iota + 1
	// virtiofsdRust is the Rust virtiofsd of newer distributions (--shared-dir style).
	virtiofsdRust
)

func (f virtiofsdFlavor) String() string {
	switch f {
	case virtiofsdC:
		return "C"
	case virtiofsdRust:
		return "Rust"
	}
	return "unknown"
}

// detectVirtiofsdFlavor runs `virtiofsd --help` once and tells the two implementations apart
// by their option syntax.
func detectVirtiofsdFlavor(ctx context.Context, path string) (virtiofsdFlavor, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--help").CombinedOutput()
	if f := flavorFromHelp(out); f != 0 {
		return f, nil
	}
	if err != nil {
		return 0, fmt.Errorf("probing virtiofsd %s --help: %w (output: %.200q)", path, err, out)
	}
	return 0, fmt.Errorf("virtiofsd %s: unrecognised --help output (neither -o source= nor --shared-dir); set VirtiofsdPath to a C or Rust virtiofsd", path)
}

func flavorFromHelp(help []byte) virtiofsdFlavor {
	switch {
	case bytes.Contains(help, []byte("--shared-dir")):
		return virtiofsdRust
	case bytes.Contains(help, []byte("-o source=")):
		return virtiofsdC
	}
	return 0
}

// virtiofsdDropCaps are the capabilities virtiofsd gives up (modcaps syntax, the same in both
// implementations): without CAP_MKNOD the guest cannot make device nodes on the host, without
// CAP_SETFCAP it cannot give host files capabilities.
const virtiofsdDropCaps = "-mknod:-setfcap"

// keepMetadataTimeout is how long, in seconds, the guest trusts what it was told of a file
// or name with cache mode "keep": auto's timeout, so the guest sees the host's changes
// (a configMap's update, a file rewritten in place) as soon as with auto.
const keepMetadataTimeout = "1"

// virtiofsdListenFD is the descriptor virtiofsd finds its listening socket at (the first of
// exec.Cmd's ExtraFiles).
const virtiofsdListenFD = 3

// virtiofsdArgs builds virtiofsd's argv (without argv[0]) for the given flavor. virtiofsd
// gets its socket bound and listening already, as virtiofsdListenFD (listenUnix).
//
// Cache mode "keep" is virtiofsd's always (the guest keeps a file's pages across opens) with
// auto's metadata timeout: once a second is up the guest looks the file up again, and a
// changed size or mtime drops the pages it kept. auto drops them at every open instead, and
// under TCG a page read anew is code translated anew: each exec of a container's binary read
// and translated it again. The Rust virtiofsd has no timeout option, so there "keep" is auto.
func virtiofsdArgs(f virtiofsdFlavor, sharedDir, cache string, debug bool) ([]string, error) {
	fd := "--fd=" + strconv.Itoa(virtiofsdListenFD)
	switch f {
	case virtiofsdC:
		var timeout []string
		switch cache {
		case "never":
			cache = "none" // the C virtiofsd's name for it
		case "keep":
			cache, timeout = "always", []string{"-o", "timeout=" + keepMetadataTimeout}
		}
		a := append([]string{
			fd,
			"-o", "source=" + sharedDir,
			"-o", "cache=" + cache,
		}, timeout...)
		a = append(a,
			"-o", "announce_submounts",
			"-o", "sandbox=namespace",
			"-o", "modcaps="+virtiofsdDropCaps,
			"--thread-pool-size=1",
		)
		if debug {
			a = append(a, "-o", "log_level=debug")
		}
		return a, nil
	case virtiofsdRust:
		if cache == "keep" {
			cache = "auto"
		}
		a := []string{
			fd,
			"--shared-dir", sharedDir,
			"--cache", cache,
			"--announce-submounts",
			"--sandbox", "namespace",
			"--modcaps=" + virtiofsdDropCaps,
			"--thread-pool-size", "1",
		}
		if debug {
			a = append(a, "--log-level", "debug")
		}
		return a, nil
	}
	return nil, fmt.Errorf("unknown virtiofsd flavor %d", f)
}

// virtiofsd is a running virtiofsd process.
type virtiofsd struct {
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error // exit status, valid after done
}

// virtiofsdLockDir is where the C virtiofsd keeps a lock file per socket path
// (<localstatedir>/run/virtiofsd, /var/run being /run): a pidfile named after the path, its
// slashes turned into dots, which it never removes. It makes one only when it binds the
// socket itself (--socket-path); podvm hands it the socket (--fd) since 2026-12-07, so only
// a VM started by an earlier podvm can have left one.
const virtiofsdLockDir = "/var/run/virtiofsd"

// virtiofsdLockName is the C virtiofsd's name for path in virtiofsdLockDir.
func virtiofsdLockName(path string) string { return strings.ReplaceAll(path, "/", ".") }

// VirtiofsdLockFiles lists the lock files C virtiofsds on sockets under dir left behind, for
// the tests' leak checks.
func VirtiofsdLockFiles(dir string) []string {
	locks, _ := filepath.Glob(filepath.Join(virtiofsdLockDir, virtiofsdLockName(dir)+".*"))
	return locks
}

// removeVirtiofsdLock removes the lock file a C virtiofsd of an earlier podvm left for
// socket sock. The directory is root's; no guest reaches it.
func removeVirtiofsdLock(sock string) error {
	err := os.Remove(filepath.Join(virtiofsdLockDir, virtiofsdLockName(sock)+".pid"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing virtiofsd's lock file: %w", err)
	}
	return nil
}

// listenUnix binds a unix socket at path and listens on it. The shim makes virtiofsd's
// socket itself and hands it over: QEMU can connect as soon as it is launched, and its
// connection waits in the backlog until virtiofsd, started meanwhile, accepts it. So
// virtiofsd's start is off a booted VM's path to its QEMU. The caller's copy must be closed
// once virtiofsd has its own (startVirtiofsd does): then virtiofsd's exit closes the socket,
// and a QEMU waiting on it fails instead of waiting for ever.
func listenUnix(path string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("virtiofsd socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("binding virtiofsd socket %s: %w", path, err)
	}
	if err := unix.Listen(fd, 1); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("listening on virtiofsd socket %s: %w", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// startVirtiofsd starts virtiofsd for cfg on the listening socket l, which it closes.
func startVirtiofsd(ctx context.Context, cfg *Config, l *os.File) (*virtiofsd, error) {
	defer func() { _ = l.Close() }() // virtiofsd has its own copy, or failed to start
	flavor, err := detectVirtiofsdFlavor(ctx, cfg.VirtiofsdPath)
	if err != nil {
		return nil, err
	}
	args, err := virtiofsdArgs(flavor, cfg.SharedDir, cfg.VirtiofsCache, cfg.Debug)
	if err != nil {
		return nil, err
	}
	logPath := cfg.path(VirtiofsdLog)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating virtiofsd log: %w", err)
	}
	defer func() { _ = logf.Close() }() // virtiofsd writes to its own copy
	cmd := exec.Command(cfg.VirtiofsdPath, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{l} // virtiofsdListenFD
	cmd.SysProcAttr = childProcAttr()
	log.G(ctx).WithField("flavor", flavor).WithField("args", args).Debug("starting virtiofsd")
	start := cmd.Start
	if cfg.SharedDirNS != nil {
		// Born in the share's namespace. Its parent-death signal then follows the thread
		// that holds the namespace, which lives as long as the share.
		start = func() error { return cfg.SharedDirNS(cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("starting virtiofsd %s: %w", cfg.VirtiofsdPath, err)
	}
	v := &virtiofsd{cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		v.err = cmd.Wait()
		close(v.done)
	}()
	if err := writePidFile(cfg.path(VirtiofsdPid), cmd.Process.Pid); err != nil {
		return nil, errors.Join(err, v.stop(ctx))
	}
	return v, nil
}

func (v *virtiofsd) pid() int { return v.cmd.Process.Pid }

// exited says how virtiofsd ended, with the end of its log, if it has exited within wait;
// nil while it runs. A QEMU that failed at its start may have failed for virtiofsd's exit
// (it closed the socket QEMU was connected to), and then virtiofsd's complaint is the one
// to read.
func (v *virtiofsd) exited(wait time.Duration) error {
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-v.done:
		return fmt.Errorf("virtiofsd exited (%v): %s", v.err, logTail(v.logPath))
	case <-t.C:
		return nil
	}
}

// stop terminates virtiofsd: SIGTERM, then SIGKILL after a short grace or when ctx ends. It
// returns once its whole process group is gone: the C virtiofsd forks into its sandbox, and
// that child can outlive the parent by a moment.
func (v *virtiofsd) stop(ctx context.Context) error {
	select {
	case <-v.done:
		return waitGroupGone(v.pid())
	default:
	}
	// Signal the process group: the C virtiofsd forks into its sandbox. The signals fail only
	// when the group is gone already, which the waits below see.
	_ = syscall.Kill(-v.pid(), syscall.SIGTERM)
	t := time.NewTimer(2 * time.Second)
	defer t.Stop()
	select {
	case <-v.done:
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	_ = syscall.Kill(-v.pid(), syscall.SIGKILL)
	select {
	case <-v.done:
		return waitGroupGone(v.pid())
	case <-time.After(5 * time.Second):
		return fmt.Errorf("virtiofsd (pid %d) did not exit after SIGKILL", v.pid())
	}
}

// waitGroupGone waits until no process is left in process group pgid, killing stragglers
// after a grace period.
func waitGroupGone(pgid int) error {
	deadline := time.Now().Add(5 * time.Second)
	killed := false
	for syscall.Kill(-pgid, 0) == nil {
		if time.Now().After(deadline) {
			if killed {
				return fmt.Errorf("process group %d still has processes after SIGKILL", pgid)
			}
			_ = syscall.Kill(-pgid, syscall.SIGKILL) // the loop checks whether it worked
			killed, deadline = true, time.Now().Add(5*time.Second)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// childProcAttr starts QEMU and virtiofsd in their own process group, and has the kernel kill
// them if the shim dies, so a crashed shim cannot leave a VM running. (The parent-death signal
// follows the OS thread that started the child; Go only ends threads that a goroutine locked
// and never unlocked.)
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
