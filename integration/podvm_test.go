package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/integration/harness"
)

// podvmStateDir is where the shim keeps per-sandbox state in the tests (the default).
const podvmStateDir = "/run/podvm"

// podvmEnv starts containerd with the podvm runtime handler configured for the test guest image.
func podvmEnv(t *testing.T, allowed ...string) *harness.Env {
	t.Helper()
	return harness.Start(t, podvmOptions(t, allowed...))
}

// podvmOptions are podvmEnv's harness options, for tests and benchmarks that change some.
func podvmOptions(t testing.TB, allowed ...string) harness.Options {
	t.Helper()
	kernel, initrd := guestImage(t)
	bin := os.Getenv("PODVM_BIN")
	require(t, needFile(filepath.Join(bin, "containerd-shim-podvm-v2")))
	cfg := filepath.Join(t.TempDir(), "podvm.toml")
	quoted := ""
	for i, a := range allowed {
		if i > 0 {
			quoted += ", "
		}
		quoted += fmt.Sprintf("%q", a)
	}
	body := fmt.Sprintf(`[hypervisor]
accel = %q
kernel = %q
initrd = %q
debug = %v

[sandbox]
state_dir = %q

[annotations]
allowed = [%s]
`, testAccel(), kernel, initrd, testDebug(), podvmStateDir, quoted)
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return harness.Options{
		ShimDir:          bin,
		PodvmConfigPath:  cfg,
		LeakProcessNames: []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"},
		LeakDirs:         []string{podvmStateDir},
		LeakDirsKeep:     []string{qemu.AccelCacheFile, qemu.AccelLockFile},
	}
}

// TestPodvmPodLifecycle is TestRuncPodLifecycle with the podvm handler: the same observable
// behaviour, with the pod in a VM.
func TestPodvmPodLifecycle(t *testing.T) {
	env := podvmEnv(t)
	testPodLifecycle(t, env, "podvm")
	env.AssertNoLeaks(t)
}
