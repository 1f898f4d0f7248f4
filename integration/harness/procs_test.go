package harness

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// fakeShimEnv makes this test binary, run as containerd-shim-fake-v2, start children in a
// loop as a shim starts QEMU or runc: TestShimsLeavesOutStartingChildren's stand-in shim.
const fakeShimEnv = "PODVM_HARNESS_FAKE_SHIM"

func init() {
	if os.Getenv(fakeShimEnv) == "" {
		return
	}
	for {
		_ = exec.Command("/bin/true").Run()
	}
}

// TestShimsLeavesOutStartingChildren: while a shim starts children, Shims finds the shim
// and only it, never a child that still carries the shim's command line before its exec
// (the e2e fault cases would kill the child instead of the shim, or a process already gone).
func TestShimsLeavesOutStartingChildren(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "containerd-shim-fake-v2")
	if err := os.Symlink(self, bin); err != nil {
		t.Fatal(err)
	}
	env := &Env{RunDir: dir}
	cmd := exec.Command(bin, "-namespace", "k8s.io", "-address", filepath.Join(dir, "c.sock"), "-id", "sandbox")
	cmd.Env = append(os.Environ(), fakeShimEnv+"=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	scans, missed, wrong := 0, 0, map[int]bool{}
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); scans++ {
		found := env.Shims("fake")
		if !slices.Contains(found, Shim{PID: cmd.Process.Pid, ID: "sandbox"}) {
			missed++
		}
		for _, sh := range found {
			if sh.PID != cmd.Process.Pid {
				wrong[sh.PID] = true
			}
		}
	}
	if missed > 0 {
		t.Errorf("%d of %d scans missed the shim %d", missed, scans, cmd.Process.Pid)
	}
	if len(wrong) > 0 {
		t.Errorf("%d scans took %d other processes for the shim %d: its children before their exec", scans, len(wrong), cmd.Process.Pid)
	}
	if !t.Failed() {
		t.Logf("%d scans: the shim found in each, its children never taken for it", scans)
	}
}

// TestReadStat: a process whose name holds what a naive parse of /proc/<pid>/stat takes for
// its fields (") Z 1 (") is read as what it is: sleeping, a child of this test. Processes lists
// it with its arguments, and the leak checks' findProcesses while it lives, not once it is a
// zombie.
func TestReadStat(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "a) Z 1 (b")
	cmd := startSleeper(t, bin)

	var st Stat
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if st, _ = ReadStat(cmd.Process.Pid); st.State == 'S' {
			break
		}
	}
	if want := (Stat{Comm: "a) Z 1 (b", State: 'S', PPID: os.Getpid()}); st != want {
		t.Errorf("ReadStat = %+v, want %+v", st, want)
	}
	byPID := func(pid int) (Process, bool) {
		for _, p := range Processes() {
			if p.PID == pid {
				return p, true
			}
		}
		return Process{}, false
	}
	mine := func(p Process) bool { return p.PID == cmd.Process.Pid }
	p, ok := byPID(cmd.Process.Pid)
	if !ok || p.Stat != st || !slices.Equal(p.Args, []string{bin, "60"}) || p.Argv0() != "a) Z 1 (b" || p.Cmdline() != bin+" 60" {
		t.Errorf("Processes() has %+v (found %v), argv0 %q; want its stat %+v and args [%s 60]", p, ok, p.Argv0(), st, bin)
	}
	if got := findProcesses(mine); len(got) != 1 {
		t.Errorf("findProcesses of a sleeping process: %+v, want it", got)
	}

	// Killed and not yet reaped: a zombie, listed but not live.
	_ = cmd.Process.Kill()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if st, _ = ReadStat(cmd.Process.Pid); st.State == 'Z' {
			break
		}
	}
	if p, ok := byPID(cmd.Process.Pid); !ok || p.State != 'Z' {
		t.Errorf("Processes() after the kill: %+v (found %v), want it as a zombie", p, ok)
	}
	if got := findProcesses(mine); len(got) != 0 {
		t.Errorf("findProcesses of a zombie: %+v, want none", got)
	}
	_, _ = cmd.Process.Wait()
	if st, ok := ReadStat(cmd.Process.Pid); ok {
		t.Errorf("ReadStat of a reaped process = %+v, want gone", st)
	}
	if p, ok := byPID(cmd.Process.Pid); ok {
		t.Errorf("Processes() lists a reaped process: %+v", p)
	}
}

// startSleeper runs a copy of sleep, made at bin, for 60 s; the test's end kills and reaps it.
func startSleeper(t *testing.T, bin string) *exec.Cmd {
	t.Helper()
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd
}
