package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// killedBeforeStart is the exit status of a process deleted or killed before it ran.
const killedBeforeStart = 128 + uint32(unix.SIGKILL)

// container is one task: its init process, its execs, its bundle, and the VM it runs in.
type container struct {
	id     string
	bundle string
	role   role
	// sharedPID is true when the container joins another's PID namespace: its execs do not
	// die with its init, so the shim kills them.
	sharedPID bool
	// sandbox is the VM the container runs in (for the sandbox or a standalone container,
	// the VM it booted).
	sandbox *sandbox
	events  *eventQueue
	init    *process

	mu    sync.Mutex
	execs map[string]*process
	// removing holds, by exec ID, the guest's removal of an exec whose Delete has returned
	// (forgetExec), closed when it is done; removals counts them.
	removing map[string]chan struct{}
	removals sync.WaitGroup
}

// ownsVM is true for the container whose create booted the VM and whose delete stops it.
func (c *container) ownsVM() bool { return c.role != roleWorkload }

// guest returns the agent of the container's VM; once that VM is stopping the container
// can no longer be reached.
func (c *container) guest() (agentConn, error) {
	if c.sandbox.stopping.Load() {
		return nil, fmt.Errorf("container %s: its pod VM %s is stopped: %w", c.id, c.sandbox.id, errdefs.ErrFailedPrecondition)
	}
	return c.sandbox.agent, nil
}

// process returns the init (execID "") or an exec.
func (c *container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// createContainer makes the container's filesystems available in sb and creates it in the
// guest; on error nothing of it is left.
func createContainer(ctx context.Context, sb *sandbox, rl role, r *taskAPI.CreateTaskRequest, spec *specs.Spec, events *eventQueue) (_ *container, retErr error) {
	paths := stdioPaths{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}
	c := &container{id: r.ID, bundle: r.Bundle, role: rl, sandbox: sb, events: events,
		init: newProcess(r.ID, "", paths), execs: map[string]*process{}, removing: map[string]chan struct{}{}}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.PIDNamespace && ns.Path != "" {
			c.sharedPID = true
		}
	}
	if shared := hostNamespaces(spec); len(shared) > 0 {
		log.G(ctx).WithFields(log.Fields{"container": r.ID, "namespaces": shared}).
			Warn("host namespaces asked for (hostPID/hostIPC): in a podvm pod they are the pod VM's, not the node's")
	}
	prepStart := time.Now()
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
	prepared, agentStart := time.Since(prepStart), time.Now()
	created, err := sb.agent.CreateContainer(ctx, &api.CreateContainerRequest{
		ContainerId: r.ID, Spec: specJSON, Stdio: paths.agentStdio(),
		Devices: guest.devices, BlockMounts: guest.blockMounts, PodTmpfs: guest.podTmpfs,
		AlongsideSetup: !sb.ready,
	})
	if err != nil {
		return nil, fmt.Errorf("create container %s in the VM: %w", r.ID, err)
	}
	log.G(ctx).WithFields(log.Fields{
		"id": r.ID, "prepare": prepared.Round(time.Millisecond), "guest_create": time.Since(agentStart).Round(time.Millisecond),
	}).Info("container created in the VM")
	ns, _ := namespaces.Namespace(ctx)
	hio, err := startIO(ctx, sb.agent, ns, r.ID, "", paths)
	if err != nil {
		_, _ = sb.agent.RemoveContainer(context.WithoutCancel(ctx), &api.RemoveContainerRequest{ContainerId: r.ID, Force: true})
		return nil, err
	}
	c.init.attach(sb.hostPID(), hio)
	if c.ownsVM() {
		sb.setOwner(c.init)
		sb.setNamespacePID(created.Pid)
	} else {
		sb.setOwnPIDNS(r.ID, guest.spec, created.Pid)
	}
	hio.startStdin(context.WithoutCancel(ctx), sb.agent, r.ID, "")
	go c.watchExit(ctx, c.init)
	return c, nil
}

// start starts the init or an exec and publishes that it did.
func (c *container) start(ctx context.Context, p *process) (uint32, error) {
	p.ops.Lock()
	defer p.ops.Unlock()
	if err := p.can(opStart); err != nil {
		return 0, err
	}
	ag, err := c.guest()
	if err != nil {
		return 0, err
	}
	if p.execID != "" {
		return c.startExec(ctx, ag, p)
	}
	if _, err := ag.StartProcess(ctx, &api.ProcessRequest{ContainerId: c.id}); err != nil {
		return 0, fmt.Errorf("start %s: %w", p, err)
	}
	if err := p.apply(opStart); err != nil {
		return 0, err
	}
	pid := p.getPid()
	c.events.publish(&eventstypes.TaskStart{ContainerID: c.id, Pid: pid})
	return pid, nil
}

