package integration

import (
	"context"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/internal/nodeslots"
	"github.com/podvm/podvm/shim/config"
)

// TestPodvmStartWaitsItsTurn: a node lets sandbox.max_parallel_starts pod VMs start at once.
// With one, and that slot held here as another pod's start holds it, RunPodSandbox waits and
// no QEMU starts; once the slot is free the pod starts and its shim says how long it waited.
// Its turn ended when its agent answered: the next pod starts without waiting.
func TestPodvmStartWaitsItsTurn(t *testing.T) {
	opts := podvmOptions(t)
	setSandboxOption(t, opts.PodvmConfigPath, "max_parallel_starts", "1")
	env := harness.Start(t, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	held, _, err := nodeslots.Acquire(ctx, filepath.Join(podvmStateDir, config.StartSlotsDirName), 1, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		pod *harness.Pod
		err error
	}
	done := make(chan result, 1)
	go func() {
		pod, err := env.RunPod(ctx, harness.PodOptions{Name: "waits", Namespace: "it", Handler: "podvm"})
		done <- result{pod, err}
	}()
	const hold = 3 * time.Second
	select {
	case r := <-done:
		held.Release()
		t.Fatalf("RunPodSandbox returned while the node's one start slot was held: %v", r.err)
	case <-time.After(hold):
	}
	for _, p := range harness.Processes() {
		if strings.Contains(p.Argv0(), "qemu-system") {
			t.Errorf("QEMU %d started while the node's one start slot was held", p.PID)
		}
	}
	held.Release()
	var r result
	select {
	case r = <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("RunPodSandbox did not return once the start slot was free")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	// The wait began once containerd had started the shim and the shim the pod's network.
	if w := startWait(t, env, r.pod.ID); w < hold/2 || w > hold+time.Second {
		t.Errorf("the shim says it waited %v for its turn, want about the %v the slot was held", w, hold)
	}
	if log := readHostFile(t, env.ContainerdLog); !strings.Contains(log, "for a turn to start the pod VM: 1 start at a time (sandbox.max_parallel_starts)") {
		t.Error("no log line says why the pod's start waited")
	}
	next := runPod(ctx, t, env, "podvm", "next")
	if w := startWait(t, env, next.ID); w > 100*time.Millisecond {
		t.Errorf("the next pod waited %v with the first one running, want no wait: the first pod's turn did not end", w)
	}
	removePod(ctx, t, env, next)
	removePod(ctx, t, env, r.pod)
	env.AssertNoLeaks(t)
}

// startWait is how long the shim of pod podID says it waited for a turn to start the pod's VM
// (its "pod VM ready" line's start_wait).
func startWait(t *testing.T, env *harness.Env, podID string) time.Duration {
	t.Helper()
	re := regexp.MustCompile(`msg="pod VM ready".* sandbox=` + podID + `.*`)
	line := re.FindString(readHostFile(t, env.ContainerdLog))
	m := regexp.MustCompile(` start_wait=(\S+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("no start_wait in pod %s's \"pod VM ready\" line %q", podID[:12], line)
	}
	d, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatalf("start_wait %q: %v", m[1], err)
	}
	t.Logf("pod %s waited %v for its turn to start", podID[:12], d)
	return d
}
