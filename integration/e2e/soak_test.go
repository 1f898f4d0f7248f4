package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/integration/k8s"
)

// SoakEnv sets the number of create/exec/delete cycles of the soak case (default 5; issue 12
// asks for 100 on a node: PODVM_E2E_SOAK=100).
const SoakEnv = "PODVM_E2E_SOAK"

func soakCycles(t *testing.T) int {
	n := 5
	if v := os.Getenv(SoakEnv); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number of cycles", SoakEnv, v)
		}
	}
	return n
}

// testSoak: pods created, exec'd into and deleted through the kubelet, cycle after cycle, leave
// the node as they found it: the same processes, containerd fds, mounts, links, pod network
// namespaces, cgroups and shim state dirs, counted before and after.
func testSoak(ctx context.Context, t *testing.T, k *kube, _ *k8s.Cluster, env *harness.Env) {
	cycle := func(i int) {
		name := fmt.Sprintf("soak-%d", i)
		start := time.Now()
		k.create(ctx, t, k.pod(name, sleeper))
		k.wait(ctx, t, name, 3*time.Minute, running)
		if out := k.mustExec(ctx, t, name, "c", "echo", "soak"); out != "soak\n" {
			t.Fatalf("exec in %s: %q", name, out)
		}
		if _, err := k.delete(ctx, name); err != nil {
			t.Fatal(err)
		}
		k.timing.add(k.rc, "soak cycle", time.Since(start))
	}
	cycle(0) // warm-up: containerd opens its long-lived connections on first use
	settle(ctx, t, k, env)
	before := nodeCounts(t, env, k.stateDir)
	n := soakCycles(t)
	for i := 1; i <= n; i++ {
		cycle(i)
	}
	settle(ctx, t, k, env)
	after := nodeCounts(t, env, k.stateDir)
	t.Logf("soak: %d cycles; node counts before → after:\n%s", n, countsTable(before, after))
	if diff := countsDiff(before, after); diff != "" {
		t.Errorf("soak: the node changed over %d cycles: %s", n, diff)
	}
}

// settle removes the stopped sandboxes of the namespace's deleted pods, as the kubelet's
// garbage collection does (once a minute), and waits until none is left: only then are their
// shims gone.
func settle(ctx context.Context, t *testing.T, k *kube, env *harness.Env) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		sbs, err := env.Runtime.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{
			LabelSelector: map[string]string{"io.kubernetes.pod.namespace": k.ns}})
		if err == nil && len(sbs) == 0 {
			return
		}
		for _, sb := range sbs {
			if sb.State == runtimeapi.PodSandboxState_SANDBOX_NOTREADY {
				_ = env.Runtime.RemovePodSandbox(ctx, sb.Id)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandboxes of deleted pods still there after 3m: %d (%v)", len(sbs), err)
		}
		time.Sleep(time.Second)
	}
}

// nodeCounts counts what a pod's life could leak on the node. Processes and mounts are those
// of this suite's containerd (its dirs, the shim's state dir): other work on the machine does
// not count.
func nodeCounts(t *testing.T, env *harness.Env, stateDir string) map[string]int {
	t.Helper()
	ours := []string{env.Dir, env.RunDir, stateDir}
	mentionsOurs := func(s string) bool {
		for _, d := range ours {
			if d != "" && strings.Contains(s, d) {
				return true
			}
		}
		return false
	}
	c := map[string]int{}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !mentionsOurs(strings.ReplaceAll(string(b), "\x00", " ")) {
			continue
		}
		comm, _ := os.ReadFile(filepath.Join(filepath.Dir(p), "comm"))
		name := strings.TrimSpace(string(comm))
		if name == "containerd" {
			fds, _ := os.ReadDir(filepath.Join(filepath.Dir(p), "fd"))
			c["containerd fds"] = len(fds)
		}
		c["processes "+name]++
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 4 && mentionsOurs(f[4]) {
				c["mounts"]++
			}
		}
	}
	if b, err := env.RunInNetNS(context.Background(), "ip", "-o", "link"); err == nil {
		c["links in the node netns"] = strings.Count(string(b), "\n")
	}
	netns, _ := os.ReadDir(filepath.Join(env.RunDir, "state", "io.containerd.grpc.v1.cri", "netns"))
	c["pod network namespaces"] = len(netns)
	_ = filepath.WalkDir(filepath.Join("/sys/fs/cgroup/memory", env.CgroupParent), func(_ string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			c["memory cgroups"]++
		}
		return nil
	})
	if stateDir != "" {
		entries, _ := os.ReadDir(stateDir)
		c["podvm state dirs"] = len(entries)
	}
	return c
}

// countsDiff lists what differs between two countings (a key missing from one counts 0).
func countsDiff(before, after map[string]int) string {
	keys := map[string]bool{}
	for k := range before {
		keys[k] = true
	}
	for k := range after {
		keys[k] = true
	}
	var d []string
	for k := range keys {
		// A process's fds leak by growing; fewer after is a connection that was still open at
		// the first count (seen: containerd 29 → 25 over 100 cycles). Everything else, the
		// cluster's processes included, must be what it was.
		if strings.HasSuffix(k, " fds") && after[k] < before[k] {
			continue
		}
		if after[k] != before[k] {
			d = append(d, fmt.Sprintf("%s %d → %d", k, before[k], after[k]))
		}
	}
	sort.Strings(d)
	return strings.Join(d, ", ")
}

func countsTable(before, after map[string]int) string {
	var keys []string
	for k := range before {
		keys = append(keys, k)
	}
	for k := range after {
		if _, ok := before[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "  %-28s %5d → %5d\n", k, before[k], after[k])
	}
	return b.String()
}
