package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	utilexec "k8s.io/client-go/util/exec"
	"k8s.io/streaming/pkg/httpstream"

	"github.com/podvm/podvm/integration/harness"
)

// kube is one runtime class's view of the cluster: its namespace, the client, and the
// timings it measured.
type kube struct {
	rc     string // RuntimeClass name
	ns     string
	client kubernetes.Interface
	config *rest.Config
	timing *timings
	env    *harness.Env // the node: its network namespace, containerd's CRI
	nodeIP string
	// stateDir is the podvm shim's state dir (one dir per live sandbox).
	stateDir string
	// busy is set for the cases that run side by side: their timings are of a busy node.
	busy bool
}

// measure records a timing of this runtime class, marked as taken on a busy node when cases
// run side by side, so that the table's figures of a quiet node stay apart.
func (k *kube) measure(what string, d time.Duration) {
	if k.busy {
		what += " (busy)"
	}
	k.timing.add(k.rc, what, d)
}

// pod returns a pod of this runtime class running busybox's `sh -c script` in container "c".
func (k *kube) pod(name, script string) *corev1.Pod {
	rc := k.rc
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: k.ns, Labels: map[string]string{"e2e": name}},
		Spec: corev1.PodSpec{
			RuntimeClassName:              &rc,
			TerminationGracePeriodSeconds: ptr[int64](2),
			Containers: []corev1.Container{{
				Name: "c", Image: "docker.io/library/busybox:latest", ImagePullPolicy: corev1.PullIfNotPresent,
				Command: []string{"sh", "-c", script},
			}},
		},
	}
}

func ptr[T any](v T) *T { return &v }

// create creates pod and deletes it (and waits until it is gone) when the test ends. It
// returns the pod as the API server stored it.
func (k *kube) create(ctx context.Context, t *testing.T, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	created, err := k.client.CoreV1().Pods(k.ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s: %v", pod.Name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if _, err := k.delete(ctx, pod.Name); err != nil {
			t.Errorf("delete pod %s: %v", pod.Name, err)
		}
	})
	return created
}

