package guest

// The guest's wall clock is the host's. A booted guest's kernel starts from the emulated RTC,
// which counts whole seconds, so SetupSandbox sets the clock to the host's; a guest restored
// from a template gets it in PrepareRestored. From then the guest keeps time on its own clock
// source (under TCG the host's TSC at the frequency the host measured, under KVM kvm-clock),
// and the host corrects it: once the pod is up it reads the guest's clock (Version) and steps
// it to the host's, as SetupSandbox's one-way trip into a busy guest left it tens of
// milliseconds behind; its pings then slew away what it drifts (shim/clock.go).

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// AdjustClock implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) AdjustClock(ctx context.Context, req *api.AdjustClockRequest) (*api.Empty, error) {
	if err := s.restoreSys.adjustClock(time.Duration(req.OffsetNs), req.Step); err != nil {
		return nil, fmt.Errorf("move the clock by %v: %w", time.Duration(req.OffsetNs), err)
	}
	return &api.Empty{}, nil
}

// setHostClock sets the guest's wall clock to the host's, as the host sent it. A booted guest's
// kernel read the emulated RTC, which counts whole seconds; under KVM kvm-clock corrects that,
// under TCG nothing would.
func setHostClock(req *api.SetupSandboxRequest, sys restoreSys) error {
	switch {
	case req.RealtimeNs < 0:
		return fmt.Errorf("realtime_ns %d: want the host's clock in nanoseconds since the epoch: %w", req.RealtimeNs, errdefs.ErrInvalidArgument)
	case req.RealtimeNs == 0:
		return nil
	}
	if err := sys.setClock(req.RealtimeNs); err != nil {
		return fmt.Errorf("set the clock: %w", err)
	}
	return nil
}

func setRealtime(ns int64) error {
	ts := unix.NsecToTimespec(ns)
	return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
}

// adjustRealtime moves CLOCK_REALTIME by offset (clockAdjustment).
func adjustRealtime(offset time.Duration, step bool) error {
	tx := clockAdjustment(offset, step)
	_, err := unix.ClockAdjtime(unix.CLOCK_REALTIME, &tx)
	return err
}

// clockAdjustment is the adjtimex request that moves the clock by offset: stepped, or slewed
// (adjtime's single-shot offset, in microseconds, which replaces one still being slewed).
func clockAdjustment(offset time.Duration, step bool) unix.Timex {
	if !step {
		return unix.Timex{Modes: unix.ADJ_OFFSET_SINGLESHOT, Offset: offset.Microseconds()}
	}
	// ADJ_SETOFFSET: time is the offset, its microseconds in [0, 1e6). Not with ADJ_NANO,
	// which would switch the kernel's NTP state to nanoseconds for good, and with it what
	// adjtimex tells every program in the guest (busybox's adjtimex would then print
	// nanoseconds as microseconds).
	usec := offset.Microseconds()
	sec, frac := usec/1e6, usec%1e6
	if frac < 0 {
		sec, frac = sec-1, frac+1e6
	}
	return unix.Timex{Modes: unix.ADJ_SETOFFSET, Time: unix.Timeval{Sec: sec, Usec: frac}}
}
