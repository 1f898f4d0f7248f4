package guest

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// containerStateRoot is where libcontainer keeps its state in the guest.
const containerStateRoot = "/run/podvm-agent/containers"

// Server implements the agent API in the guest.
type Server struct {
	started time.Time
	rt      containerRuntime

	mu         sync.Mutex
	containers map[string]*container
	// tmpfsMu serialises mounting the pod's tmpfs (containers sharing one are made at once).
	tmpfsMu sync.Mutex

	oom chan string
	// ports are the guest ends of port-forward connections.
	ports *ports
	// powerOff is called after Shutdown replied.
	powerOff func()

	// procSys is where the pod's net.* sysctls are written: /proc/sys (tests replace it).
	procSys string

	// setup sets the guest up for SetupSandbox (setupSandbox; tests replace it).
	setup func(context.Context, *api.SetupSandboxRequest) error
	// setupDone is closed when the first SetupSandbox ended, setupErr its error: containers
	// created alongside it (CreateContainerRequest.alongside_setup) wait for it.
	setupOnce sync.Once
	setupDone chan struct{}
	setupErr  error

	// restoreSys is what PrepareRestored reseeds and sets the clock with (tests replace it);
	// restored is set once it did: the guest is a clone of a VM template.
	restoreSys restoreSys
	restored   atomic.Bool
	// warm runs once in a restored guest, after its first container was made and its
	// setup ended (warmStart; tests replace it).
	warm     func()
	warmOnce sync.Once
}

// NewServer returns an agent with no containers, running them with libcontainer.
func NewServer() *Server {
	return newServer(libcontainerRuntime{root: containerStateRoot})
}

func newServer(rt containerRuntime) *Server {
	return &Server{
		started:    time.Now(),
		rt:         rt,
		containers: map[string]*container{},
		oom:        make(chan string, 64),
		ports:      newPorts(),
		powerOff:   PowerOff,
		procSys:    "/proc/sys",
		setup:      setupSandbox,
		setupDone:  make(chan struct{}),
		restoreSys: realRestoreSys(),
		warm:       warmStart,
	}
}

var _ api.AgentService = (*Server)(nil)

// Version implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) Version(ctx context.Context, _ *api.VersionRequest) (*api.VersionResponse, error) {
	var u unix.Utsname
	_ = unix.Uname(&u)
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	boot := time.Duration(ts.Nano()) - time.Since(s.started)
	return &api.VersionResponse{
		AgentVersion:  agent.Version,
		KernelRelease: unix.ByteSliceToString(u.Release[:]),
		BootToReadyNs: int64(boot),
		RealtimeNs:    time.Now().UnixNano(),
	}, nil
}

// SetupSandbox implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) SetupSandbox(ctx context.Context, req *api.SetupSandboxRequest) (*api.Empty, error) {
	err := s.setup(ctx, req)
	s.setupOnce.Do(func() {
		s.setupErr = err
		close(s.setupDone)
	})
	if err != nil {
		return nil, err
	}
	return &api.Empty{}, nil
}

// awaitSetup waits until SetupSandbox has ended and says whether it failed.
func (s *Server) awaitSetup(ctx context.Context) error {
	select {
	case <-s.setupDone:
		if s.setupErr != nil {
			return fmt.Errorf("the guest's setup failed: %w: %w", s.setupErr, errdefs.ErrFailedPrecondition)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the guest's setup: %w", ctx.Err())
	}
}

func (s *Server) container(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok || c == nil { // nil: still being created
		return nil, fmt.Errorf("container %q: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (s *Server) proc(cid, execID string) (*container, *process, error) {
	c, err := s.container(cid)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.process(execID)
	return c, p, err
}

// CreateContainer implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) CreateContainer(ctx context.Context, req *api.CreateContainerRequest) (_ *api.CreateContainerResponse, retErr error) {
	id := req.ContainerId
	if id == "" {
		return nil, fmt.Errorf("container id is empty: %w", errdefs.ErrInvalidArgument)
	}
	spec, err := parseSpec(id, req.Spec)
	if err != nil {
		return nil, err
	}
	if err := s.reserve(id); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			s.mu.Lock()
			delete(s.containers, id)
			s.mu.Unlock()
		}
	}()
	if req.AlongsideSetup && !madeBeforeSetup(spec, req) {
		if err := s.awaitSetup(ctx); err != nil {
			return nil, fmt.Errorf("container %s: %w", id, err)
		}
	}
	if err := applyPodSysctls(s.procSys, spec); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if err := s.mountPodTmpfs(req.PodTmpfs); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	st, err := prepareStorage(ctx, req.BlockMounts, req.Devices, spec)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	defer func() {
		if retErr != nil {
			st.release(ctx)
		}
	}()
	c, err := s.create(id, spec, req.Stdio)
	if err != nil {
		return nil, err
	}
	c.storage = st
	s.watchOOM(ctx, c)
	s.mu.Lock()
	s.containers[id] = c
	s.mu.Unlock()
	log.G(ctx).WithField("container", id).Info("created")
	if s.restored.Load() {
		s.warmOnce.Do(func() {
			go func() {
				<-s.setupDone
				s.warm()
			}()
		})
	}
	return &api.CreateContainerResponse{Pid: uint32(c.init.getPid())}, nil
}

