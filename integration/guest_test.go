package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/internal/logfile"
	"github.com/podvm/podvm/rootfs"
	"github.com/podvm/podvm/rootfs/guestimage"
)

// guestVM is one booted VM with a connected agent, torn down by the test's cleanup.
type guestVM struct {
	vm        *qemu.VM
	agent     *agent.Client
	sharedDir string
	// share is the pod share (rootfs.CreateShare) when the VM was booted with one;
	// sharedDir is then its read-only export.
	share    *rootfs.Share
	bootTime time.Duration
}

// bootVM boots a VM from the test guest image with a virtio-fs share and connects to its agent.
func bootVM(t testing.TB, ctx context.Context, stateDir string) *guestVM {
	t.Helper()
	return bootVMWith(t, ctx, stateDir, vmOptions{})
}

// vmOptions are what a test can add to the VM bootVM makes.
type vmOptions struct {
	// NetDevices are cold-plugged NICs; the VM takes over their tap files.
	NetDevices []*hypervisor.NetDevice
	// Setup is sent to the agent as is, except that an empty Hostname or SharedFsTag gets
	// bootVM's; nil sends only those.
	Setup *api.SetupSandboxRequest
	// Share exports a pod share (rootfs.CreateShare) as the shim does, instead of a plain
	// directory the test writes into.
	Share bool
	// MemoryMiB and VCPUs size the VM; 0 keeps the test config's.
	MemoryMiB, VCPUs int
}

// bootVMWith is bootVM with options: it boots a VM from the test guest image with a virtio-fs
// share and the given devices, connects to its agent and sets the sandbox up.
func bootVMWith(t testing.TB, ctx context.Context, stateDir string, o vmOptions) *guestVM {
	t.Helper()
	kernel, rootImage := guestImage(t)
	shared := filepath.Join(stateDir, "shared")
	var share *rootfs.Share
	if o.Share {
		if err := os.MkdirAll(stateDir, 0o700); err != nil {
			t.Fatal(err)
		}
		s, err := rootfs.CreateShare(ctx, stateDir, agent.GuestSharedDir)
		if err != nil {
			t.Fatal(err)
		}
		share, shared = s, s.ExportDir()
	} else if err := os.MkdirAll(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := testVMConfig(filepath.Base(stateDir), stateDir, shared, kernel, rootImage)
	cfg.NetDevices = o.NetDevices
	if o.MemoryMiB != 0 {
		cfg.MemoryMiB = o.MemoryMiB
	}
	if o.VCPUs != 0 {
		cfg.VCPUs = o.VCPUs
	}
	if share != nil {
		cfg.SharedDirNS = share.InMountNS
	}
	vm, err := qemu.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := vm.Start(ctx); err != nil {
		t.Fatalf("start VM: %v", err)
	}
	g := &guestVM{vm: vm, sharedDir: shared, share: share}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := stopGuest(sctx, vm, g.agent); err != nil {
			t.Errorf("stop VM: %v", err)
		}
		if share != nil {
			share.Close()
			if err := rootfs.Cleanup(sctx, stateDir); err != nil {
				t.Errorf("clean up the share: %v", err)
			}
		}
		if t.Failed() {
			t.Logf("guest console:\n%s", logfile.TailLines(vm.ConsolePath(), 60))
		}
	})
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c, err := agent.Connect(cctx, vm.DialAgent, vm.Done())
	if err != nil {
		t.Fatalf("connect to agent: %v", err)
	}
	g.agent = c
	g.bootTime = time.Since(start)
	req := &api.SetupSandboxRequest{}
	if o.Setup != nil {
		req = o.Setup
	}
	if req.Hostname == "" {
		req.Hostname = "podvm-it"
	}
	if req.SharedFsTag == "" {
		req.SharedFsTag = hypervisor.SharedFSTag
	}
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	defer scancel()
	if _, err := c.SetupSandbox(sctx, req); err != nil {
		t.Fatalf("setup sandbox: %v", err)
	}
	return g
}

// testVMConfig is the VM the tests boot: 1 vCPU, 512 MiB, the test guest image, shared as its
// virtio-fs share, the agent over virtio-serial.
func testVMConfig(id, stateDir, shared, kernel, rootImage string) hypervisor.Config {
	return hypervisor.Config{
		ID: id, StateDir: stateDir, Accel: testAccel(),
		VCPUs: 1, MemoryMiB: 512, Kernel: kernel, RootImage: rootImage, SharedDir: shared,
		AgentTransport: qemu.TransportSerial, Debug: testDebug(),
	}
}

// stopGuest shuts the guest down through its agent (if connected) and stops the VM.
func stopGuest(ctx context.Context, vm *qemu.VM, c *agent.Client) error {
	if c != nil {
		_, _ = c.Shutdown(ctx, &api.Empty{})
		c.Close()
	}
	return vm.Stop(ctx)
}

