package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// handlers are the runtimes whose observable behaviour must match.
var handlers = []string{"runc", "podvm"}

// envFor starts containerd for a handler; podvm also gets the guest image.
func envFor(t *testing.T, handler string, allowed ...string) *harness.Env {
	if handler == "podvm" {
		return podvmEnv(t, allowed...)
	}
	return harness.Start(t, harness.Options{})
}

// startContainer creates and starts a container from cfg and waits until it runs.
func startContainer(t *testing.T, ctx context.Context, env *harness.Env, pod *harness.Pod, cfg *runtimeapi.ContainerConfig) string {
	t.Helper()
	id, err := createContainer(ctx, env, pod, cfg)
	if err != nil {
		t.Fatalf("CreateContainer %s: %v", cfg.Metadata.Name, err)
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	if err := env.Runtime.StartContainer(cctx, id); err != nil {
		t.Fatalf("StartContainer %s: %v", cfg.Metadata.Name, err)
	}
	if _, err := env.WaitContainerState(cctx, id, runtimeapi.ContainerState_CONTAINER_RUNNING); err != nil {
		t.Fatal(err)
	}
	return id
}

// sh runs a shell script in a container with ExecSync and returns its stdout, trimmed.
func sh(t *testing.T, ctx context.Context, env *harness.Env, id, script string) string {
	t.Helper()
	return strings.TrimSpace(execOK(ctx, t, env, id, script))
}

// TestContainerSettings checks that the OCI process and security settings kubelet sends are
// honoured the same way by runc and podvm, and that the files containerd prepares for a pod work.
func TestContainerSettings(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			env := envFor(t, handler)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			pod := runSettingsPod(t, ctx, env, handler)
			termLog := filepath.Join(t.TempDir(), "termination-log")
			id := startRestricted(t, ctx, env, pod, termLog)
			checkRestricted(t, ctx, env, id)
			checkStatsAndUpdate(t, ctx, env, id)

			sh(t, ctx, env, id, "echo bye > /dev/termination-log")
			if b, _ := os.ReadFile(termLog); string(b) != "bye\n" {
				t.Errorf("termination log on the host: %q, want %q", b, "bye\n")
			}
			// A terminal exec, as `kubectl exec -it` runs it.
			var out bytes.Buffer
			code, err := env.Exec(ctx, id, []string{"sh", "-c", "tty"}, harness.StreamOptions{Stdout: &out, TTY: true})
			if err != nil || code != 0 || !strings.HasPrefix(strings.TrimSpace(out.String()), "/dev/pts/") {
				t.Errorf("tty exec: exit %d err %v output %q; want a /dev/pts terminal", code, err, out.String())
			}

			checkPrivileged(t, ctx, env, pod, handler)
			checkAttach(t, ctx, env, pod)
			checkPipesWithExecsRunning(t, ctx, env, pod)
			env.AssertNoLeaks(t)
		})
	}
}

// runSettingsPod runs TestContainerSettings' pod: its hostname, DNS and sysctls, and
// privileged, so that it may hold privileged containers (CRI refuses them in other pods).
func runSettingsPod(t *testing.T, ctx context.Context, env *harness.Env, handler string) *harness.Pod {
	t.Helper()
	podCfg := env.PodSandboxConfig(harness.PodOptions{Name: "settings", Namespace: "it", Handler: handler,
		Hostname: "settings-host", DNS: &runtimeapi.DNSConfig{
			Servers: []string{"10.96.0.10"}, Searches: []string{"it.svc.cluster.local"}, Options: []string{"ndots:5"}}})
	podCfg.Linux.SecurityContext.Privileged = true
	// A per-interface sysctl names the pod's NIC, which in a pod VM exists under that name only
	// once the guest is set up.
	podCfg.Linux.Sysctls = map[string]string{"kernel.shm_rmid_forced": "1", "net.ipv4.ip_local_port_range": "20000 30000",
		"net.ipv4.conf.eth0.arp_ignore": "1"}
	return runPodConfig(t, ctx, env, podCfg, handler)
}

