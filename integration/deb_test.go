package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/deploy"
	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/shim/config"
)

// debConfig is the package's one conffile: apt remove leaves it, apt purge removes it.
const debConfig = "/etc/podvm/config.toml"

// TestDebPackage installs the podvm Debian package on this machine for real (apt install
// ./podvm_<v>_amd64.deb), runs a pod through a containerd whose podvm runtime is the
// package's drop-in settings (its shim, its default node config, its guest image), then
// runs one restored from a VM template (templated start turned on in a copy of that config),
// removes the package and checks that nothing but the config is left, the templates gone
// too; it purges it at the end, so the machine is as before. PODVM_DEB names the package
// (make integration builds it).
func TestDebPackage(t *testing.T) {
	deb := os.Getenv("PODVM_DEB")
	require(t, needRoot(), needCmd("apt-get"), needCmd("dpkg"), map[bool]string{true: "PODVM_DEB (make deb)"}[deb == ""])
	require(t, needFile(deb))
	files, dirs := debContents(t, deb)
	newDirs := refuseInstalled(t, files, dirs)
	t.Cleanup(func() { purgeIfInstalled(t) })

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	apt(ctx, t, "install", "-y", deb)
	checkInstalled(ctx, t, files)
	checkPodvmCheck(ctx, t, "/usr/bin/podvm")

	env := harness.Start(t, harness.Options{
		ShimDir:          "/usr/bin",
		PodvmConfigPath:  debConfig,
		LeakProcessNames: []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"},
		LeakDirs:         []string{podvmStateDir},
		LeakDirsKeep:     []string{qemu.AccelCacheFile, qemu.AccelLockFile, config.StartSlotsDirName},
	})
	testPodLifecycle(t, env, "podvm")
	env.AssertNoLeaks(t)
	testInstalledTemplate(t, "/usr/bin", debConfig)

	apt(ctx, t, "remove", "-y", "podvm")
	checkRemoved(ctx, t, files, newDirs, true)
	apt(ctx, t, "purge", "-y", "podvm")
	checkRemoved(ctx, t, files, newDirs, false)
}

// debContents lists the package's files and directories (absolute paths) from its data tar.
func debContents(t *testing.T, deb string) (files, dirs []string) {
	t.Helper()
	out, err := exec.Command("dpkg-deb", "--fsys-tarfile", deb).Output()
	if err != nil {
		t.Fatalf("dpkg-deb --fsys-tarfile %s: %v", deb, err)
	}
	tr := tar.NewReader(bytes.NewReader(out))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", deb, err)
		}
		p := filepath.Clean("/" + h.Name)
		switch {
		case p == "/":
		case h.Typeflag == tar.TypeDir:
			dirs = append(dirs, p)
		default:
			files = append(files, p)
		}
	}
	if len(files) == 0 {
		t.Fatalf("%s holds no files", deb)
	}
	return files, dirs
}

// refuseInstalled skips the test (fails it under CI) when podvm is installed or any of the
// package's files exists: the test could not put the machine back as it was. It returns the
// package's directories that do not exist yet: removal must take them away again.
func refuseInstalled(t *testing.T, files, dirs []string) (newDirs []string) {
	t.Helper()
	if out, err := exec.Command("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "podvm").Output(); err == nil && len(bytes.TrimSpace(out)) > 0 {
		require(t, "a machine without the podvm package (dpkg says: "+strings.TrimSpace(string(out))+"; dpkg --purge podvm)")
	}
	for _, f := range files {
		if _, err := os.Lstat(f); err == nil {
			require(t, "a machine without "+f+" (the package would replace it)")
		}
	}
	for _, d := range dirs {
		if _, err := os.Lstat(d); errors.Is(err, fs.ErrNotExist) {
			newDirs = append(newDirs, d)
		}
	}
	return newDirs
}

// purgeIfInstalled puts the machine back when the test stopped half way.
func purgeIfInstalled(t *testing.T) {
	if out, err := exec.Command("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "podvm").Output(); err != nil || len(bytes.TrimSpace(out)) == 0 {
		return
	}
	if out, err := exec.Command("dpkg", "--purge", "podvm").CombinedOutput(); err != nil {
		t.Errorf("dpkg --purge podvm: %v\n%s", err, out)
	}
}

func apt(ctx context.Context, t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.CommandContext(ctx, "apt-get", args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("apt-get %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("apt-get %s:\n%s", strings.Join(args, " "), lastLines(string(out), 8))
}

// checkInstalled: dpkg owns every file of the package, and the node config is the default one.
func checkInstalled(ctx context.Context, t *testing.T, files []string) {
	t.Helper()
	out, err := exec.CommandContext(ctx, "dpkg", "-L", "podvm").Output()
	if err != nil {
		t.Fatalf("dpkg -L podvm: %v", err)
	}
	owned := map[string]bool{}
	for _, l := range strings.Split(string(out), "\n") {
		owned[strings.TrimSpace(l)] = true
	}
	for _, f := range files {
		if !owned[f] {
			t.Errorf("dpkg -L podvm does not list %s", f)
		}
		if _, err := os.Stat(f); err != nil {
			t.Errorf("installed package: %v", err)
		}
	}
	if b, err := os.ReadFile(debConfig); err != nil || !bytes.Equal(b, deploy.ConfigTOML) {
		t.Errorf("%s is not deploy/config.toml (err %v)", debConfig, err)
	}
}

// checkPodvmCheck runs the installed `podvm check` (the binary podvm) with the installed default config: it
// boots the guest image under TCG and KVM as accel "auto" does, and must pass.
func checkPodvmCheck(ctx context.Context, t *testing.T, podvm string) {
	t.Helper()
	out, err := exec.CommandContext(ctx, podvm, "check").CombinedOutput()
	t.Logf("podvm check:\n%s", out)
	if err != nil || !strings.Contains(string(out), "this node can run podvm pods") {
		t.Fatalf("podvm check with the package's default config: %v", err)
	}
	if !strings.Contains(string(out), "boot tcg") {
		t.Errorf("podvm check did not boot the guest under TCG")
	}
	// What to do about KVM is said once per line (on a host without /dev/kvm the reason and
	// the advice both said it).
	for line := range strings.Lines(string(out)) {
		if strings.Count(line, "kvm_intel") > 1 {
			t.Errorf("podvm check repeats its advice: %s", line)
		}
	}
}

// checkRemoved: after apt remove (keepConfig) only the config is left of the package, after
// purge nothing; the directories the package made are gone, and so is the accelerator
// probe's cache the shim wrote under the default state dir.
func checkRemoved(ctx context.Context, t *testing.T, files, newDirs []string, keepConfig bool) {
	t.Helper()
	for _, f := range files {
		_, err := os.Lstat(f)
		switch {
		case f == debConfig && keepConfig && err != nil:
			t.Errorf("apt remove took the config %s: %v", f, err)
		case f == debConfig && keepConfig:
			if out, err := exec.CommandContext(ctx, "dpkg", "-S", f).CombinedOutput(); err != nil {
				t.Errorf("dpkg -S %s after remove: %v (%s): the kept config should still belong to podvm", f, err, out)
			}
		case err == nil:
			t.Errorf("%s left after apt-get remove/purge", f)
		}
	}
	for _, d := range newDirs {
		if keepConfig && d == filepath.Dir(debConfig) {
			continue
		}
		if _, err := os.Lstat(d); err == nil {
			t.Errorf("directory %s, made by the package, left after apt-get remove/purge", d)
		}
	}
	checkRunStateGone(t, "apt-get remove/purge")
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
