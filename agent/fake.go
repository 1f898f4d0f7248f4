package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/agent/api"
)

// Fake is an in-memory guest agent for unit tests of the host side. It implements every RPC
// of api.AgentService. Processes "run" from StartProcess until they are signalled or Exit is
// called; their output is what Output set. Every call is recorded (Calls), any RPC can be
// made to fail (FailOn), and the replies a hostile guest could shape are fields a test sets.
// Port-forward calls reach the test machine's own loopback, as the guest's reach the guest's.
type Fake struct {
	mu         sync.Mutex
	procs      map[string]*fakeProc
	containers map[string]*fakeContainer
	calls      []string
	fail       map[string]error
	setup      *api.SetupSandboxRequest
	restored   *api.PrepareRestoredRequest
	nextPid    uint32
	closed     chan struct{}
	closeOnce  sync.Once
	ooms       chan string
	conns      map[uint64]*fakeConn
	nextConn   uint64
	shutdown   bool
	// CreateErr, if set, fails CreateContainer.
	CreateErr error
	// The replies of ListProcesses and Stats, as a test (playing a hostile guest) sets them.
	ProcessList *api.ListProcessesResponse
	StatsReply  *api.StatsResponse
	// MemInfoReply, if set, is what MemInfo answers.
	MemInfoReply *api.MemInfoResponse
	// VersionReply, if set, is what Version answers.
	VersionReply *api.VersionResponse
	// ExitedAt, if not zero, is the exit time WaitProcess reports (Unix nanoseconds).
	ExitedAt int64
	// RestoreGate, if set, holds PrepareRestored's answer until it is closed.
	RestoreGate chan struct{}
	// RemoveGate, if set, holds RemoveProcess until it is closed; the exec stays until then.
	RemoveGate chan struct{}
	// clockOffset is how far the fake guest's clock is ahead of the host's: Version answers
	// with the host's clock plus it, and AdjustClock moves it.
	clockOffset time.Duration
}

var _ api.AgentService = (*Fake)(nil)

type fakeContainer struct {
	paused    bool
	resources []byte
	spec      []byte
	alongside bool
}

type fakeProc struct {
	created       bool
	started       bool
	stdout        []byte
	stdin         []byte
	stdinClosed   bool
	width, height uint32
	exit          chan struct{}
	status        uint32
	pid           uint32
}

type fakeConn struct {
	c      *net.TCPConn
	readMu sync.Mutex
	eof    bool
}

// NewFake returns an agent with no containers.
func NewFake() *Fake {
	return &Fake{
		procs: map[string]*fakeProc{}, containers: map[string]*fakeContainer{}, fail: map[string]error{},
		conns: map[uint64]*fakeConn{}, nextPid: 100, closed: make(chan struct{}), ooms: make(chan string, 4096),
	}
}

func key(cid, eid string) string { return cid + "/" + eid }

// FailOn makes every later call of the RPC method (e.g. "Stats") fail with err; a nil err
// makes it succeed again. The call is still recorded.
func (f *Fake) FailOn(method string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.fail, method)
		return
	}
	f.fail[method] = err
}

