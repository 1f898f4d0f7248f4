package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// cases run for every runtime class, in this order, with the same assertions.
var cases = []testCase{
	{"run_logs_delete", testRunLogsDelete},
	{"exec", testExec},
	{"exit_codes", testExitCodes},
	{"cp", testCopy},
	{"port_forward", testPortForward},
	{"probes", testProbes},
	{"init_containers", testInitContainers},
	{"volumes", testVolumes},
	{"oom_killed", testOOMKilled},
	{"host_network", testHostNetwork},
	{"deployment_3", testDeployment},
	{"iptables_init", testIptablesInit},
	{"bridge", testBridge},
	{"attach", testAttach},
	{"hooks_and_grace", testHooksAndGrace},
	{"job", testJob},
	{"more_volumes", testMoreVolumes},
	{"emptydir_memory", testEmptyDirMemory},
	{"pod_network", testPodNetwork},
	{"limits", testLimits},
	{"resize", testResize},
	{"debug_container", testDebug},
}

const sleeper = "echo started; exec sleep 3600"

// testRunLogsDelete: apply → Running, the log (stdout and stderr) and its follow stream, and a
// delete that completes.
func testRunLogsDelete(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("logs", `echo out-line; echo err-line >&2; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done`)
	k.run(ctx, t, pod)
	waitLog(ctx, t, k, "logs", "c", "tick 1")
	logs, err := k.logs(ctx, "logs", "c", false)
	if err != nil || !strings.Contains(logs, "out-line\n") || !strings.Contains(logs, "err-line\n") {
		t.Fatalf("logs: %v\n%s", err, logs)
	}
	// kubectl logs -f: lines written after the request arrive on the open stream.
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	stream, err := k.client.CoreV1().Pods(k.ns).GetLogs("logs", &corev1.PodLogOptions{Follow: true, TailLines: ptr[int64](1)}).Stream(fctx)
	if err != nil {
		t.Fatalf("logs -f: %v", err)
	}
	defer func() { _ = stream.Close() }()
	sc := bufio.NewScanner(stream)
	var seen []string
	for len(seen) < 5 && sc.Scan() {
		seen = append(seen, sc.Text())
	}
	if len(seen) < 5 || !strings.HasPrefix(seen[4], "tick ") {
		t.Fatalf("logs -f gave %q (%v), want 5 tick lines", seen, sc.Err())
	}
	d, err := k.delete(ctx, "logs")
	if err != nil {
		t.Fatal(err)
	}
	k.measure("delete (grace 2s)", d)
}

