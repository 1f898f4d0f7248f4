package guest

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/containerd/errdefs"

	// Device rules in cgroups need the devices controller implementation linked in.
	_ "github.com/opencontainers/cgroups/devices"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// libcontainerRuntime runs containers with runc's libcontainer, keeping its state under root.
type libcontainerRuntime struct {
	root string
}

// lcContainer is a libcontainer container and its cgroup v2 group.
type lcContainer struct {
	guestCgroup
	lc *libcontainer.Container
}

// lcProcess is a started libcontainer process.
type lcProcess struct{ p *libcontainer.Process }

// Create makes a container with libcontainer, except for a CRI pod sandbox, whose namespaces a
// holder process keeps (see holdNamespaces): the pause program would do nothing a VM needs, and
// libcontainer's first start in a fresh guest is the slowest part of a pod's start under TCG.
func (r libcontainerRuntime) Create(id string, spec *specs.Spec, init *procConfig) (runtimeContainer, runtimeProcess, error) {
	spec.Linux.CgroupsPath = guestCgroupsPath(id, spec.Linux.CgroupsPath)
	if isPodSandbox(spec) && init.consoleSocket == nil {
		return holdNamespaces(r, id, spec, init)
	}
	return r.createContainer(id, spec, init)
}

// createContainer is runc create.
func (r libcontainerRuntime) createContainer(id string, spec *specs.Spec, init *procConfig) (runtimeContainer, runtimeProcess, error) {
	cfg, err := specconv.CreateLibcontainerConfig(&specconv.CreateOpts{CgroupName: id, Spec: spec})
	if err != nil {
		return nil, nil, fmt.Errorf("convert spec: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	lp, err := toLibcontainerProcess(init)
	if err != nil {
		return nil, nil, err
	}
	lc, err := libcontainer.Create(r.root, id, cfg)
	if err != nil {
		return nil, nil, typed(err)
	}
	if err := lc.Start(lp); err != nil {
		_ = lc.Destroy()
		return nil, nil, fmt.Errorf("create: %w", typed(err))
	}
	return &lcContainer{guestCgroup: newGuestCgroup(id, spec.Linux.CgroupsPath), lc: lc}, lcProcess{lp}, nil
}

func (c *lcContainer) Start() error { return typed(c.lc.Exec()) }

func (c *lcContainer) Exec(p *procConfig) (runtimeProcess, error) {
	lp, err := toLibcontainerProcess(p)
	if err != nil {
		return nil, err
	}
	if err := c.lc.Run(lp); err != nil {
		return nil, typed(err)
	}
	return lcProcess{lp}, nil
}

func (c *lcContainer) Signal(sig unix.Signal) error { return typed(c.lc.Signal(sig)) }

func (c *lcContainer) Processes() ([]int, error) {
	pids, err := c.lc.Processes()
	return pids, typed(err)
}

func (c *lcContainer) Pause() error  { return typed(c.lc.Pause()) }
func (c *lcContainer) Resume() error { return typed(c.lc.Resume()) }
func (c *lcContainer) Destroy() error {
	c.closeStats()
	return typed(c.lc.Destroy())
}

// typed adds the errdefs class to libcontainer's state errors, so the host can tell "not
// running" from "failed".
func typed(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, libcontainer.ErrExist):
		return fmt.Errorf("%w: %w", err, errdefs.ErrAlreadyExists)
	case errors.Is(err, libcontainer.ErrNotExist), errors.Is(err, libcontainer.ErrCgroupNotExist):
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	case errors.Is(err, libcontainer.ErrInvalidID):
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	case errors.Is(err, libcontainer.ErrPaused), errors.Is(err, libcontainer.ErrRunning),
		errors.Is(err, libcontainer.ErrNotRunning), errors.Is(err, libcontainer.ErrNotPaused):
		return fmt.Errorf("%w: %w", err, errdefs.ErrFailedPrecondition)
	}
	return err
}

func (p lcProcess) Pid() (int, error) { return p.p.Pid() }

func (p lcProcess) Wait() uint32 {
	ps, _ := p.p.Wait()
	if ps != nil {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok {
			return exitStatus(unix.WaitStatus(ws))
		}
	}
	return 255
}

