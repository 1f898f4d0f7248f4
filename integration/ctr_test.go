package integration

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestPodvmCtrRun runs a container with plain `ctr run --runtime io.containerd.podvm.v2`: no
// CRI, no pod. It gets a VM of its own, which goes when the container does. While it runs,
// `ctr task exec` runs twice with the same exec ID, as a script may: each exec is deleted
// when it ends, and the second must not find the first still in the guest. The container's
// cgroup (ctr's --cgroup, under the env's parent so that the leak check covers it) holds its
// VM while it runs.
func TestPodvmCtrRun(t *testing.T) {
	env, ctx := podvmTest(t, 5*time.Minute)
	ctr := filepath.Join(devDir(), "bin", "ctr")
	require(t, needFile(ctr))
	sock := strings.TrimPrefix(env.Endpoint, "unix://")
	base := []string{"--address", sock, "--namespace", "podvm-ctr"}
	ctrCmd := func(args ...string) ([]byte, error) {
		return env.RunInNetNS(ctx, ctr, append(append([]string(nil), base...), args...)...)
	}
	run := func(args ...string) string {
		t.Helper()
		out, err := ctrCmd(args...)
		if err != nil {
			t.Fatalf("ctr %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run("images", "pull", "--plain-http", "--hosts-dir", filepath.Join(env.Dir, "certs.d"), env.BusyboxImage)
	config := podvmOptions(t).PodvmConfigPath // here: it may fail t, which a goroutine must not
	// Without --cgroup, ctr would put it in /<namespace>/<id>, and /<namespace> stays after the
	// run, with runc as with podvm: outside the env, nothing would remove it.
	cgroup := env.CgroupParent + "/ctr-vm"
	ran := make(chan string, 1)
	go func() {
		// It ends killed (exit 137), which ctr reports as its own failure.
		out, _ := ctrCmd("run", "--rm", "--runtime", "io.containerd.podvm.v2", "--runtime-config-path", config,
			"--cgroup", cgroup,
			env.BusyboxImage, "ctr-vm", "sh", "-c", "echo kernel $(uname -r); cat /proc/sys/kernel/random/boot_id; exec sleep 600")
		ran <- string(out)
	}()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(run("task", "ls"), "RUNNING") {
		if time.Now().After(deadline) {
			t.Fatal("ctr run: its task not running after a minute")
		}
		time.Sleep(100 * time.Millisecond)
	}
	checkVMInCgroup(t, cgroup)
	var bootIDs []string
	for range 2 {
		bootIDs = append(bootIDs, withoutCtrLog(run("task", "exec", "--exec-id", "again", "ctr-vm", "cat", "/proc/sys/kernel/random/boot_id")))
	}
	run("task", "kill", "--signal", "SIGKILL", "ctr-vm")
	out := <-ran
	if !strings.Contains(out, "kernel ") || strings.Contains(out, "kernel "+hostKernel(t)) {
		t.Fatalf("ctr run output %q: want the guest kernel, not the host's %s", out, hostKernel(t))
	}
	for _, id := range bootIDs {
		if id == "" || !strings.Contains(out, id) {
			t.Errorf("exec saw boot id %q, the container %q: want the same VM's", id, out)
		}
	}
	t.Logf("ctr run in its own VM:\n%s", out)
	// --rm deleted the container: its VM and state must be gone.
	if left := withoutCtrLog(run("containers", "list", "-q")); left != "" {
		t.Errorf("containers left: %q", left)
	}
	env.AssertNoLeaks(t)
	if left, _ := filepath.Glob("/sys/fs/cgroup/*/podvm-ctr"); len(left) > 0 {
		t.Errorf("cgroups of ctr's namespace left: %v", left)
	}
}

// withoutCtrLog is ctr's output without its own log lines, trimmed.
func withoutCtrLog(out string) string {
	var keep []string
	for _, line := range strings.Split(out, "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "time=") {
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, "\n")
}
