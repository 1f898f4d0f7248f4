//go:build realvm

package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/hypervisor"
)

// The tests in this file run a real QEMU (TCG) with a real virtiofsd, so they are built only
// with -tags realvm: `make integration` runs them, `make unit` (no QEMU) does not. They need root, QEMU,
// virtiofsd and a guest kernel: PODVM_TEST_KERNEL (a vmlinuz), or the Debian
// linux-image-*-cloud-amd64 .deb in /opt/podvm-dev/kernel. Missing prerequisites skip the
// tests, except with CI=true, where they fail them.

// missingReal skips t for a missing prerequisite, or fails it under CI=true.
func missingReal(t *testing.T, format string, a ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("real QEMU test prerequisite missing: "+format, a...)
	}
	t.Skipf("real QEMU test prerequisite missing: "+format, a...)
}

// requireQEMU: root, QEMU and virtiofsd.
func requireQEMU(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		missingReal(t, "not root")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missingReal(t, "qemu-system-x86_64: %v", err)
	}
	if findVirtiofsd() == "" {
		missingReal(t, "virtiofsd")
	}
}

// requireReal is requireQEMU and a kernel without podvm's agent: $PODVM_TEST_KERNEL, else
// Debian's cloud kernel from the package in /opt/podvm-dev/kernel.
func requireReal(t *testing.T) (kernel string) {
	t.Helper()
	requireQEMU(t)
	if k := os.Getenv("PODVM_TEST_KERNEL"); k != "" {
		return k
	}
	debs, _ := filepath.Glob("/opt/podvm-dev/kernel/linux-image-*.deb")
	if len(debs) == 0 {
		missingReal(t, "no kernel: set PODVM_TEST_KERNEL or put linux-image-*-cloud-amd64 .deb in /opt/podvm-dev/kernel")
	}
	dir := t.TempDir()
	cmd := exec.Command("sh", "-c", `dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards './boot/vmlinuz-*'`, "sh", debs[0], dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		missingReal(t, "extracting kernel from %s: %v: %s", debs[0], err, out)
	}
	ks, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	if len(ks) == 0 {
		missingReal(t, "no boot/vmlinuz-* in %s", debs[0])
	}
	return ks[0]
}

func realConfig(t *testing.T, kernel string) Config {
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	// What rootfs.CreateShare makes of a sandbox's share: a mount with shared propagation,
	// so what is mounted under it later reaches virtiofsd's sandbox.
	if err := unix.Mount(shared, shared, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(shared, unix.MNT_DETACH) })
	if err := unix.Mount("", shared, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	return Config{
		ID:             "real-" + strconv.Itoa(os.Getpid()),
		StateDir:       filepath.Join(dir, "state"),
		Accel:          AccelTCG,
		AgentTransport: TransportSerial,
		MemoryMiB:      256,
		Kernel:         kernel,
		// No initrd: the kernel panics for lack of a root fs; panic=0 keeps it (and QEMU)
		// there instead of rebooting, i.e. exiting.
		KernelParams: []string{"panic=0"},
		Debug:        true, // no "quiet": the test looks for "Linux version"
		SharedDir:    shared,
		HotplugSlots: 2,
	}
}

// leftovers lists processes whose command line mentions dir and mounts under dir.
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	var found []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if args := processArgs(pid); strings.Contains(strings.Join(args, " "), dir) {
			found = append(found, "process "+e.Name()+": "+strings.Join(args, " "))
		}
	}
	points, err := mountPoints("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	fixture := filepath.Join(dir, "shared") // realConfig's own mount, undone at test cleanup
	for _, p := range points {
		if strings.HasPrefix(p, dir) && p != fixture && !strings.HasPrefix(p, fixture+"/") {
			found = append(found, "mount "+p)
		}
	}
	for _, l := range VirtiofsdLockFiles(dir) {
		found = append(found, "virtiofsd lock file "+l)
	}
	return found
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// descendants returns pid and all its descendants.
func descendants(pid int) []int {
	out := []int{pid}
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(pid) + "/children")
	for _, f := range strings.Fields(string(b)) {
		if c, err := strconv.Atoi(f); err == nil {
			out = append(out, descendants(c)...)
		}
	}
	return out
}

