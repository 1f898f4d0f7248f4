package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/agent/api"
)

// Fake is an in-memory guest agent for unit tests of the host side. Processes "run" from
// StartProcess until they are signalled or Exit is called; their output is what Output set.
type Fake struct {
	api.AgentService // not implemented methods panic, so a test notices

	mu         sync.Mutex
	procs      map[string]*fakeProc
	containers map[string]bool
	calls      []string
	setup      *api.SetupSandboxRequest
	nextPid    uint32
	closed     chan struct{}
	closeOnce  sync.Once
	ooms       chan string
	// CreateErr, if set, fails CreateContainer.
	CreateErr error
	// The replies of ListProcesses and Stats, as a test (playing a hostile guest) sets them.
	ProcessList *api.ListProcessesResponse
	StatsReply  *api.StatsResponse
	// ExitedAt, if not zero, is the exit time WaitProcess reports (Unix nanoseconds).
	ExitedAt int64
}

type fakeProc struct {
	created bool
	started bool
	stdout  []byte
	exit    chan struct{}
	status  uint32
	pid     uint32
}

// NewFake returns an agent with no containers.
func NewFake() *Fake {
	return &Fake{procs: map[string]*fakeProc{}, containers: map[string]bool{}, nextPid: 100, closed: make(chan struct{}), ooms: make(chan string, 4096)}
}

func key(cid, eid string) string { return cid + "/" + eid }

func (f *Fake) record(call string) {
	f.calls = append(f.calls, call)
}

// Calls lists the RPCs the fake served, as "Method container/exec".
func (f *Fake) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

// Setup returns the SetupSandbox request the fake got.
func (f *Fake) Setup() *api.SetupSandboxRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.setup
}

// Containers lists the containers the fake holds.
func (f *Fake) Containers() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for id := range f.containers {
		ids = append(ids, id)
	}
	return ids
}

// Output sets what a process writes to stdout (before or after it is created).
func (f *Fake) Output(cid, eid string, b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.proc(cid, eid).stdout = b
}

// Exit makes a process exit with status.
func (f *Fake) Exit(cid, eid string, status uint32) {
	f.mu.Lock()
	p := f.proc(cid, eid)
	f.mu.Unlock()
	select {
	case <-p.exit:
	default:
		p.status = status
		close(p.exit)
	}
}

func (f *Fake) proc(cid, eid string) *fakeProc {
	p, ok := f.procs[key(cid, eid)]
	if !ok {
		p = &fakeProc{exit: make(chan struct{})}
		f.procs[key(cid, eid)] = p
	}
	return p
}

func (f *Fake) get(cid, eid string) (*fakeProc, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.procs[key(cid, eid)]
	if !ok || !p.created {
		return nil, fmt.Errorf("process %s: %w", key(cid, eid), errdefs.ErrNotFound)
	}
	return p, nil
}

// Close implements the client's Close; Done is closed afterwards.
func (f *Fake) Close() error {
	f.closeOnce.Do(func() { close(f.closed) })
	return nil
}

// Done is closed when the fake connection is closed.
func (f *Fake) Done() <-chan struct{} { return f.closed }

func (f *Fake) Version(ctx context.Context, _ *api.VersionRequest) (*api.VersionResponse, error) {
	return &api.VersionResponse{AgentVersion: Version, KernelRelease: "fake"}, nil
}

func (f *Fake) SetupSandbox(ctx context.Context, r *api.SetupSandboxRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("SetupSandbox")
	f.setup = r
	return &api.Empty{}, nil
}

func (f *Fake) CreateContainer(ctx context.Context, r *api.CreateContainerRequest) (*api.CreateContainerResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("CreateContainer " + r.ContainerId)
	if f.CreateErr != nil {
		return nil, f.CreateErr
	}
	if f.containers[r.ContainerId] {
		return nil, fmt.Errorf("container %s: %w", r.ContainerId, errdefs.ErrAlreadyExists)
	}
	f.containers[r.ContainerId] = true
	p := f.proc(r.ContainerId, "")
	p.created, f.nextPid, p.pid = true, f.nextPid+1, f.nextPid
	return &api.CreateContainerResponse{Pid: p.pid}, nil
}

func (f *Fake) ExecProcess(ctx context.Context, r *api.ExecProcessRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("ExecProcess " + key(r.ContainerId, r.ExecId))
	if !f.containers[r.ContainerId] {
		return nil, fmt.Errorf("container %s: %w", r.ContainerId, errdefs.ErrNotFound)
	}
	p := f.proc(r.ContainerId, r.ExecId)
	p.created, f.nextPid, p.pid = true, f.nextPid+1, f.nextPid
	return &api.Empty{}, nil
}

