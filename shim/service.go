// Package shim is containerd-shim-podvm-v2: containerd's task API (v3) served for one pod,
// whose containers run in one VM. containerd's pkg/shim provides the process lifecycle,
// flags, ttrpc server and event publisher; this package provides the task service, the pod
// VM behind it and the `delete` clean-up.
package shim

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/version"
)

// Service is the task service of one shim: one pod, one VM.
type Service struct {
	backend  backend
	shutdown shutdown.Service

	evMu   sync.RWMutex
	events chan any // nil once closed

	mu         sync.Mutex
	containers map[string]*container
	// sandbox is the pod VM; nil until the sandbox (or standalone) container was created.
	sandbox *sandbox
}

// container is one task: its init process, its execs, and how it relates to the VM.
type container struct {
	id     string
	bundle string
	role   role
	// shared is true when the container shares a PID namespace: its execs do not die with
	// its init, so the shim kills them.
	sharedPID bool
	init      *process

	mu     sync.Mutex
	execs  map[string]*process
	paused bool
}

// NewService returns a task service; publisher receives the task events.
func NewService(ctx context.Context, publisher shim.Publisher, sd shutdown.Service, b backend) (*Service, error) {
	s := &Service{
		backend:    b,
		shutdown:   sd,
		events:     make(chan any, 128),
		containers: map[string]*container{},
	}
	go s.forward(ctx, publisher, s.events)
	sd.RegisterCallback(func(ctx context.Context) error {
		s.teardown(ctx)
		return nil
	})
	return s, nil
}

// RegisterTTRPC implements containerd's shim.TTRPCService.
func (s *Service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// forward publishes events in the order they were queued.
func (s *Service) forward(ctx context.Context, publisher shim.Publisher, events <-chan any) {
	ns, _ := namespaces.Namespace(ctx)
	ctx = namespaces.WithNamespace(context.WithoutCancel(ctx), ns)
	for e := range events {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := publisher.Publish(pctx, runtime.GetTopic(e), e); err != nil {
			log.G(ctx).WithError(err).Error("publish event")
		}
		cancel()
	}
	publisher.Close()
}

func (s *Service) publish(e any) {
	s.evMu.RLock()
	defer s.evMu.RUnlock()
	if s.events != nil {
		s.events <- e
	}
}

func (s *Service) get(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok || c == nil { // nil: still being created
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (s *Service) proc(id, execID string) (*container, *process, error) {
	c, err := s.get(id)
	if err != nil {
		return nil, nil, err
	}
	if execID == "" {
		return c, c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, nil, fmt.Errorf("exec %s in container %s: %w", execID, id, errdefs.ErrNotFound)
	}
	return c, p, nil
}

func (s *Service) vm() (*sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sandbox == nil {
		return nil, fmt.Errorf("the pod VM is not running: %w", errdefs.ErrFailedPrecondition)
	}
	return s.sandbox, nil
}

// toTTRPC converts errors into status codes at the API edge.
func toTTRPC(err error) error {
	if err == nil {
		return nil
	}
	return errgrpc.ToGRPC(err)
}

// Create a new container (the sandbox boots the VM first).
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	resp, err := s.create(ctx, r)
	if err != nil {
		log.G(ctx).WithError(err).WithField("id", r.ID).Error("create failed")
	}
	return resp, toTTRPC(err)
}

func (s *Service) create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		// Not ErrNotImplemented: from Create, containerd reads Unimplemented as an old task API.
		return nil, fmt.Errorf("restoring from a checkpoint is not supported by podvm (containers run inside a VM): %w", errdefs.ErrInvalidArgument)
	}
	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	rl, sandboxID := roleOf(spec)
	s.mu.Lock()
	if _, ok := s.containers[r.ID]; ok {
		s.mu.Unlock()
		return nil, fmt.Errorf("container %s: %w", r.ID, errdefs.ErrAlreadyExists)
	}
	s.containers[r.ID] = nil // reserved while being created
	sb := s.sandbox
	s.mu.Unlock()
	defer func() {
		if retErr != nil {
			s.mu.Lock()
			delete(s.containers, r.ID)
			s.mu.Unlock()
		}
	}()

	if rl == roleWorkload {
		if sb == nil || sb.id != sandboxID {
			return nil, fmt.Errorf("container %s belongs to pod sandbox %s, which this shim does not run: %w", r.ID, sandboxID, errdefs.ErrFailedPrecondition)
		}
	} else {
		if sb != nil {
			return nil, fmt.Errorf("this shim already runs pod %s; container %s needs its own: %w", sb.id, r.ID, errdefs.ErrAlreadyExists)
		}
		opts, err := s.backend.sandboxOptions(ctx, r, spec)
		if err != nil {
			return nil, err
		}
		if sb, err = bootSandbox(ctx, s.backend, opts); err != nil {
			return nil, err
		}
		defer func() {
			if retErr != nil {
				sb.shutdown(context.WithoutCancel(ctx))
			}
		}()
		go s.watchVM(ctx, sb)
		go s.watchOOM(ctx, sb)
	}

	prepStart := time.Now()
	paths := stdioPaths{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}
	c := &container{id: r.ID, bundle: r.Bundle, role: rl, init: newProcess(r.ID, "", paths), execs: map[string]*process{}}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.PIDNamespace && ns.Path != "" {
			c.sharedPID = true
		}
	}
	guest, err := sb.prepare(ctx, r.ID, r.Bundle, spec, mount.FromProto(r.Rootfs))
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			sb.release(context.WithoutCancel(ctx), r.ID)
		}
	}()
	adaptSpecForGuest(guest.spec)
	if r.Terminal && guest.spec.Process != nil {
		guest.spec.Process.Terminal = true
	}
	specJSON, err := json.Marshal(guest.spec)
	if err != nil {
		return nil, err
	}
	prepared := time.Since(prepStart)
	agentStart := time.Now()
	created, err := sb.agent.CreateContainer(ctx, &api.CreateContainerRequest{
		ContainerId: r.ID, Spec: specJSON, Stdio: paths.agentStdio(),
		Devices: guest.devices, BlockMounts: guest.blockMounts,
	})
	if err != nil {
		return nil, fmt.Errorf("create container %s in the VM: %w", r.ID, err)
	}
	c.init.pid = created.Pid
	log.G(ctx).WithFields(log.Fields{
		"id": r.ID, "prepare": prepared.Round(time.Millisecond), "guest_create": time.Since(agentStart).Round(time.Millisecond),
	}).Info("container created in the VM")
	ns, _ := namespaces.Namespace(ctx)
	c.init.io, err = startIO(ctx, sb.agent, ns, r.ID, "", paths)
	if err != nil {
		_, _ = sb.agent.RemoveContainer(context.WithoutCancel(ctx), &api.RemoveContainerRequest{ContainerId: r.ID, Force: true})
		return nil, err
	}
	c.init.io.startStdin(context.WithoutCancel(ctx), sb.agent, r.ID, "")
	go s.watchExit(ctx, sb, c, c.init)

	s.mu.Lock()
	s.containers[r.ID] = c
	if rl != roleWorkload {
		s.sandbox = sb
	}
	s.mu.Unlock()
	s.publish(&eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Pid: created.Pid, Checkpoint: r.Checkpoint,
		IO: &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	})
	return &taskAPI.CreateTaskResponse{Pid: created.Pid}, nil
}

