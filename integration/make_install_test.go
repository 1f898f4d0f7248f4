package integration

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/shim/config"
)

// makeInstallTouches are the paths make install writes under (PREFIX=/usr/local), with the
// record it keeps and the shim's default state dir: the test compares them before and after.
var makeInstallTouches = []string{"/usr/local/bin", "/usr/share/podvm", "/etc/podvm", "/etc/containerd", "/var/lib/podvm", podvmStateDir}

// TestMakeInstall runs the real `make install` onto this machine's / (with podvm not
// installed: the test is skipped, and fails under CI=true, if any of its files exists),
// checks the node with the installed `podvm check`, runs a pod through a containerd whose
// podvm runtime is only the installed drop-in (imported, the shim found in /usr/local/bin on
// containerd's PATH, the installed default config) and one restored from a VM template (the
// installed shim and config, templated start turned on), then runs `make uninstall` and
// checks that those paths are exactly as before: the templates are gone too.
func TestMakeInstall(t *testing.T) {
	repo := repoRoot()
	require(t, needRoot(), needCmd("make"), needFile(filepath.Join(repo, "Makefile")))
	refuseMakeInstalled(t)
	before := treeState(t)
	restoreStateDir(t)
	t.Cleanup(func() { // a test stopped half way still uninstalls
		if _, err := os.Stat("/var/lib/podvm/install.json"); err == nil {
			_ = exec.Command("/usr/local/bin/podvm", "uninstall").Run()
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	runMake(ctx, t, repo, "install")
	checkPodvmCheck(ctx, t, "/usr/local/bin/podvm")

	env := harness.Start(t, harness.Options{
		NoPodvmRuntime:   true,
		Imports:          []string{"/etc/containerd/conf.d/podvm.toml"},
		LeakProcessNames: []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"},
		LeakDirs:         []string{podvmStateDir},
		LeakDirsKeep:     []string{qemu.AccelCacheFile, qemu.AccelLockFile, config.StartSlotsDirName},
	})
	testPodLifecycle(t, env, "podvm")
	env.AssertNoLeaks(t)
	testInstalledTemplate(t, "/usr/local/bin", "/etc/podvm/config.toml")

	runMake(ctx, t, repo, "uninstall")
	checkRunStateGone(t, "make uninstall")
	harness.SameTree(t, "make install", before, treeState(t))
}

// testInstalledTemplate runs a pod through the installed shim in shimDir with the installed
// node config, templated start turned on as an admin would ([template] enabled = true): the
// pod's VM is restored from a VM template, which stays in the default state dir for the
// uninstall to remove.
func testInstalledTemplate(t *testing.T, shimDir, nodeConfig string) {
	t.Helper()
	b, err := os.ReadFile(nodeConfig)
	if err != nil {
		t.Fatal(err)
	}
	// The line in the [template] section, not in the next one.
	const off, on = "\nenabled = false\n", "\nenabled = true\n"
	body := string(b)
	start := strings.Index(body, "\n[template]\n")
	if start < 0 {
		t.Fatalf("%s has no [template] section", nodeConfig)
	}
	section := body[start+1:]
	if next := strings.Index(section, "\n["); next >= 0 {
		section = section[:next+1]
	}
	at := strings.Index(section, off)
	if at < 0 {
		t.Fatalf("%s: its [template] section has no %q", nodeConfig, strings.TrimSpace(off))
	}
	at += start + 1
	body = body[:at] + on + body[at+len(off):]
	cfg := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	env := harness.Start(t, harness.Options{
		ShimDir:          shimDir,
		PodvmConfigPath:  cfg,
		LeakProcessNames: []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"},
		LeakDirs:         []string{podvmStateDir},
		LeakDirsKeep:     []string{qemu.AccelCacheFile, qemu.AccelLockFile, config.StartSlotsDirName, config.TemplateDirName},
	})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	pod := runPod(ctx, t, env, "podvm", "templated")
	if err := waitLog(ctx, env, "pod VM ready", "from_template=", time.Second); err != nil {
		t.Errorf("the pod's VM was not restored from a template: %v", err)
	}
	removePod(ctx, t, env, pod)
	env.AssertNoLeaks(t)
	if _, err := os.Stat(filepath.Join(podvmStateDir, config.TemplateDirName)); err != nil {
		t.Errorf("no VM template in %s: %v", podvmStateDir, err)
	}
}

// checkRunStateGone: after an uninstall, nothing the shim made at run time is left in the
// default state dir: the accelerator probe's cache and lock, the start slots, the VM templates.
func checkRunStateGone(t *testing.T, what string) {
	t.Helper()
	for _, f := range []string{qemu.AccelCacheFile, qemu.AccelLockFile, config.StartSlotsDirName, config.TemplateDirName} {
		if _, err := os.Lstat(filepath.Join(podvmStateDir, f)); err == nil {
			t.Errorf("%s left after %s", filepath.Join(podvmStateDir, f), what)
		}
	}
}

// restoreStateDir puts back, at the end, the shim's state dir if it was there before: an
// empty one left by earlier tests' pods, which make uninstall removes as the deb's postrm
// does.
func restoreStateDir(t *testing.T) {
	st, err := os.Stat(podvmStateDir)
	if err != nil {
		return
	}
	t.Cleanup(func() {
		if _, err := os.Stat(podvmStateDir); errors.Is(err, fs.ErrNotExist) {
			if err := os.Mkdir(podvmStateDir, st.Mode().Perm()); err != nil {
				t.Error(err)
			}
		}
	})
}

func runMake(ctx context.Context, t *testing.T, repo, target string) {
	t.Helper()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "make", "-C", repo, target)
	// Not the variables of a make this test runs under (make integration IT_RUN=...).
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); k != "MAKEFLAGS" && k != "MFLAGS" && k != "MAKELEVEL" {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make %s: %v\n%s", target, err, out)
	}
	t.Logf("make %s (%v):\n%s", target, time.Since(start).Round(time.Millisecond), lastLines(string(out), 12))
}

// refuseMakeInstalled skips the test (fails it under CI) when podvm looks installed under
// /usr/local or /etc: the test could not tell its files from the machine's.
func refuseMakeInstalled(t *testing.T) {
	t.Helper()
	for _, f := range []string{"/var/lib/podvm/install.json", "/usr/local/bin/podvm", "/usr/local/bin/containerd-shim-podvm-v2",
		"/usr/share/podvm", "/etc/podvm/config.toml", "/etc/containerd/conf.d/podvm.toml"} {
		if _, err := os.Lstat(f); err == nil {
			require(t, "a machine without podvm installed ("+f+" exists; make uninstall, or dpkg --purge podvm)")
		}
	}
}

// treeState is harness.TreeState of makeInstallTouches but the run-time state dir itself and
// the accelerator probe's cache in it, which pods of earlier tests may have left and uninstall
// removes (and the directory, when empty).
func treeState(t *testing.T) map[string]string {
	t.Helper()
	skip := func(p string, d fs.DirEntry) bool {
		return p == podvmStateDir || (filepath.Dir(p) == podvmStateDir && strings.HasPrefix(d.Name(), "accel."))
	}
	return harness.TreeState(t, skip, makeInstallTouches...)
}
