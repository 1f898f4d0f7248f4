package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/integration/k8s"
)

// faultCase is a node fault with pods running, for every runtime class.
type faultCase struct {
	name string
	run  func(ctx context.Context, t *testing.T, k *kube, cl *k8s.Cluster, env *harness.Env)
	// alone: the case restarts a node daemon or counts what is on the node, so nothing else
	// may run beside it. The others harm only their own pod and run beside the plain cases.
	alone bool
}

var faultCases = []faultCase{
	{"kubelet_restart", testKubeletRestart, true},
	{"containerd_restart", testContainerdRestart, true},
	{"shim_killed_booting", testShimKilledBooting, true},
	{"soak", testSoak, true},
	{"guest_frozen", testGuestFrozen, false},
	{"sandbox_killed", testSandboxKilled, false},
	{"shim_killed", testShimKilled, false},
}

// survives checks that pod kept running through a fault: same container, no restart, and exec
// and logs work. It returns how long after the fault exec answered again.
func survives(ctx context.Context, t *testing.T, k *kube, before *corev1.Pod, faultAt time.Time) time.Duration {
	t.Helper()
	var recovered time.Duration
	deadline := time.Now().Add(2 * time.Minute)
	for {
		r, err := k.exec(ctx, before.Name, "c", []string{"echo", "alive"}, nil, false)
		if err == nil && r.stdout == "alive\n" {
			recovered = time.Since(faultAt)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec after the fault: %+v %v", r, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	after := k.wait(ctx, t, before.Name, time.Minute, running)
	b, a := containerStatus(before, "c"), containerStatus(after, "c")
	if a.ContainerID != b.ContainerID || a.RestartCount != 0 {
		t.Errorf("container %s (restarts %d) after the fault, was %s: the pod was not kept", a.ContainerID, a.RestartCount, b.ContainerID)
	}
	waitLog(ctx, t, k, before.Name, "c", "started")
	return recovered
}

// testKubeletRestart: the kubelet restarts (SIGTERM, then SIGKILL) with a pod running; the pod
// is kept, and exec and logs work after.
func testKubeletRestart(ctx context.Context, t *testing.T, k *kube, cl *k8s.Cluster, _ *harness.Env) {
	before := k.run(ctx, t, k.pod("kubelet-restart", sleeper))
	for _, hard := range []bool{false, true} {
		start := time.Now()
		ready, err := cl.RestartKubelet(ctx, hard)
		if err != nil {
			t.Fatalf("restart kubelet (hard=%v): %v", hard, err)
		}
		rec := survives(ctx, t, k, before, start)
		k.measure(fmt.Sprintf("kubelet restart(kill=%v): node Ready", hard), ready)
		k.measure(fmt.Sprintf("kubelet restart(kill=%v): exec", hard), rec)
	}
}

// testContainerdRestart: containerd restarts with a pod running; its shim and the pod live on,
// and kubelet, exec and logs work after.
func testContainerdRestart(ctx context.Context, t *testing.T, k *kube, _ *k8s.Cluster, env *harness.Env) {
	before := k.run(ctx, t, k.pod("containerd-restart", sleeper))
	start := time.Now()
	if err := env.RestartContainerd(ctx); err != nil {
		t.Fatalf("restart containerd: %v", err)
	}
	k.measure("containerd restart: CRI ready", time.Since(start))
	k.measure("containerd restart: exec", survives(ctx, t, k, before, start))
}

// testSandboxKilled: the pod's sandbox dies under it (SIGKILL to runc's pause process, or to
// podvm's QEMU). The kubelet sees it once, makes one new sandbox and restarts the container
// once; the old sandbox leaves nothing running.
func testSandboxKilled(ctx context.Context, t *testing.T, k *kube, _ *k8s.Cluster, env *harness.Env) {
	killAndRecover(ctx, t, k, env, "sandbox-killed", "sandbox killed → Running", sandboxProcess)
}

// testShimKilled: the pod's shim dies (SIGKILL, as the OOM killer might); for podvm its VM
// goes with it. The same recovery as testSandboxKilled.
func testShimKilled(ctx context.Context, t *testing.T, k *kube, _ *k8s.Cluster, env *harness.Env) {
	killAndRecover(ctx, t, k, env, "shim-killed", "shim killed → Running", shimProcess)
}

// killAndRecover runs a pod, SIGKILLs the process victim names for its sandbox, and checks
// the kubelet's recovery: one new sandbox, one container restart, one SandboxChanged event.
func killAndRecover(ctx context.Context, t *testing.T, k *kube, env *harness.Env, name, measure string,
	victim func(context.Context, *testing.T, *harness.Env, string, string) int) {
	p := k.run(ctx, t, k.pod(name, sleeper))
	old := podSandboxes(ctx, t, env, string(p.UID))
	if len(old) != 1 {
		t.Fatalf("%d sandboxes for the pod, want 1", len(old))
	}
	pid := victim(ctx, t, env, k.rc, old[0].Id)
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed process %d of sandbox %s (%s)", pid, old[0].Id, k.rc)
	k.wait(ctx, t, p.Name, 3*time.Minute, func(p *corev1.Pod) error {
		if cs := containerStatus(p, "c"); cs == nil || cs.RestartCount < 1 {
			return fmt.Errorf("container not restarted yet")
		}
		return running(p)
	})
	k.measure(measure, time.Since(start))
	time.Sleep(5 * time.Second) // a second, spurious restart would show by now
	after := k.wait(ctx, t, p.Name, time.Minute, running)
	ev := k.events(p.Name)
	if n := containerStatus(after, "c").RestartCount; n != 1 {
		t.Errorf("restart count %d, want 1; events:\n%s", n, ev)
	}
	if n := strings.Count(ev, "SandboxChanged"); n != 1 {
		t.Errorf("%d SandboxChanged events, want 1:\n%s", n, ev)
	}
	var ready int
	for _, s := range podSandboxes(ctx, t, env, string(p.UID)) {
		if s.Id == old[0].Id && s.State == runtimeapi.PodSandboxState_SANDBOX_READY {
			t.Errorf("the killed sandbox %s is still ready", s.Id)
		}
		if s.State == runtimeapi.PodSandboxState_SANDBOX_READY {
			ready++
		}
	}
	if ready != 1 {
		t.Errorf("%d ready sandboxes for the pod, want 1", ready)
	}
	if k.rc == "podvm" {
		if n := countQEMU(old[0].Id); n != 0 {
			t.Errorf("%d QEMU processes of the killed sandbox left", n)
		}
	}
}

func podSandboxes(ctx context.Context, t *testing.T, env *harness.Env, uid string) []*runtimeapi.PodSandbox {
	t.Helper()
	sbs, err := env.Runtime.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": uid}})
	if err != nil {
		t.Fatal(err)
	}
	return sbs
}

// sandboxProcess is the process that is the sandbox: runc's pause process, or podvm's QEMU.
func sandboxProcess(ctx context.Context, t *testing.T, env *harness.Env, rc, id string) int {
	t.Helper()
	if rc == "podvm" {
		pids := harness.QEMUs(id)
		if len(pids) != 1 {
			t.Fatalf("QEMU of sandbox %s: found %v", id, pids)
		}
		return pids[0]
	}
	resp, err := env.Runtime.PodSandboxStatus(ctx, id, true)
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(resp.GetInfo()["info"]), &info); err != nil || info.Pid == 0 {
		t.Fatalf("sandbox %s pid: %v (%q)", id, err, resp.GetInfo()["info"])
	}
	return info.Pid
}

// shimProcess is the pod's shim: containerd-shim-runc-v2 or containerd-shim-podvm-v2, the one
// started for the sandbox (-id <sandbox id>).
func shimProcess(_ context.Context, t *testing.T, env *harness.Env, rc, id string) int {
	t.Helper()
	pids := env.ShimPIDs(rc, id)
	if len(pids) != 1 {
		t.Fatalf("shim of sandbox %s: found %v", id, pids)
	}
	return pids[0]
}

func countQEMU(id string) int {
	return len(harness.QEMUs(id))
}