// watchExit waits for a process to exit in the guest, lets its output drain and publishes the
// exit. A container's init is reported after its execs.
func (s *Service) watchExit(ctx context.Context, sb *sandbox, c *container, p *process) {
	ctx = context.WithoutCancel(ctx)
	code, at := uint32(255), time.Now()
	resp, err := sb.agent.WaitProcess(ctx, &api.ProcessRequest{ContainerId: c.id, ExecId: p.execID})
	if err == nil {
		code, at = resp.ExitStatus, guestTime(resp.ExitedAtUnixNano, time.Now())
	} else {
		log.G(ctx).WithError(err).WithField("process", p.name()).Warn("lost the process (the VM died?); reporting exit 255")
	}
	if p.io != nil {
		p.io.drain()
	}
	if p.execID == "" {
		s.settleExecs(ctx, sb, c)
	}
	if p.setExited(code, at) {
		s.publish(&eventstypes.TaskExit{
			ContainerID: c.id, ID: p.name2(), Pid: p.pid, ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at),
		})
	}
	p.markReported()
}

// guestTime is a time the guest reported, unless it is not a time (zero or negative) or
// lies after now, the host's clock when the reply arrived; then it is now.
func guestTime(unixNano int64, now time.Time) time.Time {
	t := time.Unix(0, unixNano)
	if unixNano <= 0 || t.After(now) {
		return now
	}
	return t
}

// name2 is the process ID containerd's events use: the container ID for an init, else the exec ID.
func (p *process) name2() string {
	if p.execID == "" {
		return p.containerID
	}
	return p.execID
}