// startExec opens containerd's ends of an exec's stdio, then creates and starts the exec in
// the guest in one call, then copies its output. The caller holds p.ops.
func (c *container) startExec(ctx context.Context, ag agentConn, p *process) (uint32, error) {
	if err := c.waitForgotten(ctx, p.execID); err != nil {
		return 0, err
	}
	ns, _ := namespaces.Namespace(ctx)
	hio, err := openIO(ctx, ns, c.id, p.stdio)
	if err != nil {
		return 0, err
	}
	// An exec that cannot start is gone from the guest when this fails.
	if _, err := ag.ExecProcess(ctx, &api.ExecProcessRequest{
		ContainerId: c.id, ExecId: p.execID, Process: p.spec, Stdio: p.stdio.agentStdio(), Start: true,
	}); err != nil {
		hio.close()
		return 0, fmt.Errorf("start exec %s: %w", p, err)
	}
	hio.startOutput(ag, c.id, p.execID)
	p.attach(c.sandbox.hostPID(), hio)
	hio.startStdin(context.WithoutCancel(ctx), ag, c.id, p.execID)
	if err := p.apply(opStart); err != nil {
		return 0, err
	}
	// Published before the exit can be: watchExit starts only now.
	pid := p.getPid()
	c.events.publish(&eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: p.execID, Pid: pid})
	go c.watchExit(ctx, p)
	return pid, nil
}

// addExec records an exec; it starts with Start.
func (c *container) addExec(r *taskAPI.ExecProcessRequest) error {
	if st := c.init.state().status; st != statusRunning {
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
	defer c.mu.Unlock()
	if _, ok := c.execs[r.ExecID]; ok {
		return fmt.Errorf("exec %s in %s: %w", r.ExecID, c.id, errdefs.ErrAlreadyExists)
	}
	c.execs[r.ExecID] = p
	return nil
}

// status is what State reports for p: an exec of a paused container is paused too.
func (c *container) status(p *process) processState {
	st := p.state()
	if p != c.init && st.status == statusRunning && c.init.state().status == statusPaused {
		st.status = statusPaused
	}
	return st
}

// deleteProcess checks that p may be deleted (a process that never started counts as
// killed) and returns its final state. The caller holds p.ops.
func deleteProcess(p *process) (processState, error) {
	if st := p.state(); st.status == statusDeleted {
		return st, fmt.Errorf("process %s: %w", p, errdefs.ErrNotFound)
	} else if st.status == statusCreated {
		p.exit(killedBeforeStart, time.Now())
	}
	if err := p.can(opDelete); err != nil {
		return processState{}, fmt.Errorf("%w; kill it first", err)
	}
	st := p.state()
	if st.exitedAt.IsZero() {
		st.exitedAt = time.Now()
	}
	return st, nil
}

// deleteExec removes an exec that is not running.
func (c *container) deleteExec(ctx context.Context, p *process) (processState, error) {
	p.ops.Lock()
	defer p.ops.Unlock()
	st, err := deleteProcess(p)
	if err != nil {
		return st, err
	}
	if ag, err := c.guest(); err == nil && st.pid != 0 {
		c.forgetExec(ctx, ag, p.execID)
	}
	if h := p.hostIO(); h != nil {
		h.close()
	}
	p.markReported()
	if err := p.apply(opDelete); err != nil {
		return st, err
	}
	c.mu.Lock()
	delete(c.execs, p.execID)
	c.mu.Unlock()
	return st, nil
}

// forgetExec removes an exited exec's record from the guest in the background. The exec's
// Delete has its exit status already, and CRI's ExecSync answers only after that Delete
// returns: waiting for the round trip to the guest would add it to every exec. A new exec
// with the same ID waits for it (waitForgotten), and so does the container's delete.
func (c *container) forgetExec(ctx context.Context, ag agentConn, execID string) {
	done := make(chan struct{})
	c.mu.Lock()
	c.removing[execID] = done
	c.mu.Unlock()
	c.removals.Add(1)
	go func() {
		defer c.removals.Done()
		defer close(done)
		if _, err := ag.RemoveProcess(context.WithoutCancel(ctx), &api.ProcessRequest{ContainerId: c.id, ExecId: execID}); err != nil && !errdefs.IsNotFound(err) {
			log.G(ctx).WithError(err).WithField("exec", execID).Debug("remove exec in the VM")
		}
		c.mu.Lock()
		if c.removing[execID] == done {
			delete(c.removing, execID)
		}
		c.mu.Unlock()
	}()
}

// waitForgotten waits until the guest has forgotten an earlier exec of the same ID.
func (c *container) waitForgotten(ctx context.Context, execID string) error {
	c.mu.Lock()
	done := c.removing[execID]
	c.mu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("exec %s in %s: waiting for the guest to forget an earlier exec of that ID: %w", execID, c.id, ctx.Err())
	}
}