func waitLog(ctx context.Context, t *testing.T, k *kube, pod, c, want string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		logs, err := k.logs(ctx, pod, c, false)
		if err == nil && strings.Contains(logs, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("log of %s/%s has no %q after 1m: %v\n%s", pod, c, want, err, logs)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// testExec: kubectl exec without stdin, with piped stdin (its EOF ends the command, whose
// output and exit code come back), with a TTY, and a missing command.
func testExec(ctx context.Context, t *testing.T, k *kube) {
	k.run(ctx, t, k.pod("exec", sleeper))
	ectx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()

	r, err := k.exec(ectx, "exec", "c", []string{"sh", "-c", "echo out; echo err >&2; exit 3"}, nil, false)
	if err != nil || r.stdout != "out\n" || r.stderr != "err\n" || r.code != 3 {
		t.Errorf("exec without stdin: %+v, %v; want out/err/3", r, err)
	}

	input := bytes.Repeat([]byte("piped input 0123456789\n"), 4096) // 94 KB
	r, err = k.exec(ectx, "exec", "c", []string{"sh", "-c", "cat; exit 5"}, bytes.NewReader(input), false)
	if err != nil || r.stdout != string(input) || r.code != 5 {
		t.Errorf("exec with stdin: %d bytes back of %d, code %d, err %v (stdin's EOF must end cat)", len(r.stdout), len(input), r.code, err)
	}
	r, err = k.exec(ectx, "exec", "c", []string{"wc", "-c"}, strings.NewReader("12345"), false)
	if err != nil || strings.TrimSpace(r.stdout) != "5" || r.code != 0 {
		t.Errorf("exec wc -c with stdin: %+v, %v", r, err)
	}

	r, err = k.exec(ectx, "exec", "c", []string{"sh", "-c", "tty; exit 4"}, nil, true)
	if err != nil || !strings.HasPrefix(r.stdout, "/dev/pts/") || r.code != 4 {
		t.Errorf("exec -t: %+v, %v; want a /dev/pts/N tty and code 4", r, err)
	}

	r, err = k.exec(ectx, "exec", "c", []string{"/no/such/command"}, nil, false)
	if err == nil && r.code == 0 {
		t.Errorf("exec of a missing command succeeded: %+v", r)
	}
	t.Logf("exec of a missing command: code %d, err %v, stderr %q", r.code, err, r.stderr)
}

// testExitCodes: a container's exit code reaches the pod status, and restartPolicy decides.
func testExitCodes(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("exit", "exit 7")
	pod.Spec.RestartPolicy = corev1.RestartPolicyNever
	k.create(ctx, t, pod)
	p := k.wait(ctx, t, "exit", 3*time.Minute, func(p *corev1.Pod) error {
		if p.Status.Phase != corev1.PodFailed {
			return fmt.Errorf("phase %s, want Failed", p.Status.Phase)
		}
		return nil
	})
	if s := containerState(p, "c"); s == nil || s.Terminated == nil || s.Terminated.ExitCode != 7 {
		t.Errorf("container state %+v, want terminated with exit code 7", s)
	}

	ok := k.pod("exit-ok", "exit 0")
	ok.Spec.RestartPolicy = corev1.RestartPolicyOnFailure
	k.create(ctx, t, ok)
	k.wait(ctx, t, "exit-ok", 3*time.Minute, func(p *corev1.Pod) error {
		if p.Status.Phase != corev1.PodSucceeded {
			return fmt.Errorf("phase %s, want Succeeded", p.Status.Phase)
		}
		return nil
	})
}

// testCopy: kubectl cp both ways (tar over exec), byte-exact, for a 1 MiB random file.
func testCopy(ctx context.Context, t *testing.T, k *kube) {
	k.run(ctx, t, k.pod("cp", sleeper))
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	sum := sha256.Sum256(data)
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := k.cpTo(cctx, "cp", "c", "/tmp", "in.bin", data); err != nil {
		t.Fatalf("cp into the pod: %v", err)
	}
	got := k.mustExec(cctx, t, "cp", "c", "sha256sum", "/tmp/in.bin")
	if !strings.HasPrefix(got, hex.EncodeToString(sum[:])) {
		t.Fatalf("cp into the pod: sha256 in the pod %q, want %x", got, sum)
	}
	k.mustExec(cctx, t, "cp", "c", "cp", "/tmp/in.bin", "/tmp/out.bin")
	back, err := k.cpFrom(cctx, "cp", "c", "/tmp", "out.bin")
	if err != nil {
		t.Fatalf("cp out of the pod: %v", err)
	}
	if !bytes.Equal(back, data) {
		t.Fatalf("cp out of the pod: %d bytes, not the %d sent", len(back), len(data))
	}
}

// httpdScript serves /www/index.html (body) on port 8080 with busybox httpd.
func httpdScript(body string) string {
	return fmt.Sprintf("mkdir -p /www && echo -n %s > /www/index.html && exec httpd -f -p 8080 -h /www", body)
}

// testPortForward: kubectl port-forward to an HTTP server in the pod.
func testPortForward(ctx context.Context, t *testing.T, k *kube) {
	// As a user would, wait until the server listens (kubectl port-forward ends at the first
	// connection the pod refuses).
	pod := k.pod("pf", httpdScript("pf-"+k.rc))
	pod.Spec.Containers[0].ReadinessProbe = &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr(8080)}}, PeriodSeconds: 1}
	k.create(ctx, t, pod)
	k.wait(ctx, t, "pf", 3*time.Minute, ready)
	addr := k.portForward(t, "pf", 8080)
	var body string
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := httpGet(ctx, "http://"+addr+"/index.html")
		if err == nil {
			body = b
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET through port-forward: %v", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if body != "pf-"+k.rc {
		t.Fatalf("GET through port-forward: %q, want %q", body, "pf-"+k.rc)
	}
}

