package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/remotecommand"
)

// testAttach: kubectl attach -i to a container reading its stdin; closing stdin (stdinOnce)
// ends the container, and what it read is in its output.
func testAttach(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("attach", "read line; echo got:$line")
	pod.Spec.RestartPolicy = corev1.RestartPolicyNever
	pod.Spec.Containers[0].Stdin, pod.Spec.Containers[0].StdinOnce = true, true
	k.run(ctx, t, pod)
	req := k.client.CoreV1().RESTClient().Post().Resource("pods").Namespace(k.ns).Name("attach").SubResource("attach").
		VersionedParams(&corev1.PodAttachOptions{Container: "c", Stdin: true, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ex, err := k.executor(req.URL().String())
	if err != nil {
		t.Fatal(err)
	}
	actx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var out syncBuffer
	err = ex.StreamWithContext(actx, remotecommand.StreamOptions{Stdin: strings.NewReader("hello\n"), Stdout: &out, Stderr: io.Discard})
	if err != nil || !strings.Contains(out.String(), "got:hello") {
		t.Fatalf("attach: %v, output %q, want got:hello", err, out.String())
	}
	p := k.wait(ctx, t, "attach", time.Minute, terminated("c"))
	if code := containerState(p, "c").Terminated.ExitCode; code != 0 {
		t.Errorf("attached container exited %d, want 0", code)
	}
}

// testHooksAndGrace: postStart runs before the container counts as started; a kill by the
// kubelet (here: a liveness failure) runs preStop, then sends SIGTERM, which the container
// handles; both leave their mark in the termination message. A container that ignores
// SIGTERM is killed when its grace period ends, not before.
func testHooksAndGrace(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("hooks", "trap 'echo term-handled >> /dev/termination-log; exit 42' TERM; "+
		"while true; do sleep 0.2; done")
	c := &pod.Spec.Containers[0]
	c.Lifecycle = &corev1.Lifecycle{
		PostStart: &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"touch", "/tmp/poststart"}}},
		PreStop:   &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"sh", "-c", "echo prestop >> /dev/termination-log"}}},
	}
	// The probe fails once the test marks the container dead: a probe that waited for a file
	// the container makes itself could run before the container's shell did, on a busy node,
	// and kill the container before the test asked for it.
	c.LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "!", "-f", "/tmp/dead"}}},
		PeriodSeconds: 1, FailureThreshold: 1, TimeoutSeconds: 10} // slow on a busy node is not failed
	pod.Spec.TerminationGracePeriodSeconds = ptr[int64](10)
	k.run(ctx, t, pod)
	k.mustExec(ctx, t, "hooks", "c", "test", "-f", "/tmp/poststart")
	last := killByProbe(ctx, t, k, "hooks", "c")
	if last.ExitCode != 42 || last.Message != "prestop\nterm-handled\n" {
		t.Errorf("killed container: exit %d, message %q; want 42 and \"prestop\\nterm-handled\\n\"", last.ExitCode, last.Message)
	}

	stubborn := k.pod("stubborn", "trap '' TERM; while true; do sleep 0.2; done")
	stubborn.Spec.TerminationGracePeriodSeconds = ptr[int64](3)
	k.run(ctx, t, stubborn)
	d, err := k.delete(ctx, "stubborn")
	if err != nil {
		t.Fatal(err)
	}
	if d < 3*time.Second {
		t.Errorf("a container ignoring SIGTERM was gone after %v, before its grace period of 3s", d)
	}
}