// passGate waits until gate (if not nil) is closed or ctx ends.
func passGate(ctx context.Context, gate chan struct{}) error {
	if gate == nil {
		return nil
	}
	select {
	case <-gate:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// begin records a call of method (with its arguments, as "Method args") and returns the
// error FailOn injected for it. The caller holds f.mu.
func (f *Fake) begin(method, args string) error {
	call := method
	if args != "" {
		call += " " + args
	}
	f.calls = append(f.calls, call)
	return f.fail[method]
}

// enter is begin for a caller that does not hold f.mu.
func (f *Fake) enter(method, args string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.begin(method, args)
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

// Spec returns the OCI spec (JSON) container cid was created with, nil if it was not.
func (f *Fake) Spec(cid string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c := f.containers[cid]; c != nil {
		return c.spec
	}
	return nil
}

// CreatedAlongsideSetup reports whether container cid's create said it was sent while the
// guest's setup ran (CreateContainerRequest.alongside_setup).
func (f *Fake) CreatedAlongsideSetup(cid string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.containers[cid]
	return c != nil && c.alongside
}

// Paused reports whether the container is paused.
func (f *Fake) Paused(cid string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.containers[cid]
	return c != nil && c.paused
}

// Resources returns the resources JSON the last UpdateContainer of the container sent.
func (f *Fake) Resources(cid string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c := f.containers[cid]; c != nil {
		return c.resources
	}
	return nil
}

// Stdin returns what the host wrote to a process's stdin, and whether it closed it.
func (f *Fake) Stdin(cid, eid string) ([]byte, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.proc(cid, eid)
	return append([]byte(nil), p.stdin...), p.stdinClosed
}

// PtySize returns the terminal size the last ResizePty of a process set.
func (f *Fake) PtySize(cid, eid string) (width, height uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.proc(cid, eid)
	return p.width, p.height
}

// IsShutdown reports whether Shutdown was called.
func (f *Fake) IsShutdown() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.shutdown
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
	defer f.mu.Unlock()
	p := f.proc(cid, eid)
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

// get returns a created process; the caller holds f.mu.
func (f *Fake) get(cid, eid string) (*fakeProc, error) {
	p, ok := f.procs[key(cid, eid)]
	if !ok || !p.created {
		return nil, fmt.Errorf("process %s: %w", key(cid, eid), errdefs.ErrNotFound)
	}
	return p, nil
}

// serve records the call, then returns the created process or the injected error.
func (f *Fake) serve(method, cid, eid string) (*fakeProc, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(method, key(cid, eid)); err != nil {
		return nil, err
	}
	return f.get(cid, eid)
}

// container records the call, then returns the container or the injected error. The caller
// holds f.mu.
func (f *Fake) container(method, cid string) (*fakeContainer, error) {
	if err := f.begin(method, cid); err != nil {
		return nil, err
	}
	c, ok := f.containers[cid]
	if !ok {
		return nil, fmt.Errorf("container %s: %w", cid, errdefs.ErrNotFound)
	}
	return c, nil
}

func (f *Fake) errClosed() error {
	return errors.New("fake agent connection closed")
}

// Close implements the client's Close; Done is closed afterwards.
func (f *Fake) Close() error {
	f.closeOnce.Do(func() { close(f.closed) })
	return nil
}

// Done is closed when the fake connection is closed.
func (f *Fake) Done() <-chan struct{} { return f.closed }

// Version returns VersionReply, else this host's version and kernel "fake".
func (f *Fake) Version(ctx context.Context, _ *api.VersionRequest) (*api.VersionResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("Version", ""); err != nil {
		return nil, err
	}
	if f.VersionReply != nil {
		return f.VersionReply, nil
	}
	return &api.VersionResponse{AgentVersion: Version, KernelRelease: "fake", RealtimeNs: time.Now().Add(f.clockOffset).UnixNano()}, nil
}

// SetClockOffset puts the fake guest's clock d ahead of the host's (behind if negative).
func (f *Fake) SetClockOffset(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.clockOffset = d
}

// ClockOffset is how far the fake guest's clock is ahead of the host's.
func (f *Fake) ClockOffset() time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clockOffset
}

// AdjustClock implements the RPC of that name in api.AgentService (agent.proto) for tests: it
// moves the fake guest's clock at once, and records the call as "AdjustClock <offset> step"
// or "AdjustClock <offset> slew".
func (f *Fake) AdjustClock(ctx context.Context, r *api.AdjustClockRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := time.Duration(r.OffsetNs)
	if err := f.begin("AdjustClock", d.String()+map[bool]string{true: " step", false: " slew"}[r.Step]); err != nil {
		return nil, err
	}
	f.clockOffset += d
	return &api.Empty{}, nil
}

// SetupSandbox implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) SetupSandbox(ctx context.Context, r *api.SetupSandboxRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("SetupSandbox", ""); err != nil {
		return nil, err
	}
	f.setup = r
	return &api.Empty{}, nil
}