// reserve holds id while its container is being made: other calls do not find it yet, and a
// second create of it fails.
func (s *Server) reserve(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.containers[id]; ok {
		return fmt.Errorf("container %q: %w", id, errdefs.ErrAlreadyExists)
	}
	s.containers[id] = nil
	return nil
}

// create has the runtime make the container and its init, stopped before the program runs.
func (s *Server) create(id string, spec *specs.Spec, stdio *api.Stdio) (*container, error) {
	init, err := newProcess("", spec.Process, stdio, true)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	rc, rp, err := s.rt.Create(id, spec, init.cfg)
	if err != nil {
		init.release()
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if err := init.started(rp); err != nil {
		_ = rc.Signal(unix.SIGKILL)
		init.release()
		_ = rc.Destroy()
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	return &container{id: id, rc: rc, init: init, execs: map[string]*process{}}, nil
}

// watchOOM turns the container's OOM kills into GetOOMEvent replies. Events beyond what the
// queue holds are dropped: the host only needs to know that one happened.
func (s *Server) watchOOM(ctx context.Context, c *container) {
	err := c.rc.WatchOOM(func() {
		select {
		case s.oom <- c.id:
		default:
		}
	})
	if err != nil {
		log.G(ctx).WithError(err).WithField("container", c.id).Warn("no OOM events for container")
	}
}

// ExecProcess implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) ExecProcess(ctx context.Context, req *api.ExecProcessRequest) (*api.Empty, error) {
	c, err := s.container(req.ContainerId)
	if err != nil {
		return nil, err
	}
	if req.ExecId == "" {
		return nil, fmt.Errorf("exec id is empty: %w", errdefs.ErrInvalidArgument)
	}
	var ps specs.Process
	if err := json.Unmarshal(req.Process, &ps); err != nil {
		return nil, fmt.Errorf("exec %s: process is not valid JSON: %v: %w", req.ExecId, err, errdefs.ErrInvalidArgument)
	}
	if c.init.exited() {
		return nil, fmt.Errorf("container %s is not running: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	p, err := newProcess(req.ExecId, &ps, req.Stdio, false)
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", req.ExecId, err)
	}
	c.mu.Lock()
	if _, ok := c.execs[req.ExecId]; ok {
		c.mu.Unlock()
		p.release()
		return nil, fmt.Errorf("exec %q: %w", req.ExecId, errdefs.ErrAlreadyExists)
	}
	if req.Start {
		// Before the exec can be found: no StartProcess can come between.
		if err := p.transition(stateRunning); err != nil {
			c.mu.Unlock()
			p.release()
			return nil, err
		}
	}
	c.execs[req.ExecId] = p
	c.mu.Unlock()
	if !req.Start {
		return &api.Empty{}, nil
	}
	if err := c.startExec(req.ExecId, p); err != nil {
		c.forgetExec(req.ExecId, p)
		return nil, err
	}
	return &api.Empty{}, nil
}

// forgetExec removes exec p of c and releases it, unless RemoveContainer got there first.
func (c *container) forgetExec(execID string, p *process) {
	c.mu.Lock()
	mine := c.execs[execID] == p
	if mine {
		delete(c.execs, execID)
	}
	c.mu.Unlock()
	if mine {
		p.release()
	}
}

// StartProcess implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) StartProcess(ctx context.Context, req *api.ProcessRequest) (*api.StartProcessResponse, error) {
	c, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	if err := p.transition(stateRunning); err != nil {
		return nil, err
	}
	if req.ExecId == "" {
		if err := c.rc.Start(); err != nil {
			return nil, fmt.Errorf("container %s: start: %w", c.id, err)
		}
		return &api.StartProcessResponse{Pid: uint32(p.getPid())}, nil
	}
	if err := c.startExec(req.ExecId, p); err != nil {
		return nil, err
	}
	return &api.StartProcessResponse{Pid: uint32(p.getPid())}, nil
}

// startExec starts exec p of c, which the caller moved to stateRunning; if it cannot, p has
// exited with status 255.
func (c *container) startExec(execID string, p *process) error {
	rp, err := c.rc.Exec(p.cfg)
	if err != nil {
		p.io.closeChild()
		p.setExited(255)
		return fmt.Errorf("exec %s in %s: start: %w", execID, c.id, err)
	}
	if err := p.started(rp); err != nil {
		_ = rp.Signal(unix.SIGKILL)
		return fmt.Errorf("exec %s in %s: %w", execID, c.id, err)
	}
	return nil
}

// SignalProcess implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) SignalProcess(ctx context.Context, req *api.SignalProcessRequest) (*api.Empty, error) {
	c, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	sig := unix.Signal(req.Signal)
	if req.All && req.ExecId == "" {
		if err := c.rc.SignalAll(sig); err != nil {
			return nil, fmt.Errorf("container %s: signal all: %w", c.id, err)
		}
		return &api.Empty{}, nil
	}
	if err := p.signal(sig); err != nil {
		return nil, err
	}
	return &api.Empty{}, nil
}