// delete deletes a pod and waits until the API no longer has it; it returns how long that took.
func (k *kube) delete(ctx context.Context, name string) (time.Duration, error) {
	start := time.Now()
	err := k.client.CoreV1().Pods(k.ns).Delete(ctx, name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	for {
		_, err := k.client.CoreV1().Pods(k.ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return time.Since(start), nil
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("pod %s still there: %w", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// wait polls the pod until cond holds (nil error), and fails the test after timeout with
// cond's last answer and the pod's events.
func (k *kube) wait(ctx context.Context, t *testing.T, name string, timeout time.Duration, cond func(*corev1.Pod) error) *corev1.Pod {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		p, err := k.client.CoreV1().Pods(k.ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			if last = cond(p); last == nil {
				return p
			}
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod %s: %v; events:\n%s", name, last, k.events(name))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// running is a wait condition: phase Running and every container started.
func running(p *corev1.Pod) error {
	if p.Status.Phase != corev1.PodRunning {
		return fmt.Errorf("phase %s, want Running", p.Status.Phase)
	}
	for _, cs := range p.Status.ContainerStatuses {
		if cs.State.Running == nil {
			return fmt.Errorf("container %s not running: %+v", cs.Name, cs.State)
		}
	}
	return nil
}

// ready is a wait condition: the pod's Ready condition is true.
func ready(p *corev1.Pod) error {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return nil
		}
	}
	return fmt.Errorf("not Ready (phase %s)", p.Status.Phase)
}

// terminated is a wait condition: container c has terminated (its last state, if it restarted).
func terminated(c string) func(*corev1.Pod) error {
	return func(p *corev1.Pod) error {
		if s := containerState(p, c); s != nil && s.Terminated != nil {
			return nil
		}
		return fmt.Errorf("container %s not terminated yet (phase %s)", c, p.Status.Phase)
	}
}

func containerStatus(p *corev1.Pod, name string) *corev1.ContainerStatus {
	for i := range p.Status.ContainerStatuses {
		if p.Status.ContainerStatuses[i].Name == name {
			return &p.Status.ContainerStatuses[i]
		}
	}
	return nil
}

func containerState(p *corev1.Pod, name string) *corev1.ContainerState {
	if cs := containerStatus(p, name); cs != nil {
		return &cs.State
	}
	return nil
}

// run creates pod and waits until it runs. It records apply → Running and its two halves as
// the kubelet reports them (startSteps), and logs when each step was seen.
func (k *kube) run(ctx context.Context, t *testing.T, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	start := time.Now()
	created := k.create(ctx, t, pod)
	p, steps := k.watchStart(ctx, t, created, 3*time.Minute)
	t.Logf("pod %s/%s start: %s", k.ns, pod.Name, steps)
	k.measure("apply → Running", steps.running.Sub(start))
	if !steps.sandboxReady.IsZero() {
		k.measure("apply → sandbox ready", steps.sandboxReady.Sub(start))
		k.measure("sandbox ready → Running", steps.running.Sub(steps.sandboxReady))
	}
	return p
}

// startSteps are the moments the test saw a starting pod's status change, from the watch:
// scheduled (PodScheduled), sandbox ready (PodReadyToStartContainers: the kubelet sets it as
// soon as RunPodSandbox returned and the pod's IP is known) and running (the running
// condition: the containers were created and started). For podvm the first half is the VM's
// boot, the second the containers' start in the guest (docs/e2e.md, "Where a pod's start
// goes").
type startSteps struct {
	created, scheduled, sandboxReady, running time.Time
}

func (s startSteps) String() string {
	since := func(t time.Time) string {
		if t.IsZero() {
			return "not seen"
		}
		return "+" + t.Sub(s.created).Round(time.Millisecond).String()
	}
	return fmt.Sprintf("scheduled %s, sandbox ready %s, running %s",
		since(s.scheduled), since(s.sandboxReady), since(s.running))
}

// see records the steps p's status shows, the first time each shows.
func (s *startSteps) see(p *corev1.Pod, now time.Time) {
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue {
			continue
		}
		switch {
		case c.Type == corev1.PodScheduled && s.scheduled.IsZero():
			s.scheduled = now
		case c.Type == corev1.PodReadyToStartContainers && s.sandboxReady.IsZero():
			s.sandboxReady = now
		}
	}
	if s.running.IsZero() && running(p) == nil {
		s.running = now
	}
}

// watchStart follows pod from its creation (the watch starts at the resource version create
// returned, so no change is missed) until it runs, and fails the test after timeout with the
// last status and the pod's events.
func (k *kube) watchStart(ctx context.Context, t *testing.T, pod *corev1.Pod, timeout time.Duration) (*corev1.Pod, startSteps) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	steps := startSteps{created: time.Now()}
	steps.see(pod, steps.created)
	last, err := pod, error(nil)
	for steps.running.IsZero() && err == nil {
		last, err = k.watchOnce(ctx, last, &steps)
	}
	if err != nil {
		t.Fatalf("pod %s: %v (%v, %s); events:\n%s", pod.Name, running(last), err, steps, k.events(pod.Name))
	}
	return last, steps
}

// watchOnce watches pod from its resource version until it runs or the API server ends the
// watch, and returns the last version seen.
func (k *kube) watchOnce(ctx context.Context, pod *corev1.Pod, steps *startSteps) (*corev1.Pod, error) {
	w, err := k.client.CoreV1().Pods(k.ns).Watch(ctx, metav1.ListOptions{
		FieldSelector: "metadata.name=" + pod.Name, ResourceVersion: pod.ResourceVersion})
	if err != nil {
		return pod, err
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return pod, ctx.Err()
		case ev, ok := <-w.ResultChan():
			if !ok {
				return pod, nil
			}
			p, isPod := ev.Object.(*corev1.Pod)
			if ev.Type == watch.Error || ev.Type == watch.Deleted || !isPod {
				return pod, fmt.Errorf("watch: %s event %v", ev.Type, ev.Object)
			}
			pod = p
			if steps.see(p, time.Now()); !steps.running.IsZero() {
				return pod, nil
			}
		}
	}
}

// events lists the pod's events, one a line.
func (k *kube) events(name string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs, err := k.client.CoreV1().Events(k.ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range evs.Items {
		fmt.Fprintf(&b, "  %s %s (x%d): %s\n", e.Type, e.Reason, e.Count, e.Message)
	}
	return b.String()
}

// logs returns container c's log (previous: the last terminated instance).
func (k *kube) logs(ctx context.Context, name, c string, previous bool) (string, error) {
	b, err := k.client.CoreV1().Pods(k.ns).GetLogs(name, &corev1.PodLogOptions{Container: c, Previous: previous}).DoRaw(ctx)
	return string(b), err
}

// execResult is what one exec returned.
type execResult struct {
	stdout, stderr string
	code           int
}

// exec runs cmd in container c as `kubectl exec` does: WebSocket first, SPDY if the server
// refuses the upgrade. A non-zero exit is a code, not an error.
func (k *kube) exec(ctx context.Context, name, c string, cmd []string, stdin io.Reader, tty bool) (execResult, error) {
	req := k.client.CoreV1().RESTClient().Post().Resource("pods").Namespace(k.ns).Name(name).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: c, Command: cmd, Stdin: stdin != nil, Stdout: true,
			Stderr: !tty, TTY: tty}, scheme.ParameterCodec)
	ex, err := k.executor(req.URL().String())
	if err != nil {
		return execResult{}, err
	}
	var out, errb bytes.Buffer
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: stdin, Stdout: &out, Stderr: &errb, Tty: tty})
	res := execResult{stdout: out.String(), stderr: errb.String()}
	var exitErr utilexec.CodeExitError
	if errors.As(err, &exitErr) {
		res.code = exitErr.Code
		return res, nil
	}
	return res, err
}

func (k *kube) executor(url string) (remotecommand.Executor, error) {
	u, err := parseURL(url)
	if err != nil {
		return nil, err
	}
	ws, err := remotecommand.NewWebSocketExecutor(k.config, http.MethodGet, u.String())
	if err != nil {
		return nil, err
	}
	spdy, err := remotecommand.NewSPDYExecutor(k.config, http.MethodPost, u)
	if err != nil {
		return nil, err
	}
	return remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
}

// mustExec is exec for a command that must succeed; it returns stdout.
func (k *kube) mustExec(ctx context.Context, t *testing.T, name, c string, cmd ...string) string {
	t.Helper()
	r, err := k.exec(ctx, name, c, cmd, nil, false)
	if err != nil || r.code != 0 {
		t.Fatalf("exec %v in %s/%s: code %d, err %v, stderr %q", cmd, name, c, r.code, err, r.stderr)
	}
	return r.stdout
}