// startRestricted starts a container with every process and security setting kubelet can
// send, and termLog (made world-writable, as kubelet makes it, whatever the container's user)
// as its /dev/termination-log.
func startRestricted(t *testing.T, ctx context.Context, env *harness.Env, pod *harness.Pod, termLog string) string {
	t.Helper()
	if err := os.WriteFile(termLog, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(termLog, 0o666); err != nil {
		t.Fatal(err)
	}
	cfg := env.ContainerConfig(harness.ContainerOptions{Name: "restricted", Command: []string{"sleep", "3600"},
		Env: map[string]string{"GREETING": "hello world"}, WorkingDir: "/tmp",
		Mounts: []*runtimeapi.Mount{{ContainerPath: "/dev/termination-log", HostPath: termLog}}})
	sc := cfg.Linux.SecurityContext
	sc.RunAsUser = &runtimeapi.Int64Value{Value: 1000}
	sc.RunAsGroup = &runtimeapi.Int64Value{Value: 3000}
	sc.SupplementalGroups = []int64{4000}
	sc.Capabilities = &runtimeapi.Capability{DropCapabilities: []string{"ALL"}, AddCapabilities: []string{"NET_BIND_SERVICE"}}
	sc.ReadonlyRootfs = true
	sc.NoNewPrivs = true
	sc.Seccomp = &runtimeapi.SecurityProfile{ProfileType: runtimeapi.SecurityProfile_RuntimeDefault}
	cfg.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 64 << 20, CpuQuota: 50000, CpuPeriod: 100000}
	return startContainer(t, ctx, env, pod, cfg)
}

// memoryMax prints a container's memory limit, under cgroup v2 or v1.
const memoryMax = "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"

// checkRestricted checks from inside startRestricted's container that each setting holds, and
// the pod's sysctls, hostname and the files containerd prepares.
func checkRestricted(t *testing.T, ctx context.Context, env *harness.Env, id string) {
	t.Helper()
	for _, c := range []struct{ name, script, want string }{
		{"uid", "id -u", "1000"},
		{"gid", "id -g", "3000"},
		{"supplementary groups", "id -G | tr ' ' '\\n' | grep -x 4000", "4000"},
		{"capability bounding set", "grep CapBnd /proc/self/status | cut -f2", "0000000000000400"},
		{"no effective capabilities as non-root", "grep CapEff /proc/self/status | cut -f2", "0000000000000000"},
		{"no new privileges", "grep NoNewPrivs /proc/self/status | cut -f2", "1"},
		{"seccomp filter", "grep '^Seccomp:' /proc/self/status | cut -f2", "2"},
		{"read-only rootfs", "touch /probe 2>/dev/null && echo writable || echo read-only", "read-only"},
		{"masked path", "wc -c < /proc/timer_list", "0"},
		{"read-only path", "(echo x > /proc/sys/kernel/hostname) 2>/dev/null && echo writable || echo read-only", "read-only"},
		{"pod sysctl", "cat /proc/sys/kernel/shm_rmid_forced", "1"},
		{"pod net sysctl", "cat /proc/sys/net/ipv4/ip_local_port_range | tr -s ' \\t' ' '", "20000 30000"},
		{"pod NIC sysctl", "cat /proc/sys/net/ipv4/conf/eth0/arp_ignore", "1"},
		{"memory limit", memoryMax, "67108864"},
		{"cpu quota", "cut -d' ' -f1 /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us", "50000"},
		{"env", "echo $GREETING", "hello world"},
		{"cwd", "pwd", "/tmp"},
		{"hostname", "hostname", "settings-host"},
		{"/etc/hosts", "grep -q localhost /etc/hosts && echo present", "present"},
		{"/etc/resolv.conf", "grep -E '^(nameserver|search|options)' /etc/resolv.conf | tr '\\n' ';'", "search it.svc.cluster.local;nameserver 10.96.0.10;options ndots:5;"},
		{"/dev/shm", "echo shared > /dev/shm/probe && cat /dev/shm/probe", "shared"},
	} {
		if got := sh(t, ctx, env, id, c.script); got != c.want {
			t.Errorf("%s: got %q, want %q", c.name, got, c.want)
		}
	}
}