// busyboxRootfs makes a minimal rootfs under the VM's shared dir and returns the guest path.
func busyboxRootfs(t testing.TB, g *guestVM, id string) string {
	t.Helper()
	root := filepath.Join(g.sharedDir, id, "rootfs")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	busyboxTree(t, root)
	return filepath.Join(agent.GuestSharedDir, id, "rootfs")
}

// defaultSpec is the spec containerd itself would generate for a container.
func defaultSpec(t testing.TB, id, guestRoot string, opts ...oci.SpecOpts) []byte {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "podvm-it")
	opts = append([]oci.SpecOpts{oci.WithRootFSPath(guestRoot), oci.WithHostname("c-" + id), oci.WithDefaultPathEnv}, opts...)
	spec, err := oci.GenerateSpec(ctx, nil, &containers.Container{ID: id}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// output collects a process's stdout and stderr through the agent.
type output struct {
	wg             sync.WaitGroup
	mu             sync.Mutex
	stdout, stderr bytes.Buffer
	errs           []error
}

func collect(ctx context.Context, c api.AgentService, cid, execID string, streams ...api.StdioStream) *output {
	o := &output{}
	for _, s := range streams {
		w := &o.stdout
		if s == api.StdioStream_STDERR {
			w = &o.stderr
		}
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			if err := agent.CopyOut(ctx, c, cid, execID, s, lockedWriter{&o.mu, w}); err != nil {
				o.mu.Lock()
				o.errs = append(o.errs, err)
				o.mu.Unlock()
			}
		}()
	}
	return o
}

func (o *output) wait(t testing.TB) (string, string) {
	t.Helper()
	o.wg.Wait()
	for _, err := range o.errs {
		t.Error(err)
	}
	return o.stdout.String(), o.stderr.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func hostKernel(t testing.TB) string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	return unix.ByteSliceToString(u.Release[:])
}

func wait(t testing.TB, ctx context.Context, c api.AgentService, cid, execID string) uint32 {
	t.Helper()
	resp, err := c.WaitProcess(ctx, &api.ProcessRequest{ContainerId: cid, ExecId: execID})
	if err != nil {
		t.Fatalf("wait %s/%s: %v", cid, execID, err)
	}
	return resp.ExitStatus
}