// settleExecs makes sure the execs of a container whose init exited have exited and been
// reported first. In a private PID namespace they died with the init; in a shared one the
// shim kills them.
func (s *Service) settleExecs(ctx context.Context, sb *sandbox, c *container) {
	c.mu.Lock()
	var running []*process
	for _, e := range c.execs {
		if st, _, _, _ := e.state(); st == statusRunning {
			running = append(running, e)
		}
	}
	c.mu.Unlock()
	if len(running) == 0 {
		return
	}
	if c.sharedPID {
		_, _ = sb.agent.SignalProcess(ctx, &api.SignalProcessRequest{ContainerId: c.id, Signal: uint32(unix.SIGKILL), All: true})
	}
	deadline := time.After(10 * time.Second)
	for _, e := range running {
		select {
		case <-e.reported:
		case <-deadline:
			return
		}
	}
}

// watchVM reports, with the end of the guest's console log, a VM or agent that goes away
// while the pod runs; the processes' waits then fail and they are reported as exited.
func (s *Service) watchVM(ctx context.Context, sb *sandbox) {
	what := "the pod VM exited"
	select {
	case <-sb.vm.Done():
	case <-sb.agent.Done():
		what = "the connection to the guest agent closed"
	}
	if !sb.stopping.Load() {
		log.G(ctx).WithField("sandbox", sb.id).Errorf("%s unexpectedly; the end of the console log (%s):\n%s",
			what, sb.consolePath(), consoleTail(sb.consolePath(), 60))
	}
}

// Start a container's init or an exec.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	resp, err := s.start(ctx, r)
	return resp, toTTRPC(err)
}

func (s *Service) start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	sb, err := s.vm()
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	if p.status != statusCreated {
		st := p.status
		p.mu.Unlock()
		return nil, fmt.Errorf("process %s is %s, not created: %w", p.name(), st, errdefs.ErrFailedPrecondition)
	}
	p.mu.Unlock()
	if r.ExecID != "" {
		if err := s.startExec(ctx, sb, c, p); err != nil {
			return nil, err
		}
	} else if _, err := sb.agent.StartProcess(ctx, &api.ProcessRequest{ContainerId: c.id}); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.name(), err)
	}
	if err := p.to(statusRunning); err != nil {
		// It exited already (e.g. a very short exec): that is still a successful start.
		log.G(ctx).WithError(err).Debug("start raced with exit")
	}
	if r.ExecID == "" {
		s.publish(&eventstypes.TaskStart{ContainerID: c.id, Pid: p.pid})
	} else {
		s.publish(&eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: r.ExecID, Pid: p.pid})
	}
	return &taskAPI.StartResponse{Pid: p.pid}, nil
}

func (s *Service) startExec(ctx context.Context, sb *sandbox, c *container, p *process) error {
	spec, err := readExecSpec(p)
	if err != nil {
		return err
	}
	if _, err := sb.agent.ExecProcess(ctx, &api.ExecProcessRequest{
		ContainerId: c.id, ExecId: p.execID, Process: spec, Stdio: p.stdio.agentStdio(),
	}); err != nil {
		return fmt.Errorf("exec %s: %w", p.name(), err)
	}
	ns, _ := namespaces.Namespace(ctx)
	hio, err := startIO(ctx, sb.agent, ns, c.id, p.execID, p.stdio)
	if err != nil {
		_, _ = sb.agent.RemoveProcess(context.WithoutCancel(ctx), &api.ProcessRequest{ContainerId: c.id, ExecId: p.execID})
		return err
	}
	resp, err := sb.agent.StartProcess(ctx, &api.ProcessRequest{ContainerId: c.id, ExecId: p.execID})
	if err != nil {
		hio.close()
		_, _ = sb.agent.RemoveProcess(context.WithoutCancel(ctx), &api.ProcessRequest{ContainerId: c.id, ExecId: p.execID})
		return fmt.Errorf("start exec %s: %w", p.name(), err)
	}
	p.mu.Lock()
	p.pid, p.io = resp.Pid, hio
	p.mu.Unlock()
	hio.startStdin(context.WithoutCancel(ctx), sb.agent, c.id, p.execID)
	go s.watchExit(ctx, sb, c, p)
	return nil
}

// execSpecs keeps an exec's OCI process until it starts.
func readExecSpec(p *process) ([]byte, error) {
	if p.spec == nil {
		return nil, fmt.Errorf("exec %s has no process spec: %w", p.name(), errdefs.ErrInvalidArgument)
	}
	return p.spec, nil
}

