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
	pod, err := env.RunPod(ctx, harness.PodOptions{Name: "lifecycle", Namespace: "it", Handler: handler})
	if err != nil {
		t.Fatal(err)
	}
	l := &lifecycle{ctx: ctx, t: t, env: env, pod: pod}
	l.checkSandboxReady(handler)
	if _, err := env.PullImage(ctx, env.BusyboxImage, pod.Config); err != nil {
		t.Fatal(err)
	}
	main, mainLog := l.startMain()
	l.checkExecSync(main)
	l.checkStreamingExec(main)
	l.checkLog(mainLog)
	l.stopMain(main)
	l.checkExits()
	l.stopAndRemovePod()
}

// lifecycle is testPodLifecycle's pod and the steps it takes, in order. Each step fails the test
// as testPodLifecycle would: t.Fatal ends it, t.Error goes on.
type lifecycle struct {
	ctx context.Context
	t   *testing.T
	env *harness.Env
	pod *harness.Pod
}

// call runs one CRI call under callTimeout.
func (l *lifecycle) call(f func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(l.ctx, callTimeout)
	defer cancel()
	return f(ctx)
}

// checkSandboxReady: the pod is ready and its IP comes from the CNI bridge's subnet.
func (l *lifecycle) checkSandboxReady(handler string) {
	t := l.t
	t.Helper()
	var ps *runtimeapi.PodSandboxStatusResponse
	err := l.call(func(ctx context.Context) (err error) {
		ps, err = l.env.Runtime.PodSandboxStatus(ctx, l.pod.ID, false)
		return err
	})
	if err != nil {
		t.Fatalf("PodSandboxStatus %s: %v", l.pod.ID, err)
	}
	if got := ps.GetStatus().GetState(); got != runtimeapi.PodSandboxState_SANDBOX_READY {
		t.Fatalf("pod %s state = %s, want SANDBOX_READY", l.pod.ID, got)
	}
	ip := net.ParseIP(ps.GetStatus().GetNetwork().GetIp())
	if ip == nil || !l.env.Subnet.Contains(ip) {
		t.Fatalf("pod IP %q is not in the bridge subnet %s", ps.GetStatus().GetNetwork().GetIp(), l.env.Subnet)
	}
	t.Logf("pod %s (handler %q) has IP %s", l.pod.ID, handler, ip)
}