func execProcess(t testing.TB, args []string, terminal bool) []byte {
	t.Helper()
	b, err := json.Marshal(&specs.Process{Args: args, Cwd: "/", Terminal: terminal,
		Env: []string{"PATH=/bin", "TERM=xterm"}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGuestAboveFourGiB: a VM whose RAM reaches above 4 GiB boots from its root image and
// sees all of it. q35 then maps the root image's pmem at the next GiB boundary after the RAM
// above 4 GiB; a guest without ACPI is told that window in its memory map (memmap=), else it
// puts PCI BARs there and hangs probing a device, or loses RAM to a misplaced reservation.
// Nor does the kernel set 64 MiB of it aside as a bounce buffer for DMA above 4 GiB, which
// no device of a pod VM uses and which the host would pay for in every such pod (zeroed at
// boot, so never given back).
func TestGuestAboveFourGiB(t *testing.T) {
	ctx, stateDir := vmTest(t, 3*time.Minute)
	g := bootVMWith(t, ctx, stateDir, vmOptions{MemoryMiB: 3072, VCPUs: 2})
	root := busyboxRootfs(t, g, "big")
	spec := defaultSpec(t, "big", root, oci.WithProcessArgs("sh", "-c",
		"grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo"))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "big", spec)
	removeGuestContainer(t, ctx, g.agent, "big")
	if code != 0 {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	var kib, cpus int
	if _, err := fmt.Sscanf(stdout, "MemTotal: %d kB\n%d", &kib, &cpus); err != nil {
		t.Fatalf("%q: %v", stdout, err)
	}
	if low := minMemTotalKiB(3072); kib < low || kib > 3072<<10 {
		t.Errorf("guest MemTotal %d KiB, want %d to %d: the kernel keeps more than its own bookkeeping", kib, low, 3072<<10)
	}
	if cpus != 2 {
		t.Errorf("guest has %d vCPUs, want 2", cpus)
	}
	t.Logf("3 GiB, 2 vCPUs: MemTotal %d KiB, agent ready %s after QEMU start; QEMU's %s", kib,
		g.bootTime.Round(time.Millisecond), guestRAMInUse(g.vm.Pid()))
}

// minMemTotalKiB is the least MemTotal a guest of memMiB should report: the kernel takes its
// own text and data, early allocations, its struct page array (1/64 of the RAM) and the
// hash tables it sizes by the RAM (under 1/256), and nothing else.
func minMemTotalKiB(memMiB int) int {
	return (memMiB - memMiB/64 - memMiB/256 - 32) << 10
}

// guestRAMInUse says how much of its guest RAM QEMU's pid holds (the shared memory in its
// smaps_rollup: the guest RAM's memfd), for the test's log.
func guestRAMInUse(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return err.Error()
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "Pss_Shmem:") {
			return "guest RAM in use: " + strings.Join(strings.Fields(l)[1:], " ")
		}
	}
	return "smaps_rollup has no Pss_Shmem"
}

// TestGuestRunsContainers boots a real VM and runs containers in it through the agent.
func TestGuestRunsContainers(t *testing.T) {
	ctx, stateDir := vmTest(t, 5*time.Minute)
	g := bootVM(t, ctx, stateDir)
	c := g.agent
	t.Logf("agent ready %s after QEMU start (guest: %s since kernel start), guest kernel %s",
		g.bootTime.Round(time.Millisecond), time.Duration(c.Info.BootToReadyNs).Round(time.Millisecond), c.Info.KernelRelease)
	if c.Info.KernelRelease == hostKernel(t) {
		t.Fatalf("guest kernel %q is the host's: not running in the VM", c.Info.KernelRelease)
	}
	t.Run("stdout, stderr and exit code", func(t *testing.T) { testGuestStdio(t, ctx, g) })
	t.Run("exec, terminal, stdin and kill", func(t *testing.T) { testGuestExec(t, ctx, g) })
	t.Run("free page reporting order", func(t *testing.T) { testGuestPageReporting(t, ctx, g) })
	t.Run("timer device", func(t *testing.T) { testGuestTimer(t, ctx, g) })
	t.Run("root image mapped with DAX", func(t *testing.T) { testGuestRootImage(t, ctx, g) })
	t.Run("cgroup hierarchy favours dynamic changes", func(t *testing.T) { testGuestCgroupDynmods(t, ctx, g) })
	t.Run("kernel entered as the image says", func(t *testing.T) { testGuestBootProtocol(t, ctx, g) })
	t.Run("kernel preloaded, its file not kept mapped", func(t *testing.T) { testGuestKernelPreloaded(t, g) })
	t.Run("TSC frequency from the host", func(t *testing.T) { testGuestTSC(t, ctx, g) })
	t.Run("CPU vulnerability mitigations", func(t *testing.T) { testGuestMitigations(t, ctx, g) })
}

// mitigationConfigs are the guest kernel's options that a container of a pod, sharing the
// guest kernel with the pod's other containers, meets: Meltdown's page table isolation,
// Spectre v2's retpolines and the return thunks of Retbleed's and SRSO's mitigations.
var mitigationConfigs = []string{"CONFIG_CPU_MITIGATIONS", "CONFIG_PAGE_TABLE_ISOLATION", "CONFIG_RETPOLINE", "CONFIG_RETHUNK"}

// testGuestMitigations: the guest kernel is built with the CPU vulnerability mitigations a
// distribution kernel has (a node's kernel keeps runc's containers apart with them). Under
// KVM they are on: Meltdown and Spectre v2, which the kernel mitigates in software alone
// (page table isolation, retpolines), are not reported vulnerable. Under TCG, which executes
// nothing speculatively, the guest boots with mitigations=off and leaves its thunk sites as
// compiled (keep_thunks).
func testGuestMitigations(t *testing.T, ctx context.Context, g *guestVM) {
	root := busyboxRootfs(t, g, "c8")
	v := "/sys/devices/system/cpu/vulnerabilities/"
	spec := defaultSpec(t, "c8", root, oci.WithProcessArgs("sh", "-c",
		"cat /proc/cmdline && zcat /proc/config.gz | grep -E '^CONFIG_[A-Z_]+=' && grep . "+v+"meltdown "+v+"spectre_v2; "+
			"dmesg | grep keep_thunks || true"))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "c8", spec)
	removeGuestContainer(t, ctx, g.agent, "c8")
	if code != 0 {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	lines := strings.Split(stdout, "\n")
	for _, c := range mitigationConfigs {
		if !slices.Contains(lines, c+"=y") {
			t.Errorf("the guest kernel's config has no %s=y", c)
		}
	}
	cmdline := strings.Fields(lines[0])
	off := slices.Contains(cmdline, "mitigations=off")
	if g.vm.Config().Accel == qemu.AccelTCG {
		// The thunk sites left as compiled (kernel/patches/0004): the kernel says so only
		// when no mitigation in use needs them rewritten.
		if !off || !strings.Contains(stdout, "keep_thunks: retpoline and return thunk sites left as compiled") {
			t.Errorf("accel tcg: want the kernel booted with mitigations=off and its thunk sites kept:\n%s", stdout)
		}
		return
	}
	if off || slices.Contains(cmdline, "keep_thunks") {
		t.Errorf("accel %s, and the kernel command line %q turns the mitigations off", g.vm.Config().Accel, lines[0])
	}
	for _, l := range lines {
		if file, state, ok := strings.Cut(l, ":"); ok && strings.HasPrefix(file, v) && strings.HasPrefix(state, "Vulnerable") {
			t.Errorf("under %s the guest reports %s", g.vm.Config().Accel, l)
		}
	}
}

// testGuestTSC: under TCG the guest kernel is told the TSC's frequency (tsc_early_khz, the
// host's, measured by the shim) instead of measuring it against the emulated PIT at boot.
// A guest without ACPI (the default) has no HPET or ACPI timer to check the value against
// later, so its clocks run on it: a wrong value would leave them running fast or slow. The
// guest's clock must keep time with its RTC (QEMU's follows the host's clock) within 1%
// over 10 s. A kernel that can check it (with ACPI) must keep the value within 0.2%.
func testGuestTSC(t *testing.T, ctx context.Context, g *guestVM) {
	cfg := g.vm.Config()
	root := busyboxRootfs(t, g, "c7")
	// The RTC counts whole seconds: time 10 of them, from one change to another, on the
	// guest's clock (/proc/uptime); read, a shell builtin, polls without forking.
	spec := defaultSpec(t, "c7", root, oci.WithProcessArgs("sh", "-c", `cat /proc/cmdline
r=/sys/class/rtc/rtc0/since_epoch
read s < $r; while read t < $r; [ "$t" = "$s" ]; do :; done; read a _ < /proc/uptime
e=$((t+10)); while read t < $r; [ "$t" -lt "$e" ]; do :; done; read b _ < /proc/uptime
echo "uptime over 10 RTC seconds: $a $b"
dmesg | grep -E 'tsc: (Refined|Unable|Detected)'`))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "c7", spec)
	removeGuestContainer(t, ctx, g.agent, "c7")
	if code != 0 {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	var a, b float64
	_, times, _ := strings.Cut(stdout, "uptime over 10 RTC seconds: ")
	if _, err := fmt.Sscan(times, &a, &b); err != nil {
		t.Fatalf("no uptimes in %q: %v", stdout, err)
	}
	if d := b - a; math.Abs(d-10) > 0.1 {
		t.Errorf("the guest's clock counted %.2f s over 10 s of its RTC:\n%s", d, stdout)
	}
	given := 0
	for _, f := range strings.Fields(strings.SplitN(stdout, "\n", 2)[0]) {
		if v, ok := strings.CutPrefix(f, "tsc_early_khz="); ok {
			given, _ = strconv.Atoi(v)
		}
	}
	if cfg.Accel != qemu.AccelTCG {
		if given != 0 {
			t.Errorf("accel %s, and the kernel was given tsc_early_khz=%d", cfg.Accel, given)
		}
		return
	}
	if !hostConstantTSC(t) {
		if given != 0 {
			t.Errorf("the host's TSC does not tick at a constant rate, and the kernel was given tsc_early_khz=%d", given)
		}
		return
	}
	if given == 0 || given != cfg.TSCkHz {
		t.Fatalf("kernel command line %q: want tsc_early_khz=%d", strings.SplitN(stdout, "\n", 2)[0], cfg.TSCkHz)
	}
	if strings.Contains(stdout, "Unable to calibrate") {
		t.Errorf("the guest calibrated its TSC against the PIT although it was given the frequency:\n%s", stdout)
	}
	if want := fmt.Sprintf("tsc: Detected %d.%03d MHz", given/1000, given%1000); !strings.Contains(stdout, want) {
		t.Errorf("the guest did not take the TSC frequency it was given (%q):\n%s", want, stdout)
	}
	_, refined, ok := strings.Cut(stdout, "Refined TSC clocksource calibration: ")
	if !ok {
		t.Logf("TSC given %d kHz; the guest has no timer to refine it against; uptime %.3f s over 10 RTC seconds", given, b-a)
		return
	}
	mhz, err := strconv.ParseFloat(strings.TrimSuffix(strings.SplitN(refined, "\n", 2)[0], " MHz"), 64)
	if err != nil {
		t.Fatalf("refined TSC frequency: %v:\n%s", err, stdout)
	}
	if d := math.Abs(mhz*1000-float64(given)) / float64(given); d > 0.002 {
		t.Errorf("guest refined its TSC to %.3f MHz, %.2f%% from the %d kHz it was given", mhz, 100*d, given)
	}
	t.Logf("TSC given %d kHz, refined by the guest to %.3f MHz; uptime %.3f s over 10 RTC seconds", given, mhz, b-a)
}

// hostConstantTSC reports whether the host CPU's flags say its TSC ticks at a constant rate.
func hostConstantTSC(t *testing.T) bool {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if name, flags, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "flags" {
			f := strings.Fields(flags)
			return slices.Contains(f, "constant_tsc") && slices.Contains(f, "nonstop_tsc")
		}
	}
	return false
}

