package integration

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/integration/harness"
)

// bootDeadline is both the RunPodSandbox deadline and the shim's agent_timeout in
// TestPodvmFrozenGuestAtDeadline: the two give up on a frozen guest at about the same moment.
// Each case waits it out, so it is short; a guest reaches the latest point where the test
// freezes it (its agent serving) within a few seconds even on a slow TCG machine.
const bootDeadline = 10 * time.Second

// TestPodvmFrozenGuestAtDeadline freezes a pod's guest while its sandbox boots, with the CRI
// call's deadline and the shim's agent_timeout equal, so that containerd gives up on the shim
// while the shim is still giving up on the guest. RunPodSandbox fails; containerd rolls the
// sandbox back (its task delete, the shim's Shutdown, `containerd-shim-podvm-v2 delete`);
// once it has, nothing of the pod may be left: no state dir, QEMU, virtiofsd or shim. kubelet
// then retries, and that pod runs and goes as usual. The guest freezes before its agent
// listens (the shim waits to connect), once it does (the shim connected, or is about to, and
// waits for the guest's setup), or right after it was restored from a VM template.
func TestPodvmFrozenGuestAtDeadline(t *testing.T) {
	plain := func(t *testing.T) harness.Options { return bootedShimOptions(t, ownStateDir(t, "pvd-")) }
	for name, c := range map[string]frozenBoot{
		"booting":  {options: plain, frozen: consoleHas("")},
		"agent up": {options: plain, frozen: consoleHas("podvm-agent: serving on")},
		"restored": {
			options: func(t *testing.T) harness.Options { return podvmTemplateOptions(t, "pvdt-") },
			prepare: func(ctx context.Context, t *testing.T, env *harness.Env) {
				removePod(ctx, t, env, runPod(ctx, t, env, "podvm", "builds-the-template"))
			},
			frozen: resumed,
		},
	} {
		t.Run(name, func(t *testing.T) { testFrozenGuestAtDeadline(t, c) })
	}
}

// frozenBoot is one way TestPodvmFrozenGuestAtDeadline's pod boots and when its guest freezes.
type frozenBoot struct {
	// options are the env's; its podvm state dir is LeakDirs[0].
	options func(t *testing.T) harness.Options
	// prepare, if set, runs before the pod whose guest freezes.
	prepare func(ctx context.Context, t *testing.T, env *harness.Env)
	// frozen says whether the pod VM with state dir podDir is to be frozen now.
	frozen func(env *harness.Env, podDir string) bool
}

// consoleHas freezes a guest once its console has marker ("": anything).
func consoleHas(marker string) func(*harness.Env, string) bool {
	return func(_ *harness.Env, podDir string) bool {
		console, err := os.ReadFile(filepath.Join(podDir, qemu.ConsoleLog))
		return err == nil && len(console) > 0 && strings.Contains(string(console), marker)
	}
}

// resumed freezes a guest restored from a template once QEMU runs it again (the shim logs
// QEMU's RESUME event), before the shim made it the pod's own.
func resumed(env *harness.Env, podDir string) bool {
	b, _ := os.ReadFile(env.ContainerdLog)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "event=RESUME") && strings.Contains(l, "vm="+filepath.Base(podDir)) {
			return true
		}
	}
	return false
}