// WaitProcess implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) WaitProcess(ctx context.Context, req *api.ProcessRequest) (*api.WaitProcessResponse, error) {
	_, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	status, at, err := p.waitExit(ctx)
	if err != nil {
		return nil, err
	}
	return &api.WaitProcessResponse{ExitStatus: status, ExitedAtUnixNano: at.UnixNano()}, nil
}

// ResizePty implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) ResizePty(ctx context.Context, req *api.ResizePtyRequest) (*api.Empty, error) {
	_, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	if err := p.io.resize(req.Width, req.Height); err != nil {
		return nil, err
	}
	return &api.Empty{}, nil
}

// ReadStdio implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) ReadStdio(ctx context.Context, req *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	_, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	r, err := p.io.reader(req.Stream)
	if err != nil {
		return nil, err
	}
	data, eof, err := r.read(ctx, req.MaxBytes)
	if err != nil {
		return nil, err
	}
	return &api.ReadStdioResponse{Data: data, Eof: eof}, nil
}

// WriteStdin implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) WriteStdin(ctx context.Context, req *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	_, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	n, err := p.io.write(ctx, req.Data)
	if err != nil {
		return nil, err
	}
	return &api.WriteStdinResponse{Written: uint32(n)}, nil
}

// CloseStdin implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) CloseStdin(ctx context.Context, req *api.ProcessRequest) (*api.Empty, error) {
	_, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	if p.req.Terminal {
		// The terminal stays; the host just stops writing to it.
		return &api.Empty{}, nil
	}
	if err := p.io.closeStdin(); err != nil {
		return nil, err
	}
	return &api.Empty{}, nil
}

// RemoveProcess implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) RemoveProcess(ctx context.Context, req *api.ProcessRequest) (*api.Empty, error) {
	if req.ExecId == "" {
		return nil, fmt.Errorf("use RemoveContainer for a container's init: %w", errdefs.ErrInvalidArgument)
	}
	c, p, err := s.proc(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	if !p.exited() {
		return nil, fmt.Errorf("exec %s is still running: %w", req.ExecId, errdefs.ErrFailedPrecondition)
	}
	c.forgetExec(req.ExecId, p)
	return &api.Empty{}, nil
}