// testGuestBootProtocol: the guest kernel was entered the way image.json says its kernel file
// is booted, and podvm's own kernel (release "*-podvm") through its PVH entry, with no firmware
// loader and no decompression on the boot path (docs/kernel.md). /sys/kernel/boot_params/data
// shows how: entered through PVH, the kernel builds boot_params itself, with protocol version
// 2.12 and no setup header signature; booted as a bzImage, its boot_params start from the
// bzImage's own setup header, signature "HdrS" (offset 0x202) and version 2.15.
func testGuestBootProtocol(t *testing.T, ctx context.Context, g *guestVM) {
	j, err := os.ReadFile(filepath.Join(os.Getenv("PODVM_IMAGE_DIR"), guestimage.ManifestFile))
	if err != nil {
		t.Fatal(err)
	}
	var m guestimage.Manifest
	if err := json.Unmarshal(j, &m); err != nil {
		t.Fatal(err)
	}
	if strings.HasSuffix(m.KernelVersion, "-podvm") && m.KernelFormat != guestimage.KernelPVH {
		t.Errorf("image of podvm's kernel %s has kernelFormat %q, want %q", m.KernelVersion, m.KernelFormat, guestimage.KernelPVH)
	}
	// The setup header's signature (4 bytes at 0x202) and protocol version (2 bytes, little-endian).
	want := "48 64 72 53 0f 02"
	if m.KernelFormat == guestimage.KernelPVH {
		want = "00 00 00 00 0c 02"
	}
	root := busyboxRootfs(t, g, "c6")
	spec := defaultSpec(t, "c6", root, oci.WithProcessArgs("od", "-A", "n", "-t", "x1", "-j", "514", "-N", "6", "/sys/kernel/boot_params/data"))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "c6", spec)
	if got := strings.TrimSpace(stdout); code != 0 || got != want {
		t.Errorf("boot_params header: exit %d, stdout %q, stderr %q; want %q for a %q kernel", code, got, stderr, want, m.KernelFormat)
	}
	removeGuestContainer(t, ctx, g.agent, "c6")
}

