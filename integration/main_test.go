package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/podvm/podvm/rootfs/guestimage"
)

// The integration tests need podvm's binaries and a guest image. `make integration` builds
// them and passes PODVM_BIN and PODVM_IMAGE_DIR; a bare `go test` builds them here once.
func TestMain(m *testing.M) {
	code := run(m)
	printBenchSummary()
	os.Exit(code)
}

func run(m *testing.M) int {
	if os.Getenv("PODVM_BIN") != "" && os.Getenv("PODVM_IMAGE_DIR") != "" {
		return m.Run()
	}
	if os.Geteuid() != 0 {
		// Nothing can run; each test says why (skip, or fail under CI).
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "podvm-it-build-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := buildAll(dir); err != nil {
		fmt.Fprintln(os.Stderr, "integration: building podvm for the tests:", err)
		if os.Getenv("CI") == "true" {
			return 1
		}
	} else {
		for k, v := range map[string]string{"PODVM_BIN": filepath.Join(dir, "bin"), "PODVM_IMAGE_DIR": filepath.Join(dir, "image")} {
			if err := os.Setenv(k, v); err != nil {
				fmt.Fprintln(os.Stderr, "integration:", err)
				return 1
			}
		}
	}
	return m.Run()
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

func buildAll(dir string) error {
	bin := filepath.Join(dir, "bin")
	build := func(env []string, out, pkg string, args ...string) error {
		cmd := exec.Command("go", append(append([]string{"build", "-o", filepath.Join(bin, out)}, args...), pkg)...)
		cmd.Dir = repoRoot()
		cmd.Env = append(os.Environ(), env...)
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
		}
		return nil
	}
	// As the Makefile builds it: protobuf's detrand replaced (agent/detrand).
	agentMod := filepath.Join(dir, "agent-mod")
	if b, err := exec.Command("bash", filepath.Join(repoRoot(), "hack/agent-modfile.sh"), agentMod).CombinedOutput(); err != nil {
		return fmt.Errorf("hack/agent-modfile.sh: %w\n%s", err, b)
	}
	if err := build([]string{"CGO_ENABLED=1"}, "podvm-agent", "./cmd/podvm-agent",
		"-tags", "seccomp netgo osusergo", "-modfile", filepath.Join(agentMod, "go.mod"), "-ldflags", "-extldflags -static"); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(repoRoot(), "cmd/containerd-shim-podvm-v2")); err == nil {
		if err := build([]string{"CGO_ENABLED=0"}, "containerd-shim-podvm-v2", "./cmd/containerd-shim-podvm-v2"); err != nil {
			return err
		}
	}
	kernel, err := guestimage.FindKernel(filepath.Join(devDir(), "kernel"))
	if err != nil {
		return err
	}
	_, err = guestimage.Build(context.Background(), guestimage.Options{
		Kernel: kernel, Agent: filepath.Join(bin, "podvm-agent"), OutputDir: filepath.Join(dir, "image"),
	})
	return err
}

func devDir() string {
	if d := os.Getenv("PODVM_DEV"); d != "" {
		return d
	}
	return "/opt/podvm-dev"
}

// require skips the test when a prerequisite is missing, or fails it under CI, where a missing
// prerequisite is a broken setup and not a reason to test less.
func require(t testing.TB, missing ...string) {
	t.Helper()
	var what []string
	for _, m := range missing {
		if m != "" {
			what = append(what, m)
		}
	}
	if len(what) == 0 {
		return
	}
	msg := fmt.Sprintf("missing prerequisites %v (run `make deps`, as root)", what)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func needRoot() string {
	if os.Geteuid() != 0 {
		return "root"
	}
	return ""
}

func needFile(p string) string {
	if _, err := os.Stat(p); err != nil {
		return p
	}
	return ""
}

func needCmd(name string) string {
	if _, err := exec.LookPath(name); err != nil {
		return name
	}
	return ""
}

// guestImage returns the kernel and root image the tests boot (the default path: podvm's
// kernel boots from the root image; hypervisor/qemu's real-VM tests cover the initrd).
func guestImage(t testing.TB) (kernel, rootImage string) {
	t.Helper()
	dir := os.Getenv("PODVM_IMAGE_DIR")
	require(t, needRoot(), needCmd("qemu-system-x86_64"), map[bool]string{true: "PODVM_IMAGE_DIR (make image)"}[dir == ""])
	kernel, rootImage = filepath.Join(dir, guestimage.KernelFile), filepath.Join(dir, guestimage.RootImageFile)
	require(t, needFile(kernel), needFile(rootImage))
	return kernel, rootImage
}

// testAccel is the accelerator tests use: TCG unless PODVM_TEST_ACCEL says otherwise, since
// nested KVM on CI machines is slower than TCG (see docs/development.md).
func testAccel() string {
	if a := os.Getenv("PODVM_TEST_ACCEL"); a != "" {
		return a
	}
	return "tcg"
}

// testDebug turns on the guest kernel's and agent's verbose console output (PODVM_TEST_DEBUG=1).
func testDebug() bool { return os.Getenv("PODVM_TEST_DEBUG") != "" }