// TestRealVM boots one VM and takes it through its life: confinement, the share, the
// console, the agent's channel, pause and resume, hot-plug, stop.
func TestRealVM(t *testing.T) {
	// podvm's own guest, which boots to its agent: the unplug check needs a guest whose PCIe
	// hot-plug driver has powered the disks' slots on (checkRealUnplug).
	kernel, initrd := guestImageFiles(t)
	cfg := realConfig(t, kernel)
	cfg.Initrd, cfg.KernelParams = initrd, nil
	testDir := filepath.Dir(cfg.StateDir)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	v := newRealVM(t, cfg)
	t.Cleanup(func() {
		if err := v.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
		if err := Cleanup(context.Background(), cfg.StateDir); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
	})
	start := time.Now()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("started in %s, pid %d", time.Since(start), v.Pid())
	if v.Pid() <= 0 {
		t.Fatal("no pid")
	}
	// At once, while the guest is still early in its boot.
	plugRealDisks(ctx, t, v, testDir)
	checkConfined(t, v.Pid(), cfg)
	checkLateMountShared(t, v, cfg.SharedDir)

	waitFor(t, "kernel output on the console", 15*time.Second, func() bool {
		b, _ := os.ReadFile(v.ConsolePath())
		return strings.Contains(string(b), "Linux version")
	})
	t.Logf("kernel output after %s", time.Since(start))
	checkVirtiofsdCaps(t, v.fs.pid())
	checkVirtiofsdSocketHandedOver(t, v.fs.pid(), testDir)

	conn, err := v.DialAgent(ctx)
	if err != nil {
		t.Fatalf("DialAgent: %v", err)
	}
	conn.Close()

	checkPauseResume(ctx, t, v)
	checkRealUnplug(ctx, t, v)
	checkStopLeavesNothing(ctx, t, v, testDir)
}

