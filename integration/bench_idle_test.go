package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// idleWindow is how long BenchmarkPodIdleCPU counts an idle pod's CPU time.
const idleWindow = 10 * time.Second

// clockTick is the unit of utime and stime in /proc/<pid>/stat (USER_HZ, 100 on Linux).
const clockTick = 10 * time.Millisecond

// BenchmarkPodIdleCPU measures the host CPU one idle pod keeps using: the CPU time (user and
// system, all threads) of the processes BenchmarkPodMemory sums, over idleWindow, as CPU
// milliseconds per second (10 ms/s is 1% of one core). A warm-up pod pulls the image; each
// iteration starts a pod with a busybox `sleep 3600`, lets it settle, counts, and removes it. containerd's own work (its CRI
// polls every container's stats once a second) is the same for both handlers and not counted;
// what that polling costs the pod's processes is. ns/op is the whole cycle and means nothing.
func BenchmarkPodIdleCPU(b *testing.B) {
	compareHandlers(b, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		removePod(ctx, b, env, runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "warmup", Handler: criHandler(h)}))
		var rates []float64
		for i := 0; b.Loop(); i++ {
			pod := runPod(ctx, b, env, criHandler(h), fmt.Sprintf("idle-%d", i))
			startSleeper(ctx, b, env, pod, "sleep")
			settle(ctx, b)
			procs, err := podProcesses(env, pod.ID)
			if err != nil {
				b.Fatal(err)
			}
			before := cpuTimes(b, procs)
			start := time.Now()
			select {
			case <-time.After(idleWindow):
			case <-ctx.Done():
				b.Fatal(ctx.Err())
			}
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
		med, hi := quantile(rates, 0.5), quantile(rates, 1)
		b.Logf("%s idle pod CPU: %.1f ms/s", h, rates)
		b.ReportMetric(med, "cpu-ms/s-median")
		b.ReportMetric(hi, "cpu-ms/s-max")
		cmp.set(h, "idle pod CPU median", "CPU ms/s", med)
		if r, ok := cmp.ratio("idle pod CPU median", h); ok && h != "runc" {
			b.ReportMetric(r, "x-runc")
		}
	})
}

// perSecond is CPU time cpu spent over wall, in CPU milliseconds per second.
func perSecond(cpu, wall time.Duration) float64 {
	return float64(cpu) / float64(time.Millisecond) / wall.Seconds()
}

// cpuTimes reads the CPU time (utime + stime, every thread's, exited ones included) of each
// of procs that still runs.
func cpuTimes(b *testing.B, procs []procEntry) map[int]time.Duration {
	out := map[int]time.Duration{}
	for _, p := range procs {
		t, err := cpuTime(p.pid)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			b.Fatal(err)
		}
		out[p.pid] = t
	}
	return out
}

// cpuTime is a process's user + system CPU time from /proc/<pid>/stat.
func cpuTime(pid int) (time.Duration, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// After comm's closing parenthesis: state (field 3) ... utime (14), stime (15).
	end := bytes.LastIndexByte(stat, ')')
	f := strings.Fields(string(stat[end+1:]))
	if end < 0 || len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q has no utime and stime", pid, stat)
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * clockTick, nil
}

// TestCPUTime checks cpuTime against CPU this process burns: it must count it, in the right
// unit, and not count sleep.
func TestCPUTime(t *testing.T) {
	before, err := cpuTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	spin := time.Now()
	x := 0
	for time.Since(spin) < 300*time.Millisecond {
		x++
	}
	after, err := cpuTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// At most the 300 ms of spinning (and a tick): the sleep is not CPU time; at least a
	// sixth of it, however loaded the machine.
	if d := after - before; d < 50*time.Millisecond || d > 300*time.Millisecond+clockTick {
		t.Fatalf("cpuTime grew by %v over 300 ms asleep and 300 ms spinning (%d loops), want 50..310 ms", d, x)
	}
}
