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

// virtiofsdArgs builds virtiofsd's argv (without argv[0]) for the given flavor.
//
// Cache mode "keep" is virtiofsd's always (the guest keeps a file's pages across opens) with
// auto's metadata timeout: once a second is up the guest looks the file up again, and a
// changed size or mtime drops the pages it kept. auto drops them at every open instead, and
// under TCG a page read anew is code translated anew: each exec of a container's binary read
// and translated it again. The Rust virtiofsd has no timeout option, so there "keep" is auto.
func virtiofsdArgs(f virtiofsdFlavor, socketPath, sharedDir, cache string, debug bool) ([]string, error) {
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
			"--socket-path=" + socketPath,
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
			"--socket-path", socketPath,
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
	cmd  *exec.Cmd
	sock string
	done chan struct{}
	err  error // exit status, valid after done
}

// virtiofsdLockDir is where the C virtiofsd keeps a lock file per socket path
// (<localstatedir>/run/virtiofsd, /var/run being /run): a pidfile named after the path, its
// slashes turned into dots, which it takes so that no second virtiofsd serves the same
// socket, and never removes. A node that starts a pod VM per pod would gather one per pod.
const virtiofsdLockDir = "/var/run/virtiofsd"

// virtiofsdLockName is the C virtiofsd's name for path in virtiofsdLockDir.
func virtiofsdLockName(path string) string { return strings.ReplaceAll(path, "/", ".") }

// VirtiofsdLockFiles lists the lock files C virtiofsds on sockets under dir left behind, for
// the tests' leak checks.
func VirtiofsdLockFiles(dir string) []string {
	locks, _ := filepath.Glob(filepath.Join(virtiofsdLockDir, virtiofsdLockName(dir)+".*"))
	return locks
}

// removeVirtiofsdLock removes the lock file a C virtiofsd on socket sock left behind, once
// it has exited. The directory is root's; no guest reaches it. The Rust virtiofsd keeps no
// such file, so there is nothing to remove.
func removeVirtiofsdLock(sock string) error {
	err := os.Remove(filepath.Join(virtiofsdLockDir, virtiofsdLockName(sock)+".pid"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing virtiofsd's lock file: %w", err)
	}
	return nil
}

// startVirtiofsd starts virtiofsd for cfg and waits until its socket listens.
func startVirtiofsd(ctx context.Context, cfg *Config) (*virtiofsd, error) {
	flavor, err := detectVirtiofsdFlavor(ctx, cfg.VirtiofsdPath)
	if err != nil {
		return nil, err
	}
	sock := cfg.path(VirtiofsdSocket)
	args, err := virtiofsdArgs(flavor, sock, cfg.SharedDir, cfg.VirtiofsCache, cfg.Debug)
	if err != nil {
		return nil, err
	}
	// Best effort: virtiofsd binds anew and says in its log if it cannot.
	_ = os.Remove(sock)
	logf, err := os.OpenFile(cfg.path(VirtiofsdLog), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating virtiofsd log: %w", err)
	}
	defer func() { _ = logf.Close() }() // virtiofsd writes to its own copy
	cmd := exec.Command(cfg.VirtiofsdPath, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
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
	v := &virtiofsd{cmd: cmd, sock: sock, done: make(chan struct{})}
	go func() {
		v.err = cmd.Wait()
		close(v.done)
	}()
	if err := writePidFile(cfg.path(VirtiofsdPid), cmd.Process.Pid); err != nil {
		return nil, errors.Join(err, v.stop(ctx))
	}
	if err := v.waitListening(ctx, sock, cfg.path(VirtiofsdLog)); err != nil {
		return nil, errors.Join(err, v.stop(ctx))
	}
	return v, nil
}

func (v *virtiofsd) pid() int { return v.cmd.Process.Pid }

func (v *virtiofsd) waitListening(ctx context.Context, sock, logPath string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if listening, err := unixSocketListening(sock); err != nil {
			return err
		} else if listening {
			return nil
		}
		select {
		case <-v.done:
			return fmt.Errorf("virtiofsd exited before listening (%v): %s", v.err, logTail(logPath))
		case <-ctx.Done():
			return fmt.Errorf("waiting for virtiofsd socket %s: %w: %s", sock, ctx.Err(), logTail(logPath))
		case <-t.C:
		}
	}
}

// unixSocketListening reports whether a listening unix socket is bound to path, without
// connecting to it (virtiofsd serves exactly one connection, QEMU's).
func unixSocketListening(path string) (bool, error) {
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		return false, fmt.Errorf("reading /proc/net/unix: %w", err)
	}
	const soAcceptCon = 0x10000
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		// Num RefCount Protocol Flags Type St Inode Path
		if len(f) < 8 || f[7] != path {
			continue
		}
		if flags, err := strconv.ParseUint(f[3], 16, 32); err == nil && flags&soAcceptCon != 0 {
			return true, nil
		}
	}
	return false, nil
}

// stop terminates virtiofsd: SIGTERM, then SIGKILL after a short grace or when ctx ends. It
// returns once its whole process group is gone: the C virtiofsd forks into its sandbox, and
// that child can outlive the parent by a moment. Then it removes virtiofsd's lock file.
func (v *virtiofsd) stop(ctx context.Context) error {
	err := v.terminate(ctx)
	return errors.Join(err, removeVirtiofsdLock(v.sock))
}

func (v *virtiofsd) terminate(ctx context.Context) error {
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
