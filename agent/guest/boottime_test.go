package guest

import (
	"testing"
	"time"
)

// PID 1 hands its boot times to the server through the environment, in nanoseconds as
// cmd/podvm-agent/pid1.go writes them; the server's ready line names every phase, and a
// missing or garbled hand-over only shortens it.
func TestBootPhasesHandOver(t *testing.T) {
	pid1 := bootPhases{initMain: 900 * time.Millisecond, initDone: 950 * time.Millisecond}
	t.Setenv(initTimesEnv, "900000000,950000000")
	got := bootPhasesFromEnv()
	if got.initMain != pid1.initMain || got.initDone != pid1.initDone {
		t.Fatalf("bootPhasesFromEnv() = %+v, want %+v", got, pid1)
	}
	got.serverMain, got.ready = 1010*time.Millisecond, 1030*time.Millisecond
	want := "kernel start to /init 900ms, /init setup 50ms, server exec 60ms, server start to serving 20ms"
	if s := got.String(); s != want {
		t.Errorf("String() = %q, want %q", s, want)
	}

	for _, bad := range []string{"", "12", "a,b", "1,2,3"} {
		t.Setenv(initTimesEnv, bad)
		if b := bootPhasesFromEnv(); b.initMain != 0 || b.initDone != 0 {
			t.Errorf("%s=%q: got %+v, want zero times", initTimesEnv, bad, b)
		}
	}
	b := bootPhases{serverMain: time.Second, ready: 1100 * time.Millisecond}
	if s, want := b.String(), "kernel start to server 1s, server start to serving 100ms"; s != want {
		t.Errorf("without PID 1's times: String() = %q, want %q", s, want)
	}
}
