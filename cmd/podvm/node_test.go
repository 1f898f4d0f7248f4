package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNodeInstallUninstall drives `podvm node install` and `uninstall` against a temp root
// (no containerd restart, no label), with the dist tree found beside the binary.
func TestNodeInstallUninstall(t *testing.T) {
	dist, host := t.TempDir(), t.TempDir()
	for _, p := range []string{"usr/bin/podvm", "etc/podvm/config.toml"} {
		if err := os.MkdirAll(filepath.Join(dist, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dist, p), []byte(p), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"etc", "var/lib"} { // what every node has
		if err := os.MkdirAll(filepath.Join(host, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	exeDir := filepath.Join(dist, "usr", "bin")
	r := runCLI(t, exeDir, "", "node", "install", "--host-root", host, "--restart-containerd=none", "--node-name", "")
	if r.code != 0 || !strings.Contains(r.stdout, "installed "+dist) {
		t.Fatalf("install: %+v", r)
	}
	if b, err := os.ReadFile(filepath.Join(host, "usr/bin/podvm")); err != nil || string(b) != "usr/bin/podvm" {
		t.Fatalf("installed podvm: %q %v", b, err)
	}
	r = runCLI(t, exeDir, "", "node", "uninstall", "--host-root", host, "--restart-containerd=none", "--node-name", "")
	if r.code != 0 {
		t.Fatalf("uninstall: %+v", r)
	}
	for _, d := range []string{"etc", "var/lib"} {
		if entries, _ := os.ReadDir(filepath.Join(host, d)); len(entries) != 0 {
			t.Fatalf("left in the node's /%s: %v", d, entries)
		}
	}
	r = runCLI(t, exeDir, "", "node", "image", "--dist", t.TempDir(), "--output", filepath.Join(t.TempDir(), "i.tar"))
	if r.code != 1 || !strings.Contains(r.stderr, "run 'make dist'") {
		t.Fatalf("image from an empty dist: %+v", r)
	}
}
