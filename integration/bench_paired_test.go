package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// benchTimer is the part of *testing.B a latency step uses to keep its set-up work out of the
// timer. The runc iterations that run alongside another handler's get noTimer: they run with
// the timer already stopped.
type benchTimer interface {
	StartTimer()
	StopTimer()
}

type noTimer struct{}

func (noTimer) StartTimer() {}
func (noTimer) StopTimer()  {}

// latencyStep is iteration i of a latency benchmark on one handler: how long its measured part
// took, and what to do after it (check, clean up), which runs outside the timer.
type latencyStep func(i int) (time.Duration, func())

// latencySetup readies handler h's side of a latency benchmark in env (its pod, container,
// warm-up) and returns its step and what to do after the last iteration. The step keeps its
// own set-up out of the timer with tm.
type latencySetup func(ctx context.Context, b *testing.B, tm benchTimer, h string, env *harness.Env) (latencyStep, func())

// compareLatency runs the latency benchmark what as a sub-benchmark per handler, as
// compareAmong does. A sub-benchmark other than runc's also keeps a runc environment of its
// own and runs runc iterations after each of its own, outside the timer: the two alternate,
// so when the machine's speed drifts during the minutes a podvm run takes (it does, on shared
// machines, by tens of percent), both sides see the same drift. Two runc iterations follow each
// of the handler's, and only the second is kept: right after a pod VM's step the host's caches
// hold QEMU's working set, and a runc exec measured there took twice its own time (31 against
// 14 ms), which made podvm's ratio look half what it is. The untimed one brings runc back to
// the warm state its own sub-benchmark measures it in. The handler's ratio to runc
// (x-runc, and the table's podvm/runc column) is then its median over the median of these
// paired runc iterations, not over the runc sub-benchmark that ran earlier; the runc column
// stays the runc sub-benchmark's own figure.
func compareLatency(b *testing.B, handlers []string, what string, setup latencySetup) {
	compareAmong(b, handlers, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		step, done := setup(ctx, b, b, h, env)
		if h == "runc" {
			ds := timedLoop(b, step)
			done()
			cmp.reportLatency(b, h, what, ds)
			return
		}
		withBenchEnv(b, "runc", func(rctx context.Context, renv *harness.Env) {
			ref, refDone := setup(rctx, b, noTimer{}, "runc", renv)
			var refs durations
			ds := timedLoop(b, func(i int) (time.Duration, func()) {
				d, after := step(i)
				return d, func() {
					after()
					_, warmed := ref(i)
					warmed()
					rd, rafter := ref(i)
					refs = append(refs, rd)
					rafter()
				}
			})
			refDone()
			done()
			b.Logf("runc alongside %s %s: %s", h, what, refs)
			cmp.pair(h, what, ds, refs)
			cmp.reportLatency(b, h, what, ds)
		})
	})
}

// TestComparisonPairedRatio checks the ratio the tables and x-runc show: over the runc
// iterations paired with the handler's when there are any, else over the runc sub-benchmark.
func TestComparisonPairedRatio(t *testing.T) {
	ms := func(vs ...int) durations {
		var ds durations
		for _, v := range vs {
			ds = append(ds, time.Duration(v)*time.Millisecond)
		}
		return ds
	}
	c := newComparison(nil)
	c.set("runc", "X median", "ms", 100)
	c.set("podvm", "X median", "ms", 400)
	if r, ok := c.ratio("X median", "podvm"); !ok || r != 4 {
		t.Fatalf("unpaired ratio %v %v, want 4 (400 over the runc sub-benchmark's 100)", r, ok)
	}
	// Ten paired iterations: podvm 400..490 ms, runc alongside 200..290 ms (slower than the
	// runc sub-benchmark's 100: the machine drifted).
	var pv, rc []int
	for i := range 10 {
		pv, rc = append(pv, 400+10*i), append(rc, 200+10*i)
	}
	c.pair("podvm", "X", ms(pv...), ms(rc...))
	// Nearest-rank medians: the 5th fastest of each, 440 and 240 ms; p90s 480 and 280 ms.
	if r, _ := c.ratio("X median", "podvm"); r != 440.0/240 {
		t.Errorf("paired median ratio %v, want %v", r, 440.0/240)
	}
	if r, _ := c.ratio("X p90", "podvm"); r != 480.0/280 {
		t.Errorf("paired p90 ratio %v, want %v", r, 480.0/280)
	}
	if _, ok := c.ratio("X median", podvmTemplate); ok {
		t.Error("a ratio for a handler that did not run")
	}
	if row := c.row("X median"); !strings.Contains(row, "| 100.0 ms | 400.0 ms | 1.8x |") {
		t.Errorf("table row %q: want the runc sub-benchmark's figure and the paired ratio", row)
	}
}