// killByProbe has the liveness probe of container c of pod name (which fails once
// /tmp/dead exists) kill it, waits until the kubelet has restarted it, and returns how the
// killed one ended (its LastTerminationState).
//
// The kubelet's container GC, once a minute, keeps the newest container per pod and
// container name that is not running. A restarted container is not running from its CRI
// CreateContainer until StartContainer returns, which with podvm is the ~1.5 s the guest takes
// to create it (tens of ms with runc); a GC in that window removes the killed one, and with
// it the kubelet's record of how it ended: the pod shows no last state. That is the
// kubelet's doing (docs/e2e.md); then the container is killed once more.
func killByProbe(ctx context.Context, t *testing.T, k *kube, name, c string) *corev1.ContainerStateTerminated {
	t.Helper()
	for kills := int32(1); kills <= 2; kills++ {
		k.mustExec(ctx, t, name, c, "touch", "/tmp/dead")
		p := k.wait(ctx, t, name, 2*time.Minute, func(p *corev1.Pod) error {
			if cs := containerStatus(p, c); cs == nil || cs.RestartCount < kills || cs.State.Running == nil {
				return fmt.Errorf("not killed by the liveness probe and running again yet")
			}
			return nil
		})
		if last := containerStatus(p, c).LastTerminationState.Terminated; last != nil {
			return last
		}
		t.Logf("%s/%s restarted with no last state: the kubelet's container GC removed the killed container before its successor started; killing it again", name, c)
	}
	t.Fatalf("%s/%s: no last state after two kills by the liveness probe", name, c)
	return nil
}

