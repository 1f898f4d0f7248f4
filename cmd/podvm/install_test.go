package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podvm/podvm/deploy"
)

func TestInstallIntoAStagingRoot(t *testing.T) {
	bin, img, root := t.TempDir(), t.TempDir(), t.TempDir()
	for _, f := range []string{"podvm", shimName} {
		if err := os.WriteFile(filepath.Join(bin, f), []byte("#!/bin/true\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"vmlinuz", "root.img", "initrd.img", "image.json"} {
		if err := os.WriteFile(filepath.Join(img, f), []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r := runCLI(t, bin, t.TempDir(), "install", "--root", root, "--prefix", "/usr", "--image", img)
	if r.code != 0 {
		t.Fatalf("install: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	for path, want := range map[string]string{
		"usr/bin/podvm":                     "#!/bin/true\n",
		"usr/bin/" + shimName:               "#!/bin/true\n",
		"usr/share/podvm/initrd.img":        "initrd.img",
		"usr/share/podvm/root.img":          "root.img",
		"usr/share/podvm/runtimeclass.yaml": string(deploy.RuntimeClass),
		"etc/containerd/conf.d/podvm.toml":  string(deploy.ContainerdDropIn),
		"etc/podvm/config.toml":             string(deploy.ConfigTOML),
	} {
		if b, err := os.ReadFile(filepath.Join(root, path)); err != nil || string(b) != want {
			t.Errorf("%s: %q, %v", path, b, err)
		}
	}
	if st, _ := os.Stat(filepath.Join(root, "usr/bin", shimName)); st == nil || st.Mode().Perm() != 0o755 {
		t.Errorf("shim mode: %v", st)
	}

	// A second install keeps the operator's config.
	cfg := filepath.Join(root, "etc/podvm/config.toml")
	if err := os.WriteFile(cfg, []byte("# mine\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, bin, t.TempDir(), "install", "--root", root, "--image", img); r.code != 0 || !strings.Contains(r.stdout, "keeping") {
		t.Fatalf("reinstall: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if b, _ := os.ReadFile(cfg); string(b) != "# mine\n" {
		t.Errorf("reinstall overwrote the node config: %q", b)
	}

	// An image without a root image (a Debian kernel's) takes the earlier one away: it would
	// boot another agent.
	if err := os.Remove(filepath.Join(img, "root.img")); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, bin, t.TempDir(), "install", "--root", root, "--image", img); r.code != 0 {
		t.Fatalf("reinstall without a root image: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(root, "usr/share/podvm/root.img")); !os.IsNotExist(err) {
		t.Errorf("the earlier root image stayed: %v", err)
	}

	// Without the shim next to podvm, it says what to do.
	os.Remove(filepath.Join(bin, shimName))
	if r := runCLI(t, bin, t.TempDir(), "install", "--root", t.TempDir()); r.code != 1 || !strings.Contains(r.stderr, "make build") {
		t.Errorf("install without a shim: exit %d stderr %q", r.code, r.stderr)
	}
}

// TestInstallRecordedUninstall: an install that records itself (as onto /) is undone by podvm
// uninstall exactly: files, the directories it made, the probe's cache; a node config the
// admin changed stays, and without a record uninstall says so.
func TestInstallRecordedUninstall(t *testing.T) {
	bin, img, root := t.TempDir(), t.TempDir(), t.TempDir()
	for _, f := range []string{"podvm", shimName} {
		if err := os.WriteFile(filepath.Join(bin, f), []byte("#!/bin/true\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"vmlinuz", "root.img", "initrd.img", "image.json"} {
		if err := os.WriteFile(filepath.Join(img, f), []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"usr/local/bin", "etc", "run"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, edit := range []bool{false, true} {
		r := runCLI(t, bin, t.TempDir(), "install", "--root", root, "--record", "--image", img)
		if r.code != 0 || !strings.Contains(r.stdout, filepath.Join(root, "usr/local/bin", shimName)) {
			t.Fatalf("install: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		if b, err := os.ReadFile(filepath.Join(root, "etc/containerd/conf.d/podvm.toml")); err != nil || string(b) != string(deploy.ContainerdDropIn) {
			t.Fatalf("drop-in: %q %v", b, err)
		}
		if err := os.MkdirAll(filepath.Join(root, "run/podvm"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "run/podvm/accel.json"), []byte("{}"), 0o644); err != nil {
			t.Fatal(err)
		}
		if edit {
			if err := os.WriteFile(filepath.Join(root, "etc/podvm/config.toml"), []byte("# mine\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if r := runCLI(t, bin, t.TempDir(), "uninstall", "--root", root); r.code != 0 {
			t.Fatalf("uninstall: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		var left []string
		_ = filepath.WalkDir(root, func(p string, _ fs.DirEntry, _ error) error {
			rel, _ := filepath.Rel(root, p)
			left = append(left, rel)
			return nil
		})
		want := ". etc run usr usr/local usr/local/bin"
		if edit {
			want = ". etc etc/podvm etc/podvm/config.toml run usr usr/local usr/local/bin"
		}
		if got := strings.Join(left, " "); got != want {
			t.Errorf("after uninstall (config edited %v): %s, want %s", edit, got, want)
		}
		_ = os.RemoveAll(filepath.Join(root, "etc/podvm"))
	}
	if r := runCLI(t, bin, t.TempDir(), "uninstall", "--root", root); r.code != 1 || !strings.Contains(r.stderr, "nothing recorded") {
		t.Errorf("uninstall without a record: exit %d\n%s", r.code, r.stderr)
	}
}