// CreateContainer implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) CreateContainer(ctx context.Context, r *api.CreateContainerRequest) (*api.CreateContainerResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("CreateContainer", r.ContainerId); err != nil {
		return nil, err
	}
	if f.CreateErr != nil {
		return nil, f.CreateErr
	}
	if _, ok := f.containers[r.ContainerId]; ok {
		return nil, fmt.Errorf("container %s: %w", r.ContainerId, errdefs.ErrAlreadyExists)
	}
	f.containers[r.ContainerId] = &fakeContainer{spec: r.Spec, alongside: r.AlongsideSetup}
	p := f.proc(r.ContainerId, "")
	p.created, f.nextPid, p.pid = true, f.nextPid+1, f.nextPid
	return &api.CreateContainerResponse{Pid: p.pid}, nil
}

// ExecProcess implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) ExecProcess(ctx context.Context, r *api.ExecProcessRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("ExecProcess", key(r.ContainerId, r.ExecId)); err != nil {
		return nil, err
	}
	if _, ok := f.containers[r.ContainerId]; !ok {
		return nil, fmt.Errorf("container %s: %w", r.ContainerId, errdefs.ErrNotFound)
	}
	if _, err := f.get(r.ContainerId, r.ExecId); err == nil {
		return nil, fmt.Errorf("exec %s: %w", key(r.ContainerId, r.ExecId), errdefs.ErrAlreadyExists)
	}
	p := f.proc(r.ContainerId, r.ExecId)
	p.created, f.nextPid, p.pid = true, f.nextPid+1, f.nextPid
	p.started = r.Start
	return &api.Empty{}, nil
}

// StartProcess implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) StartProcess(ctx context.Context, r *api.ProcessRequest) (*api.StartProcessResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("StartProcess", key(r.ContainerId, r.ExecId)); err != nil {
		return nil, err
	}
	p, err := f.get(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	p.started = true
	return &api.StartProcessResponse{Pid: p.pid}, nil
}

// SignalProcess makes the process exit with 128+signal; an exited one is not found.
func (f *Fake) SignalProcess(ctx context.Context, r *api.SignalProcessRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("SignalProcess", fmt.Sprintf("%s %d", key(r.ContainerId, r.ExecId), r.Signal)); err != nil {
		return nil, err
	}
	p, err := f.get(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exit:
		return nil, fmt.Errorf("process exited: %w", errdefs.ErrNotFound)
	default:
	}
	p.status = 128 + r.Signal
	close(p.exit)
	return &api.Empty{}, nil
}

// WaitProcess implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) WaitProcess(ctx context.Context, r *api.ProcessRequest) (*api.WaitProcessResponse, error) {
	p, err := f.serve("WaitProcess", r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exit:
		at := time.Now().UnixNano()
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.ExitedAt != 0 {
			at = f.ExitedAt
		}
		return &api.WaitProcessResponse{ExitStatus: p.status, ExitedAtUnixNano: at}, nil
	case <-f.closed:
		return nil, f.errClosed()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// ResizePty records the size; PtySize returns it.
func (f *Fake) ResizePty(ctx context.Context, r *api.ResizePtyRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("ResizePty", fmt.Sprintf("%s %dx%d", key(r.ContainerId, r.ExecId), r.Width, r.Height)); err != nil {
		return nil, err
	}
	p, err := f.get(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	p.width, p.height = r.Width, r.Height
	return &api.Empty{}, nil
}

// ReadStdio returns the process's output once, then EOF when the process exited.
func (f *Fake) ReadStdio(ctx context.Context, r *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	p, err := f.serve("ReadStdio", r.ContainerId, r.ExecId)
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

// WriteStdin takes all of the data (Stdin returns it) until CloseStdin.
func (f *Fake) WriteStdin(ctx context.Context, r *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("WriteStdin", key(r.ContainerId, r.ExecId)); err != nil {
		return nil, err
	}
	// A process the fake does not hold takes the bytes too: the shim's copy loops start
	// before a test has always made one.
	p := f.proc(r.ContainerId, r.ExecId)
	if p.stdinClosed {
		return nil, fmt.Errorf("stdin of %s is closed: %w", key(r.ContainerId, r.ExecId), errdefs.ErrFailedPrecondition)
	}
	p.stdin = append(p.stdin, r.Data...)
	return &api.WriteStdinResponse{Written: uint32(len(r.Data))}, nil
}

// CloseStdin implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) CloseStdin(ctx context.Context, r *api.ProcessRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("CloseStdin", key(r.ContainerId, r.ExecId)); err != nil {
		return nil, err
	}
	f.proc(r.ContainerId, r.ExecId).stdinClosed = true
	return &api.Empty{}, nil
}

// RemoveProcess implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) RemoveProcess(ctx context.Context, r *api.ProcessRequest) (*api.Empty, error) {
	if err := f.enter("RemoveProcess", key(r.ContainerId, r.ExecId)); err != nil {
		return nil, err
	}
	if err := passGate(ctx, f.RemoveGate); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.procs, key(r.ContainerId, r.ExecId))
	return &api.Empty{}, nil
}