// testFrozenGuestAtDeadline is TestPodvmFrozenGuestAtDeadline for one frozenBoot.
func testFrozenGuestAtDeadline(t *testing.T, c frozenBoot) {
	opts := c.options(t)
	stateDir := opts.LeakDirs[0]
	setAgentTimeout(t, opts.PodvmConfigPath, bootDeadline)
	opts.LeakProcessNames = []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"}
	env := harness.Start(t, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	if c.prepare != nil {
		c.prepare(ctx, t, env)
	}

	frozen := make(chan int, 1)
	go func() { frozen <- freezeBootingGuest(ctx, env, stateDir, c.frozen) }()
	cfg := env.PodSandboxConfig(harness.PodOptions{Name: "frozen-boot", Namespace: "it"})
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithTimeout(ctx, bootDeadline)
	start := time.Now()
	id, err := env.Runtime.RunPodSandbox(rctx, cfg, "podvm")
	rcancel()
	pid := <-frozen
	if pid > 0 {
		t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	}
	if err == nil {
		t.Fatalf("RunPodSandbox of a pod whose guest froze while booting succeeded (%s); the test did not freeze it (QEMU pid %d)", id, pid)
	}
	if pid <= 0 {
		t.Fatalf("RunPodSandbox failed before the test could freeze the guest: %v", err)
	}
	t.Logf("RunPodSandbox with the guest frozen failed after %v: %v", time.Since(start).Round(time.Millisecond), err)

	// containerd goes on after kubelet's call gave up: it deletes the half-made task, shuts the
	// shim down, runs `shim delete` and removes the sandbox; its log says when it is done.
	if err := waitLog(ctx, env, "RunPodSandbox for", "failed", time.Minute); err != nil {
		t.Fatal(err)
	}
	// What kubelet's garbage collection does with sandboxes of the pod it still sees.
	sbs, err := env.Runtime.ListPodSandbox(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range sbs {
		t.Logf("sandbox %s left after the failed RunPodSandbox (%v): removing it", sb.Id, sb.State)
		stopAndRemovePod(t, ctx, env, sb.Id)
	}
	// The state dir goes before containerd is done (it waits for the shim's clean-up); the
	// processes exit a moment after.
	for _, l := range append(stateDirLeftovers(stateDir, opts.LeakDirsKeep), processLeftovers(env, stateDir, 5*time.Second)...) {
		t.Errorf("after containerd rolled back the failed RunPodSandbox: %s", l)
	}

	// kubelet retries; the pod runs, and goes without a trace.
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "frozen-boot", Namespace: "it", Handler: "podvm"})
	startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	stopAndRemovePod(t, ctx, env, pod.ID)
	env.AssertNoLeaks(t)
}

// setAgentTimeout sets [sandbox] agent_timeout in the node config at path.
func setAgentTimeout(t *testing.T, path string, d time.Duration) {
	t.Helper()
	setSandboxOption(t, path, "agent_timeout", `"`+d.String()+`"`)
}

// freezeBootingGuest stops (SIGSTOP) the QEMU of the first pod VM in stateDir for which
// frozen holds. It returns QEMU's pid, or 0 if ctx ended first.
func freezeBootingGuest(ctx context.Context, env *harness.Env, stateDir string, frozen func(*harness.Env, string) bool) int {
	for ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
		pids, _ := filepath.Glob(filepath.Join(stateDir, "*", qemu.QEMUPidFile))
		for _, pf := range pids {
			if !frozen(env, filepath.Dir(pf)) {
				continue
			}
			b, err := os.ReadFile(pf)
			if err != nil {
				continue
			}
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil || pid <= 0 {
				continue
			}
			if syscall.Kill(pid, syscall.SIGSTOP) == nil {
				return pid
			}
		}
	}
	return 0
}

// waitLog waits until containerd's log has a line with all of words.
func waitLog(ctx context.Context, env *harness.Env, first, second string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		b, _ := os.ReadFile(env.ContainerdLog)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, first) && strings.Contains(l, second) {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("containerd's log never said " + strconv.Quote(first+" … "+second))
}

// stateDirLeftovers lists the entries of stateDir but those named in keep (node-wide files).
func stateDirLeftovers(stateDir string, keep []string) []string {
	var left []string
	entries, _ := os.ReadDir(stateDir)
	for _, e := range entries {
		if !slices.Contains(keep, e.Name()) {
			left = append(left, "state dir entry "+filepath.Join(stateDir, e.Name()))
		}
	}
	return left
}

// processLeftovers lists, once they stop going away or grace is over, the processes naming
// stateDir or the env's run dir (QEMU, virtiofsd, shims).
func processLeftovers(env *harness.Env, stateDir string, grace time.Duration) []string {
	deadline := time.Now().Add(grace)
	for {
		var left []string
		for _, pat := range []string{stateDir, "containerd-shim-podvm-v2 .*" + env.RunDir} {
			out, _ := exec.Command("pgrep", "-a", "-f", pat).Output()
			for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
				if l != "" && !strings.Contains(l, "pgrep") {
					left = append(left, "process "+l)
				}
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(200 * time.Millisecond)
	}
}