func httpGet(ctx context.Context, url string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
	if err != nil {
		return "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s", resp.Status)
	}
	return string(b), err
}

// testProbes: a startup probe gates the others, a readiness httpGet makes the pod Ready, and a
// failing liveness exec probe restarts the container, which becomes Ready again.
func testProbes(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("probes", "touch /tmp/alive; sleep 2; touch /tmp/started; "+httpdScript("ok"))
	c := &pod.Spec.Containers[0]
	c.StartupProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "-f", "/tmp/started"}}},
		PeriodSeconds: 1, FailureThreshold: 60}
	c.ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/index.html", Port: intstr(8080)}},
		PeriodSeconds: 1}
	// A probe that only runs slowly on a busy node (cases run side by side) is not a failure.
	c.LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "-f", "/tmp/alive"}}},
		PeriodSeconds: 1, FailureThreshold: 2, TimeoutSeconds: 10}
	start := time.Now()
	k.create(ctx, t, pod)
	k.wait(ctx, t, "probes", 3*time.Minute, ready)
	k.measure("apply → Ready (probes)", time.Since(start))

	k.mustExec(ctx, t, "probes", "c", "rm", "/tmp/alive")
	p := k.wait(ctx, t, "probes", 2*time.Minute, func(p *corev1.Pod) error {
		cs := containerStatus(p, "c")
		if cs == nil || cs.RestartCount < 1 {
			return fmt.Errorf("not restarted by the liveness probe yet")
		}
		return ready(p)
	})
	if n := containerStatus(p, "c").RestartCount; n != 1 {
		t.Errorf("restart count %d after one liveness failure, want 1", n)
	}
	if ev := k.events("probes"); !strings.Contains(ev, "Liveness probe failed") {
		t.Errorf("no 'Liveness probe failed' event:\n%s", ev)
	}
}

