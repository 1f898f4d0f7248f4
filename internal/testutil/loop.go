// Package testutil holds helpers that tests of several packages share. It is imported by
// tests only.
package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// LoopDevice attaches a new sparse file of size bytes to a loop device and detaches it at the
// test's cleanup. It needs root and losetup; the error says which is missing, so the caller
// decides whether that skips or fails the test.
func LoopDevice(t testing.TB, size int64) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("loop devices need root")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		return "", fmt.Errorf("no losetup (Debian: mount): %w", err)
	}
	f := filepath.Join(t.TempDir(), "block.raw")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		return "", err
	}
	if err := os.Truncate(f, size); err != nil {
		return "", err
	}
	out, err := exec.Command("losetup", "--find", "--show", f).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("losetup: %w: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev, nil
}
