package guest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// HoldArg is the argument /init runs with as a pod's namespace holder (see Hold).
const HoldArg = "hold"

// CRI's annotation that marks the pod sandbox (pause) container's spec.
const (
	annotationContainerType = "io.kubernetes.cri.container-type"
	containerTypeSandbox    = "sandbox"
	// holdReadyFd is the pipe on which the holder reports its set-up: EOF alone is success,
	// anything written before it is the error.
	holdReadyFd = 3
)

// isPodSandbox reports whether spec is a CRI pod sandbox's.
func isPodSandbox(spec *specs.Spec) bool {
	return spec.Annotations[annotationContainerType] == containerTypeSandbox
}

// holder is a CRI pod sandbox in the guest: instead of the pause container, a process of the
// agent's own binary that sits in the pod's new PID, IPC and UTS namespaces (the ones the
// pod's containers join by /proc/<pid>/ns/*), with the pod's hostname and namespaced sysctls,
// reaping what is reparented to it and exiting on SIGTERM or SIGINT as pause does. It runs no
// image code, and starting it costs one fork and exec instead of a libcontainer container.
type holder struct {
	guestCgroup
	proc *os.Process

	once   sync.Once
	status uint32
}

// holderCloneFlags are the namespaces a holder makes for spec; ok is false for a spec it
// cannot hold (a namespace to join, or a user namespace), which libcontainer then runs.
func holderCloneFlags(spec *specs.Spec) (flags uintptr, ok bool) {
	for _, ns := range spec.Linux.Namespaces {
		if ns.Path != "" {
			return 0, false
		}
		switch ns.Type {
		case specs.PIDNamespace:
			flags |= unix.CLONE_NEWPID
		case specs.IPCNamespace:
			flags |= unix.CLONE_NEWIPC
		case specs.UTSNamespace:
			flags |= unix.CLONE_NEWUTS
		case specs.UserNamespace:
			return 0, false
		}
	}
	return flags, true
}

// holdNamespaces starts the holder of pod sandbox id, in its cgroup, once its namespaces are
// set up. A spec it cannot hold goes to libcontainer.
func holdNamespaces(r libcontainerRuntime, id string, spec *specs.Spec, init *procConfig) (runtimeContainer, runtimeProcess, error) {
	flags, ok := holderCloneFlags(spec)
	if !ok {
		return r.createContainer(id, spec, init)
	}
	args := []string{"/init", HoldArg}
	if flags&unix.CLONE_NEWUTS != 0 && spec.Hostname != "" {
		args = append(args, "hostname="+spec.Hostname)
	}
	for k, v := range spec.Linux.Sysctl {
		if err := checkSysctlName(k); err != nil {
			return nil, nil, err
		}
		args = append(args, "sysctl="+k+"="+v)
	}
	cg, err := newHolderCgroup(id, spec)
	if err != nil {
		return nil, nil, err
	}
	proc, err := startHolder(args, flags, init)
	if err != nil {
		_ = cg.Delete()
		return nil, nil, err
	}
	if err := cg.AddProc(uint64(proc.Pid)); err != nil {
		_ = proc.Kill()
		_, _ = proc.Wait()
		_ = cg.Delete()
		return nil, nil, fmt.Errorf("pod sandbox %s: cgroup: %w", id, err)
	}
	h := &holder{guestCgroup: guestCgroup{id: id, path: spec.Linux.CgroupsPath}, proc: proc}
	return h, h, nil
}

// newHolderCgroup makes the sandbox's cgroup with the spec's limits. Device rules are left
// out: the holder opens no device.
func newHolderCgroup(id string, spec *specs.Spec) (*cgroup2.Manager, error) {
	res := &cgroup2.Resources{}
	if r := spec.Linux.Resources; r != nil {
		rc := *r
		rc.Devices = nil
		res = cgroup2.ToResources(&rc)
	}
	m, err := cgroup2.NewManager("/sys/fs/cgroup", spec.Linux.CgroupsPath, res)
	if err != nil {
		return nil, fmt.Errorf("pod sandbox %s: cgroup %s: %w", id, spec.Linux.CgroupsPath, err)
	}
	return m, nil
}