// testGuestKernelPreloaded: a PVH kernel is copied into the guest RAM before QEMU starts
// (hypervisor/qemu/preload.go), so QEMU loads only a stub and holds no mapping of the kernel
// file, whose pages it would otherwise keep for a reset a pod VM never has.
func testGuestKernelPreloaded(t *testing.T, g *guestVM) {
	kernel, _ := guestImage(t)
	ef, err := elf.Open(kernel)
	if err != nil {
		t.Skipf("%s is no ELF (%v), a bzImage: QEMU loads it itself", kernel, err)
	}
	_ = ef.Close() // read only
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", g.vm.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cmdline), "\x00-kernel\x00/proc/self/fd/") {
		t.Errorf("QEMU's -kernel is not the preloaded kernel's stub: %q", strings.ReplaceAll(string(cmdline), "\x00", " "))
	}
	var st unix.Stat_t
	if err := unix.Stat(kernel, &st); err != nil {
		t.Fatal(err)
	}
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", g.vm.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	// address perms offset dev inode path: the kernel file by its device and inode, under
	// whatever path QEMU opened it.
	dev := fmt.Sprintf("%02x:%02x", unix.Major(st.Dev), unix.Minor(st.Dev))
	for _, l := range strings.Split(string(maps), "\n") {
		if f := strings.Fields(l); len(f) >= 5 && f[3] == dev && f[4] == strconv.FormatUint(st.Ino, 10) {
			t.Errorf("QEMU maps the guest kernel file: %s", l)
		}
	}
}

// testGuestCgroupDynmods: the guest's cgroup v2 hierarchy is mounted with favordynmods. Without
// it, every move of a process into a cgroup (libcontainer's Apply of each container's runc
// init) waits for an RCU grace period, ~17 ms of each container's create under TCG
// (docs/benchmarks.md).
func testGuestCgroupDynmods(t *testing.T, ctx context.Context, g *guestVM) {
	root := busyboxRootfs(t, g, "c9")
	spec := defaultSpec(t, "c9", root, oci.WithHostNamespace(specs.PIDNamespace),
		oci.WithProcessArgs("cat", "/proc/1/mountinfo"))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "c9", spec)
	var cg []string
	for _, l := range strings.Split(stdout, "\n") {
		// id parent major:minor root mountpoint options ... - fstype source superoptions
		if f := strings.Fields(l); len(f) >= 10 && f[4] == "/sys/fs/cgroup" && f[len(f)-3] == "cgroup2" {
			cg = f
		}
	}
	if code != 0 || cg == nil || !slices.Contains(strings.Split(cg[len(cg)-1], ","), "favordynmods") {
		t.Errorf("exit %d, stderr %q: the guest's cgroup2 mount is %q, want favordynmods among its superblock options\n%s",
			code, stderr, cg, stdout)
	}
	removeGuestContainer(t, ctx, g.agent, "c9")
}

