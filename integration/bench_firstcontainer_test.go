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
	compareLatency(b, templateBenchHandlers, "CreateStartFirstContainer", func(ctx context.Context, b *testing.B, tm benchTimer, h string, env *harness.Env) (latencyStep, func()) {
		removePod(ctx, b, env, runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "warmup", Handler: criHandler(h)}))
		return func(i int) (time.Duration, func()) {
			tm.StopTimer()
			pod := runPod(ctx, b, env, criHandler(h), fmt.Sprintf("first-%d", i))
			tm.StartTimer()
			start := time.Now()
			startSleeper(ctx, b, env, pod, "first")
			return time.Since(start), func() { removePod(ctx, b, env, pod) }
		}, func() {}
	})
}
