package harness

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// fakeShimEnv makes this test binary, run as containerd-shim-fake-v2, start children in a
// loop as a shim starts QEMU or runc: TestShimsLeavesOutStartingChildren's stand-in shim.
const fakeShimEnv = "PODVM_HARNESS_FAKE_SHIM"

func init() {
	if os.Getenv(fakeShimEnv) == "" {
		return
	}
	for {
		_ = exec.Command("/bin/true").Run()
	}
}

// TestShimsLeavesOutStartingChildren: while a shim starts children, Shims finds the shim
// and only it, never a child that still carries the shim's command line before its exec
// (the e2e fault cases would kill the child instead of the shim, or a process already gone).
func TestShimsLeavesOutStartingChildren(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "containerd-shim-fake-v2")
	if err := os.Symlink(self, bin); err != nil {
		t.Fatal(err)
	}
	env := &Env{RunDir: dir}
	cmd := exec.Command(bin, "-namespace", "k8s.io", "-address", filepath.Join(dir, "c.sock"), "-id", "sandbox")
	cmd.Env = append(os.Environ(), fakeShimEnv+"=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	scans, missed, wrong := 0, 0, map[int]bool{}
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); scans++ {
		found := env.Shims("fake")
		if !slices.Contains(found, Shim{PID: cmd.Process.Pid, ID: "sandbox"}) {
			missed++
		}
		for _, sh := range found {
			if sh.PID != cmd.Process.Pid {
				wrong[sh.PID] = true
			}
		}
	}
	if missed > 0 {
		t.Errorf("%d of %d scans missed the shim %d", missed, scans, cmd.Process.Pid)
	}
	if len(wrong) > 0 {
		t.Errorf("%d scans took %d other processes for the shim %d: its children before their exec", scans, len(wrong), cmd.Process.Pid)
	}
	if !t.Failed() {
		t.Logf("%d scans: the shim found in each, its children never taken for it", scans)
	}
}
