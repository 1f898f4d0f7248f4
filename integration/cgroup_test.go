package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// podLimits are kubelet's for a pod of one container with limits cpu 500m, memory 256Mi.
func podLimits() *runtimeapi.LinuxContainerResources {
	return &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000, CpuShares: 512,
		MemoryLimitInBytes: 256 << 20}
}

// TestPodCgroup checks that a pod is the pod on the host: what runs it is in the cgroup
// kubelet made for it (the CRI CgroupParent), the memory it touches is charged there, a CPU
// hog in it gets the pod's 500m, and its cgroups go with it. With podvm, QEMU, virtiofsd and
// the shim are what runs the pod, and the guest RAM in use is what is charged.
func TestPodCgroup(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			env := envFor(t, handler)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			podCfg := env.PodSandboxConfig(harness.PodOptions{Name: "limited", Namespace: "it", Handler: handler})
			podCfg.Linux.Resources = podLimits()
			parent := podCfg.Linux.CgroupParent
			makePodCgroup(t, parent)
			pod := runPodConfig(t, ctx, env, podCfg, handler)
			cfg := env.ContainerConfig(harness.ContainerOptions{Name: "limited", Command: []string{"sleep", "3600"}})
			cfg.Linux.Resources = podLimits()
			id := startContainer(t, ctx, env, pod, cfg)

			if handler == "podvm" {
				checkVMInCgroup(t, parent)
			}
			checkMemoryCharged(t, ctx, env, id, parent, handler)
			checkCPUQuota(t, ctx, env, id, parent)

			stopAndRemovePod(t, ctx, env, pod.ID)
			if left := cgroupsBelow(parent); len(left) > 0 {
				t.Errorf("cgroups left below the pod's cgroup after RemovePodSandbox: %v", left)
			}
			env.AssertNoLeaks(t)
		})
	}
}

// runPodConfig runs a pod from a config of the test's and pulls busybox for it.
func runPodConfig(t *testing.T, ctx context.Context, env *harness.Env, podCfg *runtimeapi.PodSandboxConfig, handler string) *harness.Pod {
	t.Helper()
	if err := os.MkdirAll(podCfg.LogDirectory, 0o755); err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Minute)
	podID, err := env.Runtime.RunPodSandbox(rctx, podCfg, handler)
	rcancel()
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	if _, err := env.PullImage(ctx, env.BusyboxImage, podCfg); err != nil {
		t.Fatal(err)
	}
	return &harness.Pod{ID: podID, Handler: handler, Config: podCfg}
}

func stopAndRemovePod(t *testing.T, ctx context.Context, env *harness.Env, podID string) {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	if err := env.Runtime.StopPodSandbox(sctx, podID); err != nil {
		t.Fatalf("StopPodSandbox: %v", err)
	}
	if err := env.Runtime.RemovePodSandbox(sctx, podID); err != nil {
		t.Fatalf("RemovePodSandbox: %v", err)
	}
}

// cgroupV2 reports whether the host runs cgroup v2 alone.
func cgroupV2() bool {
	_, err := os.Stat("/sys/fs/cgroup/cgroup.controllers")
	return err == nil
}

// cgroupDir is path in the hierarchy of a cgroup v1 controller, or in the v2 hierarchy.
func cgroupDir(controller, path string) string {
	if cgroupV2() {
		return filepath.Join("/sys/fs/cgroup", path)
	}
	return filepath.Join("/sys/fs/cgroup", controller, path)
}

