package integration

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// burstPods is how many pods a burst of BenchmarkPodBurst starts at once.
const burstPods = 10

// BenchmarkPodBurst starts 10 pods at once, each with a busybox `sleep 3600`, as a Deployment
// scaled up or a node's pods after a reboot do, and measures each pod's RunPodSandbox from the
// burst's start ("PodBurst ready", so its median is when half the pods were ready) and the
// burst until every container runs ("PodBurst all running"). An iteration is one burst; its
// pods are removed outside the timer. podvm's VMs take turns to start on a node with few CPUs
// (sandbox.max_parallel_starts).
func BenchmarkPodBurst(b *testing.B) {
	compareTemplate(b, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		removePod(ctx, b, env, runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "warmup", Handler: criHandler(h)}))
		var ready, all durations
		for i := 0; b.Loop(); i++ {
			start := time.Now()
			pods := make([]*harness.Pod, burstPods)
			readyAt := make(durations, burstPods)
			errs := make([]error, burstPods)
			var wg sync.WaitGroup
			for j := range burstPods {
				wg.Add(1)
				go func() {
					defer wg.Done()
					pods[j], errs[j] = env.RunPod(ctx, harness.PodOptions{Name: fmt.Sprintf("burst-%d-%d", i, j), Handler: criHandler(h)})
					if errs[j] != nil {
						return
					}
					readyAt[j] = time.Since(start)
					_, errs[j] = runSleeper(ctx, env, pods[j], "sleeper")
				}()
			}
			wg.Wait()
			took := time.Since(start)
			b.StopTimer()
			for _, p := range pods {
				if p != nil {
					removePod(ctx, b, env, p)
				}
			}
			if err := errors.Join(errs...); err != nil {
				b.Fatalf("burst %d: %v", i, err)
			}
			ready = append(ready, readyAt...)
			all = append(all, took)
			b.StartTimer()
		}
		cmp.reportLatency(b, h, "PodBurst ready", ready)
		cmp.reportLatency(b, h, "PodBurst all running", all)
	})
}