func (f *Fake) StartProcess(ctx context.Context, r *api.ProcessRequest) (*api.StartProcessResponse, error) {
	p, err := f.get(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("StartProcess " + key(r.ContainerId, r.ExecId))
	p.started = true
	return &api.StartProcessResponse{Pid: p.pid}, nil
}

func (f *Fake) SignalProcess(ctx context.Context, r *api.SignalProcessRequest) (*api.Empty, error) {
	p, err := f.get(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.record(fmt.Sprintf("SignalProcess %s %d", key(r.ContainerId, r.ExecId), r.Signal))
	f.mu.Unlock()
	select {
	case <-p.exit:
		return nil, fmt.Errorf("process exited: %w", errdefs.ErrNotFound)
	default:
	}
	f.Exit(r.ContainerId, r.ExecId, 128+r.Signal)
	return &api.Empty{}, nil
}

func (f *Fake) WaitProcess(ctx context.Context, r *api.ProcessRequest) (*api.WaitProcessResponse, error) {
	p, err := f.get(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exit:
		at := time.Now().UnixNano()
		f.mu.Lock()
		if f.ExitedAt != 0 {
			at = f.ExitedAt
		}
		f.mu.Unlock()
		return &api.WaitProcessResponse{ExitStatus: p.status, ExitedAtUnixNano: at}, nil
	case <-f.closed:
		return nil, fmt.Errorf("fake agent connection closed")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// ReadStdio returns the process's output once, then EOF when the process exited.
func (f *Fake) ReadStdio(ctx context.Context, r *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	p, err := f.get(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	if r.Stream == api.StdioStream_STDOUT && len(p.stdout) > 0 {
		out := p.stdout
		p.stdout = nil
		f.mu.Unlock()
		return &api.ReadStdioResponse{Data: out}, nil
	}
	f.mu.Unlock()
	select {
	case <-p.exit:
		return &api.ReadStdioResponse{Eof: true}, nil
	case <-f.closed:
		return &api.ReadStdioResponse{Eof: true}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (f *Fake) WriteStdin(ctx context.Context, r *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	return &api.WriteStdinResponse{Written: uint32(len(r.Data))}, nil
}

func (f *Fake) CloseStdin(ctx context.Context, r *api.ProcessRequest) (*api.Empty, error) {
	return &api.Empty{}, nil
}

func (f *Fake) RemoveProcess(ctx context.Context, r *api.ProcessRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("RemoveProcess " + key(r.ContainerId, r.ExecId))
	delete(f.procs, key(r.ContainerId, r.ExecId))
	return &api.Empty{}, nil
}

func (f *Fake) RemoveContainer(ctx context.Context, r *api.RemoveContainerRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("RemoveContainer " + r.ContainerId)
	if !f.containers[r.ContainerId] {
		return nil, fmt.Errorf("container %s: %w", r.ContainerId, errdefs.ErrNotFound)
	}
	delete(f.containers, r.ContainerId)
	return &api.Empty{}, nil
}

func (f *Fake) Shutdown(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	f.mu.Lock()
	f.record("Shutdown")
	f.mu.Unlock()
	return &api.Empty{}, nil
}

func (f *Fake) PauseContainer(ctx context.Context, r *api.ContainerRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("PauseContainer " + r.ContainerId)
	return &api.Empty{}, nil
}

func (f *Fake) ResumeContainer(ctx context.Context, r *api.ContainerRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("ResumeContainer " + r.ContainerId)
	return &api.Empty{}, nil
}

// OOM queues an OOM event naming containerID, as a guest (honest or not) would send it.
func (f *Fake) OOM(containerID string) {
	f.ooms <- containerID
}

// GetOOMEvent returns the events OOM queued, in order.
func (f *Fake) GetOOMEvent(ctx context.Context, _ *api.Empty) (*api.OOMEvent, error) {
	select {
	case id := <-f.ooms:
		return &api.OOMEvent{ContainerId: id}, nil
	case <-f.closed:
		return nil, fmt.Errorf("fake agent connection closed")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// ListProcesses returns ProcessList (none if unset).
func (f *Fake) ListProcesses(ctx context.Context, r *api.ContainerRequest) (*api.ListProcessesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("ListProcesses " + r.ContainerId)
	if f.ProcessList == nil {
		return &api.ListProcessesResponse{}, nil
	}
	return f.ProcessList, nil
}

// Stats returns StatsReply (empty metrics if unset).
func (f *Fake) Stats(ctx context.Context, r *api.ContainerRequest) (*api.StatsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("Stats " + r.ContainerId)
	if f.StatsReply == nil {
		return &api.StatsResponse{}, nil
	}
	return f.StatsReply, nil
}
