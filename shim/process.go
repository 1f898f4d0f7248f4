package shim

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// status is where a task process is in its life. The allowed transitions are
//
//	created → running → stopped → deleted
//	created → stopped   (killed, or its container died, before it started)
//	created → deleted   (deleted without ever starting)
//
// Pause and resume are a flag of the running container, not a process state.
type status int

const (
	statusCreated status = iota
	statusRunning
	statusStopped
	statusDeleted
)

func (s status) String() string {
	return [...]string{"created", "running", "stopped", "deleted"}[s]
}

var transitions = map[status][]status{
	statusCreated: {statusRunning, statusStopped, statusDeleted},
	statusRunning: {statusStopped},
	statusStopped: {statusDeleted},
}

// process is the shim's view of one task process: a container's init or an exec.
type process struct {
	containerID string
	execID      string
	stdio       stdioPaths
	// spec is an exec's OCI process (JSON), kept from Exec until Start.
	spec []byte

	mu       sync.Mutex
	status   status
	pid      uint32
	exitCode uint32
	exitedAt time.Time
	// exited is closed once the exit status is known; reported once its TaskExit is queued
	// (an init's exit is published only after its execs' were).
	exited       chan struct{}
	reported     chan struct{}
	reportedOnce sync.Once
	// io forwards the process's stdio; nil before the process exists in the guest.
	io *hostIO
}

func newProcess(containerID, execID string, stdio stdioPaths) *process {
	return &process{containerID: containerID, execID: execID, stdio: stdio,
		exited: make(chan struct{}), reported: make(chan struct{})}
}

func (p *process) name() string {
	if p.execID == "" {
		return p.containerID
	}
	return p.containerID + "/" + p.execID
}

// to moves the process to a new status when the transition is allowed.
func (p *process) to(s status) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.toLocked(s)
}

func (p *process) toLocked(s status) error {
	for _, next := range transitions[p.status] {
		if next == s {
			p.status = s
			return nil
		}
	}
	return fmt.Errorf("process %s is %s and cannot become %s: %w", p.name(), p.status, s, errdefs.ErrFailedPrecondition)
}

func (p *process) state() (status, uint32, uint32, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status, p.pid, p.exitCode, p.exitedAt
}

// setExited records the exit; it reports false when the exit was already recorded.
func (p *process) setExited(code uint32, at time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.exited:
		return false
	default:
	}
	if p.status == statusCreated || p.status == statusRunning {
		p.status = statusStopped
	}
	p.exitCode, p.exitedAt = code, at
	close(p.exited)
	return true
}

func (p *process) wait(ctx context.Context) (uint32, time.Time, error) {
	select {
	case <-p.exited:
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.exitCode, p.exitedAt, nil
	case <-ctx.Done():
		return 0, time.Time{}, ctx.Err()
	}
}

func (p *process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// markReported records that the exit event, if any, is queued.
func (p *process) markReported() { p.reportedOnce.Do(func() { close(p.reported) }) }
