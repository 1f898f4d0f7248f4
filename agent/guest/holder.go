package guest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// HoldArg is the argument /init runs with as a pod's namespace holder (cmd/podvm-agent/hold.go).
const HoldArg = "hold"

// CRI's annotation that marks the pod sandbox (pause) container's spec.
const (
	annotationContainerType = "io.kubernetes.cri.container-type"
	containerTypeSandbox    = "sandbox"
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

// madeBeforeSetup reports whether the container of a create sent alongside the guest's setup
// (CreateContainerRequest.alongside_setup) can be made before SetupSandbox ended: a pod
// sandbox that a holder keeps needs neither the pod's share (it has no rootfs to mount) nor its
// NICs, unless it sets a NIC's sysctls (nicSysctl) or mounts disks. Anything else,
// libcontainer's containers among them, waits for the setup.
func madeBeforeSetup(spec *specs.Spec, req *api.CreateContainerRequest) bool {
	if !isPodSandbox(spec) || (spec.Process != nil && spec.Process.Terminal) || len(req.BlockMounts) > 0 || len(req.Devices) > 0 {
		return false
	}
	if _, ok := holderCloneFlags(spec); !ok {
		return false
	}
	for k := range spec.Linux.Sysctl {
		if nicSysctl(k) {
			return false
		}
	}
	return true
}

// nicSysctl reports whether sysctl k is one of a network device's (net.<family>.conf.<dev>.*
// or net.<family>.neigh.<dev>.*): it names a pod NIC, which the guest's setup names, or is
// the "default" a NIC takes when it appears, which in a runc pod is there before any sysctl is
// written. Other net.* sysctls, as the two containerd gives every pod
// (ip_unprivileged_port_start, ping_group_range), belong to the network namespace alone.
func nicSysctl(k string) bool {
	parts := strings.SplitN(k, ".", 4)
	return len(parts) == 4 && parts[0] == "net" && (parts[2] == "conf" || parts[2] == "neigh")
}

// holdNamespaces starts the holder of pod sandbox id in its cgroup and gives its namespaces
// the pod's hostname and namespaced sysctls. A spec it cannot hold goes to libcontainer.
func holdNamespaces(r libcontainerRuntime, id string, spec *specs.Spec, init *procConfig) (runtimeContainer, runtimeProcess, error) {
	flags, ok := holderCloneFlags(spec)
	if !ok {
		return r.createContainer(id, spec, init)
	}
	for k := range spec.Linux.Sysctl {
		if err := checkSysctlName(k); err != nil {
			return nil, nil, err
		}
	}
	cg, err := newHolderCgroup(id, spec)
	if err != nil {
		return nil, nil, err
	}
	proc, err := startHolder(flags, spec.Linux.CgroupsPath, init)
	if err == nil {
		err = setUpHeldNamespaces(proc.Pid, flags, spec)
		if err != nil {
			_ = proc.Kill()
			_, _ = proc.Wait()
		}
	}
	if err != nil {
		_ = cg.Delete()
		return nil, nil, fmt.Errorf("pod sandbox %s: %w", id, err)
	}
	h := &holder{guestCgroup: newGuestCgroup(id, spec.Linux.CgroupsPath), proc: proc}
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
	m, err := cgroup2.NewManager(cgroupRoot, spec.Linux.CgroupsPath, res)
	if err != nil {
		return nil, fmt.Errorf("pod sandbox %s: cgroup %s: %w", id, spec.Linux.CgroupsPath, err)
	}
	return m, nil
}

// startHolder runs /init as a holder in new namespaces, born in the cgroup at cgroupPath
// (CLONE_INTO_CGROUP: no move after the fact). The holder is C code that runs before the Go
// runtime (cmd/podvm-agent/hold.go): it has nothing to set up and nothing to report.
func startHolder(flags uintptr, cgroupPath string, init *procConfig) (*os.Process, error) {
	cgDir, err := os.Open(filepath.Join(cgroupRoot, cgroupPath))
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	defer func() { _ = cgDir.Close() }()
	cmd := &exec.Cmd{Path: "/init", Args: []string{"/init", HoldArg}, Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
		SysProcAttr: &syscall.SysProcAttr{Cloneflags: flags, UseCgroupFD: true, CgroupFD: int(cgDir.Fd())}}
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
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the pod's namespace holder: %w", err)
	}
	return cmd.Process, nil
}

// setUpHeldNamespaces gives the holder's new UTS namespace the pod's hostname and its new IPC
// namespace (or the guest's, if it made none) the spec's sysctls, from a thread of the agent
// that enters them: UTS and IPC namespaces can be entered by one thread of a process. The
// thread stays locked, so it ends with its goroutine and never runs other Go code in the
// pod's namespaces.
func setUpHeldNamespaces(pid int, flags uintptr, spec *specs.Spec) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- setUpNamespacesOfThread(pid, flags, spec)
	}()
	return <-errc
}

func setUpNamespacesOfThread(pid int, flags uintptr, spec *specs.Spec) error {
	for _, ns := range []struct {
		flag int
		name string
	}{{unix.CLONE_NEWUTS, "uts"}, {unix.CLONE_NEWIPC, "ipc"}} {
		if flags&uintptr(ns.flag) == 0 {
			continue
		}
		if err := enterNamespace(pid, ns.name, ns.flag); err != nil {
			return err
		}
	}
	if flags&unix.CLONE_NEWUTS != 0 && spec.Hostname != "" {
		if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
			return fmt.Errorf("set hostname %q: %w", spec.Hostname, err)
		}
	}
	for k, v := range spec.Linux.Sysctl {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if err := os.WriteFile(p, []byte(v), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w: %w", k, v, err, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

func enterNamespace(pid int, name string, flag int) error {
	fd, err := unix.Open(fmt.Sprintf("/proc/%d/ns/%s", pid, name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open the holder's %s namespace: %w", name, err)
	}
	defer func() { _ = unix.Close(fd) }()
	if err := unix.Setns(fd, flag); err != nil {
		return fmt.Errorf("enter the holder's %s namespace: %w", name, err)
	}
	return nil
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
	h.closeStats()
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