// Delete a process: an exec, or a container (after its init stopped).
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	resp, err := s.delete(ctx, r)
	return resp, toTTRPC(err)
}

func (s *Service) delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	st, pid, code, at := p.state()
	if st == statusRunning {
		return nil, fmt.Errorf("process %s is running; kill it first: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	if at.IsZero() {
		at = time.Now()
	}
	sb, _ := s.vm()
	if r.ExecID != "" {
		if sb != nil && st == statusStopped {
			_, _ = sb.agent.RemoveProcess(ctx, &api.ProcessRequest{ContainerId: c.id, ExecId: r.ExecID})
		}
		if p.io != nil {
			p.io.close()
		}
		_ = p.to(statusDeleted)
		c.mu.Lock()
		delete(c.execs, r.ExecID)
		c.mu.Unlock()
		return &taskAPI.DeleteResponse{Pid: pid, ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)}, nil
	}
	if st == statusCreated {
		// Never started: there is no exit status to wait for; the agent kills it.
		code = 128 + uint32(unix.SIGKILL)
	}
	if sb != nil {
		if _, err := sb.agent.RemoveContainer(ctx, &api.RemoveContainerRequest{ContainerId: c.id, Force: true}); err != nil && !errdefs.IsNotFound(err) {
			log.G(ctx).WithError(err).WithField("id", c.id).Warn("remove container in the VM")
		}
		sb.release(ctx, c.id)
	}
	if p.io != nil {
		p.io.close()
	}
	p.setExited(code, at)
	p.markReported()
	_ = p.to(statusDeleted)
	s.mu.Lock()
	delete(s.containers, c.id)
	vmOwner := c.role != roleWorkload && s.sandbox != nil
	var others []*container
	if vmOwner {
		for _, o := range s.containers {
			if o != nil {
				others = append(others, o)
			}
		}
	}
	s.mu.Unlock()
	if vmOwner {
		// The pod is going: whatever is left runs in the VM that is about to stop.
		for _, o := range others {
			log.G(ctx).WithField("id", o.id).Warn("sandbox deleted before this container; it stops with the VM")
		}
		s.stopSandbox(ctx)
	}
	s.publish(&eventstypes.TaskDelete{ContainerID: c.id, Pid: pid, ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)})
	return &taskAPI.DeleteResponse{Pid: pid, ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

func (s *Service) stopSandbox(ctx context.Context) {
	s.mu.Lock()
	sb := s.sandbox
	s.sandbox = nil
	s.mu.Unlock()
	if sb != nil {
		sb.shutdown(context.WithoutCancel(ctx))
	}
}

// Exec adds an exec to a container; it starts with Start.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*ptypes.Empty, error) {
	err := s.exec(ctx, r)
	return &ptypes.Empty{}, toTTRPC(err)
}

func (s *Service) exec(ctx context.Context, r *taskAPI.ExecProcessRequest) error {
	c, err := s.get(r.ID)
	if err != nil {
		return err
	}
	if st, _, _, _ := c.init.state(); st != statusRunning {
		return fmt.Errorf("container %s is %s; exec needs it running: %w", c.id, st, errdefs.ErrFailedPrecondition)
	}
	if r.Spec == nil {
		return fmt.Errorf("exec %s: no process spec: %w", r.ExecID, errdefs.ErrInvalidArgument)
	}
	var ps specs.Process
	if err := json.Unmarshal(r.Spec.Value, &ps); err != nil {
		return fmt.Errorf("exec %s: process spec: %w: %w", r.ExecID, err, errdefs.ErrInvalidArgument)
	}
	ps.ApparmorProfile, ps.SelinuxLabel = "", ""
	if r.Terminal {
		ps.Terminal = true
	}
	spec, err := json.Marshal(&ps)
	if err != nil {
		return err
	}
	p := newProcess(c.id, r.ExecID, stdioPaths{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal})
	p.spec = spec
	c.mu.Lock()
	if _, ok := c.execs[r.ExecID]; ok {
		c.mu.Unlock()
		return fmt.Errorf("exec %s in %s: %w", r.ExecID, c.id, errdefs.ErrAlreadyExists)
	}
	c.execs[r.ExecID] = p
	c.mu.Unlock()
	s.publish(&eventstypes.TaskExecAdded{ContainerID: c.id, ExecID: r.ExecID})
	return nil
}

