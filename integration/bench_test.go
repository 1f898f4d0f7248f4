package integration

// Benchmarks of pod start latency and per-pod host memory, podvm against runc in the same run.
// docs/benchmarks.md says how to run them (`make bench`), what each one measures and how to
// read the numbers. The project measures speed and memory here, as ratios to runc on the same
// machine at the same time, and never asserts them in timed tests.
//
// Every benchmark that needs containerd starts one harness environment per handler (a latency
// benchmark's non-runc handler also a runc one to pair with, see compareLatency) and reuses
// it for all iterations; what an iteration leaves (its pod, its container) is removed outside
// the timer. Each iteration's duration is collected so the benchmarks report the median and
// p90 (ms/median, ms/p90) next to Go's mean (ns/op); with -benchtime 10x that is the median
// of 10. The parent benchmark runs runc first, then podvm, and logs a "metric | runc | podvm |
// ratio" table; the podvm sub-benchmark also reports the ratio as a metric (x-runc). For the
// latency benchmarks that ratio is over runc iterations that alternated with podvm's
// (compareLatency), so a drift in the machine's speed does not land on one side only.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/internal/logfile"
	"github.com/podvm/podvm/shim/config"
)

// benchHandlers are the runtime handlers compared, runc first: it is the baseline the ratios
// divide by.
var benchHandlers = []string{"runc", "podvm"}

// podvmTemplate is the benchmarks' name for podvm with templated start on ([template]
// enabled): the same CRI handler, podvm, with a node config of its own.
const podvmTemplate = "podvm-template"

// templateBenchHandlers are benchHandlers and podvm with templated start, for the benchmarks
// of a pod's start, its memory, its containers' start and exec.
var templateBenchHandlers = []string{"runc", "podvm", podvmTemplate}

// benchColumns are the comparison table's handlers, in its column order.
var benchColumns = templateBenchHandlers

// criHandler is the CRI runtime handler of a benchmarked handler.
func criHandler(h string) string {
	if h == podvmTemplate {
		return "podvm"
	}
	return h
}

// benchDeadline bounds one handler's part of a benchmark (setup, b.N iterations, teardown). A
// hang then fails the benchmark and the harness tears everything down, instead of `go test
// -timeout` killing the binary and leaving VMs and shims behind.
const benchDeadline = 20 * time.Minute

// BenchmarkRunPodSandbox measures RunPodSandbox until it returns (the pod is ready: for podvm the
// VM booted, its agent answered and the pause process runs in the guest). Stop and remove are
// outside the timer. A first pod, outside the measurement, pulls the pause image and warms the
// caches.
func BenchmarkRunPodSandbox(b *testing.B) {
	compareLatency(b, templateBenchHandlers, "RunPodSandbox", func(ctx context.Context, b *testing.B, _ benchTimer, h string, env *harness.Env) (latencyStep, func()) {
		removePod(ctx, b, env, runPod(ctx, b, env, criHandler(h), "warmup"))
		return func(i int) (time.Duration, func()) {
			start := time.Now()
			pod, err := env.RunPod(ctx, harness.PodOptions{Name: fmt.Sprintf("bench-%d", i), Handler: criHandler(h)})
			return time.Since(start), func() {
				if err != nil {
					b.Fatal(err)
				}
				assertPodReady(ctx, b, env, pod)
				removePod(ctx, b, env, pod)
			}
		}, func() {}
	})
}

// BenchmarkCreateStartContainer measures CreateContainer + StartContainer of a busybox
// `sleep 3600` in a running pod, until ContainerStatus says RUNNING. The pod is made once; each
// container is stopped and removed outside the timer. The image is pulled before the loop.
func BenchmarkCreateStartContainer(b *testing.B) {
	compareLatency(b, templateBenchHandlers, "CreateStartContainer", func(ctx context.Context, b *testing.B, _ benchTimer, h string, env *harness.Env) (latencyStep, func()) {
		pod := runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "bench", Handler: criHandler(h)})
		removeContainer(ctx, b, env, startSleeper(ctx, b, env, pod, "warmup"), 0)
		return func(i int) (time.Duration, func()) {
			start := time.Now()
			id := startSleeper(ctx, b, env, pod, fmt.Sprintf("c%d", i))
			return time.Since(start), func() { removeContainer(ctx, b, env, id, 0) }
		}, func() { removePod(ctx, b, env, pod) }
	})
}