func newRealVM(t *testing.T, cfg Config) *VM {
	t.Helper()
	v, err := New(context.Background(), hypervisor.Config(cfg))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// checkLateMountShared: a mount made under the shared dir after virtiofsd started must reach
// virtiofsd's sandbox, a mount namespace of its own.
func checkLateMountShared(t *testing.T, v *VM, shared string) {
	t.Helper()
	late := filepath.Join(shared, "late")
	if err := os.Mkdir(late, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", late, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(late, unix.MNT_DETACH) })
	myNS, _ := os.Readlink("/proc/self/ns/mnt")
	sandboxed := false
	waitFor(t, "the late mount in virtiofsd's mount namespace", 5*time.Second, func() bool {
		for _, pid := range descendants(v.fs.pid()) {
			ns, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/ns/mnt")
			if ns == "" || ns == myNS {
				continue
			}
			sandboxed = true
			points, _ := mountPoints("/proc/" + strconv.Itoa(pid) + "/mountinfo")
			for _, p := range points {
				if p == "/late" || p == late {
					return true
				}
			}
		}
		return false
	})
	if !sandboxed {
		t.Fatal("virtiofsd runs in no mount namespace of its own")
	}
}

func checkPauseResume(ctx context.Context, t *testing.T, v *VM) {
	t.Helper()
	if err := v.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := v.Status(ctx); err != nil || st != "paused" {
		t.Fatalf("after Pause: %q %v", st, err)
	}
	if err := v.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := v.Status(ctx); err != nil || st != "running" {
		t.Fatalf("after Resume: %q %v", st, err)
	}
}

// plugRealDisks: hot-plug against the real QEMU checks the blockdev-add/device_add
// arguments. It runs early in the guest's boot; whether the guest's PCIe hot-plug driver
// finds the disks when it probes the slots or is told of them later, it powers their slots
// on (checkRealUnplug waits for that).
func plugRealDisks(ctx context.Context, t *testing.T, v *VM, dir string) {
	t.Helper()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	// QEMU is chrooted and unprivileged: it gets the image as a descriptor (add-fd).
	imgF, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer imgF.Close()
	for _, d := range []*hypervisor.BlockDevice{
		{ID: "disk0", Path: img, File: imgF, ReadOnly: true},
		{ID: "disk1", Path: img, File: imgF, Cache: "writeback", ReadOnly: true},
	} {
		if err := v.Hotplug(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Hotplug(ctx, &hypervisor.BlockDevice{ID: "disk2", Path: img, File: imgF}); err == nil {
		t.Fatal("third hot-plug with 2 slots succeeded")
	}
}

// checkRealUnplug: Linux acknowledges an unplug request (the slot's attention button) only
// 5 s later, the time it gives a user to cancel, so an Unplug with a shorter ctx must give up
// with it. It first waits for the guest to have both disks: until its hot-plug driver has
// powered their slots on, they are off, and QEMU removes a device from a slot that is off at
// once, without asking the guest. (The test used to rely on a guest that panicked for lack
// of a root filesystem; whether that guest had powered the slots on before it panicked was a
// race, which a fast host lost 4 times in 5.)
func checkRealUnplug(ctx context.Context, t *testing.T, v *VM) {
	t.Helper()
	waitFor(t, "both disks in the guest", 30*time.Second, func() bool {
		b, _ := os.ReadFile(v.ConsolePath())
		return strings.Contains(string(b), "[vda]") && strings.Contains(string(b), "[vdb]")
	})
	uctx, ucancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err := v.Unplug(uctx, "disk0")
	ucancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Unplug in a dead guest: %v, want deadline exceeded", err)
	}
}

// checkStopLeavesNothing stops v twice and checks that no process or mount under dir is
// left. The tmpfs under SharedDir stays mounted: Stop's detach of the bind must take it along.
func checkStopLeavesNothing(ctx context.Context, t *testing.T, v *VM, dir string) {
	t.Helper()
	qemuPid := v.Pid()
	stopStart := time.Now()
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("stopped in %s", time.Since(stopStart))
	select {
	case <-v.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if err := unix.Kill(qemuPid, 0); err == nil {
		t.Fatalf("qemu pid %d still exists", qemuPid)
	}
	if l := leftovers(t, dir); len(l) > 0 {
		t.Fatalf("left behind: %v", l)
	}
}

func TestRealStartFailureCleansUp(t *testing.T) {
	requireQEMU(t)
	notAKernel := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(notAKernel, []byte("this is not a kernel\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := realConfig(t, notAKernel)
	v := newRealVM(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := v.Start(ctx)
	if err == nil {
		_ = v.Stop(ctx) // the test fails either way; this only stops the VM
		t.Fatal("Start with a bogus kernel succeeded")
	}
	t.Logf("Start error: %v", err)
	if !strings.Contains(err.Error(), "qemu exited during startup") || !strings.Contains(err.Error(), "qemu.log") {
		t.Fatalf("error lacks QEMU's own complaint: %v", err)
	}
	if l := leftovers(t, filepath.Dir(cfg.StateDir)); len(l) > 0 {
		t.Fatalf("left behind: %v", l)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatalf("Stop after failed Start: %v", err)
	}
}

// TestRealVirtiofsdSlowOrFailing: QEMU starts while virtiofsd does. A virtiofsd slow to
// start holds QEMU up, not the start; one that fails fails the start with its own
// complaint, and nothing is left behind.
func TestRealVirtiofsdSlowOrFailing(t *testing.T) {
	kernel := requireReal(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	cfg := realConfig(t, kernel)
	cfg.VirtiofsdPath = slowVirtiofsd(t, time.Second)
	v := newRealVM(t, cfg)
	start := time.Now()
	if err := v.Start(ctx); err != nil {
		t.Fatalf("Start with a virtiofsd that takes a second to start: %v", err)
	}
	// QEMU answers its monitor only once it has created the virtio-fs device, which is
	// once virtiofsd has answered on the socket.
	if took := time.Since(start); took < time.Second {
		t.Errorf("started in %s, before virtiofsd could answer", took)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}

	cfg = realConfig(t, kernel)
	cfg.VirtiofsdPath = failingVirtiofsd(t)
	v = newRealVM(t, cfg)
	err := v.Start(ctx)
	if err == nil {
		_ = v.Stop(ctx)
		t.Fatal("Start with a virtiofsd that fails succeeded")
	}
	t.Logf("Start error: %v", err)
	for _, want := range []string{"virtiofsd exited", "fake virtiofsd: refusing to start"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	if l := leftovers(t, filepath.Dir(cfg.StateDir)); len(l) > 0 {
		t.Fatalf("left behind: %v", l)
	}
}

// slowVirtiofsd is the real virtiofsd, started after delay.
func slowVirtiofsd(t *testing.T, delay time.Duration) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "virtiofsd")
	script := "#!/bin/sh\n" +
		"if [ \"$1\" != --help ]; then sleep " + strconv.FormatFloat(delay.Seconds(), 'f', -1, 64) + "; fi\n" +
		"exec " + findVirtiofsd() + " \"$@\"\n"
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// checkVirtiofsdSocketHandedOver: virtiofsd gets its socket as a descriptor (the shim
// listens on it before QEMU starts), so its command line names no socket, and the C
// virtiofsd keeps no lock file for it.
func checkVirtiofsdSocketHandedOver(t *testing.T, pid int, dir string) {
	t.Helper()
	args := processArgs(pid)
	if !slices.Contains(args, "--fd=3") || slices.ContainsFunc(args, func(a string) bool { return strings.Contains(a, "socket-path") }) {
		t.Errorf("virtiofsd's command line %q: want --fd=3 and no --socket-path", args)
	}
	if locks := VirtiofsdLockFiles(dir); len(locks) > 0 {
		t.Errorf("virtiofsd keeps lock files: %v", locks)
	}
}

func TestRealCleanupAfterCrash(t *testing.T) {
	kernel := requireReal(t)
	cfg := realConfig(t, kernel)
	v := newRealVM(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// The shim "died": a new one only has the state dir.
	if err := Cleanup(ctx, cfg.StateDir); err != nil {
		t.Fatal(err)
	}
	select {
	case <-v.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("qemu survived Cleanup")
	}
	if l := leftovers(t, filepath.Dir(cfg.StateDir)); len(l) > 0 {
		t.Fatalf("left behind: %v", l)
	}
	if err := Cleanup(ctx, cfg.StateDir); err != nil {
		t.Fatalf("second Cleanup: %v", err)
	}
	// QEMU is gone: Stop only releases the monitor, and must not fail on what Cleanup removed.
	if err := v.Stop(ctx); err != nil {
		t.Errorf("Stop after Cleanup: %v", err)
	}
}

// checkConfined checks that QEMU (pid) runs as cfg's unprivileged uid/gid with no
// capabilities, chrooted into the VM's empty root dir.
func checkConfined(t *testing.T, pid int, cfg Config) {
	t.Helper()
	uid, gid := cfg.RunAs()
	status := procStatus(t, pid)
	for _, l := range []string{"Uid", "Gid", "Groups", "CapEff", "CapPrm", "Seccomp"} {
		t.Logf("qemu %s:\t%s", l, status[l])
	}
	wantIDs := func(key string, id uint32) {
		t.Helper()
		for _, f := range strings.Fields(status[key]) { // real, effective, saved, fs
			if f != strconv.FormatUint(uint64(id), 10) {
				t.Errorf("qemu %s: %q, want %d everywhere", key, status[key], id)
				return
			}
		}
	}
	wantIDs("Uid", uid)
	wantIDs("Gid", gid)
	if g := status["Groups"]; g != strconv.FormatUint(uint64(gid), 10) && g != "" {
		t.Errorf("qemu Groups: %q, want only %d", g, gid)
	}
	for _, c := range []string{"CapEff", "CapPrm"} {
		if status[c] != "0000000000000000" {
			t.Errorf("qemu %s = %s, want none", c, status[c])
		}
	}
	if status["Seccomp"] != "2" {
		t.Errorf("qemu Seccomp = %q, want 2 (filter)", status["Seccomp"])
	}
	root, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/root")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("qemu root: %s", root)
	if root != filepath.Join(cfg.StateDir, ChrootDir) {
		t.Errorf("qemu root %q, want the chroot %q", root, filepath.Join(cfg.StateDir, ChrootDir))
	}
	if ents, err := os.ReadDir(root); err != nil || len(ents) != 0 {
		t.Errorf("chroot %s: %d entries, %v; want empty", root, len(ents), err)
	}
}

// checkVirtiofsdCaps checks that no process of virtiofsd (the C one forks into its sandbox
// once QEMU connects) has CAP_MKNOD or CAP_SETFCAP.
func checkVirtiofsdCaps(t *testing.T, pid int) {
	t.Helper()
	const capMknod, capSetfcap = 27, 31
	for _, p := range descendants(pid) {
		st := procStatus(t, p)
		eff, err := strconv.ParseUint(st["CapEff"], 16, 64)
		if err != nil {
			continue // gone
		}
		t.Logf("virtiofsd pid %d CapEff %s", p, st["CapEff"])
		if eff&(1<<capMknod|1<<capSetfcap) != 0 {
			t.Errorf("virtiofsd pid %d has CAP_MKNOD or CAP_SETFCAP: CapEff %s", p, st["CapEff"])
		}
	}
}

func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return map[string]string{}
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// mountPoints lists the mount points in a mountinfo file.
func mountPoints(mountinfo string) ([]string, error) {
	b, err := os.ReadFile(mountinfo)
	if err != nil {
		return nil, fmt.Errorf("reading mount table: %w", err)
	}
	var points []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		points = append(points, unescapeMountinfo(fields[4]))
	}
	return points, sc.Err()
}