// testGuestRootImage: the guest's root is the node's root image on virtio-pmem, read-only and
// mapped with DAX, so the agent runs from the host's page cache, shared by every pod.
func testGuestRootImage(t *testing.T, ctx context.Context, g *guestVM) {
	root := busyboxRootfs(t, g, "c5")
	// In the guest's PID namespace, /proc/1 is the agent (PID 1): its mounts are the guest's.
	spec := defaultSpec(t, "c5", root, oci.WithHostNamespace(specs.PIDNamespace),
		oci.WithProcessArgs("cat", "/sys/block/pmem0/dev", "/proc/1/mountinfo"))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "c5", spec)
	lines := strings.Split(stdout, "\n")
	// mountinfo: id parent major:minor root mountpoint options ... - fstype source superoptions
	var rootMount []string
	for _, l := range lines[1:] {
		if f := strings.Fields(l); len(f) >= 10 && f[4] == "/" {
			rootMount = f
		}
	}
	n := len(rootMount)
	if code != 0 || n < 10 || rootMount[2] != lines[0] || rootMount[n-3] != "ext4" ||
		!slices.Contains(strings.Split(rootMount[5], ","), "ro") || !slices.Contains(strings.Split(rootMount[n-1], ","), "dax=always") {
		t.Errorf("exit %d, stderr %q: the guest's root is %q, want the device of pmem0 (%s), ext4, ro and dax=always\n%s",
			code, stderr, rootMount, lines[0], stdout)
	}
	removeGuestContainer(t, ctx, g.agent, "c5")
}