// BenchmarkPodMemory measures the host memory one idle pod costs: the proportional set size
// (PSS, /proc/<pid>/smaps_rollup) summed over the pod's shim and everything it runs, plus the
// pages of their memfds that none of them maps (podMemoryMiB). For runc that is the shim,
// pause and the container; for podvm the shim, QEMU (its guest RAM: what the guest touched
// and, for a clone of a VM template, all the template's memory copied into it) and
// virtiofsd. Each iteration starts a pod with a busybox `sleep 3600`, lets it settle,
// measures, and removes it; ns/op is that whole cycle and means nothing here.
func BenchmarkPodMemory(b *testing.B) {
	compareTemplate(b, func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison) {
		removePod(ctx, b, env, runPodWithBusybox(ctx, b, env, harness.PodOptions{Name: "warmup", Handler: criHandler(h)}))
		var mibs []float64
		for i := 0; b.Loop(); i++ {
			pod, procs := startIdlePod(ctx, b, env, h, fmt.Sprintf("mem-%d", i))
			total, unmapped := podMemoryMiB(b, procs)
			if i == 0 {
				b.Logf("%s pod processes: %s; memfd pages none of them maps %.1f MiB", h, describeProcs(procs), unmapped)
				logTemplates(b, h, env)
			}
			mibs = append(mibs, total)
			removePod(ctx, b, env, pod)
		}
		cmp.reportMemory(b, h, mibs)
	})
}

// podSettle is how long BenchmarkPodMemory lets a started pod sit before measuring it.
const podSettle = 3 * time.Second

// startIdlePod starts pod name for handler h with a busybox `sleep 3600`, lets it settle, and
// returns it with its host processes (podProcesses), for the benchmarks of an idle pod's cost.
func startIdlePod(ctx context.Context, b *testing.B, env *harness.Env, h, name string) (*harness.Pod, []procEntry) {
	pod := runPod(ctx, b, env, criHandler(h), name)
	startSleeper(ctx, b, env, pod, "sleep")
	settle(ctx, b)
	procs, err := podProcesses(env, pod.ID)
	if err != nil {
		b.Fatal(err)
	}
	return pod, procs
}

// compareHandlers runs fn as a sub-benchmark per handler of benchHandlers (runc first), each
// in withBenchEnv, then logs what they reported to cmp as one table.
func compareHandlers(b *testing.B, fn func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison)) {
	compareAmong(b, benchHandlers, fn)
}

// compareTemplate is compareHandlers with podvm's templated start as a third handler
// (podvm-template). fn passes criHandler(h) to the CRI.
func compareTemplate(b *testing.B, fn func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison)) {
	compareAmong(b, templateBenchHandlers, fn)
}

func compareAmong(b *testing.B, handlers []string, fn func(ctx context.Context, b *testing.B, h string, env *harness.Env, cmp *comparison)) {
	cmp := newComparison(b)
	for _, h := range handlers {
		b.Run(h, func(b *testing.B) {
			withBenchEnv(b, h, func(ctx context.Context, env *harness.Env) { fn(ctx, b, h, env, cmp) })
		})
	}
	cmp.log()
}

// timedLoop runs b.Loop. Iteration i runs step(i), which returns how long its measured part
// took and what to do after it (check and clean up); that runs with the timer stopped. It
// returns the measured durations.
func timedLoop(b *testing.B, step func(i int) (time.Duration, func())) durations {
	var ds durations
	for i := 0; b.Loop(); i++ {
		d, after := step(i)
		b.StopTimer()
		ds = append(ds, d)
		after()
		b.StartTimer()
	}
	return ds
}

