package guest

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"
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
	cfg    *procConfig
	io     *stdio
	req    *api.Stdio
	// consoleSock receives the pty master in terminal mode.
	consoleSock *os.File

	mu sync.Mutex
	// rp is the runtime's process, set once it started.
	rp       runtimeProcess
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
	// Refuse what the runtime could not run before making anything.
	if _, err := convertProcess(p); err != nil {
		return nil, err
	}
	if req == nil {
		req = &api.Stdio{}
	}
	req.Terminal = req.Terminal || p.Terminal
	io, err := newStdio(req)
	if err != nil {
		return nil, err
	}
	cfg := &procConfig{spec: p, init: init}
	pr := &process{execID: execID, cfg: cfg, io: io, req: req, done: make(chan struct{})}
	defer func() {
		if retErr != nil {
			pr.release()
		}
	}()
	if !req.Terminal {
		cfg.stdin, cfg.stdout, cfg.stderr = io.in, io.out, io.errf
		return pr, nil
	}
	parent, child, err := utils.NewSockPair("console")
	if err != nil {
		return nil, err
	}
	pr.consoleSock = parent
	io.child = append(io.child, child)
	cfg.consoleSocket = child
	if req.Width > 0 && req.Height > 0 {
		cfg.consoleWidth, cfg.consoleHeight = uint16(req.Width), uint16(req.Height)
	}
	return pr, nil
}

// started is called after the runtime started the process: it collects the terminal, drops
// the agent's copies of the child's stdio ends and waits for the exit in the background.
func (p *process) started(rp runtimeProcess) error {
	p.mu.Lock()
	p.rp = rp
	p.mu.Unlock()
	p.io.closeChild()
	if p.consoleSock != nil {
		// runc 1.5 has no public successor (cmsg is internal to runc); revisit with runc 1.6.
		master, err := utils.RecvFile(p.consoleSock) //nolint:staticcheck // SA1019, see above
		_ = p.consoleSock.Close()
		p.consoleSock = nil
		if err != nil {
			return fmt.Errorf("receive terminal: %w", err)
		}
		if err := p.io.setConsole(master, p.req.Width, p.req.Height); err != nil {
			return fmt.Errorf("set up terminal: %w", err)
		}
	}
	pid, err := rp.Pid()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.pid = pid
	p.mu.Unlock()
	go func() { p.setExited(rp.Wait()) }()
	return nil
}

// runtimeProcess returns the started process, or nil before the start.
func (p *process) runtimeProcess() runtimeProcess {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rp
}

// getPid returns the pid, 0 before the start.
func (p *process) getPid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
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
	rp := p.runtimeProcess()
	if rp == nil {
		return fmt.Errorf("process %q is not started: %w", p.execID, errdefs.ErrFailedPrecondition)
	}
	if err := rp.Signal(sig); err != nil {
		return fmt.Errorf("process %q: %w", p.execID, err)
	}
	return nil
}

// release frees what the agent holds for the process.
func (p *process) release() {
	p.io.closeChild()
	p.io.close()
	if p.consoleSock != nil {
		_ = p.consoleSock.Close()
	}
}