// makePodCgroup makes the pod's cgroup as kubelet does before it runs the sandbox (here
// without limits of its own: the limits seen below it are the runtime's).
func makePodCgroup(t *testing.T, path string) {
	t.Helper()
	for _, c := range []string{"cpu", "cpuacct", "memory"} {
		if err := os.MkdirAll(cgroupDir(c, path), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// cgroupsBelow lists the cgroups below path in every hierarchy.
func cgroupsBelow(path string) []string {
	var left []string
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	for _, r := range append(roots, "/sys/fs/cgroup") {
		subs, _ := filepath.Glob(filepath.Join(r, path, "*"))
		for _, s := range subs {
			if st, err := os.Stat(s); err == nil && st.IsDir() {
				left = append(left, s)
			}
		}
	}
	return left
}

// procsBelow returns the command names of the processes in the cgroup tree at dir.
func procsBelow(dir string) []string {
	var comms []string
	_ = filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
		if err != nil || de.Name() != "cgroup.procs" {
			return nil //nolint:nilerr // a cgroup going away mid-walk holds nothing
		}
		b, _ := os.ReadFile(p)
		for _, pid := range strings.Fields(string(b)) {
			c, _ := os.ReadFile(filepath.Join("/proc", pid, "comm"))
			comms = append(comms, strings.TrimSpace(string(c)))
		}
		return nil
	})
	return comms
}

// checkVMInCgroup checks that what runs a podvm pod on the host runs in the pod's cgroup, in
// the hierarchies kubelet sizes and reports pods by.
func checkVMInCgroup(t *testing.T, parent string) {
	t.Helper()
	for _, c := range []string{"cpu", "cpuacct", "memory", "pids"} {
		comms := strings.Join(procsBelow(cgroupDir(c, parent)), " ")
		for _, want := range []string{"qemu-system", "virtiofsd", "containerd-shim"} {
			if !strings.Contains(comms, want) {
				t.Errorf("%s cgroup %s holds [%s], no %s", c, parent, comms, want)
			}
		}
	}
}

func readCgroupInt(t *testing.T, file string) int64 {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return n
}

// memoryUsage is the cgroup's charged memory in bytes.
func memoryUsage(t *testing.T, path string) int64 {
	t.Helper()
	if cgroupV2() {
		return readCgroupInt(t, cgroupDir("memory", path)+"/memory.current")
	}
	return readCgroupInt(t, cgroupDir("memory", path)+"/memory.usage_in_bytes")
}

// cpuUsage is the cgroup's CPU time used so far.
func cpuUsage(t *testing.T, path string) time.Duration {
	t.Helper()
	if !cgroupV2() {
		return time.Duration(readCgroupInt(t, cgroupDir("cpuacct", path)+"/cpuacct.usage"))
	}
	b, err := os.ReadFile(cgroupDir("cpu", path) + "/cpu.stat")
	if err != nil {
		t.Fatal(err)
	}
	var usec int64
	if _, err := fmt.Sscanf(string(b), "usage_usec %d", &usec); err != nil {
		t.Fatalf("cpu.stat: %v", err)
	}
	return time.Duration(usec) * time.Microsecond
}

// checkMemoryCharged fills 48 MiB of the container's /dev/shm and checks the pod's cgroup is
// charged for it; for podvm, it is charged at least the guest's memory in use.
func checkMemoryCharged(t *testing.T, ctx context.Context, env *harness.Env, id, parent, handler string) {
	t.Helper()
	sh(t, ctx, env, id, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=48 2>/dev/null")
	used := memoryUsage(t, parent)
	if used < 48<<20 {
		t.Errorf("pod cgroup memory usage %d MiB after the container filled 48 MiB", used>>20)
	}
	if handler == "podvm" {
		var total, free int64
		meminfo := sh(t, ctx, env, id, "cat /proc/meminfo")
		for _, l := range strings.Split(meminfo, "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 && f[0] == "MemTotal:" {
				total, _ = strconv.ParseInt(f[1], 10, 64)
			} else if len(f) >= 2 && f[0] == "MemFree:" {
				free, _ = strconv.ParseInt(f[1], 10, 64)
			}
		}
		if inGuest := (total - free) << 10; inGuest <= 0 || used < inGuest {
			t.Errorf("pod cgroup memory usage %d MiB, less than the guest's memory in use %d MiB", used>>20, inGuest>>20)
		}
	}
	sh(t, ctx, env, id, "rm /dev/shm/fill")
}

// checkCPUQuota runs a CPU hog in the container and measures the pod cgroup's CPU time over
// a few seconds: the pod's 500m limit holds it to about half a host core.
func checkCPUQuota(t *testing.T, ctx context.Context, env *harness.Env, id, parent string) {
	t.Helper()
	sh(t, ctx, env, id, "sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & echo started")
	time.Sleep(2 * time.Second)
	const window = 6 * time.Second
	before, start := cpuUsage(t, parent), time.Now()
	time.Sleep(window)
	cores := float64(cpuUsage(t, parent)-before) / float64(time.Since(start))
	t.Logf("pod with a CPU hog and limit 500m: %.2f host cores", cores)
	if cores < 0.2 || cores > 0.75 {
		t.Errorf("pod with a CPU hog and a 500m limit used %.2f host cores, want about 0.5", cores)
	}
}

// TestUnlimitedContainerNotSqueezed runs a pod of a container limited to 128Mi beside one
// without a limit, as kubelet sends it (the sandbox's memory is the sum of the limits, 128Mi):
// the limited one stays limited, the unlimited one is not held to its neighbour's limit and
// can use 600 MB. podvm sizes the VM as default_memory (here 1Gi) + the limits.
func TestUnlimitedContainerNotSqueezed(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			var env *harness.Env
			if handler == "podvm" {
				opts := podvmOptions(t)
				setSandboxConfig(t, opts.PodvmConfigPath, `default_memory = "1Gi"`)
				env = harness.Start(t, opts)
			} else {
				env = envFor(t, handler)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			podCfg := env.PodSandboxConfig(harness.PodOptions{Name: "mixed", Namespace: "it", Handler: handler})
			podCfg.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 128 << 20}
			pod := runPodConfig(t, ctx, env, podCfg, handler)
			limitedCfg := env.ContainerConfig(harness.ContainerOptions{Name: "limited", Command: []string{"sleep", "3600"}})
			limitedCfg.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 128 << 20}
			limited := startContainer(t, ctx, env, pod, limitedCfg)
			free := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Name: "free", Command: []string{"sleep", "3600"}}))

			// dd holds its whole block in memory and fills it from /dev/zero.
			if code, out, errOut := volSh(ctx, t, env, free, "dd if=/dev/zero of=/dev/null bs=600M count=1"); code != 0 {
				t.Errorf("the unlimited container could not use 600 MB: exit %d, %s %s", code, out, errOut)
			}
			if code, _, _ := volSh(ctx, t, env, limited, "dd if=/dev/zero of=/dev/null bs=200M count=1"); code == 0 {
				t.Errorf("the container limited to 128Mi used 200 MB")
			}
			env.AssertNoLeaks(t)
		})
	}
}

// setSandboxConfig adds lines to the [sandbox] section of the podvm node config at path.
func setSandboxConfig(t *testing.T, path, lines string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(b), "[sandbox]\n", "[sandbox]\n"+lines+"\n", 1)
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}