// BenchmarkBootToAgentReady measures the VM alone, without containerd or the shim: from
// starting virtiofsd and QEMU (the VM bootVM makes, with a default pod's vCPUs: 2, or the
// host's CPU count if lower; 512 MiB, virtio-fs share, virtio-serial agent) until the agent
// answers Version. It also reports the guest's own kernel-start-to-agent-serving time from
// that reply (guest-ms/median); the difference is QEMU start, firmware and kernel
// decompression as seen from the host. Stopping the VM is outside the timer.
func BenchmarkBootToAgentReady(b *testing.B) {
	kernel, rootImage := guestImage(b)
	root, err := os.MkdirTemp("/run", "pvb-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { assertNothingUnder(b, root) })
	ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
	defer cancel()
	// The VM logs each start at info level; only warnings and errors belong in benchmark output.
	quiet := logrus.New()
	quiet.SetLevel(logrus.WarnLevel)
	v := &benchVM{b: b, ctx: log.WithLogger(ctx, logrus.NewEntry(quiet)), root: root, kernel: kernel, rootImage: rootImage}
	b.Cleanup(v.stop) // a failed iteration leaves no VM behind

	// The first boot pages the kernel and root image in; it is not measured.
	v.boot(-1)
	v.stop()
	var guest durations
	host := timedLoop(b, func(i int) (time.Duration, func()) {
		h, g := v.boot(i)
		return h, func() {
			guest = append(guest, g)
			v.stop()
			if err := os.RemoveAll(v.stateDir(i)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(host.quantileMs(0.5), "ms/median")
	b.ReportMetric(host.quantileMs(0.9), "ms/p90")
	b.ReportMetric(guest.quantileMs(0.5), "guest-ms/median")
	b.Logf("host %s; guest %s", host, guest)
	b.Logf("boot to agent ready over %d boots: host median %.0f ms (p90 %.0f), guest kernel start to agent serving median %.0f ms",
		len(host), host.quantileMs(0.5), host.quantileMs(0.9), guest.quantileMs(0.5))
}

// benchVM is BenchmarkBootToAgentReady's VM: one at a time, each in a state dir of its own
// under root.
type benchVM struct {
	b                 *testing.B
	ctx               context.Context
	root              string
	kernel, rootImage string
	vm                *qemu.VM
	agent             *agent.Client
}

func (v *benchVM) stateDir(i int) string { return filepath.Join(v.root, strconv.Itoa(i)) }

// boot boots VM i and waits for its agent. It returns the time from QEMU's start to the agent's
// answer, and the guest's own kernel-start-to-agent-serving time.
func (v *benchVM) boot(i int) (time.Duration, time.Duration) {
	b := v.b
	stateDir := v.stateDir(i)
	shared := filepath.Join(stateDir, "shared")
	if err := os.MkdirAll(shared, 0o755); err != nil {
		b.Fatal(err)
	}
	cfg := testVMConfig("bench-"+strconv.Itoa(i), stateDir, shared, v.kernel, v.rootImage)
	cfg.VCPUs = min(config.DefaultVCPUs, runtime.NumCPU())
	vm, err := qemu.New(v.ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := vm.Start(v.ctx); err != nil {
		b.Fatalf("start VM: %v", err)
	}
	v.vm = vm
	cctx, ccancel := context.WithTimeout(v.ctx, 60*time.Second)
	defer ccancel()
	c, err := agent.Connect(cctx, vm.DialAgent, vm.Done())
	d := time.Since(start)
	if err != nil {
		b.Fatalf("connect to agent: %v; guest console:\n%s", err, logfile.TailLines(vm.ConsolePath(), 40))
	}
	v.agent = c
	return d, time.Duration(c.Info.GetBootToReadyNs())
}

// stop shuts the current VM down, if there is one.
func (v *benchVM) stop() {
	if v.vm == nil {
		return
	}
	sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer scancel()
	if err := stopGuest(sctx, v.vm, v.agent); err != nil {
		v.b.Errorf("stop VM: %v", err)
	}
	v.vm, v.agent = nil, nil
}

// withBenchEnv runs fn with a fresh harness environment for handler and a context bounded by
// benchDeadline, then tears the environment down and fails b if anything is left behind: a
// process, mount, directory, cgroup, netns or (podvm) anything in the shim's state dir. It
// tears down and checks also when fn fails.
func withBenchEnv(b *testing.B, handler string, fn func(ctx context.Context, env *harness.Env)) {
	b.Helper()
	var env *harness.Env
	switch handler {
	case "runc":
		env = harness.Start(b, harness.Options{})
	case "podvm":
		env = podvmBenchEnv(b)
	case podvmTemplate:
		env = podvmTemplateBenchEnv(b)
	default:
		b.Fatalf("unknown handler %q", handler)
	}
	// Cleanups run last-in first-out: this runs before the harness's own teardown, tears down
	// itself and checks the result, also after a failure.
	b.Cleanup(func() { env.AssertNoLeaks(b) })
	ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
	defer cancel()
	fn(ctx, env)
}

// podvmBenchEnv is podvmEnv with a state dir of its own instead of /run/podvm, and without
// podvmEnv's machine-wide check for QEMU, virtiofsd and podvm shim processes: other tests'
// VMs on the same machine are not this benchmark's leaks. Its own are found by the state dir
// in their command lines.
func podvmBenchEnv(t testing.TB) *harness.Env {
	t.Helper()
	opts := bootedShimOptions(t, ownStateDir(t, "pvb-"))
	opts.LeakDirsKeep = []string{config.StartSlotsDirName}
	return harness.Start(t, opts)
}

// podvmTemplateBenchEnv is podvmBenchEnv with templated start on; its templates are in its
// state dir.
func podvmTemplateBenchEnv(t testing.TB) *harness.Env {
	t.Helper()
	opts := podvmTemplateOptions(t, "pvb-")
	opts.LeakDirsKeep = []string{config.StartSlotsDirName, config.TemplateDirName}
	return harness.Start(t, opts)
}

// logTemplates logs how much memory the VM templates of a podvm-template env take: tmpfs
// pages no process's PSS shows.
func logTemplates(b *testing.B, h string, env *harness.Env) {
	if h != podvmTemplate {
		return
	}
	dir := filepath.Join(env.LeakDirs()[0], config.TemplateDirName)
	var total int64
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		var st syscall.Stat_t
		if err == nil && !d.IsDir() && syscall.Stat(p, &st) == nil {
			total += st.Blocks * 512
		}
		return nil
	})
	b.Logf("%s: the VM templates in %s take %.1f MiB (tmpfs, in no process's PSS)", h, dir, float64(total)/(1<<20))
}

// assertNothingUnder fails t if a process still names dir on its command line, something is
// mounted under it or a C virtiofsd's lock file names a socket under it, then removes dir.
func assertNothingUnder(t testing.TB, dir string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var left []procEntry
	for {
		left = left[:0]
		all := listProcesses()
		for _, p := range all {
			if strings.Contains(p.cmdline, dir+"/") {
				left = append(left, p)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range left {
		t.Errorf("leak: process %d (%s) still running: %s", p.pid, p.comm, p.cmdline)
	}
	if mi, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(mi), " "+dir+"/") {
		t.Errorf("leak: mounts left under %s", dir)
	}
	for _, l := range qemu.VirtiofsdLockFiles(dir) {
		t.Errorf("leak: virtiofsd lock file %s left for a socket under %s", l, dir)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Errorf("leak: remove %s: %v", dir, err)
	}
}

// runPod runs a pod sandbox with handler and fails t if it does not start.
func runPod(ctx context.Context, t testing.TB, env *harness.Env, handler, name string) *harness.Pod {
	t.Helper()
	pod, err := env.RunPod(ctx, harness.PodOptions{Name: name, Handler: handler})
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

func assertPodReady(ctx context.Context, t testing.TB, env *harness.Env, pod *harness.Pod) {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	st, err := env.Runtime.PodSandboxStatus(sctx, pod.ID, false)
	if err != nil {
		t.Fatalf("PodSandboxStatus %s: %v", pod.ID, err)
	}
	if got := st.GetStatus().GetState(); got != runtimeapi.PodSandboxState_SANDBOX_READY {
		t.Fatalf("pod %s is %s right after RunPodSandbox, want SANDBOX_READY", pod.ID, got)
	}
}

// removePod stops and removes a pod, as kubelet does when a pod is deleted.
func removePod(ctx context.Context, t testing.TB, env *harness.Env, pod *harness.Pod) {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	if err := env.Runtime.StopPodSandbox(sctx, pod.ID); err != nil {
		t.Fatalf("StopPodSandbox %s: %v", pod.ID, err)
	}
	if err := env.Runtime.RemovePodSandbox(sctx, pod.ID); err != nil {
		t.Fatalf("RemovePodSandbox %s: %v", pod.ID, err)
	}
}

// startSleeper creates and starts a busybox `sleep 3600` in pod and returns once ContainerStatus
// says it runs. It polls every 2 ms, so the poll adds little to what a benchmark measures.
func startSleeper(ctx context.Context, t testing.TB, env *harness.Env, pod *harness.Pod, name string) string {
	t.Helper()
	id, err := runSleeper(ctx, env, pod, name)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// runSleeper is startSleeper returning its error, for goroutines other than the test's.
func runSleeper(ctx context.Context, env *harness.Env, pod *harness.Pod, name string) (string, error) {
	id, _, err := env.CreateContainer(ctx, pod, harness.ContainerOptions{Name: name, Command: []string{"sleep", "3600"}})
	if err != nil {
		return "", err
	}
	sctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	if err := env.Runtime.StartContainer(sctx, id); err != nil {
		return "", fmt.Errorf("StartContainer %s: %w", name, err)
	}
	for {
		st, err := env.Runtime.ContainerStatus(sctx, id, false)
		if err != nil {
			return "", fmt.Errorf("ContainerStatus %s: %w", name, err)
		}
		switch s := st.GetStatus().GetState(); s {
		case runtimeapi.ContainerState_CONTAINER_RUNNING:
			return id, nil
		case runtimeapi.ContainerState_CONTAINER_EXITED:
			return "", fmt.Errorf("container %s exited (code %d, %s) instead of running", name, st.GetStatus().GetExitCode(), st.GetStatus().GetReason())
		}
		select {
		case <-sctx.Done():
			return "", fmt.Errorf("container %s not RUNNING: %w", name, sctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// removeContainer stops a container, killing it after grace seconds, and removes it.
func removeContainer(ctx context.Context, t testing.TB, env *harness.Env, id string, grace int64) {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	if err := env.Runtime.StopContainer(sctx, id, grace); err != nil {
		t.Fatalf("StopContainer %s: %v", id, err)
	}
	if err := env.Runtime.RemoveContainer(sctx, id); err != nil {
		t.Fatalf("RemoveContainer %s: %v", id, err)
	}
}

// durations are one benchmark's per-iteration times.
type durations []time.Duration

// String lists the samples in the order they were taken, in milliseconds.
func (ds durations) String() string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = strconv.FormatInt(d.Milliseconds(), 10)
	}
	return "[" + strings.Join(parts, " ") + "] ms"
}

// quantileMs is the q-quantile by nearest rank (q=0.5 of 10 samples is the 5th smallest,
// q=0.9 the 9th), in milliseconds; 0 without samples.
func (ds durations) quantileMs(q float64) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return float64(s[nearestRank(len(s), q)]) / float64(time.Millisecond)
}

func nearestRank(n int, q float64) int {
	r := int(float64(n)*q+0.999999) - 1 // ceil(n*q) - 1
	return max(0, min(n-1, r))
}

func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[nearestRank(len(s), q)]
}

// comparison collects one parent benchmark's results per handler for its ratio table.
type comparison struct {
	b    *testing.B
	rows []string              // metric names in report order
	vals map[string][3]float64 // metric -> a value per benchColumns
	unit map[string]string
	// paired holds, per metric, a handler's ratio to the runc iterations that alternated with
	// its own (compareLatency); ratio prefers it to the runc sub-benchmark's figure.
	paired map[string]map[string]float64
}

func newComparison(b *testing.B) *comparison {
	return &comparison{b: b, vals: map[string][3]float64{}, unit: map[string]string{}, paired: map[string]map[string]float64{}}
}

func (c *comparison) set(handler, metric, unit string, v float64) {
	if _, ok := c.vals[metric]; !ok {
		c.rows = append(c.rows, metric)
	}
	c.unit[metric] = unit
	vals := c.vals[metric]
	vals[slices.Index(benchColumns, handler)] = v
	c.vals[metric] = vals
}

// pair records handler's latency samples ds against the runc samples refs that alternated with
// them: the ratios of their medians and of their p90s.
func (c *comparison) pair(handler, what string, ds, refs durations) {
	for _, q := range []struct {
		name string
		q    float64
	}{{" median", 0.5}, {" p90", 0.9}} {
		if r := refs.quantileMs(q.q); r > 0 {
			if c.paired[what+q.name] == nil {
				c.paired[what+q.name] = map[string]float64{}
			}
			c.paired[what+q.name][handler] = ds.quantileMs(q.q) / r
		}
	}
}

// ratio is handler's value over runc's for metric, if both ran in this process: over the runc
// iterations paired with handler's, if there were any, else over the runc sub-benchmark's.
func (c *comparison) ratio(metric, handler string) (float64, bool) {
	if r, ok := c.paired[metric][handler]; ok {
		return r, true
	}
	p := c.vals[metric]
	v := p[slices.Index(benchColumns, handler)]
	if p[0] == 0 || v == 0 {
		return 0, false
	}
	return v / p[0], true
}

func (c *comparison) reportLatency(b *testing.B, handler, what string, ds durations) {
	med, p90 := ds.quantileMs(0.5), ds.quantileMs(0.9)
	b.Logf("%s %s: %s", handler, what, ds)
	b.ReportMetric(med, "ms/median")
	b.ReportMetric(p90, "ms/p90")
	c.set(handler, what+" median", "ms", med)
	c.set(handler, what+" p90", "ms", p90)
	if r, ok := c.ratio(what+" median", handler); ok && handler != "runc" {
		b.ReportMetric(r, "x-runc")
	}
}

func (c *comparison) reportMemory(b *testing.B, handler string, mibs []float64) {
	c.reportMemoryAs(b, handler, "pod PSS", mibs)
}

// reportMemoryAs reports a memory metric (MiB samples) under the name what.
func (c *comparison) reportMemoryAs(b *testing.B, handler, what string, mibs []float64) {
	c.reportAmounts(b, handler, what, "MiB", mibs)
}

// reportAmounts reports samples xs of an amount in unit (memory, CPU time per second) under
// the name what: their median and maximum, and the median's ratio to runc's.
func (c *comparison) reportAmounts(b *testing.B, handler, what, unit string, xs []float64) {
	med, hi := quantile(xs, 0.5), quantile(xs, 1)
	b.Logf("%s %s: %.1f %s", handler, what, xs, unit)
	b.ReportMetric(med, unit+"/median")
	b.ReportMetric(hi, unit+"/max")
	c.set(handler, what+" median", unit, med)
	c.set(handler, what+" max", unit, hi)
	if r, ok := c.ratio(what+" median", handler); ok && handler != "runc" {
		b.ReportMetric(r, "x-runc")
	}
}

// log writes the table of what both handlers measured in this run, and keeps its rows for
// the run's summary (printBenchSummary).
func (c *comparison) log() {
	if len(c.rows) == 0 {
		return
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "%s, same run (load average at the end: %s)\n", c.b.Name(), loadAvg())
	fmt.Fprint(&buf, tableHeader)
	for _, m := range c.rows {
		row := c.row(m)
		fmt.Fprintln(&buf, row)
		benchSummary.rows = append(benchSummary.rows, row)
	}
	c.b.Log("\n" + buf.String())
}

// tableHeader heads the comparison tables: runc, podvm and podvm with templated start.
const tableHeader = "| metric | runc | podvm | podvm/runc | podvm-template | podvm-template/runc |\n| --- | --- | --- | --- | --- | --- |\n"

// row is metric m's table row.
func (c *comparison) row(m string) string {
	p := c.vals[m]
	ratio := func(h string) string {
		if v, ok := c.ratio(m, h); ok {
			return fmt.Sprintf("%.1fx", v)
		}
		return "n/a"
	}
	return fmt.Sprintf("| %s | %s | %s | %s | %s | %s |", m, fmtVal(p[0], c.unit[m]), fmtVal(p[1], c.unit[m]), ratio("podvm"),
		fmtVal(p[2], c.unit[m]), ratio(podvmTemplate))
}

// benchSummary collects every comparison table's rows of one `go test -bench` run, for the
// one table printBenchSummary prints at the end.
var benchSummary struct{ rows []string }

// printBenchSummary prints the rows of all the benchmarks that ran, as one runc/podvm table
// with the load average, after the run (TestMain). Without benchmarks it prints nothing.
func printBenchSummary() {
	if len(benchSummary.rows) == 0 {
		return
	}
	fmt.Printf("\nAll benchmarks of this run, runc and podvm side by side (load average at the end: %s)\n", loadAvg())
	fmt.Print(tableHeader)
	for _, r := range benchSummary.rows {
		fmt.Println(r)
	}
}

func fmtVal(v float64, unit string) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f %s", v, unit)
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// procEntry is one host process as BenchmarkPodMemory sees it.
type procEntry struct {
	pid, ppid int
	comm      string
	cmdline   string
	pssMiB    float64
}

func listProcesses() []procEntry {
	var out []procEntry
	for _, p := range harness.Processes() {
		out = append(out, procEntry{pid: p.PID, ppid: p.PPID, comm: p.Comm, cmdline: p.Cmdline()})
	}
	return out
}

// podProcesses finds the host processes of one pod with their PSS: the shim containerd started
// for the sandbox (by -id and this env's -address) and all its descendants (runc: pause and the
// containers, which the shim reaps as subreaper; podvm: QEMU and virtiofsd), plus any process
// naming the pod's ID in its command line that was reparented away (podvm's QEMU and virtiofsd
// name the sandbox state dir).
func podProcesses(env *harness.Env, podID string) ([]procEntry, error) {
	all := listProcesses()
	addr := "-address " + strings.TrimPrefix(env.Endpoint, "unix://")
	children := map[int][]int{}
	byPID := map[int]procEntry{}
	var roots []int
	for _, p := range all {
		children[p.ppid] = append(children[p.ppid], p.pid)
		byPID[p.pid] = p
		fields := strings.Fields(p.cmdline)
		isShim := len(fields) > 0 && strings.HasPrefix(filepath.Base(fields[0]), "containerd-shim")
		if isShim && strings.Contains(p.cmdline+" ", addr+" ") && strings.Contains(p.cmdline+" ", "-id "+podID+" ") {
			roots = append(roots, p.pid)
		}
	}
	if len(roots) != 1 {
		return nil, fmt.Errorf("pod %s: found %d shim processes with -id %s and %s, want 1", podID, len(roots), podID, addr)
	}
	seen := map[int]bool{}
	var walk func(int)
	walk = func(pid int) {
		if seen[pid] {
			return
		}
		seen[pid] = true
		for _, c := range children[pid] {
			walk(c)
		}
	}
	walk(roots[0])
	for _, p := range all {
		if strings.Contains(p.cmdline, podID) && !strings.HasPrefix(p.comm, "containerd") {
			walk(p.pid)
		}
	}
	var out []procEntry
	var errs []error
	for pid := range seen {
		p := byPID[pid]
		pss, err := pssMiB(pid)
		if exited(err) {
			continue // exited meanwhile (a short-lived helper)
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.pssMiB = pss
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pssMiB > out[j].pssMiB })
	return out, errors.Join(errs...)
}

// exited says whether err, from reading a process's /proc files, means it has exited since it
// was listed: its directory gone (ENOENT), or still there while it exits (ESRCH).
func exited(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH)
}

// pssMiB is a process's proportional set size: its private pages plus its share of the pages
// it shares, so summing it over processes counts each page once.
func pssMiB(pid int) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 3 && fields[0] == "Pss:" && fields[2] == "kB" {
			kb, err := strconv.ParseFloat(fields[1], 64)
			if err != nil {
				return 0, fmt.Errorf("pid %d smaps_rollup: %q: %w", pid, sc.Text(), err)
			}
			return kb / 1024, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	// Kernel threads and zombies have an empty smaps_rollup.
	return 0, nil
}

func describeProcs(ps []procEntry) string {
	var parts []string
	for _, p := range ps {
		parts = append(parts, fmt.Sprintf("%s[%d] %.1f MiB", p.comm, p.pid, p.pssMiB))
	}
	return strings.Join(parts, ", ")
}

// podMemoryMiB is the memory of one pod's processes procs (podProcesses): their PSS summed,
// plus the pages of their memfds that none of them maps. It returns the total and that part.
func podMemoryMiB(b *testing.B, procs []procEntry) (total, unmapped float64) {
	pids := make([]int, 0, len(procs))
	for _, p := range procs {
		total += p.pssMiB
		pids = append(pids, p.pid)
	}
	unmapped, err := unmappedMemfdMiB(pids)
	if err != nil {
		b.Fatal(err)
	}
	return total + unmapped, unmapped
}

// unmappedMemfdMiB is the memory of the memfds the processes pids hold (open or mapped) that
// none of them maps, in MiB: memory no process's PSS shows. A pod VM's guest RAM is a memfd
// (QEMU's memory backend); a clone of a VM template gets the template's memory copied into
// it through the file, and QEMU maps only the pages its guest touches since. Each such memfd
// is the pod's own, so the part its processes do not map is the pod's too.
func unmappedMemfdMiB(pids []int) (float64, error) {
	allocated := map[uint64]int64{} // inode: bytes allocated
	for _, pid := range pids {
		for _, dir := range []string{"fd", "map_files"} {
			ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/%s", pid, dir))
			if exited(err) {
				continue
			}
			if err != nil {
				return 0, err
			}
			for _, e := range ents {
				p := fmt.Sprintf("/proc/%d/%s/%s", pid, dir, e.Name())
				if l, err := os.Readlink(p); err != nil || !strings.HasPrefix(l, "/memfd:") {
					continue
				}
				var st unix.Stat_t
				if unix.Stat(p, &st) == nil {
					allocated[st.Ino] = st.Blocks * 512
				}
			}
		}
	}
	if len(allocated) == 0 {
		return 0, nil
	}
	mappedKB := map[uint64]float64{} // inode: PSS of its mappings
	for _, pid := range pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
		if exited(err) {
			continue
		}
		if err != nil {
			return 0, err
		}
		var ino uint64
		var in bool
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
				// A mapping's header: range perms offset dev inode [path].
				n, err := strconv.ParseUint(f[4], 10, 64)
				_, in = allocated[n]
				in = in && err == nil && len(f) >= 6 && strings.HasPrefix(f[5], "/memfd:")
				ino = n
				continue
			}
			if in && len(f) == 3 && f[0] == "Pss:" {
				kb, err := strconv.ParseFloat(f[1], 64)
				if err != nil {
					return 0, fmt.Errorf("pid %d smaps: %q: %w", pid, line, err)
				}
				mappedKB[ino] += kb
			}
		}
	}
	total := 0.0
	for ino, n := range allocated {
		total += max(0, float64(n)/(1<<20)-mappedKB[ino]/1024)
	}
	return total, nil
}
