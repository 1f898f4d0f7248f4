package integration

// The memory a node pays for one more pod when it already runs several: PSS splits shared
// pages (binaries, the guest image's page cache) among every process that maps them, so the
// tenth pod costs less than the first. docs/benchmarks.md describes it with the others.

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// densityPods is how many pods run while the last one's cost is measured.
const densityPods = 10

// BenchmarkPodMemoryMarginal measures the marginal PSS of the 10th idle pod: with nine pods
// running a busybox `sleep 3600` each (started once, before the loop), each iteration sums
// the PSS of the nine pods' processes, starts the tenth the same way, lets it settle, sums
// all ten and reports the difference (MiB/median); then removes the tenth. The difference
// includes what the tenth pod takes from the others' shares of shared pages.
func BenchmarkPodMemoryMarginal(b *testing.B) {
	compareHandlers(b, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		var pods []*harness.Pod
		for i := 0; i < densityPods-1; i++ {
			pod := runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: fmt.Sprintf("base-%d", i), Handler: criHandler(h)})
			startSleeper(ctx, b, env, pod, "sleep")
			pods = append(pods, pod)
		}
		var mibs []float64
		for i := 0; b.Loop(); i++ {
			settle(ctx, b)
			before := podsMemoryMiB(b, env, pods)
			pod := runPod(ctx, b, env, criHandler(h), fmt.Sprintf("tenth-%d", i))
			startSleeper(ctx, b, env, pod, "sleep")
			settle(ctx, b)
			after := podsMemoryMiB(b, env, append(pods, pod))
			mibs = append(mibs, after-before)
			if i == 0 {
				b.Logf("%s: %d pods %.1f MiB, %d pods %.1f MiB", h, len(pods), before, len(pods)+1, after)
			}
			removePod(ctx, b, env, pod)
		}
		for _, pod := range pods {
			removePod(ctx, b, env, pod)
		}
		cmp.reportMemoryAs(b, h, fmt.Sprintf("PSS of pod %d (marginal)", densityPods), mibs)
	})
}

// settle lets started pods sit idle (start-up work and page-ins finish) before a measurement.
func settle(ctx context.Context, b *testing.B) { sit(ctx, b, podSettle) }

// sit waits d, failing b if ctx ends first.
func sit(ctx context.Context, b *testing.B, d time.Duration) {
	select {
	case <-time.After(d):
	case <-ctx.Done():
		b.Fatal(ctx.Err())
	}
}

// podsMemoryMiB sums the memory of pods (podMemoryMiB of each: its processes' PSS and the
// memfd pages none of them maps), in MiB.
func podsMemoryMiB(b *testing.B, env *harness.Env, pods []*harness.Pod) float64 {
	total := 0.0
	for _, pod := range pods {
		procs, err := podProcesses(env, pod.ID)
		if err != nil {
			b.Fatal(err)
		}
		mib, _ := podMemoryMiB(b, procs)
		total += mib
	}
	return total
}
