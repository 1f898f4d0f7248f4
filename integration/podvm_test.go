package integration

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
	"github.com/podvm/podvm/shim/config"
)

// podvmStateDir is where the shim keeps per-sandbox state in the tests (the default).
const podvmStateDir = "/run/podvm"

// podvmEnv starts containerd with the podvm runtime handler configured for the test guest image.
func podvmEnv(t *testing.T, allowed ...string) *harness.Env {
	t.Helper()
	return harness.Start(t, podvmOptions(t, allowed...))
}

// podvmTest is podvmEnv for a test whose calls are bounded by timeout: the context ends with
// the test, before the environment's teardown.
func podvmTest(t *testing.T, timeout time.Duration, allowed ...string) (*harness.Env, context.Context) {
	t.Helper()
	env := podvmEnv(t, allowed...)
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	t.Cleanup(cancel)
	return env, ctx
}

// podvmOptions are podvmEnv's harness options, for tests and benchmarks that change some.
func podvmOptions(t testing.TB, allowed ...string) harness.Options {
	t.Helper()
	opts := podvmShimOptions(t, podvmStateDir, "", allowed...)
	opts.LeakProcessNames = []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"}
	return opts
}

// podvmShimOptions are harness options that run podvm's shim with a node config of the test
// guest image, stateDir as its state dir, the allowed annotations and, if not empty, block as
// its [block] section; with templated start if harness.TemplateEnv asks for it. AssertNoLeaks
// requires stateDir empty but for the accelerator probe's cache and lock (and the templates).
func podvmShimOptions(t testing.TB, stateDir, block string, allowed ...string) harness.Options {
	t.Helper()
	return shimOptions(t, stateDir, block, harness.Templated(), allowed...)
}

// bootedShimOptions are podvmShimOptions whose pods always boot, for the tests of the boot.
func bootedShimOptions(t testing.TB, stateDir string) harness.Options {
	t.Helper()
	return shimOptions(t, stateDir, "", false)
}

// shimOptions are podvmShimOptions, with templated start if templated. The templates stay
// in stateDir/templates until the test's end, when they go (after the env's teardown).
func shimOptions(t testing.TB, stateDir, block string, templated bool, allowed ...string) harness.Options {
	t.Helper()
	kernel, rootImage := guestImage(t)
	bin := os.Getenv("PODVM_BIN")
	require(t, needFile(filepath.Join(bin, "containerd-shim-podvm-v2")))
	quoted := make([]string, len(allowed))
	for i, a := range allowed {
		quoted[i] = fmt.Sprintf("%q", a)
	}
	body := fmt.Sprintf(`[hypervisor]
accel = %q
kernel = %q
image = %q
debug = %v

[sandbox]
state_dir = %q

[annotations]
allowed = [%s]
`, testAccel(), kernel, rootImage, testDebug(), stateDir, strings.Join(quoted, ", "))
	if block != "" {
		body += "\n[block]\n" + block + "\n"
	}
	keep := []string{qemu.AccelCacheFile, qemu.AccelLockFile, config.StartSlotsDirName}
	keepStartSlots(t, stateDir)
	if templated {
		body, keep = harness.WithTemplates(t, stateDir, body, keep)
	}
	cfg := filepath.Join(t.TempDir(), "podvm.toml")
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return harness.Options{
		ShimDir:         bin,
		PodvmConfigPath: cfg,
		LeakDirs:        []string{stateDir},
		LeakDirsKeep:    keep,
	}
}

// keepStartSlots removes, at the end (after the env's teardown), the node's start slots the
// shims make in stateDir, unless they were there before: the machine is left as it was.
func keepStartSlots(t testing.TB, stateDir string) {
	dir := filepath.Join(stateDir, config.StartSlotsDirName)
	if _, err := os.Lstat(dir); err == nil {
		return
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
}

// ownStateDir makes a podvm state dir of the test's own under /run, so that other tests' VMs on
// the same machine are not taken for its leaks: after the test (and its harness's teardown) no
// process may name it and nothing may be mounted under it, and it is removed.
func ownStateDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/run", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { assertNothingUnder(t, dir) }) // after the env's teardown
	return dir
}

// TestPodvmPodLifecycle is TestRuncPodLifecycle with the podvm handler: the same observable
// behaviour, with the pod in a VM.
func TestPodvmPodLifecycle(t *testing.T) {
	env := podvmEnv(t)
	testPodLifecycle(t, env, "podvm")
	env.AssertNoLeaks(t)
}