// checkStatsAndUpdate: stats, as kubelet's and crictl's come from the runtime, that follow
// what the container does, and a live resource update.
func checkStatsAndUpdate(t *testing.T, ctx context.Context, env *harness.Env, id string) {
	t.Helper()
	stats := func() *runtimeapi.ContainerStats {
		sctx, scancel := context.WithTimeout(ctx, time.Minute)
		defer scancel()
		s, err := env.Runtime.ContainerStats(sctx, id)
		if err != nil {
			t.Errorf("ContainerStats: %v", err)
			return nil
		}
		return s
	}
	before := stats()
	if before.GetMemory().GetWorkingSetBytes().GetValue() == 0 || before.GetCpu().GetUsageCoreNanoSeconds().GetValue() == 0 {
		t.Errorf("ContainerStats: memory working set %d, CPU %d ns; want both non-zero",
			before.GetMemory().GetWorkingSetBytes().GetValue(), before.GetCpu().GetUsageCoreNanoSeconds().GetValue())
	}
	// Work in the container must show in the next stats: CPU time and page faults grow.
	sh(t, ctx, env, id, "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done")
	after := stats()
	if after.GetCpu().GetUsageCoreNanoSeconds().GetValue() <= before.GetCpu().GetUsageCoreNanoSeconds().GetValue() ||
		after.GetMemory().GetPageFaults().GetValue() <= before.GetMemory().GetPageFaults().GetValue() {
		t.Errorf("ContainerStats after an exec that worked: CPU %d ns -> %d ns, page faults %d -> %d; want both to grow",
			before.GetCpu().GetUsageCoreNanoSeconds().GetValue(), after.GetCpu().GetUsageCoreNanoSeconds().GetValue(),
			before.GetMemory().GetPageFaults().GetValue(), after.GetMemory().GetPageFaults().GetValue())
	}
	uctx, ucancel := context.WithTimeout(ctx, time.Minute)
	err := env.Runtime.UpdateContainerResources(uctx, id, &runtimeapi.ContainerResources{Linux: &runtimeapi.LinuxContainerResources{
		MemoryLimitInBytes: 96 << 20, CpuQuota: 50000, CpuPeriod: 100000}})
	ucancel()
	if err != nil {
		t.Errorf("UpdateContainerResources: %v", err)
	} else if got := sh(t, ctx, env, id, memoryMax); got != "100663296" {
		t.Errorf("memory limit after update: %s, want 100663296", got)
	}
}

// checkPrivileged: a privileged container gets every capability, but no host device (podvm:
// the host's devices are not in the VM).
func checkPrivileged(t *testing.T, ctx context.Context, env *harness.Env, pod *harness.Pod, handler string) {
	t.Helper()
	pcfg := env.ContainerConfig(harness.ContainerOptions{Name: "privileged", Command: []string{"sleep", "3600"}})
	pcfg.Linux.SecurityContext.Privileged = true
	pid := startContainer(t, ctx, env, pod, pcfg)
	// containerd grants a privileged container every capability it holds itself.
	caps := sh(t, ctx, env, pid, "grep CapEff /proc/self/status | cut -f2")
	var capEff uint64
	if _, err := fmt.Sscanf(caps, "%x", &capEff); err != nil {
		t.Fatalf("CapEff %q: %v", caps, err)
	}
	const capSysAdmin, capNetAdmin = 21, 12
	if capEff&(1<<capSysAdmin) == 0 || capEff&(1<<capNetAdmin) == 0 {
		t.Errorf("privileged CapEff %q lacks CAP_SYS_ADMIN or CAP_NET_ADMIN", caps)
	}
	hostDisks := sh(t, ctx, env, pid, "ls /dev | grep -cE '^(vd|sd|nvme)' || true")
	if handler == "podvm" && hostDisks != "0" {
		t.Errorf("privileged podvm container sees %s host disks in /dev, want none", hostDisks)
	}
}