// RemoveContainer implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) RemoveContainer(ctx context.Context, r *api.RemoveContainerRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.container("RemoveContainer", r.ContainerId); err != nil {
		return nil, err
	}
	delete(f.containers, r.ContainerId)
	return &api.Empty{}, nil
}

// ListProcesses returns ProcessList (none if unset).
func (f *Fake) ListProcesses(ctx context.Context, r *api.ContainerRequest) (*api.ListProcessesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("ListProcesses", r.ContainerId); err != nil {
		return nil, err
	}
	if f.ProcessList == nil {
		return &api.ListProcessesResponse{}, nil
	}
	return f.ProcessList, nil
}

// PauseContainer marks a container paused (Paused); pausing twice is not an error, as with
// the cgroup freezer.
func (f *Fake) PauseContainer(ctx context.Context, r *api.ContainerRequest) (*api.Empty, error) {
	return f.setPaused("PauseContainer", r.ContainerId, true)
}

// ResumeContainer implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) ResumeContainer(ctx context.Context, r *api.ContainerRequest) (*api.Empty, error) {
	return f.setPaused("ResumeContainer", r.ContainerId, false)
}

func (f *Fake) setPaused(method, cid string, paused bool) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, err := f.container(method, cid)
	if err != nil {
		return nil, err
	}
	c.paused = paused
	return &api.Empty{}, nil
}

// UpdateContainer keeps the resources JSON (Resources returns it).
func (f *Fake) UpdateContainer(ctx context.Context, r *api.UpdateContainerRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, err := f.container("UpdateContainer", r.ContainerId)
	if err != nil {
		return nil, err
	}
	c.resources = append([]byte(nil), r.Resources...)
	return &api.Empty{}, nil
}

// Stats returns StatsReply (empty metrics if unset).
func (f *Fake) Stats(ctx context.Context, r *api.ContainerRequest) (*api.StatsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("Stats", r.ContainerId); err != nil {
		return nil, err
	}
	if f.StatsReply == nil {
		return &api.StatsResponse{}, nil
	}
	return f.StatsReply, nil
}

// MemInfo answers MemInfoReply, or a guest with 512Mi of which 400Mi are available.
func (f *Fake) MemInfo(ctx context.Context, _ *api.Empty) (*api.MemInfoResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("MemInfo", ""); err != nil {
		return nil, err
	}
	if f.MemInfoReply == nil {
		return &api.MemInfoResponse{TotalBytes: 512 << 20, AvailableBytes: 400 << 20}, nil
	}
	return f.MemInfoReply, nil
}

// OOM queues an OOM event naming containerID, as a guest (honest or not) would send it.
func (f *Fake) OOM(containerID string) {
	f.ooms <- containerID
}

