package shim

import (
	"strings"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
)

// ooms waits until a TaskOOM for last was published and returns the TaskOOMs' ids.
func (r *rig) ooms(last string) []string {
	r.t.Helper()
	var ids []string
	ok := r.pub.waitFor(10*time.Second, func(events []any) bool {
		ids = nil
		for _, e := range events {
			if o, ok := e.(*eventstypes.TaskOOM); ok {
				ids = append(ids, o.ContainerID)
			}
		}
		return len(ids) > 0 && ids[len(ids)-1] == last
	})
	if !ok {
		r.t.Fatalf("no TaskOOM for %s was published", last)
	}
	for i := range ids {
		ids[i] = logSafe(ids[i], 20) // a test failure shows huge ids short
	}
	return ids
}

// A guest names containers in its OOM events: only the shim's own, live ones are published,
// and one burst of kills is one event.
func TestOOMEventsFromTheGuestAreChecked(t *testing.T) {
	r := newRig(t)
	r.running()
	r.mustCreate("c2", workloadAnnotations("pod1"))
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c2"}); err != nil {
		t.Fatal(err)
	}

	for _, id := range []string{
		"ghost",          // never created by this shim
		"c1", "c1", "c1", // one OOM burst
		"c2",                       // deleted
		"",                         // no id
		strings.Repeat("x", 1<<16), // a huge id
		"c1",                       // still the same burst
		"pod1",                     // the sandbox is the shim's too
	} {
		r.agent.OOM(id)
	}
	got := r.ooms("pod1")
	if want := []string{"c1", "pod1"}; strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("TaskOOM for %q, want %q", got, want)
	}
}

func TestOOMGuardPacesAFlood(t *testing.T) {
	now := time.Unix(1000, 0)
	g := newOOMGuard(now)
	var waited time.Duration
	const n = 1000
	for i := 0; i < n; i++ {
		w := g.pace(now)
		if w < 0 || w > time.Second/oomRate+time.Millisecond {
			t.Fatalf("event %d: wait %v, want at most one token's worth", i, w)
		}
		waited += w
		now = now.Add(w) // the loop sleeps that long
	}
	want := time.Duration(n-oomBurst) * time.Second / oomRate
	if d := waited - want; d < -time.Millisecond || d > time.Millisecond {
		t.Errorf("%d events at once waited %v in all, want %v (burst %d, then %d/s)", n, waited, want, oomBurst, oomRate)
	}
	// After a quiet spell the burst is available again.
	now = now.Add(time.Minute)
	for i := 0; i < oomBurst; i++ {
		if w := g.pace(now); w != 0 {
			t.Fatalf("event %d after a pause waited %v", i, w)
		}
	}
}

func TestOOMGuardRepeats(t *testing.T) {
	now := time.Unix(1000, 0)
	g := newOOMGuard(now)
	if g.repeat("c1", now) {
		t.Fatal("first OOM of c1 is a repeat")
	}
	if !g.repeat("c1", now.Add(g.window-time.Millisecond)) {
		t.Error("OOM of c1 within the window is not a repeat")
	}
	if g.repeat("c2", now) {
		t.Error("c2's OOM is a repeat of c1's")
	}
	later := now.Add(g.window)
	if g.repeat("c1", later) {
		t.Error("OOM of c1 after the window is a repeat")
	}
	if len(g.last) != 1 {
		t.Errorf("guard keeps %d containers' times after the window, want 1 (c1)", len(g.last))
	}
}