// pipeExecs is how many execs checkPipesWithExecsRunning keeps running: their stdout and
// stderr pipes, grown to a megabyte each, would have added up to more than the 64 MiB of
// pipes (fs.pipe-user-pages-soft) a user may hold before its processes without
// CAP_SYS_RESOURCE get pipes of 8 KiB.
const pipeExecs = 36

// checkPipesWithExecsRunning: with many execs running in a pod (kubelet's exec probes,
// `kubectl exec` sessions, each with its stdout and stderr), a pipe that the pod's own root
// process makes holds Linux's default 64 KiB, as it does with runc. A pipe that holds
// 8 KiB blocks a writer eight times as often: a shell pipeline slows down.
func checkPipesWithExecsRunning(t *testing.T, ctx context.Context, env *harness.Env, pod *harness.Pod) {
	t.Helper()
	id := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Name: "pipes", Command: []string{"sleep", "3600"}}))
	var wg sync.WaitGroup
	for range pipeExecs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Ends when the check kills it; its error then is of no interest.
			_, _, _ = env.Runtime.ExecSync(ctx, id, []string{"sleep", "600"}, 0)
		}()
	}
	defer func() {
		sh(t, ctx, env, id, `kill $(ps -o pid,args | awk '$2 == "sleep" && $3 == "600" {print $1}') 2>/dev/null; true`)
		wg.Wait()
	}()
	deadline := time.Now().Add(2 * time.Minute)
	for n := ""; n != strconv.Itoa(pipeExecs); n = sh(t, ctx, env, id, "ps -o args | grep -cx 'sleep 600'; true") {
		if time.Now().After(deadline) {
			t.Fatalf("%s of the %d execs run after 2 minutes", n, pipeExecs)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// 32 KiB into a pipe that nobody reads: all of it fits in 64 KiB, dd ends and says so;
	// in 8 KiB it blocks until the reader exits, and dies of SIGPIPE.
	ectx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	probe := "{ dd if=/dev/zero bs=4096 count=8 2>/dev/null && echo fits >&2; } | sleep 1"
	_, stderr, err := env.Runtime.ExecSync(ectx, id, []string{"sh", "-c", probe}, 45*time.Second)
	if err != nil || strings.TrimSpace(string(stderr)) != "fits" {
		t.Errorf("with %d execs running, 32 KiB did not fit into a pipe made in the container (Linux's default holds 64 KiB): %q, %v",
			pipeExecs, stderr, err)
	}
}

// checkAttach attaches to a container's stdin and stdout, as `kubectl attach -i` does.
func checkAttach(t *testing.T, ctx context.Context, env *harness.Env, pod *harness.Pod) {
	t.Helper()
	acfg := env.ContainerConfig(harness.ContainerOptions{Name: "attached", Command: []string{"sh", "-c", "read line; echo got $line; sleep 3600"},
		Stdin: true, StdinOnce: true})
	aid := startContainer(t, ctx, env, pod, acfg)
	aout := &lockedBuffer{}
	actx, acancel := context.WithTimeout(ctx, 30*time.Second)
	go func() {
		// The attach stream lasts as long as the container; the test stops it.
		_ = env.Attach(actx, aid, harness.StreamOptions{Stdin: strings.NewReader("hello\n"), Stdout: aout})
	}()
	deadline := time.Now().Add(25 * time.Second)
	for time.Now().Before(deadline) && !strings.Contains(aout.String(), "got hello") {
		time.Sleep(100 * time.Millisecond)
	}
	acancel()
	if got := aout.String(); !strings.Contains(got, "got hello") {
		t.Errorf("attach: output %q, want %q", got, "got hello")
	}
}

// TestPodvmPodIsOneVM checks that a pod's containers share one VM (and its files), that two
// pods get two, and that the containers really run in the guest kernel.
func TestPodvmPodIsOneVM(t *testing.T) {
	env, ctx := podvmTest(t, 10*time.Minute)
	emptyDir := t.TempDir()
	var pods []*harness.Pod
	for _, name := range []string{"first", "second"} {
		pod, err := env.RunPod(ctx, harness.PodOptions{Name: name, Namespace: "it", Handler: "podvm"})
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, pod)
	}
	if _, err := env.PullImage(ctx, env.BusyboxImage, pods[0].Config); err != nil {
		t.Fatal(err)
	}
	vol := []*runtimeapi.Mount{{ContainerPath: "/data", HostPath: emptyDir}}
	writer := startContainer(t, ctx, env, pods[0], env.ContainerConfig(harness.ContainerOptions{Name: "writer", Command: []string{"sleep", "3600"}, Mounts: vol}))
	reader := startContainer(t, ctx, env, pods[0], env.ContainerConfig(harness.ContainerOptions{Name: "reader", Command: []string{"sleep", "3600"}, Mounts: vol}))
	other := startContainer(t, ctx, env, pods[1], env.ContainerConfig(harness.ContainerOptions{Name: "other", Command: []string{"sleep", "3600"}}))

	host := hostKernel(t)
	for _, id := range []string{writer, reader, other} {
		if k := sh(t, ctx, env, id, "uname -r"); k == host || k == "" {
			t.Errorf("container %s: uname -r %q is the host's kernel %q", id[:12], k, host)
		}
	}
	sh(t, ctx, env, writer, "echo from-writer > /data/shared")
	if got := sh(t, ctx, env, reader, "cat /data/shared"); got != "from-writer" {
		t.Errorf("reader sees %q in the shared emptyDir, want from-writer", got)
	}
	// Both containers of the first pod see each other's processes' kernel: one VM, one boot id.
	if a, b := sh(t, ctx, env, writer, "cat /proc/sys/kernel/random/boot_id"), sh(t, ctx, env, reader, "cat /proc/sys/kernel/random/boot_id"); a != b {
		t.Errorf("containers of one pod run in different kernels (boot ids %s, %s)", a, b)
	}
	if a, b := sh(t, ctx, env, writer, "cat /proc/sys/kernel/random/boot_id"), sh(t, ctx, env, other, "cat /proc/sys/kernel/random/boot_id"); a == b {
		t.Errorf("two pods share a kernel (boot id %s)", a)
	}
	for _, pod := range pods {
		if n := countQEMU(pod.ID); n != 1 {
			t.Errorf("pod %s has %d QEMU processes, want 1", pod.ID[:12], n)
		}
	}
	env.AssertNoLeaks(t)
}

