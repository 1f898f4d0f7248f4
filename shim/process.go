package shim

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// status is where a task process is in its life.
type status int

const (
	statusCreated status = iota
	statusRunning
	statusPaused
	statusStopped
	statusDeleted
)

func (s status) String() string {
	switch s {
	case statusCreated:
		return "created"
	case statusRunning:
		return "running"
	case statusPaused:
		return "paused"
	case statusStopped:
		return "stopped"
	case statusDeleted:
		return "deleted"
	}
	return fmt.Sprintf("status(%d)", int(s))
}

// op is something that happens to a process: a task API call, or its exit.
type op string

const (
	opStart  op = "start"
	opPause  op = "pause"
	opResume op = "resume"
	// opExit: the process ended, or was killed (or its VM died) before it started.
	opExit   op = "exit"
	opDelete op = "delete"
)

// transitions is the whole state machine: what each op does in each status. An op missing
// from a status's row is illegal there and fails with errdefs.ErrFailedPrecondition.
//
//	created ─start→ running ─pause→ paused ─resume→ running
//	created, running, paused ─exit→ stopped ─delete→ deleted
//
// A process deleted before it started first exits (it was killed before it ran), so every
// waiter learns an exit status.
// Only a container's init is paused (the container's cgroup is frozen); its execs report the
// init's paused status while they run.
var transitions = map[status]map[op]status{
	statusCreated: {opStart: statusRunning, opExit: statusStopped},
	statusRunning: {opPause: statusPaused, opExit: statusStopped},
	statusPaused:  {opResume: statusRunning, opExit: statusStopped},
	statusStopped: {opDelete: statusDeleted},
	statusDeleted: {},
}

// next returns the status op leads to from s, or an error saying why it cannot happen.
func next(s status, o op) (status, error) {
	if to, ok := transitions[s][o]; ok {
		return to, nil
	}
	return s, fmt.Errorf("it is %s; cannot %s it: %w", s, o, errdefs.ErrFailedPrecondition)
}

// process is the shim's view of one task process: a container's init or an exec. Its status
// changes only through the transitions table.
type process struct {
	containerID string
	execID      string
	stdio       stdioPaths
	// spec is an exec's OCI process (JSON) for the guest; nil for an init. Set before the
	// process is shared, never changed.
	spec []byte

	// ops serialises the task API's operations on the process (start, delete, pause,
	// resume), each of which checks the status, calls the guest and then moves the status.
	// The exit is recorded without it.
	ops sync.Mutex

	mu     sync.Mutex
	status status
	// pid is what containerd is told: a host pid that belongs to the pod (QEMU's, as Kata
	// does), so that host tools acting on a task pid (NRI plugins, crictl inspect, nsenter)
	// touch the pod and nothing else. Guest pids are the agent's (Pids lists them).
	pid      uint32
	exitCode uint32
	exitedAt time.Time
	// io forwards the process's stdio; nil before the process exists in the guest.
	io *hostIO

	// exited is closed once the exit status is known; reported once its TaskExit is queued
	// (an init's exit is published only after its execs' were).
	exited       chan struct{}
	reported     chan struct{}
	reportedOnce sync.Once
}

func newProcess(containerID, execID string, stdio stdioPaths) *process {
	return &process{containerID: containerID, execID: execID, stdio: stdio,
		exited: make(chan struct{}), reported: make(chan struct{})}
}

// String names the process in messages: "c1" for an init, "c1/e1" for an exec.
func (p *process) String() string {
	if p.execID == "" {
		return p.containerID
	}
	return p.containerID + "/" + p.execID
}

// eventID is the process id containerd's events and State use: the container id for an
// init, else the exec id.
func (p *process) eventID() string {
	if p.execID == "" {
		return p.containerID
	}
	return p.execID
}

// can reports whether o is allowed in the current status.
func (p *process) can(o op) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, err := next(p.status, o)
	return p.wrap(err)
}

// apply moves the process by o, or says why it cannot.
func (p *process) apply(o op) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	to, err := next(p.status, o)
	if err != nil {
		return p.wrap(err)
	}
	p.status = to
	return nil
}

func (p *process) wrap(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("process %s: %w", p, err)
}

// processState is a consistent snapshot of a process.
type processState struct {
	status   status
	pid      uint32
	exitCode uint32
	exitedAt time.Time
}

func (p *process) state() processState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return processState{status: p.status, pid: p.pid, exitCode: p.exitCode, exitedAt: p.exitedAt}
}

func (p *process) getPid() uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// attach records, once the process exists in the guest, the host pid containerd is told
// (see pid) and its stdio forwarding.
func (p *process) attach(hostPid uint32, h *hostIO) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pid, p.io = hostPid, h
}

// hostIO returns the stdio forwarding, nil if there is none (yet).
func (p *process) hostIO() *hostIO {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.io
}

// exit records the exit status (the exit transition); it reports false when the exit was
// already recorded or the process is deleted.
func (p *process) exit(code uint32, at time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	to, err := next(p.status, opExit)
	if err != nil {
		return false
	}
	p.status, p.exitCode, p.exitedAt = to, code, at
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

// markReported records that the exit event, if any, is queued.
func (p *process) markReported() { p.reportedOnce.Do(func() { close(p.reported) }) }
