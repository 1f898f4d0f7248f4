package shim

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestGuestClockOffset(t *testing.T) {
	sent := time.Unix(1_700_000_000, 0)
	answered := sent.Add(10 * time.Millisecond)
	for _, c := range []struct {
		guest     time.Time
		wantOff   time.Duration
		wantUncer time.Duration
	}{
		{sent.Add(5 * time.Millisecond), 0, 5 * time.Millisecond},
		{sent, -5 * time.Millisecond, 5 * time.Millisecond},
		{sent.Add(-time.Hour), -time.Hour - 5*time.Millisecond, 5 * time.Millisecond},
		{answered.Add(300 * time.Millisecond), 305 * time.Millisecond, 5 * time.Millisecond},
	} {
		off, u := guestClockOffset(sent, answered, c.guest.UnixNano())
		if off != c.wantOff || u != c.wantUncer {
			t.Errorf("guest at %v: offset %v ± %v, want %v ± %v", c.guest.Sub(sent), off, u, c.wantOff, c.wantUncer)
		}
	}
}

// clockCalls are the AdjustClock calls the rig's agent got, as "<offset> step|slew".
func clockCalls(r *rig) []string {
	var calls []string
	for _, c := range r.agent.Calls() {
		if a, ok := strings.CutPrefix(c, "AdjustClock "); ok {
			calls = append(calls, a)
		}
	}
	return calls
}

// Once the pod is up the shim steps the guest's clock to the host's, however little it is
// off: SetupSandbox's clock reached a busy guest late, and no container runs yet.
func TestClockSteppedOnceUp(t *testing.T) {
	r := newRig(t)
	r.agent.SetClockOffset(-80 * time.Millisecond)
	r.running()
	waitFor(t, "the guest's clock corrected", func() bool { return r.agent.ClockOffset().Abs() < 10*time.Millisecond })
	calls := clockCalls(r)
	if len(calls) != 1 || !strings.HasSuffix(calls[0], " step") {
		t.Errorf("AdjustClock calls %q, want one step", calls)
	}
}

// The shim's pings keep the guest's clock to the host's: a guest off by a little is slewed,
// one an hour ahead is stepped back, one within what a ping can tell is left alone, and a
// guest that cannot take the correction is still pinged (and not taken for hung).
func TestPingsKeepGuestClock(t *testing.T) {
	r := newRig(t)
	r.pingInterval = 50 * time.Millisecond
	r.running()
	time.Sleep(5 * r.pingInterval)
	if calls := clockCalls(r); len(calls) != 0 {
		t.Errorf("AdjustClock calls %q for a guest on the host's clock, want none", calls)
	}

	for _, c := range []struct {
		offset time.Duration
		how    string
	}{{40 * time.Millisecond, "slew"}, {time.Hour, "step"}, {-time.Second, "step"}} {
		before := len(clockCalls(r))
		r.agent.SetClockOffset(c.offset)
		waitFor(t, "the guest's clock corrected", func() bool { return r.agent.ClockOffset().Abs() < 10*time.Millisecond })
		calls := clockCalls(r)[before:]
		if len(calls) != 1 || !strings.HasSuffix(calls[0], " "+c.how) {
			t.Errorf("a guest %v off: AdjustClock calls %q, want one %s", c.offset, calls, c.how)
		}
	}

	r.agent.FailOn("AdjustClock", errors.New("EPERM"))
	r.agent.SetClockOffset(-time.Minute)
	before := len(clockCalls(r))
	waitFor(t, "two more tries", func() bool { return len(clockCalls(r)) >= before+2 })
	if _, stopped, _ := r.vm.State(); stopped {
		t.Error("the shim stopped the VM of a guest that answers its pings but could not set its clock")
	}
}

// waitFor polls cond every 5 ms for up to 10 s and fails t if it never holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
	}
}
