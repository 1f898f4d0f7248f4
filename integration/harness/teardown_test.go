package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A failed test's output ends with containerd's last errors: only error-level lines, the
// newest last, long ones cut.
func TestLastErrors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "containerd.log")
	long := strings.Repeat("x", 1000)
	log := strings.Join([]string{
		`time="1" level=error msg="first"`,
		`time="2" level=info msg="RunPodSandbox"`,
		`time="3" level=error msg="RunPodSandbox failed" error="` + long + `"`,
		`time="4" level=warning msg="not an error"`,
		`time="5" level=error msg="last"`,
	}, "\n") + "\n"
	if err := os.WriteFile(path, []byte(log), 0o600); err != nil {
		t.Fatal(err)
	}
	got := strings.Split(lastErrors(path, 2), "\n")
	if len(got) != 2 || !strings.HasPrefix(got[0], `time="3" level=error`) || got[1] != `time="5" level=error msg="last"` {
		t.Fatalf("lastErrors = %q", got)
	}
	if !strings.HasSuffix(got[0], "…") || len(got[0]) > 410 {
		t.Errorf("a long line is not cut: %d bytes", len(got[0]))
	}
	if got := lastErrors(filepath.Join(t.TempDir(), "none.log"), 2); !strings.HasPrefix(got, "(no log: ") {
		t.Errorf("lastErrors of a missing log = %q", got)
	}
	if err := os.WriteFile(path, []byte(`level=info msg="ok"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := lastErrors(path, 2); got != "(none)" {
		t.Errorf("lastErrors of a log without errors = %q", got)
	}
}

// The leak check names a process still running from the env's directories, and one of the
// names it is told to look for, and stops once the process is gone.
func TestLeaksNamesProcesses(t *testing.T) {
	e := &Env{Dir: t.TempDir(), opts: Options{LeakProcessNames: []string{"podvm-leak-"}}}
	inDir := filepath.Join(e.Dir, "sleeper")
	named := filepath.Join(t.TempDir(), "podvm-leak-test")
	cmds := []*exec.Cmd{startSleeper(t, inDir), startSleeper(t, named)}
	found := func() (dir, name bool) {
		for _, l := range e.leaks() {
			dir = dir || strings.Contains(l, fmt.Sprintf("process %d still running: %s 60", cmds[0].Process.Pid, inDir))
			name = name || strings.Contains(l, fmt.Sprintf("process %d (podvm-leak-test) still running: %s 60", cmds[1].Process.Pid, named))
		}
		return dir, name
	}
	if dir, name := found(); !dir || !name {
		t.Errorf("leaks() = %q: want both sleepers named (from the env's dir %v, by name %v)", e.leaks(), dir, name)
	}
	for _, c := range cmds {
		_ = c.Process.Kill()
		_ = c.Wait()
	}
	if dir, name := found(); dir || name {
		t.Errorf("leaks() = %q after both sleepers were reaped", e.leaks())
	}
}
