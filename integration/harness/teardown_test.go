package harness

import (
	"os"
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
