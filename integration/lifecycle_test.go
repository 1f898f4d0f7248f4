package integration

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// callTimeout bounds each step of the lifecycle; a VM-backed handler gets the same budget.
const callTimeout = 2 * time.Minute

// testPodLifecycle drives one pod through what kubelet does over its life, against handler. It
// is the same for every runtime: runc proves the harness and the expectations, podvm must match.
func testPodLifecycle(t *testing.T, env *harness.Env, handler string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	step := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, callTimeout) }

	pod, err := env.RunPod(ctx, harness.PodOptions{Name: "lifecycle", Namespace: "it", Handler: handler})
	if err != nil {
		t.Fatal(err)
	}

	// The pod IP comes from the CNI bridge's subnet.
	sctx, scancel := step()
	ps, err := env.Runtime.PodSandboxStatus(sctx, pod.ID, false)
	scancel()
	if err != nil {
		t.Fatalf("PodSandboxStatus %s: %v", pod.ID, err)
	}
	if got := ps.GetStatus().GetState(); got != runtimeapi.PodSandboxState_SANDBOX_READY {
		t.Fatalf("pod %s state = %s, want SANDBOX_READY", pod.ID, got)
	}
	ip := net.ParseIP(ps.GetStatus().GetNetwork().GetIp())
	if ip == nil || !env.Subnet.Contains(ip) {
		t.Fatalf("pod IP %q is not in the bridge subnet %s", ps.GetStatus().GetNetwork().GetIp(), env.Subnet)
	}
	t.Logf("pod %s (handler %q) has IP %s", pod.ID, handler, ip)

	if _, err := env.PullImage(ctx, env.BusyboxImage, pod.Config); err != nil {
		t.Fatal(err)
	}

	// A long-running container with output on both streams.
	main, mainLog, err := env.CreateContainer(ctx, pod, harness.ContainerOptions{
		Name:    "main",
		Command: []string{"sh", "-c", "echo hello; echo oops >&2; sleep 3600"},
	})
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel = step()
	err = env.Runtime.StartContainer(sctx, main)
	scancel()
	if err != nil {
		t.Fatalf("StartContainer %s: %v", main, err)
	}
	wctx, wcancel := step()
	_, err = env.WaitContainerState(wctx, main, runtimeapi.ContainerState_CONTAINER_RUNNING)
	wcancel()
	if err != nil {
		t.Fatal(err)
	}

	// ExecSync, as kubelet's exec probes do.
	sctx, scancel = step()
	stdout, stderr, err := env.Runtime.ExecSync(sctx, main, []string{"echo", "hi"}, 30*time.Second)
	scancel()
	if err != nil {
		t.Fatalf("ExecSync echo hi: %v (stdout %q, stderr %q)", err, stdout, stderr)
	}
	if string(stdout) != "hi\n" || len(stderr) != 0 {
		t.Errorf("ExecSync echo hi: stdout %q, stderr %q; want \"hi\\n\" and nothing", stdout, stderr)
	}
	sctx, scancel = step()
	_, _, err = env.Runtime.ExecSync(sctx, main, []string{"sh", "-c", "exit 7"}, 30*time.Second)
	scancel()
	if code := execSyncExitCode(err); code != 7 {
		t.Errorf("ExecSync `exit 7`: exit code %d (err %v), want 7", code, err)
	}

	// Streaming exec, as `kubectl exec -i` through kubelet does.
	var out, errOut bytes.Buffer
	sctx, scancel = step()
	code, err := env.Exec(sctx, main, []string{"sh", "-c", "read x; echo got $x; echo err >&2; exit 3"},
		harness.StreamOptions{Stdin: strings.NewReader("abc\n"), Stdout: &out, Stderr: &errOut})
	scancel()
	if err != nil {
		t.Fatalf("streaming exec: %v", err)
	}
	if code != 3 || out.String() != "got abc\n" || errOut.String() != "err\n" {
		t.Errorf("streaming exec: exit %d, stdout %q, stderr %q; want 3, \"got abc\\n\", \"err\\n\"", code, out.String(), errOut.String())
	}

	// The end of stdin reaches the process, and everything before it: `kubectl exec -i -- cat`
	// and `kubectl cp` (tar reading to EOF) return, byte-exact. More than a pipe holds.
	payload := bytes.Repeat([]byte("0123456789abcdef"), 12<<10)
	var catOut bytes.Buffer
	sctx, scancel = context.WithTimeout(ctx, 60*time.Second)
	code, err = env.Exec(sctx, main, []string{"cat"}, harness.StreamOptions{Stdin: bytes.NewReader(payload), Stdout: &catOut})
	scancel()
	if err != nil || code != 0 || !bytes.Equal(catOut.Bytes(), payload) {
		t.Errorf("exec -i cat with %d bytes piped in: exit %d, err %v, %d bytes back (equal: %v); want them all back and exit 0",
			len(payload), code, err, catOut.Len(), bytes.Equal(catOut.Bytes(), payload))
	}

	// The CRI log file has both streams, in CRI format.
	lctx, lcancel := step()
	lines, err := harness.WaitLog(lctx, mainLog, "stderr", "oops\n")
	lcancel()
	if err != nil {
		t.Fatal(err)
	}
	if got := harness.StreamText(lines, "stdout"); got != "hello\n" {
		t.Errorf("log %s: stdout %q, want \"hello\\n\"", mainLog, got)
	}
	if got := harness.StreamText(lines, "stderr"); got != "oops\n" {
		t.Errorf("log %s: stderr %q, want \"oops\\n\"", mainLog, got)
	}

	// StopContainer: sh runs as the container's PID 1 and has no SIGTERM handler, so the
	// kernel drops SIGTERM; after the grace period the runtime kills it: 128+SIGKILL.
	start := time.Now()
	sctx, scancel = step()
	err = env.Runtime.StopContainer(sctx, main, 2)
	scancel()
	if err != nil {
		t.Fatalf("StopContainer %s: %v", main, err)
	}
	t.Logf("StopContainer with a 2s grace period took %v", time.Since(start).Round(time.Millisecond))
	assertExited(ctx, t, env, main, 137, "Error")
	sctx, scancel = step()
	err = env.Runtime.RemoveContainer(sctx, main)
	scancel()
	if err != nil {
		t.Fatalf("RemoveContainer %s: %v", main, err)
	}

	// Containers that exit on their own report their exit codes and reasons.
	for _, tc := range []struct {
		name   string
		script string
		code   int32
		reason string
	}{
		{"succeeds", "exit 0", 0, "Completed"},
		{"fails", "echo bad >&2; exit 1", 1, "Error"},
	} {
		id, _, err := env.CreateContainer(ctx, pod, harness.ContainerOptions{Name: tc.name, Command: []string{"sh", "-c", tc.script}})
		if err != nil {
			t.Fatal(err)
		}
		sctx, scancel = step()
		err = env.Runtime.StartContainer(sctx, id)
		scancel()
		if err != nil {
			t.Fatalf("StartContainer %s: %v", tc.name, err)
		}
		assertExited(ctx, t, env, id, tc.code, tc.reason)
	}

	// StopPodSandbox is retried by kubelet, so a second call must succeed too.
	for i := 1; i <= 2; i++ {
		sctx, scancel = step()
		err = env.Runtime.StopPodSandbox(sctx, pod.ID)
		scancel()
		if err != nil {
			t.Fatalf("StopPodSandbox %s (call %d): %v", pod.ID, i, err)
		}
	}
	sctx, scancel = step()
	ps, err = env.Runtime.PodSandboxStatus(sctx, pod.ID, false)
	scancel()
	if err != nil {
		t.Fatalf("PodSandboxStatus after stop: %v", err)
	}
	if got := ps.GetStatus().GetState(); got != runtimeapi.PodSandboxState_SANDBOX_NOTREADY {
		t.Errorf("pod state after StopPodSandbox = %s, want SANDBOX_NOTREADY", got)
	}
	sctx, scancel = step()
	err = env.Runtime.RemovePodSandbox(sctx, pod.ID)
	scancel()
	if err != nil {
		t.Fatalf("RemovePodSandbox %s: %v", pod.ID, err)
	}
	sctx, scancel = step()
	pods, err := env.Runtime.ListPodSandbox(sctx, nil)
	scancel()
	if err != nil {
		t.Fatalf("ListPodSandbox: %v", err)
	}
	if len(pods) != 0 {
		t.Errorf("ListPodSandbox after RemovePodSandbox: %d pods left, want none", len(pods))
	}
}

// assertExited waits for a container to exit and checks its exit code and reason.
func assertExited(ctx context.Context, t *testing.T, env *harness.Env, id string, code int32, reason string) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	st, err := env.WaitContainerState(wctx, id, runtimeapi.ContainerState_CONTAINER_EXITED)
	if err != nil {
		t.Fatal(err)
	}
	if st.GetExitCode() != code || st.GetReason() != reason {
		t.Errorf("container %s (%s) exited with code %d reason %q (message %q); want %d %q",
			id, st.GetMetadata().GetName(), st.GetExitCode(), st.GetReason(), st.GetMessage(), code, reason)
	}
}

// execSyncExitCode extracts the exit code from cri-client's ExecSync error (nil means 0).
func execSyncExitCode(err error) int {
	if err == nil {
		return 0
	}
	// cri-client returns k8s.io/utils/exec.CodeExitError; match its method, not its type.
	var exitErr interface{ ExitStatus() int }
	if errors.As(err, &exitErr) {
		return exitErr.ExitStatus()
	}
	return -1
}
