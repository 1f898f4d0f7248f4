package integration

// Benchmarks of what a running pod is asked most after its start: an exec (kubelet's exec
// probes, kubectl exec) and its stop. docs/benchmarks.md describes them with the others.

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// BenchmarkExecSync measures CRI ExecSync of `true` in a running busybox container, as kubelet's
// exec probes call it: from the call until its exit code is back. The pod and its container
// are made once, before the loop, with one exec outside the measurement.
func BenchmarkExecSync(b *testing.B) {
	compareExec(b, templateBenchHandlers, "ExecSync", execTrue)
}

// compareExec runs the latency benchmark what of one exec (run) in a running busybox
// container, made once per handler before the loop, with one run outside the measurement.
func compareExec(b *testing.B, handlers []string, what string, run func(ctx context.Context, b *testing.B, env *harness.Env, id string)) {
	compareLatency(b, handlers, what, func(ctx context.Context, b *testing.B, _ benchTimer, h string, env *harness.Env) (latencyStep, func()) {
		pod := runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "bench", Handler: criHandler(h)})
		id := startSleeper(ctx, b, env, pod, "target")
		run(ctx, b, env, id)
		return func(int) (time.Duration, func()) {
			start := time.Now()
			run(ctx, b, env, id)
			return time.Since(start), func() {}
		}, func() { removePod(ctx, b, env, pod) }
	})
}

// execOutputBytes is what BenchmarkExecOutput's exec writes: as much as `kubectl cp` of a
// small file's tarball, or a chatty container's logs over a few seconds.
const execOutputBytes = 8 << 20

// BenchmarkExecOutput measures CRI ExecSync of `head -c 8388608 /dev/zero` in a running
// busybox container: how long 8 MiB of a process's output takes to reach the caller (what
// `kubectl cp` from a pod and `kubectl exec … cat` move), until the exit code is back.
func BenchmarkExecOutput(b *testing.B) {
	compareExec(b, benchHandlers, "ExecOutput", execOutput)
}

// execOutput runs `head -c execOutputBytes /dev/zero` in container id with ExecSync and fails
// b unless all of it came back.
func execOutput(ctx context.Context, b *testing.B, env *harness.Env, id string) {
	b.Helper()
	out, _, err := env.Runtime.ExecSync(ctx, id, []string{"head", "-c", fmt.Sprint(execOutputBytes), "/dev/zero"}, time.Minute)
	if err != nil || len(out) != execOutputBytes {
		b.Fatalf("ExecSync head in %s: %d of %d bytes, %v", id, len(out), execOutputBytes, err)
	}
}

// execTrue runs `true` in container id with ExecSync and fails b unless it exits 0.
func execTrue(ctx context.Context, b *testing.B, env *harness.Env, id string) {
	b.Helper()
	_, _, err := env.Runtime.ExecSync(ctx, id, []string{"true"}, 30*time.Second)
	if err != nil {
		b.Fatalf("ExecSync true in %s: %v", id, err)
	}
}

// BenchmarkStopPodSandbox measures StopPodSandbox of a pod with a running busybox
// `sleep 3600` (containerd kills the container, then the sandbox; for podvm the VM stops),
// until the call returns. Starting the pod and RemovePodSandbox are outside the timer.
func BenchmarkStopPodSandbox(b *testing.B) {
	compareHandlers(b, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		removePod(ctx, b, env, runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "warmup", Handler: criHandler(h)}))
		var ds durations
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			pod := runPod(ctx, b, env, criHandler(h), fmt.Sprintf("stop-%d", i))
			startSleeper(ctx, b, env, pod, "sleep")
			b.StartTimer()
			start := time.Now()
			sctx, cancel := context.WithTimeout(ctx, callTimeout)
			err := env.Runtime.StopPodSandbox(sctx, pod.ID)
			ds = append(ds, time.Since(start))
			b.StopTimer()
			if err != nil {
				cancel()
				b.Fatalf("StopPodSandbox %s: %v", pod.ID, err)
			}
			if err := env.Runtime.RemovePodSandbox(sctx, pod.ID); err != nil {
				cancel()
				b.Fatalf("RemovePodSandbox %s: %v", pod.ID, err)
			}
			cancel()
			b.StartTimer()
		}
		cmp.reportLatency(b, h, "StopPodSandbox", ds)
	})
}

// BenchmarkExecInput measures a CRI Exec of `wc -c` with 8 MiB on its stdin, through the
// streaming server as `kubectl exec -i` and `kubectl cp` into a pod send it, until the exit
// code is back: how long a process's input takes to reach it.
func BenchmarkExecInput(b *testing.B) {
	compareExec(b, benchHandlers, "ExecInput", execInput)
}

// execInput runs `wc -c` in container id with execOutputBytes of zeros on its stdin and fails
// b unless wc counted all of them.
func execInput(ctx context.Context, b *testing.B, env *harness.Env, id string) {
	b.Helper()
	var out bytes.Buffer
	code, err := env.Exec(ctx, id, []string{"wc", "-c"}, harness.StreamOptions{
		Stdin: bytes.NewReader(make([]byte, execOutputBytes)), Stdout: &out})
	if err != nil || code != 0 || strings.TrimSpace(out.String()) != fmt.Sprint(execOutputBytes) {
		b.Fatalf("Exec wc -c in %s: exit %d, %q, %v", id, code, out.String(), err)
	}
}

// BenchmarkExecTerminalOutput measures a CRI Exec with a terminal (`kubectl exec -it`) of
// `head -c 2097152 /dev/zero`: how long 2 MiB of a process's output through its terminal take
// to reach the caller, until the exit code is back.
func BenchmarkExecTerminalOutput(b *testing.B) {
	compareExec(b, benchHandlers, "ExecTerminalOutput", execTerminalOutput)
}

// execTerminalOutputBytes is what BenchmarkExecTerminalOutput's exec writes.
const execTerminalOutputBytes = 2 << 20

// execTerminalOutput runs `head -c execTerminalOutputBytes /dev/zero` with a terminal in
// container id and fails b unless all of it came back.
func execTerminalOutput(ctx context.Context, b *testing.B, env *harness.Env, id string) {
	b.Helper()
	var out countingWriter
	code, err := env.Exec(ctx, id, []string{"head", "-c", fmt.Sprint(execTerminalOutputBytes), "/dev/zero"},
		harness.StreamOptions{Stdout: &out, TTY: true})
	if err != nil || code != 0 || out.n != execTerminalOutputBytes {
		b.Fatalf("Exec -t head in %s: exit %d, %d of %d bytes, %v", id, code, out.n, execTerminalOutputBytes, err)
	}
}

type countingWriter struct{ n int }

func (w *countingWriter) Write(p []byte) (int, error) { w.n += len(p); return len(p), nil }
