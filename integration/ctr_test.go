package integration

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestPodvmCtrRun runs a container with plain `ctr run --runtime io.containerd.podvm.v2`: no
// CRI, no pod. It gets a VM of its own, which goes when the container does.
func TestPodvmCtrRun(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	ctr := filepath.Join(devDir(), "bin", "ctr")
	require(t, needFile(ctr))
	sock := strings.TrimPrefix(env.Endpoint, "unix://")
	base := []string{"--address", sock, "--namespace", "podvm-ctr"}
	run := func(args ...string) string {
		t.Helper()
		out, err := env.RunInNetNS(ctx, ctr, append(append([]string(nil), base...), args...)...)
		if err != nil {
			t.Fatalf("ctr %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run("images", "pull", "--plain-http", "--hosts-dir", filepath.Join(env.Dir, "certs.d"), env.BusyboxImage)
	out := run("run", "--rm", "--runtime", "io.containerd.podvm.v2", "--runtime-config-path", podvmOptions(t).PodvmConfigPath,
		env.BusyboxImage, "ctr-vm", "sh", "-c", "echo kernel $(uname -r); cat /proc/sys/kernel/random/boot_id")
	if !strings.Contains(out, "kernel ") || strings.Contains(out, "kernel "+hostKernel(t)) {
		t.Fatalf("ctr run output %q: want the guest kernel, not the host's %s", out, hostKernel(t))
	}
	t.Logf("ctr run in its own VM:\n%s", out)
	// --rm deleted the container: its VM and state must be gone.
	for _, line := range strings.Split(run("containers", "list", "-q"), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "time=") { // ctr's own log lines
			t.Errorf("container left: %q", line)
		}
	}
	env.AssertNoLeaks(t)
}