// delete removes the container (its init not running) from the guest and releases its
// filesystems and disks.
func (c *container) delete(ctx context.Context) (processState, error) {
	p := c.init
	p.ops.Lock()
	defer p.ops.Unlock()
	st, err := deleteProcess(p)
	if err != nil {
		return st, err
	}
	c.removals.Wait() // the guest's exec records go before the container's
	if ag, err := c.guest(); err == nil {
		if _, err := ag.RemoveContainer(ctx, &api.RemoveContainerRequest{ContainerId: c.id, Force: true}); err != nil && !errdefs.IsNotFound(err) {
			log.G(ctx).WithError(err).WithField("id", c.id).Warn("remove container in the VM")
		}
		c.sandbox.release(ctx, c.id)
	}
	if h := p.hostIO(); h != nil {
		h.close()
	}
	p.markReported()
	return st, p.apply(opDelete)
}

// kill signals a process; a process that is stopped already is no error (StopPodSandbox
// retries), and an exec that never started simply never runs.
func (c *container) kill(ctx context.Context, p *process, signal uint32, all bool) error {
	switch p.state().status {
	case statusStopped, statusDeleted:
		return nil
	case statusCreated:
		if p.execID != "" && c.killUnstartedExec(p, signal) {
			return nil
		}
	}
	if c.sandbox.vmGone() {
		return nil // it died with the VM; its exit is reported
	}
	ag, err := c.guest()
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, signalTimeout)
	_, err = ag.SignalProcess(sctx, &api.SignalProcessRequest{ContainerId: c.id, ExecId: p.execID, Signal: signal, All: all})
	cancel()
	switch {
	case err == nil:
		return nil
	case errdefs.IsNotFound(err):
		return nil // it exited meanwhile
	case signal == uint32(unix.SIGKILL) && ctx.Err() == nil && errors.Is(sctx.Err(), context.DeadlineExceeded):
		// SIGKILL cannot fail on a node: a guest that does not take it is hung, and only
		// stopping its VM ends the process (and the pod's others, reported exited with it).
		c.sandbox.stopHung(ctx, fmt.Sprintf("SIGKILL to %s was not answered within %v", p, signalTimeout))
		return nil
	default:
		return fmt.Errorf("signal %d to %s: %w", signal, p, err)
	}
}

// signalTimeout bounds a signal's delivery in the guest: the agent answers at once unless
// the guest is hung. A variable for tests.
var signalTimeout = 10 * time.Second

// killUnstartedExec records the exit of an exec that is not in the guest yet. It reports
// false when the exec started meanwhile and must be signalled in the guest.
func (c *container) killUnstartedExec(p *process, signal uint32) bool {
	p.ops.Lock()
	defer p.ops.Unlock()
	if st := p.state().status; st != statusCreated {
		return st == statusStopped || st == statusDeleted
	}
	at := time.Now()
	if p.exit(128+signal, at) {
		c.events.publish(&eventstypes.TaskExit{ContainerID: c.id, ID: p.execID, ExitStatus: 128 + signal, ExitedAt: protobuf.ToTimestamp(at)})
	}
	p.markReported()
	return true
}

// pause freezes the container's cgroup in the guest (pause) or thaws it.
func (c *container) pause(ctx context.Context, pause bool) error {
	p, o := c.init, opPause
	if !pause {
		o = opResume
	}
	p.ops.Lock()
	defer p.ops.Unlock()
	if err := p.can(o); err != nil {
		return err
	}
	ag, err := c.guest()
	if err != nil {
		return err
	}
	req := &api.ContainerRequest{ContainerId: c.id}
	if pause {
		_, err = ag.PauseContainer(ctx, req)
	} else {
		_, err = ag.ResumeContainer(ctx, req)
	}
	if err != nil {
		return fmt.Errorf("%s container %s in the VM: %w", o, c.id, err)
	}
	if err := p.apply(o); err != nil {
		return err
	}
	if pause {
		c.events.publish(&eventstypes.TaskPaused{ContainerID: c.id})
	} else {
		c.events.publish(&eventstypes.TaskResumed{ContainerID: c.id})
	}
	return nil
}

// resizePty resizes a process's terminal.
func (c *container) resizePty(ctx context.Context, p *process, width, height uint32) error {
	ag, err := c.guest()
	if err != nil {
		return err
	}
	_, err = ag.ResizePty(ctx, &api.ResizePtyRequest{ContainerId: c.id, ExecId: p.execID, Width: width, Height: height})
	return err
}
