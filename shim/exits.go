package shim

import (
	"context"
	"fmt"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// execSettleTimeout bounds how long an init's exit waits for its execs' exits to be queued.
const execSettleTimeout = 10 * time.Second

// watchExit waits for a process to exit in the guest, lets its output drain and publishes the
// exit. A container's init is reported after its execs. The exit is recorded under p.ops, so
// it never overtakes a Start's TaskStart.
func (c *container) watchExit(ctx context.Context, p *process) {
	ctx = context.WithoutCancel(ctx)
	code, at := uint32(255), time.Now()
	resp, err := c.sandbox.agent.WaitProcess(ctx, &api.ProcessRequest{ContainerId: c.id, ExecId: p.execID})
	if err == nil {
		code, at = resp.ExitStatus, guestTime(resp.ExitedAtUnixNano, time.Now())
	} else {
		log.G(ctx).WithError(err).WithField("process", p.String()).Debug("lost the process with the guest; reporting exit 255")
		if !c.ownsVM() {
			c.sandbox.awaitOwnerGone(ctx)
		}
	}
	if p == c.init {
		c.sandbox.forgetPIDNS(c.id) // no longer a target
	}
	if h := p.hostIO(); h != nil {
		h.drain()
	}
	if p.execID == "" {
		c.settleExecs(ctx)
	}
	p.ops.Lock()
	if p.exit(code, at) {
		c.events.publish(&eventstypes.TaskExit{
			ContainerID: c.id, ID: p.eventID(), Pid: p.getPid(), ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at),
		})
	}
	p.ops.Unlock()
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

// settleExecs makes sure the execs of a container whose init exited have exited and been
// reported first. In a private PID namespace they died with the init; in a shared one the
// shim kills them.
func (c *container) settleExecs(ctx context.Context) {
	c.mu.Lock()
	var running []*process
	for _, e := range c.execs {
		if st := e.state().status; st == statusRunning || st == statusPaused {
			running = append(running, e)
		}
	}
	c.mu.Unlock()
	if len(running) == 0 {
		return
	}
	if ag, err := c.guest(); err == nil && c.sharedPID {
		_, _ = ag.SignalProcess(ctx, &api.SignalProcessRequest{ContainerId: c.id, Signal: uint32(unix.SIGKILL), All: true})
	}
	deadline := time.After(execSettleTimeout)
	for _, e := range running {
		select {
		case <-e.reported:
		case <-deadline:
			return
		}
	}
}

// pingMisses is how many pings in a row a guest agent may leave unanswered before the shim
// takes the guest for hung.
const pingMisses = 3

// watchAgent sets the guest's clock (syncClock), then pings the guest agent every
// sb.pingInterval while the pod runs, each ping given that long to be answered, and keeps the
// guest's clock to the host's with what the answers say (keepClock). A guest that leaves
// pingMisses of them in a row unanswered is hung (a kernel deadlock, a guest frozen for good):
// the shim stops its VM, and what follows is what follows a VM's death (watchVM), so kubelet
// makes the pod anew instead of showing a hung pod as running until a call into it happens to
// time out.
func watchAgent(ctx context.Context, sb *sandbox) {
	sb.syncClock(ctx)
	if sb.pingInterval <= 0 {
		return
	}
	tick := time.NewTicker(sb.pingInterval)
	defer tick.Stop()
	for misses := 0; ; {
		select {
		case <-sb.vm.Done():
			return
		case <-sb.agent.Done():
			return
		case <-tick.C:
		}
		pctx, cancel := context.WithTimeout(ctx, sb.pingInterval)
		sent := time.Now()
		v, err := sb.agent.Version(pctx, &api.VersionRequest{})
		answered := time.Now()
		cancel()
		if sb.stopping.Load() || sb.vmGone() {
			return
		}
		if err == nil {
			misses = 0
			sb.keepClock(ctx, sent, answered, v.GetRealtimeNs(), false)
			continue
		}
		misses++
		log.G(ctx).WithError(err).WithField("sandbox", sb.id).Warnf("the guest agent did not answer ping %d of %d", misses, pingMisses)
		if misses == pingMisses {
			sb.stopHung(ctx, fmt.Sprintf("%d pings in a row, %v apart, were not answered", misses, sb.pingInterval))
			return
		}
	}
}

// watchVM reports, once and with the end of the guest's console log, a VM or agent that goes
// away while the pod runs; the processes' waits then fail and they are reported as exited,
// the pod sandbox first.
func watchVM(ctx context.Context, sb *sandbox) {
	select {
	case <-sb.vm.Done():
	case <-sb.agent.Done():
	}
	// Decided now: the lost processes' exits soon lead containerd to stop the sandbox.
	if sb.stopping.Load() {
		return
	}
	// QEMU going takes the connection with it; give it a moment to say so.
	select {
	case <-sb.vm.Done():
	case <-time.After(2 * time.Second):
	}
	what := "the pod VM died unexpectedly (QEMU exited: killed, e.g. by the host's OOM killer, or crashed)"
	select {
	case <-sb.vm.Done():
	default:
		what = "lost the pod VM's guest agent unexpectedly (its connection closed; the VM is stopped with the pod)"
	}
	if why := sb.hung.Load(); why != nil {
		what = "the pod VM's guest stopped answering (" + *why + "), so the shim stopped the VM"
	}
	log.G(ctx).WithField("sandbox", sb.id).Errorf("%s: the pod's containers are reported exited (255), the sandbox first, "+
		"so kubelet makes the pod anew; the end of the console log (%s):\n%s", what, sb.consolePath(), consoleTail(sb.consolePath(), 60))
}