// testInitContainers: init containers run in order, to completion, sharing an emptyDir with
// the app container.
func testInitContainers(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("init", "cat /work/msg; exec sleep 3600")
	vm := []corev1.VolumeMount{{Name: "work", MountPath: "/work"}}
	pod.Spec.Volumes = []corev1.Volume{{Name: "work", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
	pod.Spec.Containers[0].VolumeMounts = vm
	for i, s := range []string{"echo first > /work/msg", "echo second >> /work/msg"} {
		pod.Spec.InitContainers = append(pod.Spec.InitContainers, corev1.Container{
			Name: fmt.Sprintf("init%d", i), Image: pod.Spec.Containers[0].Image, ImagePullPolicy: corev1.PullIfNotPresent,
			Command: []string{"sh", "-c", s}, VolumeMounts: vm,
		})
	}
	p := k.run(ctx, t, pod)
	for _, s := range p.Status.InitContainerStatuses {
		if s.State.Terminated == nil || s.State.Terminated.ExitCode != 0 {
			t.Errorf("init container %s: %+v, want terminated with 0", s.Name, s.State)
		}
	}
	waitLog(ctx, t, k, "init", "c", "first\nsecond\n")
}

// testVolumes: emptyDir, configMap (and an update reaching the pod), secret, downwardAPI and
// the projected service account token, as files in the container.
func testVolumes(ctx context.Context, t *testing.T, k *kube) {
	cms := k.client.CoreV1().ConfigMaps(k.ns)
	if _, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cm"}, Data: map[string]string{"key": "v1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cms.Delete(context.Background(), "cm", metav1.DeleteOptions{}) })
	secrets := k.client.CoreV1().Secrets(k.ns)
	if _, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sec"}, StringData: map[string]string{"pw": "s3cret"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = secrets.Delete(context.Background(), "sec", metav1.DeleteOptions{}) })

	pod := k.pod("vols", "echo disk > /scratch/f && "+sleeper)
	pod.Spec.Volumes = []corev1.Volume{
		{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		{Name: "cm", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cm"}}}},
		{Name: "sec", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec"}}},
		{Name: "dapi", VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{Items: []corev1.DownwardAPIVolumeFile{
			{Path: "name", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}},
			{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}},
		}}}},
	}
	pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{
		{Name: "scratch", MountPath: "/scratch"}, {Name: "cm", MountPath: "/cm"},
		{Name: "sec", MountPath: "/sec"}, {Name: "dapi", MountPath: "/dapi"},
	}
	k.run(ctx, t, pod)
	for file, want := range map[string]string{
		"/scratch/f": "disk\n", "/cm/key": "v1", "/sec/pw": "s3cret", "/dapi/name": "vols", "/dapi/labels": `e2e="vols"`,
	} {
		if got := k.mustExec(ctx, t, "vols", "c", "cat", file); got != want {
			t.Errorf("%s: %q, want %q", file, got, want)
		}
	}
	if tok := k.mustExec(ctx, t, "vols", "c", "cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"); strings.Count(tok, ".") != 2 {
		t.Errorf("service account token %q is not a JWT", tok)
	}

	start := time.Now()
	if _, err := cms.Update(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cm"}, Data: map[string]string{"key": "v2"}}, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for k.mustExec(ctx, t, "vols", "c", "cat", "/cm/key") != "v2" {
		if time.Since(start) > 2*time.Minute {
			t.Fatal("configMap update did not reach the pod in 2m")
		}
		time.Sleep(time.Second)
	}
	k.measure("configMap update → pod", time.Since(start))
}

// testOOMKilled: a container that allocates past its memory limit is OOMKilled.
func testOOMKilled(ctx context.Context, t *testing.T, k *kube) {
	// dd's 256 MiB block buffer is filled from /dev/zero, so all of it is touched; dd is the
	// container's process, so its SIGKILL is the container's exit.
	pod := k.pod("oom", "exec dd if=/dev/zero of=/dev/null bs=256M count=1")
	pod.Spec.RestartPolicy = corev1.RestartPolicyNever
	pod.Spec.Containers[0].Resources = corev1.ResourceRequirements{Limits: corev1.ResourceList{
		corev1.ResourceMemory: mustQuantity("64Mi")}}
	k.create(ctx, t, pod)
	p := k.wait(ctx, t, "oom", 3*time.Minute, terminated("c"))
	term := containerState(p, "c").Terminated
	if term.Reason != "OOMKilled" || term.ExitCode != 137 {
		t.Errorf("container terminated %q with %d (%s), want OOMKilled with 137", term.Reason, term.ExitCode, term.Message)
	}
}

// testHostNetwork: runc runs a hostNetwork pod; podvm refuses it by design (a VM cannot share
// the node's network namespace) and says so in the pod's events.
func testHostNetwork(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("hostnet", sleeper)
	pod.Spec.HostNetwork = true
	if k.rc == "runc" {
		k.run(ctx, t, pod)
		return
	}
	k.create(ctx, t, pod)
	const want = "asks for the host's network (hostNetwork), which a VM cannot share"
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ev := k.events("hostnet")
		if strings.Contains(ev, "FailedCreatePodSandBox") && strings.Contains(ev, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no FailedCreatePodSandBox event saying %q:\n%s", want, ev)
		}
		time.Sleep(500 * time.Millisecond)
	}
	p, err := k.client.CoreV1().Pods(k.ns).Get(ctx, "hostnet", metav1.GetOptions{})
	if err != nil || p.Status.Phase != corev1.PodPending {
		t.Fatalf("hostNetwork pod: %v, phase %v, want Pending", err, p.Status.Phase)
	}
}
