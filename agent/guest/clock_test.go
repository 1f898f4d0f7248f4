package guest

import (
	"context"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

func TestAdjustClock(t *testing.T) {
	f := &fakeRestoreSys{}
	s := &Server{restoreSys: f.sys()}
	for _, r := range []*api.AdjustClockRequest{{OffsetNs: int64(-3 * time.Millisecond)}, {OffsetNs: int64(time.Hour), Step: true}} {
		if _, err := s.AdjustClock(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	if want := time.Hour - 3*time.Millisecond; f.adjusted != want || !slices.Equal(f.order, []string{"slew", "step"}) {
		t.Errorf("the clock moved by %v (%q), want %v (slewed, then stepped)", f.adjusted, f.order, want)
	}
}

// A slew is adjtime's single-shot offset in microseconds; a step ADJ_SETOFFSET in
// microseconds, never ADJ_NANO (which would switch the guest's NTP state to nanoseconds).
func TestClockAdjustment(t *testing.T) {
	for _, c := range []struct {
		offset time.Duration
		step   bool
		want   unix.Timex
	}{
		{3 * time.Millisecond, false, unix.Timex{Modes: unix.ADJ_OFFSET_SINGLESHOT, Offset: 3000}},
		{-128 * time.Millisecond, false, unix.Timex{Modes: unix.ADJ_OFFSET_SINGLESHOT, Offset: -128_000}},
		{3 * time.Millisecond, true, unix.Timex{Modes: unix.ADJ_SETOFFSET, Time: unix.Timeval{Sec: 0, Usec: 3000}}},
		{90*time.Second + 5*time.Microsecond + 700*time.Nanosecond, true, unix.Timex{Modes: unix.ADJ_SETOFFSET, Time: unix.Timeval{Sec: 90, Usec: 5}}},
		// -1.25 s is -2 s + 0.75 s: the kernel wants the fraction in [0, 1 s).
		{-1250 * time.Millisecond, true, unix.Timex{Modes: unix.ADJ_SETOFFSET, Time: unix.Timeval{Sec: -2, Usec: 750_000}}},
		{-time.Hour, true, unix.Timex{Modes: unix.ADJ_SETOFFSET, Time: unix.Timeval{Sec: -3600, Usec: 0}}},
	} {
		if got := clockAdjustment(c.offset, c.step); got != c.want {
			t.Errorf("%v (step %v): %+v, want %+v", c.offset, c.step, got, c.want)
		}
	}
}
