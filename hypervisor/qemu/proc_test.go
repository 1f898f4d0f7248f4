package qemu

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestProcessLogsTo: Cleanup knows a VM's virtiofsd by its stderr, the VM's log; a process
// logging elsewhere, or another binary logging there, is not it.
func TestProcessLogsTo(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, VirtiofsdLog)
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("sleep", "60")
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	pid := cmd.Process.Pid
	// Until the child has exec'd, its command line is still this test's.
	for deadline := time.Now().Add(10 * time.Second); !runs(processArgs(pid), "sleep"); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never ran sleep: %q", pid, processArgs(pid))
		}
	}
	if !processLogsTo(pid, "sleep", logPath) {
		t.Errorf("sleep logging to %s not recognised", logPath)
	}
	if processLogsTo(pid, "sleep", filepath.Join(dir, "other.log")) {
		t.Error("recognised with another log")
	}
	if processLogsTo(pid, "virtiofsd", logPath) {
		t.Error("recognised as another binary")
	}
	if processLogsTo(os.Getpid(), "qemu.test", logPath) {
		t.Error("recognised a process whose stderr is not the log")
	}
}