// State of a process.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, toTTRPC(err)
	}
	st, pid, code, at := p.state()
	c.mu.Lock()
	paused := c.paused
	c.mu.Unlock()
	resp := &taskAPI.StateResponse{
		ID: p.name2(), Bundle: c.bundle, Pid: pid, ExecID: r.ExecID,
		Stdin: p.stdio.stdin, Stdout: p.stdio.stdout, Stderr: p.stdio.stderr, Terminal: p.stdio.terminal,
	}
	switch st {
	case statusCreated:
		resp.Status = task.Status_CREATED
	case statusRunning:
		resp.Status = task.Status_RUNNING
		if paused {
			resp.Status = task.Status_PAUSED
		}
	default:
		resp.Status = task.Status_STOPPED
		resp.ExitStatus, resp.ExitedAt = code, protobuf.ToTimestamp(at)
	}
	return resp, nil
}

// Kill signals a process; killing a stopped process succeeds (StopPodSandbox retries).
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*ptypes.Empty, error) {
	err := s.kill(ctx, r)
	return &ptypes.Empty{}, toTTRPC(err)
}

func (s *Service) kill(ctx context.Context, r *taskAPI.KillRequest) error {
	c, p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return err
	}
	st, _, _, _ := p.state()
	if st == statusStopped || st == statusDeleted || p.hasExited() {
		return nil
	}
	if st == statusCreated && r.ExecID != "" {
		// Not in the guest yet: it simply never runs.
		if p.setExited(128+r.Signal, time.Now()) {
			s.publish(&eventstypes.TaskExit{ContainerID: c.id, ID: r.ExecID, ExitStatus: 128 + r.Signal, ExitedAt: protobuf.ToTimestamp(time.Now())})
		}
		p.markReported()
		return nil
	}
	sb, err := s.vm()
	if err != nil {
		return err
	}
	_, err = sb.agent.SignalProcess(ctx, &api.SignalProcessRequest{ContainerId: c.id, ExecId: r.ExecID, Signal: r.Signal, All: r.All})
	if errdefs.IsNotFound(err) {
		return nil // it exited meanwhile
	}
	if err != nil {
		return fmt.Errorf("signal %d to %s: %w", r.Signal, p.name(), err)
	}
	return nil
}

// Bounds on what the guest may answer (its replies are untrusted, see DESIGN.md).
const (
	// maxGuestPids is the most processes a Pids reply may list: the guest kernel's default
	// pid_max (32768) twice over, and still well inside containerd's message size.
	maxGuestPids = 1 << 16
	// maxStatsBytes bounds the encoded cgroup metrics of one Stats reply; real ones are a
	// few KiB.
	maxStatsBytes = 1 << 20
)

// Pids lists the container's processes (guest pids).
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	resp, err := s.pids(ctx, r)
	return resp, toTTRPC(err)
}

func (s *Service) pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	sb, err := s.vm()
	if err != nil {
		return nil, err
	}
	list, err := sb.agent.ListProcesses(ctx, &api.ContainerRequest{ContainerId: r.ID})
	if err != nil {
		return nil, err
	}
	if n := len(list.Processes); n > maxGuestPids {
		return nil, fmt.Errorf("the guest listed %d processes in container %s, more than the %d the shim accepts: %w",
			n, r.ID, maxGuestPids, errdefs.ErrOutOfRange)
	}
	c.mu.Lock()
	execs := make(map[string]bool, len(c.execs))
	for id := range c.execs {
		execs[id] = true
	}
	c.mu.Unlock()
	resp := &taskAPI.PidsResponse{}
	for _, pi := range list.Processes {
		info := &task.ProcessInfo{Pid: pi.GetPid()}
		// Only an exec this shim created is named: the guest chooses the string.
		if execs[pi.GetExecId()] {
			a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: pi.GetExecId()})
			if err != nil {
				return nil, err
			}
			info.Info = a
		}
		resp.Processes = append(resp.Processes, info)
	}
	return resp, nil
}

// Pause freezes the container's cgroup in the guest.
func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	return &ptypes.Empty{}, toTTRPC(s.setPaused(ctx, r.ID, true))
}

// Resume thaws it.
func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	return &ptypes.Empty{}, toTTRPC(s.setPaused(ctx, r.ID, false))
}