func (p lcProcess) Signal(sig unix.Signal) error {
	err := p.p.Signal(sig)
	if errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	}
	return err
}

// toLibcontainerProcess converts a process the way runc does.
func toLibcontainerProcess(pc *procConfig) (*libcontainer.Process, error) {
	lp, err := convertProcess(pc.spec)
	if err != nil {
		return nil, err
	}
	lp.Init = pc.init
	if pc.consoleSocket != nil {
		lp.ConsoleSocket = pc.consoleSocket
		if pc.consoleWidth > 0 && pc.consoleHeight > 0 {
			lp.ConsoleWidth, lp.ConsoleHeight = pc.consoleWidth, pc.consoleHeight
		}
		return lp, nil
	}
	// nil streams are /dev/null for libcontainer's exec.Cmd; a nil *os.File in the
	// interface would not be.
	if pc.stdin != nil {
		lp.Stdin = pc.stdin
	}
	if pc.stdout != nil {
		lp.Stdout = pc.stdout
	}
	if pc.stderr != nil {
		lp.Stderr = pc.stderr
	}
	return lp, nil
}

// convertProcess converts an OCI process the way runc does.
func convertProcess(p *specs.Process) (*libcontainer.Process, error) {
	lp := &libcontainer.Process{
		Args:            p.Args,
		Env:             p.Env,
		UID:             int(p.User.UID),
		GID:             int(p.User.GID),
		Cwd:             p.Cwd,
		Label:           p.SelinuxLabel,
		NoNewPrivileges: &p.NoNewPrivileges,
		AppArmorProfile: p.ApparmorProfile,
		Scheduler:       p.Scheduler,
		IOPriority:      p.IOPriority,
	}
	if lp.Cwd == "" {
		lp.Cwd = "/"
	}
	if p.ConsoleSize != nil {
		lp.ConsoleWidth, lp.ConsoleHeight = uint16(p.ConsoleSize.Width), uint16(p.ConsoleSize.Height)
	}
	if c := p.Capabilities; c != nil {
		lp.Capabilities = &configs.Capabilities{Bounding: c.Bounding, Effective: c.Effective,
			Inheritable: c.Inheritable, Permitted: c.Permitted, Ambient: c.Ambient}
	}
	for _, g := range p.User.AdditionalGids {
		lp.AdditionalGroups = append(lp.AdditionalGroups, int(g))
	}
	for _, rl := range p.Rlimits {
		t, ok := rlimits[rl.Type]
		if !ok {
			return nil, fmt.Errorf("rlimit %q is not known; use e.g. RLIMIT_NOFILE: %w", rl.Type, errdefs.ErrInvalidArgument)
		}
		lp.Rlimits = append(lp.Rlimits, configs.Rlimit{Type: t, Hard: rl.Hard, Soft: rl.Soft})
	}
	aff, err := configs.ConvertCPUAffinity(p.ExecCPUAffinity)
	if err != nil {
		return nil, fmt.Errorf("execCPUAffinity: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	lp.CPUAffinity = aff
	return lp, nil
}

var rlimits = map[string]int{
	"RLIMIT_CPU": unix.RLIMIT_CPU, "RLIMIT_FSIZE": unix.RLIMIT_FSIZE, "RLIMIT_DATA": unix.RLIMIT_DATA,
	"RLIMIT_STACK": unix.RLIMIT_STACK, "RLIMIT_CORE": unix.RLIMIT_CORE, "RLIMIT_RSS": unix.RLIMIT_RSS,
	"RLIMIT_NPROC": unix.RLIMIT_NPROC, "RLIMIT_NOFILE": unix.RLIMIT_NOFILE, "RLIMIT_MEMLOCK": unix.RLIMIT_MEMLOCK,
	"RLIMIT_AS": unix.RLIMIT_AS, "RLIMIT_LOCKS": unix.RLIMIT_LOCKS, "RLIMIT_SIGPENDING": unix.RLIMIT_SIGPENDING,
	"RLIMIT_MSGQUEUE": unix.RLIMIT_MSGQUEUE, "RLIMIT_NICE": unix.RLIMIT_NICE, "RLIMIT_RTPRIO": unix.RLIMIT_RTPRIO,
	"RLIMIT_RTTIME": unix.RLIMIT_RTTIME,
}
