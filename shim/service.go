// Package shim is containerd-shim-podvm-v2: containerd's task API (v3) served for one pod,
// whose containers run in one VM. containerd's pkg/shim provides the process lifecycle,
// flags, ttrpc server and event publisher; this package provides the task service, the pod
// VM behind it and the `delete` clean-up.
//
// The task service (this file) turns a request into a container (container.go: one
// container, its init and execs, in the pod VM) and a process (process.go: the state machine
// every operation goes through). pod.go owns the containers and the VM; exits.go orders and
// publishes exits; events.go queues events for containerd.
package shim

import (
	"context"
	"fmt"
	"os"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/podvm/podvm/version"
)

// Service is the task service of one shim: one pod, one VM. Its methods return errors with
// errdefs sentinels; UnaryServerInterceptor turns them into status codes at the ttrpc edge.
type Service struct {
	backend  backend
	shutdown shutdown.Service
	events   *eventQueue
	pod      *pod
}

var (
	_ taskAPI.TTRPCTaskService      = (*Service)(nil)
	_ shim.TTRPCService             = (*Service)(nil)
	_ shim.TTRPCServerUnaryOptioner = (*Service)(nil)
)

// NewService returns a task service; publisher receives the task events.
func NewService(ctx context.Context, publisher shim.Publisher, sd shutdown.Service, b backend) (*Service, error) {
	s := &Service{backend: b, shutdown: sd, events: newEventQueue(ctx, publisher), pod: newPod()}
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

// UnaryServerInterceptor implements containerd's shim.TTRPCServerUnaryOptioner: pkg/shim
// puts it on the shim's ttrpc server, where it converts every error to a status code, once.
func (s *Service) UnaryServerInterceptor() ttrpc.UnaryServerInterceptor { return statusAtEdge }

// createMethod is the full ttrpc name of the task API's Create.
const createMethod = "/containerd.task.v3.Task/Create"

func statusAtEdge(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (any, error) {
	resp, err := method(ctx, unmarshal)
	if err == nil {
		return resp, nil
	}
	if info.FullMethod == createMethod {
		// containerd reports a failed create without the shim's words on every path (e.g.
		// when it retries); the shim's log keeps them.
		log.G(ctx).WithError(err).Error("create failed")
	}
	return resp, errgrpc.ToGRPC(err)
}

// Create a new container (the sandbox boots the VM first).
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		// Not ErrNotImplemented: from Create, containerd reads Unimplemented as an old task API.
		return nil, fmt.Errorf("restoring from a checkpoint is not supported by podvm (containers run inside a VM): %w", errdefs.ErrInvalidArgument)
	}
	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	rl, sandboxID := roleOf(spec)
	ownsVM := rl != roleWorkload
	// Cancelled when containerd gives up on this create (Delete or Shutdown of its id).
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	sb, err := s.pod.reserve(r.ID, ownsVM, cancel)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			s.createFailed(ctx, r.ID, ownsVM, retErr)
		}
	}()
	if !ownsVM && (sb == nil || sb.id != sandboxID) {
		return nil, fmt.Errorf("container %s belongs to pod sandbox %s, which this shim does not run: %w", r.ID, sandboxID, errdefs.ErrFailedPrecondition)
	}
	var c *container
	if ownsVM {
		if sb, c, err = s.bootSandbox(ctx, r, spec, rl); err != nil {
			return nil, err
		}
		defer func() {
			if retErr != nil {
				sb.shutdown(context.WithoutCancel(ctx))
			}
		}()
	} else if c, err = createContainer(ctx, sb, rl, r, spec, s.events); err != nil {
		return nil, err
	}
	pid := c.init.getPid()
	if err := s.pod.add(c); err != nil {
		// Removed from the guest (a VM owner's VM then goes with the deferred shutdown), and
		// its exit never reported: containerd does not know it.
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), abandonedRemoveTimeout)
		defer dcancel()
		if _, derr := c.delete(dctx); derr != nil {
			log.G(ctx).WithError(derr).WithField("id", r.ID).Warn("remove the abandoned container")
		}
		return nil, err
	}
	s.events.publish(&eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Pid: pid, Checkpoint: r.Checkpoint,
		IO: &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	})
	return &taskAPI.CreateTaskResponse{Pid: pid}, nil
}