// TestRootImageGuestWrite is the attacker's side of the shared root image: the guest's root
// (here a container given CAP_MKNOD and every device) writes to the pmem device that holds it.
// Every pod VM on the node maps the same file, so the write must never reach it: QEMU maps it
// read-only and drops the stores. The write goes with O_DIRECT (past the guest's page cache)
// to the device's last block, which the image leaves free, and is read back the same way: the
// device still holds what the file holds. (Writing over the filesystem's own blocks also
// leaves the file alone, but the guest's page cache then mixes its writes with the image's
// blocks and its root fails it at random: a guest can break only itself, which this test does
// not need to show.) The guest runs the next container, and the next VM boots from the file.
func TestRootImageGuestWrite(t *testing.T) {
	ctx, stateDir := vmTest(t, 4*time.Minute)
	g := bootVM(t, ctx, stateDir)
	img := g.vm.Config().RootImage
	before := fileSHA256(t, img)
	if last := lastBlock(t, img); !bytes.Equal(last, make([]byte, 4096)) {
		t.Fatalf("the last 4 KiB of %s are not zero; the test writes there and expects zeros back", img)
	}
	root := busyboxRootfs(t, g, "w1")
	spec := defaultSpec(t, "w1", root, oci.WithAllDevicesAllowed, oci.WithProcessArgs("sh", "-c",
		`mknod /dev/pmem b $(tr : ' ' </sys/block/pmem0/dev) && last=$(( $(cat /sys/block/pmem0/size) / 8 - 1 )) &&
		 head -c 4096 /dev/zero | tr '\0' '\377' | dd of=/dev/pmem bs=4096 seek=$last count=1 oflag=direct &&
		 echo wrote && dd if=/dev/pmem bs=4096 skip=$last count=1 iflag=direct | od -An -tx1 -N4`))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "w1", spec)
	removeGuestContainer(t, ctx, g.agent, "w1")
	if code != 0 || !strings.Contains(stdout, "wrote") {
		t.Fatalf("exit %d, stdout %q, stderr %q: the guest could not even try to write its pmem device, so this test proves nothing", code, stdout, stderr)
	}
	if after := fileSHA256(t, img); after != before {
		t.Fatalf("the guest changed the node's root image %s: sha256 %s, was %s", img, after, before)
	}
	if !strings.Contains(stdout, "00 00 00 00") {
		t.Errorf("read back after writing 0xff, the device's last block starts %q, want zeros: the guest changed its view of the image", stdout)
	}
	root = busyboxRootfs(t, g, "w2")
	stdout, stderr, code = runGuestContainer(t, ctx, g.agent, "w2", defaultSpec(t, "w2", root, oci.WithProcessArgs("echo", "still here")))
	if code != 0 || stdout != "still here\n" {
		t.Errorf("the attacking guest, next container: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	removeGuestContainer(t, ctx, g.agent, "w2")

	ctx2, stateDir2 := vmTest(t, 2*time.Minute)
	g2 := bootVM(t, ctx2, stateDir2)
	root = busyboxRootfs(t, g2, "w3")
	stdout, stderr, code = runGuestContainer(t, ctx2, g2.agent, "w3", defaultSpec(t, "w3", root, oci.WithProcessArgs("echo", "still here")))
	if code != 0 || stdout != "still here\n" {
		t.Errorf("the next VM, from the same image: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	removeGuestContainer(t, ctx2, g2.agent, "w3")
}

// lastBlock returns the last 4 KiB of the file p.
func lastBlock(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil || len(b) < 4096 {
		t.Fatalf("%s: %d bytes, %v", p, len(b), err)
	}
	return b[len(b)-4096:]
}

func fileSHA256(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// testGuestTimer: the guest's timer interrupts come from a device that is programmed with a
// relative count (the local APIC), not from the HPET. The HPET's comparator is absolute: when
// the vCPU is held up between reading its counter and writing the comparator (a busy host,
// TCG translating), the deadline is already past, and Linux raises the device's minimum delta
// and retries; after ~17 raises it gives up ("CE: Reprogramming failure. Giving up") and the
// guest gets no timer interrupts again. Consoles of pods under load showed 9 raises in 13 s,
// and restored template clones hung for good.
func testGuestTimer(t *testing.T, ctx context.Context, g *guestVM) {
	c := g.agent
	root := busyboxRootfs(t, g, "c4")
	spec := defaultSpec(t, "c4", root, oci.WithProcessArgs("cat", "/sys/devices/system/clockevents/clockevent0/current_device"))
	stdout, stderr, code := runGuestContainer(t, ctx, c, "c4", spec)
	if dev := strings.TrimSpace(stdout); code != 0 || dev != "lapic" {
		t.Errorf("exit %d, stdout %q, stderr %q: the guest's clock event device is %q, want lapic", code, stdout, stderr, dev)
	}
	removeGuestContainer(t, ctx, c, "c4")
}

// testGuestPageReporting: the guest hands free blocks back from the order the shim put on the
// kernel command line, not from the balloon driver's 2 MiB (Linux 6.1 overwrites the boot
// value when the driver probes; the agent sets it again).
func testGuestPageReporting(t *testing.T, ctx context.Context, g *guestVM) {
	c := g.agent
	root := busyboxRootfs(t, g, "c3")
	spec := defaultSpec(t, "c3", root, oci.WithProcessArgs("sh", "-c",
		"cat /proc/cmdline /sys/module/page_reporting/parameters/page_reporting_order"))
	stdout, stderr, code := runGuestContainer(t, ctx, c, "c3", spec)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	const param = "page_reporting.page_reporting_order="
	want := ""
	for _, f := range strings.Fields(lines[0]) {
		if v, ok := strings.CutPrefix(f, param); ok {
			want = v
		}
	}
	if code != 0 || want == "" || len(lines) != 2 || lines[1] != want {
		t.Errorf("exit %d, stdout %q, stderr %q; want the kernel command line with %s<n> and then <n>", code, stdout, stderr, param)
	}
	removeGuestContainer(t, ctx, c, "c3")
}

// testGuestStdio: a container's stdout, stderr and exit code come back through the agent, and
// it runs on the guest's kernel.
func testGuestStdio(t *testing.T, ctx context.Context, g *guestVM) {
	c := g.agent
	root := busyboxRootfs(t, g, "c1")
	spec := defaultSpec(t, "c1", root, oci.WithProcessArgs("sh", "-c", "echo out; echo err >&2; uname -r; exit 3"))
	stdout, stderr, code := runGuestContainer(t, ctx, c, "c1", spec)
	if code != 3 {
		t.Errorf("exit status %d, want 3", code)
	}
	want := "out\n" + c.Info.KernelRelease + "\n"
	if stdout != want || stderr != "err\n" {
		t.Errorf("stdout %q stderr %q; want %q and %q", stdout, stderr, want, "err\n")
	}
	if strings.Contains(stdout, hostKernel(t)) {
		t.Errorf("uname -r in the container is the host's %q", hostKernel(t))
	}
	removeGuestContainer(t, ctx, c, "c1")
}

// testGuestExec: execs in a running container (its hostname and init's rlimits, a terminal of
// the size asked for, stdin to EOF), then SIGKILL of the container.
func testGuestExec(t *testing.T, ctx context.Context, g *guestVM) {
	c := g.agent
	root := busyboxRootfs(t, g, "c2")
	spec := defaultSpec(t, "c2", root, oci.WithProcessArgs("sleep", "1000"),
		oci.WithRlimit(&specs.POSIXRlimit{Type: "RLIMIT_NOFILE", Hard: 4321, Soft: 1234}))
	if _, err := c.CreateContainer(ctx, &api.CreateContainerRequest{ContainerId: "c2", Spec: spec}); err != nil {
		t.Fatalf("create: %v", err)
	}
	if _, err := c.StartProcess(ctx, &api.ProcessRequest{ContainerId: "c2"}); err != nil {
		t.Fatalf("start: %v", err)
	}

	if out, code := guestExec(t, ctx, c, "c2", "e1", []string{"sh", "-c", "echo hi; hostname; grep 'open files' /proc/1/limits | tr -s ' ' | cut -d' ' -f4,5"}, &api.Stdio{Stdout: true}, ""); out != "hi\nc-c2\n1234 4321\n" || code != 0 {
		t.Errorf("exec: %q exit %d; want hi, the container's hostname and its init's RLIMIT_NOFILE 1234 4321, exit 0", out, code)
	}
	out, code := guestExec(t, ctx, c, "c2", "e2", []string{"sh", "-c", "tty; stty size"}, &api.Stdio{Terminal: true, Stdout: true, Width: 100, Height: 40}, "")
	if code != 0 || !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "40 100") {
		t.Errorf("terminal exec: %q exit %d; want a /dev/pts tty of 40 rows, 100 columns", out, code)
	}
	payload := strings.Repeat("stdin line\n", 2000)
	if out, code := guestExec(t, ctx, c, "c2", "e3", []string{"cat"}, &api.Stdio{Stdin: true, Stdout: true}, payload); out != payload || code != 0 {
		t.Errorf("cat of stdin: got %d bytes exit %d, want %d bytes exit 0", len(out), code, len(payload))
	}

	if _, err := c.SignalProcess(ctx, &api.SignalProcessRequest{ContainerId: "c2", Signal: uint32(unix.SIGKILL)}); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if code := wait(t, ctx, c, "c2", ""); code != 137 {
		t.Errorf("killed container exit status %d, want 137", code)
	}
	removeGuestContainer(t, ctx, c, "c2")
}

// guestExec runs exec id in container cid through the agent, with stdin (if not empty) written
// to it, and returns its stdout and exit status; the exec is removed after.
func guestExec(t *testing.T, ctx context.Context, c api.AgentService, cid, id string, args []string, stdio *api.Stdio, stdin string) (string, uint32) {
	t.Helper()
	if _, err := c.ExecProcess(ctx, &api.ExecProcessRequest{ContainerId: cid, ExecId: id,
		Process: execProcess(t, args, stdio.Terminal), Stdio: stdio}); err != nil {
		t.Fatalf("exec %s: %v", id, err)
	}
	out := collect(ctx, c, cid, id, api.StdioStream_STDOUT)
	if _, err := c.StartProcess(ctx, &api.ProcessRequest{ContainerId: cid, ExecId: id}); err != nil {
		t.Fatalf("start exec %s: %v", id, err)
	}
	if stdin != "" {
		if err := agent.CopyIn(ctx, c, cid, id, strings.NewReader(stdin)); err != nil {
			t.Fatalf("stdin: %v", err)
		}
	}
	code := wait(t, ctx, c, cid, id)
	stdout, _ := out.wait(t)
	if _, err := c.RemoveProcess(ctx, &api.ProcessRequest{ContainerId: cid, ExecId: id}); err != nil {
		t.Errorf("remove exec %s: %v", id, err)
	}
	return stdout, code
}

// runGuestContainer creates container id from spec through the agent, with stdout and stderr,
// runs it to its exit and returns its output and exit status.
func runGuestContainer(t testing.TB, ctx context.Context, c api.AgentService, id string, spec []byte) (stdout, stderr string, code uint32) {
	t.Helper()
	if _, err := c.CreateContainer(ctx, &api.CreateContainerRequest{ContainerId: id, Spec: spec,
		Stdio: &api.Stdio{Stdout: true, Stderr: true}}); err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	return startGuestContainer(t, ctx, c, id)
}

// startGuestContainer starts the created container id, waits for its exit and returns its
// stdout, stderr and exit status.
func startGuestContainer(t testing.TB, ctx context.Context, c api.AgentService, id string) (stdout, stderr string, code uint32) {
	t.Helper()
	out := collect(ctx, c, id, "", api.StdioStream_STDOUT, api.StdioStream_STDERR)
	if _, err := c.StartProcess(ctx, &api.ProcessRequest{ContainerId: id}); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	code = wait(t, ctx, c, id, "")
	stdout, stderr = out.wait(t)
	return stdout, stderr, code
}

// removeGuestContainer removes container id through the agent.
func removeGuestContainer(t testing.TB, ctx context.Context, c api.AgentService, id string) {
	t.Helper()
	if _, err := c.RemoveContainer(ctx, &api.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Errorf("remove %s: %v", id, err)
	}
}

// vmTest starts a test that boots a VM itself: a context bounded by timeout (cancelled when
// the test ends, before the VM's cleanup) and the VM's state dir (vmStateDir).
func vmTest(t *testing.T, timeout time.Duration) (context.Context, string) {
	t.Helper()
	stateDir := vmStateDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx, stateDir
}

// vmStateDir makes a state dir for a VM the test boots itself, and checks at the end that the
// VM left nothing behind.
func vmStateDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "podvm-it-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { checkNoLeftovers(t, dir) })
	return dir
}

// checkNoLeftovers removes the test's state dir and fails if a QEMU, virtiofsd or mount of it
// is left behind.
func checkNoLeftovers(t *testing.T, stateDir string) {
	t.Helper()
	if out, _ := exec.Command("pgrep", "-af", stateDir).Output(); len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("processes left behind:\n%s", out)
	}
	if mi, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(mi), stateDir) {
		t.Errorf("mounts left under %s", stateDir)
	}
	if err := os.RemoveAll(stateDir); err != nil {
		t.Errorf("remove state dir: %v", err)
	}
	if _, err := os.Stat(stateDir); err == nil {
		t.Errorf("state dir %s left", stateDir)
	}
}