func countQEMU(podID string) int {
	return len(harness.QEMUs(podID))
}

// TestPodvmRejectsBadAnnotations checks that a pod with an invalid size annotation fails
// RunPodSandbox with a message naming the annotation, and leaves nothing behind; and that a
// valid size (here other than the defaults) is the guest's.
func TestPodvmRejectsBadAnnotations(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute, "memory", "vcpus")
	for _, c := range []struct{ key, value string }{
		{"podvm.io/memory", "abc"},
		{"podvm.io/vcpus", "9999"},
	} {
		_, err := env.RunPod(ctx, harness.PodOptions{Name: "bad", Namespace: "it", Handler: "podvm",
			Annotations: map[string]string{c.key: c.value}})
		if err == nil {
			t.Errorf("RunPodSandbox with %s=%q succeeded, want an error", c.key, c.value)
			continue
		}
		if !strings.Contains(err.Error(), c.key) {
			t.Errorf("RunPodSandbox with %s=%q: error %q does not name the annotation", c.key, c.value, err)
		}
	}
	// An allowed, valid size is used.
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "sized", Namespace: "it", Handler: "podvm",
		Annotations: map[string]string{"podvm.io/memory": "384Mi", "podvm.io/vcpus": "1"}})
	id := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	checkGuestSize(t, ctx, env, id, 1, 384)
	env.AssertNoLeaks(t)
}

