//go:build realvm

package qemu

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// guestImageFiles is requireQEMU and podvm's guest image: PODVM_IMAGE_DIR (make image
// sets it for make integration), else the repository's _output/image.
func guestImageFiles(t *testing.T) (kernel, initrd string) {
	t.Helper()
	requireQEMU(t)
	dir := os.Getenv("PODVM_IMAGE_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "_output", "image")
	}
	kernel, initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			missingReal(t, "guest image: %v (make image)", err)
		}
	}
	abs := func(p string) string {
		a, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	return abs(kernel), abs(initrd)
}

// TestRealAccelProbe runs the accelerator probe on this machine with the real guest image.
// On a host whose KVM aborts QEMU (nested, MSR 0x10a refused) or runs guests slower than TCG,
// it must pick TCG and say why; where KVM works it must pick KVM. Either way the cache then
// answers without booting, and nothing is left running or on disk but the cache.
func TestRealAccelProbe(t *testing.T) {
	kernel, initrd := guestImageFiles(t)
	nodeDir := t.TempDir()
	c := Config{
		ID:             "probe",
		StateDir:       filepath.Join(nodeDir, "pod"),
		Kernel:         kernel,
		Initrd:         initrd,
		AgentTransport: TransportSerial,
		MemoryMiB:      256,
	}
	c.Accel = AccelTCG // resolve everything but the accelerator
	c, err := c.Resolve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	r, err := RefreshAccel(ctx, c, nodeDir)
	t.Logf("QEMU %s; %s", r.QEMUVersion, r.TCG)
	for _, a := range r.KVM {
		t.Logf("%s", a)
	}
	t.Logf("decision: %s %s; %s", r.Accel, r.CPU, r.Reason)
	if err != nil {
		t.Fatal(err)
	}
	if !r.TCG.Booted {
		t.Fatalf("TCG did not boot the guest: %s", r.TCG.Reason)
	}
	kvmAborts := kvmDeviceError() == nil && len(r.KVM) > 0 && r.KVM[0].Aborted
	if kvmAborts && r.KVM[0].CPU == CPUHost && !strings.Contains(r.KVM[0].Reason, "MSR") {
		t.Errorf("-cpu host aborted without naming the MSR: %s", r.KVM[0].Reason)
	}
	switch r.Accel {
	case AccelTCG:
		if !strings.Contains(r.Reason, "MSR") && !strings.Contains(r.Reason, "slower than under TCG") && !strings.Contains(r.Reason, "/dev/kvm") {
			t.Errorf("TCG chosen, but the reason names neither an MSR abort, slowness nor /dev/kvm: %s", r.Reason)
		}
		if r.CPU != "" {
			t.Errorf("CPU %q under TCG", r.CPU)
		}
	case AccelKVM:
		if r.Reason != "" || r.CPU == "" {
			t.Errorf("KVM chosen with reason %q, cpu %q", r.Reason, r.CPU)
		}
	}
	if os.Getenv("PODVM_EXPECT_ACCEL") != "" && r.Accel != os.Getenv("PODVM_EXPECT_ACCEL") {
		t.Errorf("accel %s, PODVM_EXPECT_ACCEL=%s", r.Accel, os.Getenv("PODVM_EXPECT_ACCEL"))
	}

	// "auto" now resolves from the cache, without booting anything.
	auto := c
	auto.Accel = AccelAuto
	start := time.Now()
	got, err := auto.Resolve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got.Accel != r.Accel || (got.Accel == AccelKVM && got.CPU != r.CPU) {
		t.Errorf("auto resolved to %s/%s, the probe said %s/%s", got.Accel, got.CPU, r.Accel, r.CPU)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("resolving from the cache took %s: did it probe again?", d)
	}

	ents, _ := os.ReadDir(nodeDir)
	for _, e := range ents {
		if e.Name() != AccelCacheFile && e.Name() != AccelLockFile {
			t.Errorf("left in the node dir: %s", e.Name())
		}
	}
	if left := leftovers(t, nodeDir); len(left) > 0 {
		t.Errorf("left behind: %s", strings.Join(left, "; "))
	}
}