// testJob: a Job with 2 completions and parallelism 2 succeeds.
func testJob(ctx context.Context, t *testing.T, k *kube) {
	tmpl := k.pod("job", "echo job-done")
	tmpl.Spec.RestartPolicy = corev1.RestartPolicyNever
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: "job", Namespace: k.ns},
		Spec: batchv1.JobSpec{Completions: ptr[int32](2), Parallelism: ptr[int32](2), BackoffLimit: ptr[int32](0),
			Template: corev1.PodTemplateSpec{Spec: tmpl.Spec}},
	}
	jobs := k.client.BatchV1().Jobs(k.ns)
	if _, err := jobs.Create(ctx, job, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.deleteJob(t, "job") })
	deadline := time.Now().Add(3 * time.Minute)
	for {
		j, err := jobs.Get(ctx, "job", metav1.GetOptions{})
		if err == nil && j.Status.Succeeded == 2 {
			break
		}
		if err == nil && j.Status.Failed > 0 {
			t.Fatalf("job failed: %+v", j.Status)
		}
		if time.Now().After(deadline) {
			t.Fatalf("job: not 2 succeeded after 3m: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (k *kube) deleteJob(t *testing.T, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fg := metav1.DeletePropagationForeground
	_ = k.client.BatchV1().Jobs(k.ns).Delete(ctx, name, metav1.DeleteOptions{PropagationPolicy: &fg})
	for {
		pods, err := k.client.CoreV1().Pods(k.ns).List(ctx, metav1.ListOptions{LabelSelector: "job-name=" + name})
		if err == nil && len(pods.Items) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Errorf("job %s: pods left after delete: %s", name, describe(pods))
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// testMoreVolumes: subPath mounts one key of a configMap as a file and one dir of an emptyDir,
// and a hostPath dir is shared with the node both ways.
func testMoreVolumes(ctx context.Context, t *testing.T, k *kube) {
	hostDir, err := os.MkdirTemp("", "podvm-e2e-hostpath-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(hostDir) })
	if err := os.WriteFile(filepath.Join(hostDir, "from-node"), []byte("node"), 0o644); err != nil {
		t.Fatal(err)
	}
	cms := k.client.CoreV1().ConfigMaps(k.ns)
	if _, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "app"}, Data: map[string]string{"app.conf": "x=1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cms.Delete(context.Background(), "app", metav1.DeleteOptions{}) })
	pod := k.pod("vols2", sleeper)
	pod.Spec.Volumes = []corev1.Volume{
		{Name: "app", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app"}}}},
		{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: hostDir}}},
	}
	pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{
		{Name: "app", MountPath: "/etc/app.conf", SubPath: "app.conf"},
		{Name: "scratch", MountPath: "/sub", SubPath: "deep/dir"},
		{Name: "host", MountPath: "/host"},
	}
	k.run(ctx, t, pod)
	if got := k.mustExec(ctx, t, "vols2", "c", "cat", "/etc/app.conf"); got != "x=1" {
		t.Errorf("subPath configMap file: %q", got)
	}
	k.mustExec(ctx, t, "vols2", "c", "sh", "-c", "echo sub > /sub/f")
	if got := k.mustExec(ctx, t, "vols2", "c", "cat", "/host/from-node"); got != "node" {
		t.Errorf("hostPath file from the node: %q", got)
	}
	k.mustExec(ctx, t, "vols2", "c", "sh", "-c", "echo -n pod > /host/from-pod")
	if b, err := os.ReadFile(filepath.Join(hostDir, "from-pod")); err != nil || string(b) != "pod" {
		t.Errorf("hostPath file from the pod, on the node: %q, %v", b, err)
	}
}

// testEmptyDirMemory: an emptyDir of medium Memory is a tmpfs of its size limit where the
// container runs, and writing past the limit fails.
func testEmptyDirMemory(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("memdir", sleeper)
	pod.Spec.Volumes = []corev1.Volume{{Name: "mem", VolumeSource: corev1.VolumeSource{
		EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory, SizeLimit: ptr(mustQuantity("16Mi"))}}}}
	pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "mem", MountPath: "/mem"}}
	k.run(ctx, t, pod)
	if out := k.mustExec(ctx, t, "memdir", "c", "sh", "-c", "grep ' /mem ' /proc/mounts"); !strings.HasPrefix(out, "tmpfs /mem tmpfs") || !strings.Contains(out, "size=16384k") {
		t.Errorf("emptyDir medium Memory: mount %q, want a tmpfs of size=16384k", out)
	}
	r, err := k.exec(ctx, "memdir", "c", []string{"dd", "if=/dev/zero", "of=/mem/big", "bs=1M", "count=32"}, nil, false)
	if err != nil || r.code == 0 {
		t.Errorf("writing 32 MiB into a 16Mi memory emptyDir: code %d, err %v; want a failure (no space)", r.code, err)
	}
}

// testPodNetwork: the pod's IP in its status is the address its eth0 has, another pod
// reaches it there, and a hostPort reaches it from the node.
func testPodNetwork(ctx context.Context, t *testing.T, k *kube) {
	srv := k.pod("server", httpdScript("from-"+k.rc))
	srv.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 8080, HostPort: 18080, Protocol: corev1.ProtocolTCP}}
	srv.Spec.Containers[0].ReadinessProbe = &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr(8080)}}, PeriodSeconds: 1}
	k.create(ctx, t, srv)
	p := k.wait(ctx, t, "server", 3*time.Minute, ready)
	ip := p.Status.PodIP
	if ip == "" || net.ParseIP(ip) == nil {
		t.Fatalf("pod IP %q", ip)
	}
	if out := k.mustExec(ctx, t, "server", "c", "ip", "-o", "-4", "addr", "show", "eth0"); !strings.Contains(out, " "+ip+"/") {
		t.Errorf("eth0 in the pod: %q, want the pod IP %s", out, ip)
	}
	k.run(ctx, t, k.pod("client", sleeper))
	if got := k.mustExec(ctx, t, "client", "c", "wget", "-q", "-O-", "http://"+net.JoinHostPort(ip, "8080")+"/index.html"); got != "from-"+k.rc {
		t.Errorf("pod to pod: %q", got)
	}
	body, err := getVia(ctx, k.env.DialContext, net.JoinHostPort(k.nodeIP, strconv.Itoa(18080)))
	if err != nil || body != "from-"+k.rc {
		t.Errorf("hostPort 18080 from the node: %q, %v", body, err)
	}
}

// getVia sends GET /index.html to addr over a connection dial makes, and returns the body.
func getVia(ctx context.Context, dial func(ctx context.Context, network, addr string) (net.Conn, error), addr string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	c, err := dial(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := fmt.Fprintf(c, "GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return "", err
	}
	_, body, ok := strings.Cut(string(b), "\r\n\r\n")
	if !ok || !strings.HasPrefix(string(b), "HTTP/1.") || !strings.Contains(string(b), " 200 ") {
		return "", fmt.Errorf("response %q", b)
	}
	return body, nil
}
