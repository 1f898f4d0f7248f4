package guest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/utils"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// processState is where a process is in its life. Transitions: created → running → exited,
// and created → exited when its start fails or its container is killed first.
type processState int

const (
	stateCreated processState = iota
	stateRunning
	stateExited
)

func (s processState) String() string {
	return [...]string{"created", "running", "exited"}[s]
}

// process is one container process: the init (execID "") or an exec.
type process struct {
	execID string
	lc     *libcontainer.Process
	io     *stdio
	req    *api.Stdio
	// consoleSock receives the pty master in terminal mode.
	consoleSock *os.File

	mu       sync.Mutex
	state    processState
	pid      int
	status   uint32
	exitedAt time.Time
	done     chan struct{}
}

func newProcess(execID string, p *specs.Process, req *api.Stdio, init bool) (_ *process, retErr error) {
	if p == nil {
		return nil, fmt.Errorf("the spec has no process: %w", errdefs.ErrInvalidArgument)
	}
	if len(p.Args) == 0 {
		return nil, fmt.Errorf("process args are empty: %w", errdefs.ErrInvalidArgument)
	}
	lp, err := toLibcontainerProcess(p)
	if err != nil {
		return nil, err
	}
	lp.Init = init
	if req == nil {
		req = &api.Stdio{}
	}
	req.Terminal = req.Terminal || p.Terminal
	io, err := newStdio(req)
	if err != nil {
		return nil, err
	}
	pr := &process{execID: execID, lc: lp, io: io, req: req, done: make(chan struct{})}
	defer func() {
		if retErr != nil {
			pr.release()
		}
	}()
	if req.Terminal {
		parent, child, err := utils.NewSockPair("console")
		if err != nil {
			return nil, err
		}
		pr.consoleSock = parent
		io.child = append(io.child, child)
		lp.ConsoleSocket = child
		if req.Width > 0 && req.Height > 0 {
			lp.ConsoleWidth, lp.ConsoleHeight = uint16(req.Width), uint16(req.Height)
		}
	} else {
		// nil streams are /dev/null for libcontainer's exec.Cmd.
		if io.in != nil {
			lp.Stdin = io.in
		}
		if io.out != nil {
			lp.Stdout = io.out
		}
		if io.errf != nil {
			lp.Stderr = io.errf
		}
	}
	return pr, nil
}

// started is called after libcontainer started the process: it collects the terminal, drops
// the agent's copies of the child's stdio ends and waits for the exit in the background.
func (p *process) started() error {
	p.io.closeChild()
	if p.consoleSock != nil {
		master, err := utils.RecvFile(p.consoleSock)
		p.consoleSock.Close()
		p.consoleSock = nil
		if err != nil {
			return fmt.Errorf("receive terminal: %w", err)
		}
		if err := p.io.setConsole(master, p.req.Width, p.req.Height); err != nil {
			return fmt.Errorf("set up terminal: %w", err)
		}
	}
	pid, err := p.lc.Pid()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.pid = pid
	p.mu.Unlock()
	go p.wait()
	return nil
}

func (p *process) wait() {
	ps, err := p.lc.Wait()
	status := uint32(255)
	if ps != nil {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok {
			status = exitStatus(unix.WaitStatus(ws))
		}
	} else if err != nil {
		status = 255
	}
	p.setExited(status)
}

func (p *process) setExited(status uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == stateExited {
		return
	}
	p.state, p.status, p.exitedAt = stateExited, status, time.Now()
	close(p.done)
}

func (p *process) transition(to processState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if to != stateRunning || p.state != stateCreated {
		return fmt.Errorf("process %q is %s, cannot become %s: %w", p.execID, p.state, to, errdefs.ErrFailedPrecondition)
	}
	p.state = to
	return nil
}

func (p *process) waitExit(ctx context.Context) (uint32, time.Time, error) {
	select {
	case <-p.done:
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.status, p.exitedAt, nil
	case <-ctx.Done():
		return 0, time.Time{}, ctx.Err()
	}
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) signal(sig unix.Signal) error {
	if p.exited() {
		return fmt.Errorf("process %q: %w", p.execID, errdefs.ErrNotFound)
	}
	if err := p.lc.Signal(sig); err != nil {
		if errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("process %q: %w", p.execID, errdefs.ErrNotFound)
		}
		return err
	}
	return nil
}

// release frees what the agent holds for the process.
func (p *process) release() {
	p.io.closeChild()
	p.io.close()
	if p.consoleSock != nil {
		p.consoleSock.Close()
	}
}

// toLibcontainerProcess converts an OCI process the way runc does.
func toLibcontainerProcess(p *specs.Process) (*libcontainer.Process, error) {
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