// RemoveContainer implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) RemoveContainer(ctx context.Context, req *api.RemoveContainerRequest) (*api.Empty, error) {
	c, err := s.container(req.ContainerId)
	if err != nil {
		return nil, err
	}
	if !c.init.exited() {
		if !req.Force {
			return nil, fmt.Errorf("container %s is still running; stop it or remove with force: %w", c.id, errdefs.ErrFailedPrecondition)
		}
		c.kill()
		if _, _, err := c.init.waitExit(ctx); err != nil {
			return nil, fmt.Errorf("container %s: waiting for it to die: %w", c.id, err)
		}
	}
	if err := c.rc.Destroy(); err != nil {
		log.G(ctx).WithError(err).WithField("container", c.id).Warn("destroy")
	}
	c.mu.Lock()
	for _, p := range c.execs {
		p.release()
	}
	clear(c.execs)
	c.mu.Unlock()
	c.init.release()
	c.storage.release(ctx)
	s.mu.Lock()
	delete(s.containers, c.id)
	s.mu.Unlock()
	log.G(ctx).WithField("container", c.id).Info("removed")
	return &api.Empty{}, nil
}

// ListProcesses implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) ListProcesses(ctx context.Context, req *api.ContainerRequest) (*api.ListProcessesResponse, error) {
	c, err := s.container(req.ContainerId)
	if err != nil {
		return nil, err
	}
	pids, err := c.rc.Processes()
	if err != nil {
		return nil, fmt.Errorf("container %s: list processes: %w", c.id, err)
	}
	byPid := map[int]string{}
	c.mu.Lock()
	for id, p := range c.execs {
		if pid := p.getPid(); pid != 0 {
			byPid[pid] = id
		}
	}
	c.mu.Unlock()
	resp := &api.ListProcessesResponse{}
	for _, pid := range pids {
		resp.Processes = append(resp.Processes, &api.ProcessInfo{Pid: uint32(pid), ExecId: byPid[pid]})
	}
	return resp, nil
}

// PauseContainer implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) PauseContainer(ctx context.Context, req *api.ContainerRequest) (*api.Empty, error) {
	c, err := s.container(req.ContainerId)
	if err != nil {
		return nil, err
	}
	if err := c.rc.Pause(); err != nil {
		return nil, fmt.Errorf("container %s: pause: %w", c.id, err)
	}
	return &api.Empty{}, nil
}

// ResumeContainer implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) ResumeContainer(ctx context.Context, req *api.ContainerRequest) (*api.Empty, error) {
	c, err := s.container(req.ContainerId)
	if err != nil {
		return nil, err
	}
	if err := c.rc.Resume(); err != nil {
		return nil, fmt.Errorf("container %s: resume: %w", c.id, err)
	}
	return &api.Empty{}, nil
}

// UpdateContainer implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) UpdateContainer(ctx context.Context, req *api.UpdateContainerRequest) (*api.Empty, error) {
	c, err := s.container(req.ContainerId)
	if err != nil {
		return nil, err
	}
	var r specs.LinuxResources
	if err := json.Unmarshal(req.Resources, &r); err != nil {
		return nil, fmt.Errorf("container %s: resources are not valid JSON: %v: %w", c.id, err, errdefs.ErrInvalidArgument)
	}
	if err := c.rc.Update(&r); err != nil {
		return nil, fmt.Errorf("container %s: update resources: %w", c.id, err)
	}
	return &api.Empty{}, nil
}

// Stats implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) Stats(ctx context.Context, req *api.ContainerRequest) (*api.StatsResponse, error) {
	c, err := s.container(req.ContainerId)
	if err != nil {
		return nil, err
	}
	st, err := c.rc.Stats()
	if err != nil {
		return nil, fmt.Errorf("container %s: stats: %w", c.id, err)
	}
	b, err := proto.Marshal(st)
	if err != nil {
		return nil, err
	}
	return &api.StatsResponse{Cgroup2Metrics: b}, nil
}

// GetOOMEvent implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) GetOOMEvent(ctx context.Context, _ *api.Empty) (*api.OOMEvent, error) {
	select {
	case id := <-s.oom:
		return &api.OOMEvent{ContainerId: id}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Shutdown implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) Shutdown(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	s.mu.Lock()
	cs := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		if c != nil {
			cs = append(cs, c)
		}
	}
	s.mu.Unlock()
	for _, c := range cs {
		c.kill()
	}
	log.G(ctx).Info("shutdown requested, powering off")
	// Reply first; the host quits QEMU if the power-off does not come.
	time.AfterFunc(50*time.Millisecond, s.powerOff)
	return &api.Empty{}, nil
}
