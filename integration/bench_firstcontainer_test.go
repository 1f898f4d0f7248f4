package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// BenchmarkCreateStartFirstContainer measures what kubelet waits for after RunPodSandbox: the
// CreateContainer + StartContainer of a pod's first container, until ContainerStatus says
// RUNNING. BenchmarkCreateStartContainer times containers in a pod that already ran one; here
// every iteration starts a fresh pod (outside the timer), so for podvm the container is the
// first its guest ever makes (docs/benchmarks.md, "The first container of a pod").
func BenchmarkCreateStartFirstContainer(b *testing.B) {
	compareTemplate(b, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		removePod(ctx, b, env, runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "warmup", Handler: criHandler(h)}))
		var ds durations
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			pod := runPod(ctx, b, env, criHandler(h), fmt.Sprintf("first-%d", i))
			b.StartTimer()
			start := time.Now()
			startSleeper(ctx, b, env, pod, "first")
			ds = append(ds, time.Since(start))
			b.StopTimer()
			removePod(ctx, b, env, pod)
			b.StartTimer()
		}
		cmp.reportLatency(b, h, "CreateStartFirstContainer", ds)
	})
}