// checkGuestSize checks that container id's guest has vcpus vCPUs and a little under memMiB
// of memory (the kernel keeps some), and returns its vCPU count.
func checkGuestSize(t *testing.T, ctx context.Context, env *harness.Env, id string, vcpus, memMiB int) string {
	t.Helper()
	n := sh(t, ctx, env, id, "grep -c ^processor /proc/cpuinfo")
	if n != strconv.Itoa(vcpus) {
		t.Errorf("guest has %s vCPUs, want %d", n, vcpus)
	}
	memKiB := sh(t, ctx, env, id, "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2")
	var kib int
	if _, err := fmt.Sscan(memKiB, &kib); err != nil {
		t.Fatalf("MemTotal %q: %v", memKiB, err)
	}
	if low := minMemTotalKiB(memMiB); kib < low || kib > memMiB<<10 {
		t.Errorf("guest MemTotal %d KiB, want %d to %d KiB (%d MiB less the kernel's bookkeeping)", kib, low, memMiB<<10, memMiB)
	}
	return n
}

// TestPodvmDefaultSize: a pod that says nothing about its size gets 2 vCPUs (or the host's
// CPU count, if lower) and 512Mi; and a guest with several vCPUs keeps time on its TSC. Under
// TCG the kernel would otherwise doubt its TSCs and fall back to the jiffies clocksource: 4 ms
// steps, no high-resolution timers, a tick every 4 ms on every vCPU even when idle.
func TestPodvmDefaultSize(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "default", Namespace: "it", Handler: "podvm"})
	id := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
	want := min(2, runtime.NumCPU())
	n := checkGuestSize(t, ctx, env, id, want, 512)
	cs := sh(t, ctx, env, id, "cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
	if want > 1 && strings.Contains(cs, "jiffies") {
		t.Errorf("a %d-vCPU guest keeps time on the %s clocksource, want its TSC (or kvm-clock)", want, cs)
	}
	checkDelayLoops(t, ctx, env, id)
	t.Logf("%s vCPUs, clocksource %s", n, cs)
	env.AssertNoLeaks(t)
}

// checkDelayLoops: every vCPU's delay loop agrees with its TSC, as udelay counts TSC cycles:
// BogoMIPS (loops per jiffy * HZ / 500000) is twice the CPU's MHz. Under TCG podvm gives the
// kernel the loop's value (lpj=), so the later vCPUs do not time it against jiffies at boot
// and all report the boot CPU's; a value in the wrong unit would make every udelay wrong. A
// guest restored from a VM template has the template's loops: its boot was not given lpj=
// (the template's key must not change with each measure of the host's TSC), so there the
// later vCPUs timed theirs, once per template; they must still agree with the TSC.
func checkDelayLoops(t *testing.T, ctx context.Context, env *harness.Env, id string) {
	t.Helper()
	var mhz, bogo []float64
	var bogoText []string
	for _, line := range strings.Split(sh(t, ctx, env, id, "grep -E '^(cpu MHz|bogomips)' /proc/cpuinfo"), "\n") {
		k, v, ok := strings.Cut(line, ":")
		f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if !ok || err != nil {
			t.Fatalf("/proc/cpuinfo line %q", line)
		}
		switch strings.TrimSpace(k) {
		case "cpu MHz":
			mhz = append(mhz, f)
		case "bogomips":
			bogo, bogoText = append(bogo, f), append(bogoText, strings.TrimSpace(v))
		}
	}
	if len(mhz) == 0 || len(mhz) != len(bogo) {
		t.Fatalf("/proc/cpuinfo: %d cpu MHz and %d bogomips lines", len(mhz), len(bogo))
	}
	for i := range mhz {
		if r := bogo[i] / (2 * mhz[i]); r < 0.99 || r > 1.01 {
			t.Errorf("vCPU %d: %.2f BogoMIPS at %.3f MHz; want twice the MHz (its delay loop is off by %.2fx)", i, bogo[i], mhz[i], r)
		}
	}
	if testAccel() == "tcg" && !harness.Templated() && slices.ContainsFunc(bogoText, func(b string) bool { return b != bogoText[0] }) {
		t.Errorf("BogoMIPS per vCPU %v: under TCG every vCPU should take the boot CPU's preset delay loop, not time its own", bogoText)
	}
}

// lockedBuffer is a bytes.Buffer written by a stream goroutine and read by the test.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lockedBuffer) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(b)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}
