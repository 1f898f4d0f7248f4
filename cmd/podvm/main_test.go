package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs podvm with args; podvm's own binary is taken to live in exeDir.
func runCLI(t *testing.T, exeDir, kernelDir string, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	e := &env{
		stdout:     &stdout,
		stderr:     &stderr,
		executable: func() (string, error) { return filepath.Join(exeDir, "podvm"), nil },
		kernelDir:  kernelDir,
	}
	code := run(context.Background(), e, args)
	return result{code, stdout.String(), stderr.String()}
}

func TestDispatch(t *testing.T) {
	empty := t.TempDir()
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string // substring expected on stdout
		stderr string // substring expected on stderr
	}{
		{"no command", nil, 2, "", "podvm: missing command\nRun 'podvm -h' for usage."},
		{"help", []string{"-h"}, 0, "Commands:\n  check", ""},
		{"help word", []string{"help"}, 0, "version", ""},
		{"unknown", []string{"frobnicate"}, 2, "", `unknown command "frobnicate"; commands: check, config, debug, image, install, uninstall, metrics, node, overhead, version`},
		{"flag first", []string{"--kernel", "x"}, 2, "", "flags go after the command"},
		{"version", []string{"version"}, 0, "podvm ", ""},
		{"version extra", []string{"version", "now"}, 2, "", `podvm version: unexpected argument "now"`},
		{"image alone", []string{"image"}, 2, "", "podvm image: missing command"},
		{"image unknown", []string{"image", "burn"}, 2, "", `unknown command "burn"; commands: build`},
		{"build help", []string{"image", "build", "-h"}, 0, "-kernel FILE_OR_DIR", ""},
		{"build bad flag", []string{"image", "build", "--kernal", "x"}, 2, "", "flag provided but not defined: -kernal\nRun 'podvm image build -h' for usage."},
		{"build bad compress", []string{"image", "build", "--compress", "lz4"}, 2, "", `compression "lz4": use "none" or "gzip"`},
		{"build extra arg", []string{"image", "build", "vmlinuz"}, 2, "", `unexpected argument "vmlinuz"`},
		{"build no kernel", []string{"image", "build"}, 1, "", "podvm: no --kernel given: no kernel built by `make kernel` (" + filepath.Join(empty, "podvm") + ") and no linux-image-*.deb in " + empty + ": run `make deps`"},
		{"build no agent", []string{"image", "build", "--kernel", empty}, 1, "", "no --agent given and no podvm-agent next to podvm (" + filepath.Join(empty, "podvm-agent") + "): build it with `make`"},
		{"build dynamic agent", []string{"image", "build", "--kernel", "/nonexistent.deb", "--agent", "/bin/true"}, 1, "", "podvm: agent /bin/true is dynamically linked"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, empty, empty, tt.args...)
			if r.code != tt.code {
				t.Errorf("exit code %d, want %d\nstdout: %s\nstderr: %s", r.code, tt.code, r.stdout, r.stderr)
			}
			if !strings.Contains(r.stdout, tt.stdout) {
				t.Errorf("stdout %q does not contain %q", r.stdout, tt.stdout)
			}
			if !strings.Contains(r.stderr, tt.stderr) {
				t.Errorf("stderr %q does not contain %q", r.stderr, tt.stderr)
			}
		})
	}
}

func TestCommandsTable(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range commands() {
		if c.name == "" || c.summary == "" || c.run == nil || seen[c.name] {
			t.Errorf("bad or duplicate command entry %+v", c)
		}
		seen[c.name] = true
	}
}

// TestImageBuild runs `podvm image build` with its defaults (kernel from the kernel dir, agent
// next to the binary) on a made-up kernel tree.
func TestImageBuild(t *testing.T) {
	exeDir := t.TempDir()
	buildStatic(t, filepath.Join(exeDir, "podvm-agent"))
	tree := t.TempDir()
	const ver = "6.1.0-cli-test"
	md := filepath.Join(tree, "lib", "modules", ver)
	for p, data := range map[string]string{
		filepath.Join(tree, "boot", "vmlinuz-"+ver):     "kernel",
		filepath.Join(md, "kernel", "a", "dep.ko"):      "dep",
		filepath.Join(md, "kernel", "b", "main-mod.ko"): "main",
		filepath.Join(md, "modules.dep"):                "kernel/b/main-mod.ko: kernel/a/dep.ko\nkernel/a/dep.ko:\n",
	} {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(t.TempDir(), "podvm")
	r := runCLI(t, exeDir, t.TempDir(), "image", "build", "--kernel", tree, "--output", out, "--modules", "main_mod", "--compress", "gzip")
	if r.code != 0 {
		t.Fatalf("exit code %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	for _, s := range []string{"podvm image build: resolve modules: 2 modules", "podvm image build: write initrd: "} {
		if !strings.Contains(r.stderr, s) {
			t.Errorf("stderr %q does not report %q", r.stderr, s)
		}
	}
	if !strings.Contains(r.stdout, "modules (2, in load order): dep main_mod") {
		t.Errorf("stdout = %q", r.stdout)
	}
	var m struct {
		KernelVersion string
		Compression   string
	}
	b, err := os.ReadFile(filepath.Join(out, "image.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &m); err != nil || m.KernelVersion != ver || m.Compression != "gzip" {
		t.Errorf("image.json = %s (%v)", b, err)
	}

	// --quiet and --modules "": no step reports, no modules.
	r = runCLI(t, exeDir, t.TempDir(), "image", "build", "--kernel", tree, "--output", out, "--modules", "", "--quiet")
	if r.code != 0 || r.stderr != "" || !strings.Contains(r.stdout, "modules (0, in load order)") {
		t.Errorf("quiet build: code %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
}

func buildStatic(t *testing.T, dst string) {
	t.Helper()
	// go test puts its own toolchain's bin dir first in PATH.
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go toolchain to build a static test agent")
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte("package main\n\nfunc main() {}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(gobin, "build", "-o", dst, "main.go")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-buildvcs=false", "GO111MODULE=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build test agent: %v\n%s", err, out)
	}
}
