// Package e2e is podvm's end-to-end suite: a real single-node Kubernetes cluster (integration/k8s)
// on the harness's containerd schedules pods with RuntimeClass runc and podvm, and every case
// runs for both with the same assertions, through the APIs kubectl uses (docs/e2e.md).
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/integration/k8s"
	"github.com/podvm/podvm/rootfs/guestimage"
	"github.com/podvm/podvm/shim/config"
)

// require skips the test when a prerequisite is missing, or fails it under CI=true, where a
// missing prerequisite is a broken setup and never a reason to test less.
func require(t testing.TB, missing []string) {
	t.Helper()
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("e2e prerequisites missing: %s (run `make deps` as root, then `make e2e`)", strings.Join(missing, "; "))
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// options are the harness options of the suite: containerd with the podvm runtime configured
// for the guest image `make image` built (PODVM_BIN, PODVM_IMAGE_DIR), and the podvm leak checks.
func options(t testing.TB) harness.Options {
	t.Helper()
	bin, img := os.Getenv("PODVM_BIN"), os.Getenv("PODVM_IMAGE_DIR")
	kernel, rootImage := filepath.Join(img, guestimage.KernelFile), filepath.Join(img, guestimage.RootImageFile)
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, f := range []string{filepath.Join(bin, "containerd-shim-podvm-v2"), kernel, rootImage} {
		if bin == "" || img == "" {
			missing = append(missing, "PODVM_BIN and PODVM_IMAGE_DIR (make e2e sets them)")
			break
		}
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	missing = append(missing, k8s.Missing()...)
	require(t, missing)
	accel := os.Getenv("PODVM_TEST_ACCEL")
	if accel == "" {
		accel = "tcg"
	}
	// A state dir of the suite's own: another run's VMs on the machine are not its leaks.
	stateDir, err := os.MkdirTemp("/run", "pe2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // after the leak check, which wants it empty but for what it keeps
		_ = os.RemoveAll(filepath.Join(stateDir, config.StartSlotsDirName))
		_ = os.Remove(stateDir)
	})
	cfg := filepath.Join(t.TempDir(), "podvm.toml")
	body := fmt.Sprintf("[hypervisor]\naccel = %q\nkernel = %q\nimage = %q\n\n[sandbox]\nstate_dir = %q\n",
		accel, kernel, rootImage, stateDir)
	keep := []string{qemu.AccelCacheFile, qemu.AccelLockFile, config.StartSlotsDirName}
	if harness.Templated() {
		// The VM templates stay (in the state dir) for the whole suite, and go after it.
		body, keep = harness.WithTemplates(t, stateDir, body, keep)
	}
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return harness.Options{
		ShimDir:          bin,
		PodvmConfigPath:  cfg,
		LeakProcessNames: []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"},
		LeakDirs:         []string{stateDir},
		LeakDirsKeep:     keep,
		SetupTimeout:     5 * time.Minute,
	}
}

// runtimeClasses are the RuntimeClasses every case runs with.
var runtimeClasses = []string{"runc", "podvm"}

// suiteContext bounds the whole suite; `make e2e` gives go test a larger -timeout.
func suiteContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 40*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