func (s *Service) setPaused(ctx context.Context, id string, pause bool) error {
	c, err := s.get(id)
	if err != nil {
		return err
	}
	sb, err := s.vm()
	if err != nil {
		return err
	}
	if pause {
		_, err = sb.agent.PauseContainer(ctx, &api.ContainerRequest{ContainerId: id})
	} else {
		_, err = sb.agent.ResumeContainer(ctx, &api.ContainerRequest{ContainerId: id})
	}
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.paused = pause
	c.mu.Unlock()
	if pause {
		s.publish(&eventstypes.TaskPaused{ContainerID: id})
	} else {
		s.publish(&eventstypes.TaskResumed{ContainerID: id})
	}
	return nil
}

// Checkpoint is not supported: the container's memory lives in a VM.
func (s *Service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	return nil, toTTRPC(fmt.Errorf("checkpoint is not supported by podvm (containers run inside a VM): %w", errdefs.ErrNotImplemented))
}

// ResizePty resizes a process's terminal.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*ptypes.Empty, error) {
	sb, err := s.vm()
	if err == nil {
		_, err = sb.agent.ResizePty(ctx, &api.ResizePtyRequest{ContainerId: r.ID, ExecId: r.ExecID, Width: r.Width, Height: r.Height})
	}
	return &ptypes.Empty{}, toTTRPC(err)
}

// CloseIO closes a process's stdin.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*ptypes.Empty, error) {
	_, p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, toTTRPC(err)
	}
	if r.Stdin && p.io != nil {
		p.io.closeStdin()
	}
	return &ptypes.Empty{}, nil
}

// Update the container's resources (cgroup limits in the guest).
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*ptypes.Empty, error) {
	err := s.update(ctx, r)
	return &ptypes.Empty{}, toTTRPC(err)
}

func (s *Service) update(ctx context.Context, r *taskAPI.UpdateTaskRequest) error {
	if _, err := s.get(r.ID); err != nil {
		return err
	}
	sb, err := s.vm()
	if err != nil {
		return err
	}
	if r.Resources == nil {
		return nil
	}
	v, err := typeurl.UnmarshalAny(r.Resources)
	if err != nil {
		return fmt.Errorf("resources: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	res, ok := v.(*specs.LinuxResources)
	if !ok {
		return fmt.Errorf("resources are %T, want LinuxResources: %w", v, errdefs.ErrInvalidArgument)
	}
	if res.CPU != nil {
		res.CPU.Cpus, res.CPU.Mems = "", ""
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = sb.agent.UpdateContainer(ctx, &api.UpdateContainerRequest{ContainerId: r.ID, Resources: b})
	return err
}

// Wait for a process to exit.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, toTTRPC(err)
	}
	code, at, err := p.wait(ctx)
	if err != nil {
		return nil, toTTRPC(err)
	}
	return &taskAPI.WaitResponse{ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// Stats of the container's cgroup in the guest, as cgroup v2 metrics.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	resp, err := s.stats(ctx, r)
	return resp, toTTRPC(err)
}

func (s *Service) stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	if _, err := s.get(r.ID); err != nil {
		return nil, err
	}
	sb, err := s.vm()
	if err != nil {
		return nil, err
	}
	st, err := sb.agent.Stats(ctx, &api.ContainerRequest{ContainerId: r.ID})
	if err != nil {
		return nil, err
	}
	if n := len(st.Cgroup2Metrics); n > maxStatsBytes {
		return nil, fmt.Errorf("stats of container %s from the guest: %d bytes, more than the %d the shim accepts: %w",
			r.ID, n, maxStatsBytes, errdefs.ErrOutOfRange)
	}
	var m cgroupsv2.Metrics
	if err := proto.Unmarshal(st.Cgroup2Metrics, &m); err != nil {
		return nil, fmt.Errorf("stats of container %s from the guest: %w", r.ID, err)
	}
	a, err := typeurl.MarshalAnyToProto(&m)
	if err != nil {
		return nil, err
	}
	return &taskAPI.StatsResponse{Stats: a}, nil
}

// Connect returns the shim's and the task's pids.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), Version: version.Version}
	if c, err := s.get(r.ID); err == nil {
		_, resp.TaskPid, _, _ = c.init.state()
	}
	return resp, nil
}

// Shutdown ends the shim once it runs no container.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	s.mu.Lock()
	n := len(s.containers)
	s.mu.Unlock()
	if n > 0 {
		return &ptypes.Empty{}, nil
	}
	s.shutdown.Shutdown()
	return &ptypes.Empty{}, nil
}

// teardown stops the VM when the shim exits (Shutdown, or a signal).
func (s *Service) teardown(ctx context.Context) {
	s.stopSandbox(ctx)
	s.evMu.Lock()
	if s.events != nil {
		close(s.events)
		s.events = nil
	}
	s.evMu.Unlock()
}
