package k8s

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/podvm/podvm/integration/harness"
)

// The kubelet writes outside its root dir, at paths fixed in its code, and tunes kernel
// settings at start. hostState records what was there before the cluster, so stop can put the
// machine back and AssertNoLeaks can check it.

// kubeletSysctls are the settings the kubelet's container manager sets when
// protectKernelDefaults is false (the only mode that starts on a machine not tuned for it).
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// kubeletHostDirs are the kubelet's fixed paths outside --root-dir.
var kubeletHostDirs = []string{"/var/lib/kubelet", "/var/log/containers", "/var/log/pods"}

type hostState struct {
	sysctls map[string]string
	existed map[string]bool
}

func saveHostState() (*hostState, error) {
	h := &hostState{sysctls: map[string]string{}, existed: map[string]bool{}}
	for _, s := range kubeletSysctls {
		b, err := os.ReadFile(filepath.Join("/proc/sys", s))
		if err != nil {
			return nil, fmt.Errorf("read sysctl %s: %w", s, err)
		}
		h.sysctls[s] = strings.TrimSpace(string(b))
	}
	for _, d := range kubeletHostDirs {
		_, err := os.Lstat(d)
		h.existed[d] = err == nil
	}
	return h, nil
}

// restore puts the sysctls back and removes what the kubelet made under its fixed paths: the
// /var/log/containers links into dir, and each fixed dir that was not there before.
func (h *hostState) restore(dir string) []string {
	var errs []string
	for s, v := range h.sysctls {
		if err := os.WriteFile(filepath.Join("/proc/sys", s), []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Sprintf("restore sysctl %s=%s: %v", s, v, err))
		}
	}
	links, _ := filepath.Glob("/var/log/containers/*.log")
	for _, l := range links {
		if target, err := os.Readlink(l); err == nil && strings.HasPrefix(target, dir+"/") {
			_ = os.Remove(l)
		}
	}
	for _, d := range kubeletHostDirs {
		if h.existed[d] {
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Sprintf("remove %s: %v", d, err))
		}
	}
	return errs
}

// leaks lists what restore should have undone but did not.
func (h *hostState) leaks(dir string) []string {
	var leaks []string
	for s, v := range h.sysctls {
		b, _ := os.ReadFile(filepath.Join("/proc/sys", s))
		if got := strings.TrimSpace(string(b)); got != v {
			leaks = append(leaks, fmt.Sprintf("sysctl %s is %s, was %s", s, got, v))
		}
	}
	for _, d := range kubeletHostDirs {
		if _, err := os.Lstat(d); err == nil && !h.existed[d] {
			leaks = append(leaks, "kubelet dir left: "+d)
		}
	}
	links, _ := filepath.Glob("/var/log/containers/*.log")
	for _, l := range links {
		if target, err := os.Readlink(l); err == nil && strings.HasPrefix(target, dir+"/") {
			leaks = append(leaks, "container log link left: "+l)
		}
	}
	return leaks
}

// stop stops every component (kubelet first, etcd last), closes the proxy and cleans the
// kubelet's host paths. Idempotent.
func (c *Cluster) stop(t testing.TB) {
	t.Helper()
	if c.stopped {
		return
	}
	c.stopped = true
	if t.Failed() {
		c.logTails(t)
		c.env.NoteOnFailure("k8s: the last warning events:\n" + c.warningEvents(5))
	}
	defer func() {
		if t.Failed() || os.Getenv(harness.KeepLogsEnv) != "" {
			c.keepLogs(t)
		}
	}()
	start := time.Now()
	for _, p := range slices.Backward(c.procs) {
		if p.stop(15 * time.Second) {
			t.Logf("k8s: %s did not exit 15s after SIGTERM; killed", p.name)
		}
	}
	if c.proxy != nil {
		c.proxy.close()
	}
	if c.host != nil {
		for _, e := range c.host.restore(c.Dir) {
			t.Errorf("k8s teardown: %s", e)
		}
	}
	t.Logf("k8s: cluster stopped in %v", time.Since(start).Round(time.Millisecond))
}

// Stop stops the cluster now (it also runs when the test ends); the harness's containerd and
// the pods stay until its own teardown.
func (c *Cluster) Stop(t testing.TB) { c.stop(t) }

// AssertNoLeaks stops the cluster and the harness and checks that neither left anything: the
// harness's checks (processes, mounts, cgroups, netns, dirs) and the kubelet's host paths and
// kernel settings.
func (c *Cluster) AssertNoLeaks(t testing.TB) {
	t.Helper()
	c.stop(t)
	c.env.AssertNoLeaks(t)
	if c.host != nil {
		for _, l := range c.host.leaks(c.Dir) {
			t.Errorf("leak: %s", l)
		}
	}
}

// keepLogs copies every component's log to harness.ArtifactsEnv's dir, as the harness does
// with containerd's.
func (c *Cluster) keepLogs(t testing.TB) {
	dir := os.Getenv(harness.ArtifactsEnv)
	if dir == "" || os.MkdirAll(dir, 0o755) != nil {
		return
	}
	prefix := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
	for _, p := range c.procs {
		b, err := os.ReadFile(p.log)
		if err != nil {
			continue
		}
		dst := filepath.Join(dir, prefix+"-"+p.name+".log")
		if os.WriteFile(dst, b, 0o644) == nil {
			t.Logf("k8s: %s log kept in %s", p.name, dst)
		}
	}
}

// warningEvents lists the cluster's last n Warning events, one a line (a pod's
// FailedCreatePodSandBox, FailedMount, BackOff, ...), while the API server is still up.
func (c *Cluster) warningEvents(n int) string {
	if c.Client == nil {
		return "(no API server)"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs, err := c.Client.CoreV1().Events(metav1.NamespaceAll).List(ctx, metav1.ListOptions{
		// The kubelet warns of the cluster DNS this cluster does not run at every pod.
		FieldSelector: "type=Warning,reason!=MissingClusterDNS"})
	if err != nil {
		return err.Error()
	}
	items := evs.Items
	slices.SortStableFunc(items, func(a, b corev1.Event) int { return eventTime(a).Compare(eventTime(b)) })
	var lines []string
	for _, e := range items[max(0, len(items)-n):] {
		line := fmt.Sprintf("%s/%s %s (x%d): %s", e.InvolvedObject.Namespace, e.InvolvedObject.Name, e.Reason, e.Count, e.Message)
		if len(line) > 400 {
			line = line[:400] + "…"
		}
		lines = append(lines, line)
	}
	if len(lines) == 0 {
		return "(none)"
	}
	return strings.Join(lines, "\n")
}

// eventTime is when an event last happened.
func eventTime(e corev1.Event) time.Time {
	if !e.LastTimestamp.IsZero() {
		return e.LastTimestamp.Time
	}
	if !e.EventTime.IsZero() {
		return e.EventTime.Time
	}
	return e.CreationTimestamp.Time
}

// logTails logs the end of every component's log.
func (c *Cluster) logTails(t testing.TB) {
	for _, p := range c.procs {
		t.Logf("k8s: %s", p.tail(30))
	}
}