// startMain starts a long-running container with output on both streams and returns its ID
// and its CRI log.
func (l *lifecycle) startMain() (id, logPath string) {
	t := l.t
	t.Helper()
	main, mainLog, err := l.env.CreateContainer(l.ctx, l.pod, harness.ContainerOptions{
		Name:    "main",
		Command: []string{"sh", "-c", "echo hello; echo oops >&2; sleep 3600"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.call(func(ctx context.Context) error { return l.env.Runtime.StartContainer(ctx, main) }); err != nil {
		t.Fatalf("StartContainer %s: %v", main, err)
	}
	err = l.call(func(ctx context.Context) error {
		_, err := l.env.WaitContainerState(ctx, main, runtimeapi.ContainerState_CONTAINER_RUNNING)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return main, mainLog
}

// checkExecSync: ExecSync, as kubelet's exec probes do, with its output and exit code.
func (l *lifecycle) checkExecSync(main string) {
	t := l.t
	t.Helper()
	var stdout, stderr []byte
	err := l.call(func(ctx context.Context) (err error) {
		stdout, stderr, err = l.env.Runtime.ExecSync(ctx, main, []string{"echo", "hi"}, 30*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("ExecSync echo hi: %v (stdout %q, stderr %q)", err, stdout, stderr)
	}
	if string(stdout) != "hi\n" || len(stderr) != 0 {
		t.Errorf("ExecSync echo hi: stdout %q, stderr %q; want \"hi\\n\" and nothing", stdout, stderr)
	}
	err = l.call(func(ctx context.Context) error {
		_, _, err := l.env.Runtime.ExecSync(ctx, main, []string{"sh", "-c", "exit 7"}, 30*time.Second)
		return err
	})
	if code := execSyncExitCode(err); code != 7 {
		t.Errorf("ExecSync `exit 7`: exit code %d (err %v), want 7", code, err)
	}
}

// checkStreamingExec: a streaming exec, as `kubectl exec -i` through kubelet does; the end of
// stdin reaches the process, and everything before it: `kubectl exec -i -- cat` and `kubectl
// cp` (tar reading to EOF) return, byte-exact. More than a pipe holds.
func (l *lifecycle) checkStreamingExec(main string) {
	t := l.t
	t.Helper()
	var out, errOut bytes.Buffer
	var code int
	err := l.call(func(ctx context.Context) (err error) {
		code, err = l.env.Exec(ctx, main, []string{"sh", "-c", "read x; echo got $x; echo err >&2; exit 3"},
			harness.StreamOptions{Stdin: strings.NewReader("abc\n"), Stdout: &out, Stderr: &errOut})
		return err
	})
	if err != nil {
		t.Fatalf("streaming exec: %v", err)
	}
	if code != 3 || out.String() != "got abc\n" || errOut.String() != "err\n" {
		t.Errorf("streaming exec: exit %d, stdout %q, stderr %q; want 3, \"got abc\\n\", \"err\\n\"", code, out.String(), errOut.String())
	}

	payload := bytes.Repeat([]byte("0123456789abcdef"), 12<<10)
	var catOut bytes.Buffer
	sctx, scancel := context.WithTimeout(l.ctx, 60*time.Second)
	code, err = l.env.Exec(sctx, main, []string{"cat"}, harness.StreamOptions{Stdin: bytes.NewReader(payload), Stdout: &catOut})
	scancel()
	if err != nil || code != 0 || !bytes.Equal(catOut.Bytes(), payload) {
		t.Errorf("exec -i cat with %d bytes piped in: exit %d, err %v, %d bytes back (equal: %v); want them all back and exit 0",
			len(payload), code, err, catOut.Len(), bytes.Equal(catOut.Bytes(), payload))
	}
}

// checkLog: the CRI log file has both streams, in CRI format.
func (l *lifecycle) checkLog(mainLog string) {
	t := l.t
	t.Helper()
	var lines []harness.LogLine
	err := l.call(func(ctx context.Context) (err error) {
		lines, err = harness.WaitLog(ctx, mainLog, "stderr", "oops\n")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := harness.StreamText(lines, "stdout"); got != "hello\n" {
		t.Errorf("log %s: stdout %q, want \"hello\\n\"", mainLog, got)
	}
	if got := harness.StreamText(lines, "stderr"); got != "oops\n" {
		t.Errorf("log %s: stderr %q, want \"oops\\n\"", mainLog, got)
	}
}

// stopMain: StopContainer. sh runs as the container's PID 1 and has no SIGTERM handler, so the
// kernel drops SIGTERM; after the grace period the runtime kills it: 128+SIGKILL. Then
// RemoveContainer.
func (l *lifecycle) stopMain(main string) {
	t := l.t
	t.Helper()
	start := time.Now()
	if err := l.call(func(ctx context.Context) error { return l.env.Runtime.StopContainer(ctx, main, 2) }); err != nil {
		t.Fatalf("StopContainer %s: %v", main, err)
	}
	t.Logf("StopContainer with a 2s grace period took %v", time.Since(start).Round(time.Millisecond))
	assertExited(l.ctx, t, l.env, main, 137, "Error")
	if err := l.call(func(ctx context.Context) error { return l.env.Runtime.RemoveContainer(ctx, main) }); err != nil {
		t.Fatalf("RemoveContainer %s: %v", main, err)
	}
}

// checkExits: containers that exit on their own report their exit codes and reasons.
func (l *lifecycle) checkExits() {
	t := l.t
	t.Helper()
	for _, tc := range []struct {
		name   string
		script string
		code   int32
		reason string
	}{
		{"succeeds", "exit 0", 0, "Completed"},
		{"fails", "echo bad >&2; exit 1", 1, "Error"},
	} {
		id, _, err := l.env.CreateContainer(l.ctx, l.pod, harness.ContainerOptions{Name: tc.name, Command: []string{"sh", "-c", tc.script}})
		if err != nil {
			t.Fatal(err)
		}
		if err := l.call(func(ctx context.Context) error { return l.env.Runtime.StartContainer(ctx, id) }); err != nil {
			t.Fatalf("StartContainer %s: %v", tc.name, err)
		}
		assertExited(l.ctx, t, l.env, id, tc.code, tc.reason)
	}
}

// stopAndRemovePod: StopPodSandbox is retried by kubelet, so a second call must succeed too;
// the pod is then NOTREADY, and gone from the list once removed.
func (l *lifecycle) stopAndRemovePod() {
	t := l.t
	t.Helper()
	id := l.pod.ID
	for i := 1; i <= 2; i++ {
		if err := l.call(func(ctx context.Context) error { return l.env.Runtime.StopPodSandbox(ctx, id) }); err != nil {
			t.Fatalf("StopPodSandbox %s (call %d): %v", id, i, err)
		}
	}
	var ps *runtimeapi.PodSandboxStatusResponse
	err := l.call(func(ctx context.Context) (err error) {
		ps, err = l.env.Runtime.PodSandboxStatus(ctx, id, false)
		return err
	})
	if err != nil {
		t.Fatalf("PodSandboxStatus after stop: %v", err)
	}
	if got := ps.GetStatus().GetState(); got != runtimeapi.PodSandboxState_SANDBOX_NOTREADY {
		t.Errorf("pod state after StopPodSandbox = %s, want SANDBOX_NOTREADY", got)
	}
	if err := l.call(func(ctx context.Context) error { return l.env.Runtime.RemovePodSandbox(ctx, id) }); err != nil {
		t.Fatalf("RemovePodSandbox %s: %v", id, err)
	}
	var pods []*runtimeapi.PodSandbox
	err = l.call(func(ctx context.Context) (err error) {
		pods, err = l.env.Runtime.ListPodSandbox(ctx, nil)
		return err
	})
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