// abandonedRemoveTimeout bounds removing a container whose create containerd gave up on.
const abandonedRemoveTimeout = 2 * time.Second

// createFailed gives up the id of a failed create. When containerd had given up on it and
// asked the shim to go (Shutdown), and it was the last thing the shim ran, the shim goes now:
// Shutdown could not end it while the create was still unwinding.
func (s *Service) createFailed(ctx context.Context, id string, ownsVM bool, err error) {
	if !s.pod.unreserve(id, ownsVM) {
		return
	}
	log.G(ctx).WithError(err).WithField("id", id).Warn("containerd gave up on creating this container; it is undone")
	if s.pod.size() == 0 {
		s.shutdown.Shutdown()
	}
}

// bootSandbox boots the pod VM for a sandbox or standalone container, makes that container in
// it while the guest is set up, and watches the VM.
func (s *Service) bootSandbox(ctx context.Context, r *taskAPI.CreateTaskRequest, spec *specs.Spec, rl role) (*sandbox, *container, error) {
	opts, err := s.backend.sandboxOptions(ctx, r, spec)
	if err != nil {
		return nil, nil, err
	}
	var c *container
	sb, err := bootSandbox(ctx, s.backend, opts, func(sb *sandbox) (func(), error) {
		var err error
		c, err = createContainer(ctx, sb, rl, r, spec, s.events)
		return func() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abandonedRemoveTimeout)
			defer cancel()
			if _, err := c.delete(dctx); err != nil {
				log.G(ctx).WithError(err).WithField("id", r.ID).Warn("remove the container of a guest whose setup failed")
			}
		}, err
	})
	if err != nil {
		return nil, nil, err
	}
	go watchVM(context.WithoutCancel(ctx), sb)
	go watchAgent(context.WithoutCancel(ctx), sb)
	go s.watchOOM(ctx, sb)
	return sb, c, nil
}

// Start a container's init or an exec.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.pod.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	pid, err := c.start(ctx, p)
	if err != nil {
		return nil, err
	}
	return &taskAPI.StartResponse{Pid: pid}, nil
}

// Delete a process: an exec, or a container (after its init stopped). Deleting the container
// that owns the VM stops the VM.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, p, err := s.pod.process(r.ID, r.ExecID)
	if err != nil {
		if r.ExecID == "" && s.pod.abandon(r.ID) {
			log.G(ctx).WithField("id", r.ID).Warn("containerd deletes a container the shim is still creating; cancelling the create")
		}
		return nil, err
	}
	if r.ExecID != "" {
		st, err := c.deleteExec(ctx, p)
		if err != nil {
			return nil, err
		}
		return &taskAPI.DeleteResponse{Pid: st.pid, ExitStatus: st.exitCode, ExitedAt: protobuf.ToTimestamp(st.exitedAt)}, nil
	}
	st, err := c.delete(ctx)
	if err != nil {
		return nil, err
	}
	if vm, left := s.pod.remove(c); vm != nil {
		// The pod is going: whatever is left runs in the VM that is about to stop.
		for _, o := range left {
			log.G(ctx).WithField("id", o.id).Warn("sandbox deleted before this container; it stops with the VM")
		}
		vm.shutdown(context.WithoutCancel(ctx))
	}
	s.events.publish(&eventstypes.TaskDelete{ContainerID: c.id, Pid: st.pid, ExitStatus: st.exitCode, ExitedAt: protobuf.ToTimestamp(st.exitedAt)})
	if c.ownsVM() {
		c.sandbox.markOwnerDeleted()
	}
	return &taskAPI.DeleteResponse{Pid: st.pid, ExitStatus: st.exitCode, ExitedAt: protobuf.ToTimestamp(st.exitedAt)}, nil
}

// Exec adds an exec to a container; it starts with Start.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*ptypes.Empty, error) {
	c, err := s.pod.container(r.ID)
	if err != nil {
		return nil, err
	}
	if err := c.addExec(r); err != nil {
		return nil, err
	}
	s.events.publish(&eventstypes.TaskExecAdded{ContainerID: c.id, ExecID: r.ExecID})
	return &ptypes.Empty{}, nil
}

