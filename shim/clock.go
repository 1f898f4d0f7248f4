package shim

import (
	"context"
	"time"

	"github.com/containerd/log"

	"github.com/podvm/podvm/agent/api"
)

// The guest's wall clock is kept to the host's (agent/guest/clock.go): SetupSandbox sets it,
// syncClock steps it once the pod is up, and every ping slews away what it drifted.

// clockSlack is how far beyond what a ping's round trip can tell a guest's clock may be off
// the host's before the shim corrects it. A guest under TCG keeps time on the host's TSC at
// the frequency the shim measured, a part per million or two off (without pings, two pods
// drifted under a millisecond in eight minutes): a correction every half hour or so.
const clockSlack = 2 * time.Millisecond

// maxSlew is the largest offset the shim has the guest slew away rather than step, as NTP
// does (ntpd's step threshold): at the kernel's 0.5 ms a second, 128 ms take four minutes.
const maxSlew = 128 * time.Millisecond

// clockSyncTimeout bounds syncClock's calls.
const clockSyncTimeout = 10 * time.Second

// guestClockOffset estimates a guest's clock minus the host's from a ping: the guest read its
// clock (guestNs) at some moment between sent and answered, so the estimate, against their
// midpoint, is good to half the round trip (uncertainty).
func guestClockOffset(sent, answered time.Time, guestNs int64) (offset, uncertainty time.Duration) {
	half := answered.Sub(sent) / 2
	return time.Unix(0, guestNs).Sub(sent.Add(half)), half
}

// clockSamples is how many times syncClock reads the guest's clock.
const clockSamples = 3

// syncClock reads the guest's clock and steps it to the host's. SetupSandbox set it as the
// host's clock was when the request left, which a guest busy with its boot and the pod's
// holder took tens of milliseconds later (20–110 ms under TCG). Now, before the pod's
// containers run, a round trip tells the offset to half its time; of clockSamples reads the
// shortest counts, as the others may have waited on the guest's work for containerd.
func (sb *sandbox) syncClock(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, clockSyncTimeout)
	defer cancel()
	var best struct{ sent, answered time.Time }
	var guestNs int64
	for range clockSamples {
		sent := time.Now()
		v, err := sb.agent.Version(ctx, &api.VersionRequest{})
		answered := time.Now()
		if err != nil {
			if sb.stopping.Load() || sb.vmGone() {
				return
			}
			log.G(ctx).WithError(err).WithField("sandbox", sb.id).Warn("could not read the guest's clock")
			return
		}
		if guestNs == 0 || answered.Sub(sent) < best.answered.Sub(best.sent) {
			best.sent, best.answered, guestNs = sent, answered, v.GetRealtimeNs()
		}
	}
	sb.keepClock(ctx, best.sent, best.answered, guestNs, true)
}

// keepClock corrects the guest's clock after a ping (sent, answered, and the guest's clock in
// its answer) found it off the host's by more than the ping can tell plus clockSlack: stepped
// if step or the offset is beyond maxSlew, else slewed.
func (sb *sandbox) keepClock(ctx context.Context, sent, answered time.Time, guestNs int64, step bool) {
	if guestNs == 0 { // an agent that does not say
		return
	}
	off, uncertainty := guestClockOffset(sent, answered, guestNs)
	if off.Abs() <= uncertainty+clockSlack {
		return
	}
	step = step || off.Abs() > maxSlew
	actx, cancel := context.WithTimeout(ctx, clockSyncTimeout)
	defer cancel()
	entry := log.G(ctx).WithField("sandbox", sb.id)
	if _, err := sb.agent.AdjustClock(actx, &api.AdjustClockRequest{OffsetNs: int64(-off), Step: step}); err != nil {
		entry.WithError(err).Warnf("the guest's clock is %v off the host's and could not be corrected", off)
		return
	}
	how := map[bool]string{true: "stepped", false: "slewing"}[step]
	if off.Abs() > time.Second {
		entry.Infof("the guest's clock was %v off the host's (±%v); %s", off, uncertainty, how)
		return
	}
	entry.Debugf("the guest's clock was %v off the host's (±%v); %s", off, uncertainty, how)
}