// GetOOMEvent returns the events OOM queued, in order.
func (f *Fake) GetOOMEvent(ctx context.Context, _ *api.Empty) (*api.OOMEvent, error) {
	if err := f.enter("GetOOMEvent", ""); err != nil {
		return nil, err
	}
	select {
	case id := <-f.ooms:
		return &api.OOMEvent{ContainerId: id}, nil
	case <-f.closed:
		return nil, f.errClosed()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Shutdown marks the fake shut down (IsShutdown); processes keep their state.
func (f *Fake) Shutdown(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("Shutdown", ""); err != nil {
		return nil, err
	}
	f.shutdown = true
	return &api.Empty{}, nil
}

// DialPort connects to 127.0.0.1:port of the test machine, which stands in for the guest's
// loopback. A port nothing listens on is errdefs.ErrUnavailable, as in the guest.
func (f *Fake) DialPort(ctx context.Context, r *api.DialPortRequest) (*api.DialPortResponse, error) {
	if err := f.enter("DialPort", strconv.Itoa(int(r.Port))); err != nil {
		return nil, err
	}
	if r.Port == 0 || r.Port > 65535 {
		return nil, fmt.Errorf("port %d is not a TCP port: %w", r.Port, errdefs.ErrInvalidArgument)
	}
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(r.Port))))
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("port %d: %w", r.Port, errdefs.ErrUnavailable)
		}
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nextConn++
	f.conns[f.nextConn] = &fakeConn{c: c.(*net.TCPConn)}
	return &api.DialPortResponse{ConnId: f.nextConn}, nil
}

// conn records the call, then returns the port connection or the injected error.
func (f *Fake) conn(method string, id uint64) (*fakeConn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(method, strconv.FormatUint(id, 10)); err != nil {
		return nil, err
	}
	c, ok := f.conns[id]
	if !ok {
		return nil, fmt.Errorf("port connection %d: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

// ReadConn returns what the peer sent, blocking until data, EOF or the end of ctx.
func (f *Fake) ReadConn(ctx context.Context, r *api.ReadConnRequest) (*api.ReadConnResponse, error) {
	c, err := f.conn("ReadConn", r.ConnId)
	if err != nil {
		return nil, err
	}
	c.readMu.Lock()
	defer c.readMu.Unlock()
	if c.eof {
		return &api.ReadConnResponse{Eof: true}, nil
	}
	n := int(r.MaxBytes)
	if n <= 0 || n > portChunk {
		n = portChunk
	}
	buf := make([]byte, n)
	stop := context.AfterFunc(ctx, func() { _ = c.c.SetReadDeadline(time.Now()) })
	n, err = c.c.Read(buf)
	if !stop() {
		_ = c.c.SetReadDeadline(time.Time{})
		if n == 0 {
			return nil, ctx.Err()
		}
		err = nil
	}
	if errors.Is(err, io.EOF) {
		c.eof, err = true, nil
	}
	if err != nil {
		return nil, err
	}
	return &api.ReadConnResponse{Data: buf[:n], Eof: c.eof}, nil
}

// WriteConn implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) WriteConn(ctx context.Context, r *api.WriteConnRequest) (*api.WriteConnResponse, error) {
	c, err := f.conn("WriteConn", r.ConnId)
	if err != nil {
		return nil, err
	}
	n, err := c.c.Write(r.Data)
	if err != nil {
		return nil, err
	}
	return &api.WriteConnResponse{Written: uint32(n)}, nil
}

// CloseConn implements the RPC of that name in api.AgentService (agent.proto) for tests.
func (f *Fake) CloseConn(ctx context.Context, r *api.CloseConnRequest) (*api.Empty, error) {
	c, err := f.conn("CloseConn", r.ConnId)
	if err != nil {
		return nil, err
	}
	if r.WriteOnly {
		err = c.c.CloseWrite()
	} else {
		f.mu.Lock()
		delete(f.conns, r.ConnId)
		f.mu.Unlock()
		err = c.c.Close()
	}
	if err != nil {
		return nil, err
	}
	return &api.Empty{}, nil
}