// startHolder runs /init as a holder in new namespaces and waits for its set-up.
func startHolder(args []string, flags uintptr, init *procConfig) (*os.Process, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer func() { _ = r.Close() }()
	cmd := &exec.Cmd{Path: args[0], Args: args, Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
		ExtraFiles: []*os.File{w}, SysProcAttr: &syscall.SysProcAttr{Cloneflags: flags}}
	// nil streams are /dev/null for exec.Cmd; a nil *os.File in the interface would not be.
	if init.stdin != nil {
		cmd.Stdin = init.stdin
	}
	if init.stdout != nil {
		cmd.Stdout = init.stdout
	}
	if init.stderr != nil {
		cmd.Stderr = init.stderr
	}
	err = cmd.Start()
	_ = w.Close()
	if err != nil {
		return nil, fmt.Errorf("start the pod's namespace holder: %w", err)
	}
	msg, _ := io.ReadAll(io.LimitReader(r, 4096))
	if len(msg) > 0 {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		return nil, fmt.Errorf("pod sandbox: %s: %w", msg, errdefs.ErrInvalidArgument)
	}
	return cmd.Process, nil
}

// checkSysctlName refuses a sysctl name that is not one (it becomes a path under /proc/sys).
func checkSysctlName(k string) error {
	if k == "" || strings.Contains(k, "/") || strings.Contains(k, "..") {
		return fmt.Errorf("sysctl %q: not a sysctl name: %w", k, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Start does nothing: the holder runs from its create on, as nothing of the pod's runs in it.
func (h *holder) Start() error { return nil }

// Exec is refused: the sandbox has no container to run a process in.
func (h *holder) Exec(*procConfig) (runtimeProcess, error) {
	return nil, fmt.Errorf("pod sandbox %s runs no container in the VM; exec into one of the pod's containers: %w", h.id, errdefs.ErrNotImplemented)
}

func (h *holder) Signal(sig unix.Signal) error {
	err := h.proc.Signal(sig)
	if errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("pod sandbox %s: %w: %w", h.id, err, errdefs.ErrNotFound)
	}
	return err
}

func (h *holder) Processes() ([]int, error) { return []int{h.proc.Pid}, nil }

func (h *holder) Pause() error {
	m, err := h.cgroupManager()
	if err != nil {
		return err
	}
	return m.Freeze()
}

func (h *holder) Resume() error {
	m, err := h.cgroupManager()
	if err != nil {
		return err
	}
	return m.Thaw()
}

// Destroy removes the cgroup; the holder has exited.
func (h *holder) Destroy() error {
	m, err := h.cgroupManager()
	if err != nil {
		return err
	}
	return m.Delete()
}

func (h *holder) Pid() (int, error) { return h.proc.Pid, nil }

// Wait returns the holder's exit status once it exited; it may be called more than once.
func (h *holder) Wait() uint32 {
	h.once.Do(func() {
		h.status = 255
		if ps, err := h.proc.Wait(); err == nil {
			if ws, ok := ps.Sys().(syscall.WaitStatus); ok {
				h.status = exitStatus(unix.WaitStatus(ws))
			}
		}
	})
	return h.status
}

// Hold is /init run as a pod's namespace holder (HoldArg): it sets the hostname and the
// namespaced sysctls its arguments give ("hostname=NAME", "sysctl=KEY=VALUE"), reports on
// descriptor 3, then reaps orphans until SIGTERM or SIGINT ends it. It never returns.
func Hold(args []string) {
	ready := os.NewFile(holdReadyFd, "ready")
	if err := holdSetup(args); err != nil {
		_, _ = fmt.Fprint(ready, err.Error())
		os.Exit(1)
	}
	_ = ready.Close()
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGCHLD)
	for s := range sigs {
		if s != unix.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws unix.WaitStatus
			if pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}

func holdSetup(args []string) error {
	for _, a := range args {
		switch {
		case strings.HasPrefix(a, "hostname="):
			if err := unix.Sethostname([]byte(strings.TrimPrefix(a, "hostname="))); err != nil {
				return fmt.Errorf("set hostname: %w", err)
			}
		case strings.HasPrefix(a, "sysctl="):
			k, v, _ := strings.Cut(strings.TrimPrefix(a, "sysctl="), "=")
			if err := checkSysctlName(k); err != nil {
				return err
			}
			p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
			if err := os.WriteFile(p, []byte(v), 0); err != nil {
				return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
			}
		default:
			return fmt.Errorf("holder argument %q: want hostname=NAME or sysctl=KEY=VALUE", a)
		}
	}
	return nil
}