// taskStatus is the task API's name of a status.
var taskStatus = map[status]task.Status{
	statusCreated: task.Status_CREATED,
	statusRunning: task.Status_RUNNING,
	statusPaused:  task.Status_PAUSED,
	statusStopped: task.Status_STOPPED,
	statusDeleted: task.Status_STOPPED,
}

// State of a process.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.pod.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	st := c.status(p)
	resp := &taskAPI.StateResponse{
		ID: p.eventID(), Bundle: c.bundle, Pid: st.pid, ExecID: r.ExecID, Status: taskStatus[st.status],
		Stdin: p.stdio.stdin, Stdout: p.stdio.stdout, Stderr: p.stdio.stderr, Terminal: p.stdio.terminal,
	}
	if resp.Status == task.Status_STOPPED {
		resp.ExitStatus, resp.ExitedAt = st.exitCode, protobuf.ToTimestamp(st.exitedAt)
	}
	return resp, nil
}

// Kill signals a process; killing a stopped process succeeds (StopPodSandbox retries).
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*ptypes.Empty, error) {
	c, p, err := s.pod.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	return &ptypes.Empty{}, c.kill(ctx, p, r.Signal, r.All)
}

// Pids lists the container's processes (guest pids).
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.pod.container(r.ID)
	if err != nil {
		return nil, err
	}
	list, err := c.pids(ctx)
	if err != nil {
		return nil, err
	}
	return &taskAPI.PidsResponse{Processes: list}, nil
}

// Pause freezes the container's cgroup in the guest.
func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	c, err := s.pod.container(r.ID)
	if err != nil {
		return nil, err
	}
	return &ptypes.Empty{}, c.pause(ctx, true)
}

// Resume thaws it.
func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	c, err := s.pod.container(r.ID)
	if err != nil {
		return nil, err
	}
	return &ptypes.Empty{}, c.pause(ctx, false)
}

// Checkpoint is not supported: the container's memory lives in a VM.
func (s *Service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	return nil, fmt.Errorf("checkpoint is not supported by podvm (containers run inside a VM): %w", errdefs.ErrNotImplemented)
}

// ResizePty resizes a process's terminal.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*ptypes.Empty, error) {
	c, p, err := s.pod.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	return &ptypes.Empty{}, c.resizePty(ctx, p, r.Width, r.Height)
}

// CloseIO closes a process's stdin.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*ptypes.Empty, error) {
	_, p, err := s.pod.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if h := p.hostIO(); r.Stdin && h != nil {
		h.closeStdin()
	}
	return &ptypes.Empty{}, nil
}

// Update the container's resources (cgroup limits in the guest).
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*ptypes.Empty, error) {
	c, err := s.pod.container(r.ID)
	if err != nil {
		return nil, err
	}
	return &ptypes.Empty{}, c.update(ctx, r.Resources)
}

// Wait for a process to exit.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.pod.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	code, at, err := p.wait(ctx)
	if err != nil {
		return nil, err
	}
	return &taskAPI.WaitResponse{ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// Stats of the container's cgroup in the guest, as cgroup v2 metrics.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, err := s.pod.container(r.ID)
	if err != nil {
		return nil, err
	}
	a, err := c.stats(ctx)
	if err != nil {
		return nil, err
	}
	return &taskAPI.StatsResponse{Stats: a}, nil
}

// Connect returns the shim's and the task's pids.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), Version: version.Version}
	if c, err := s.pod.container(r.ID); err == nil {
		resp.TaskPid = c.init.getPid()
	}
	return resp, nil
}

// Shutdown ends the shim once it runs no container. containerd shuts down the shim of a task
// whose create it gave up on too: that create is cancelled, and the shim ends once it is
// undone (createFailed).
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	s.pod.abandon(r.ID)
	if s.pod.size() == 0 {
		s.shutdown.Shutdown()
	}
	return &ptypes.Empty{}, nil
}

// teardown stops the VM when the shim exits (Shutdown, or a signal).
func (s *Service) teardown(ctx context.Context) {
	if sb := s.pod.takeSandbox(); sb != nil {
		sb.shutdown(context.WithoutCancel(ctx))
	}
	s.events.close()
}
