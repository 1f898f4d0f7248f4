package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/metrics"
)

// idleWindow is how long BenchmarkPodIdleCPU counts an idle pod's CPU time.
const idleWindow = 10 * time.Second

// BenchmarkPodIdleCPU measures the host CPU one idle pod keeps using: the CPU time
// (metrics.ProcCPU: user and system, every thread's) of the processes BenchmarkPodMemory sums,
// over idleWindow, as CPU milliseconds per second (10 ms/s is 1% of one core). A warm-up pod
// pulls the image; each iteration starts a pod with a busybox `sleep 3600`, lets it settle,
// counts, and removes it. containerd's own work (its CRI polls every container's stats once a
// second) is the same for both handlers and not counted; what that polling costs the pod's
// processes is. ns/op is the whole cycle and means nothing.
func BenchmarkPodIdleCPU(b *testing.B) {
	compareHandlers(b, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		removePod(ctx, b, env, runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "warmup", Handler: criHandler(h)}))
		var rates []float64
		for i := 0; b.Loop(); i++ {
			pod, procs := startIdlePod(ctx, b, env, h, fmt.Sprintf("idle-%d", i))
			before := cpuTimes(b, procs)
			start := time.Now()
			sit(ctx, b, idleWindow)
			after := cpuTimes(b, procs)
			wall := time.Since(start)
			var total time.Duration
			var parts []string
			for _, p := range procs {
				t0, ok0 := before[p.pid]
				t1, ok1 := after[p.pid]
				if !ok0 || !ok1 {
					continue // not there at both ends: a short-lived helper
				}
				total += t1 - t0
				parts = append(parts, fmt.Sprintf("%s[%d] %.1f", p.comm, p.pid, perSecond(t1-t0, wall)))
			}
			if i == 0 {
				b.Logf("%s pod processes, CPU ms/s: %s", h, strings.Join(parts, ", "))
			}
			rates = append(rates, perSecond(total, wall))
			removePod(ctx, b, env, pod)
		}
		cmp.reportAmounts(b, h, "idle pod CPU", "cpu-ms/s", rates)
	})
}

// perSecond is CPU time cpu spent over wall, in CPU milliseconds per second.
func perSecond(cpu, wall time.Duration) float64 {
	return float64(cpu) / float64(time.Millisecond) / wall.Seconds()
}

// cpuTimes reads the CPU time of each of procs that still runs (metrics.ProcCPU).
func cpuTimes(b *testing.B, procs []procEntry) map[int]time.Duration {
	out := map[int]time.Duration{}
	for _, p := range procs {
		secs, err := metrics.ProcCPU("/proc", p.pid)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			b.Fatal(err)
		}
		out[p.pid] = time.Duration(secs * float64(time.Second))
	}
	return out
}
