package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// stateConfig makes a state dir and a node config that points at it.
func stateConfig(t *testing.T) (state, cfg string) {
	t.Helper()
	state = t.TempDir()
	return state, writeConfig(t, t.TempDir(), "config.toml", "[sandbox]\nstate_dir = \""+state+"\"\n")
}

// writeSandbox makes the state dir of sandbox id holding files.
func writeSandbox(t *testing.T, state, id string, files map[string]string) {
	t.Helper()
	dir := filepath.Join(state, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestDebugListAndConsole(t *testing.T) {
	state, cfg := stateConfig(t)
	// This test's own pid stands in for a live QEMU; a pid that cannot exist for a dead one.
	writeSandbox(t, state, "aaaa1111bbbb2222", map[string]string{
		"qemu.pid":    strconv.Itoa(os.Getpid()) + "\n",
		"console.log": "line1\r\nline2\r\nline3\r\n",
	})
	writeSandbox(t, state, "cccc3333", map[string]string{"qemu.pid": "999999999\n"})
	writeSandbox(t, state, "templates", map[string]string{".lock": ""}) // [template] dir's default

	r := runCLI(t, t.TempDir(), t.TempDir(), "debug", "list", "--config", cfg)
	if r.code != 0 || !strings.Contains(r.stdout, "aaaa1111bbbb") || !strings.Contains(r.stdout, "running") || !strings.Contains(r.stdout, "stopped") ||
		strings.Contains(r.stdout, "templates") {
		t.Errorf("debug list: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = runCLI(t, t.TempDir(), t.TempDir(), "debug", "console", "--config", cfg, "-n", "2", "aaaa")
	if r.code != 0 || r.stdout != "line2\nline3\n" {
		t.Errorf("debug console -n 2: exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"debug", "console", "--config", cfg, "zzz"}, 1, `no sandbox "zzz"`},
		{[]string{"debug", "console", "--config", cfg}, 2, "give one sandbox id"},
		{[]string{"debug", "frob"}, 2, "unknown command"},
	} {
		r := runCLI(t, t.TempDir(), t.TempDir(), tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("%v: exit %d stderr %q; want %d and %q", tc.args, r.code, r.stderr, tc.code, tc.msg)
		}
	}
}

func TestDebugConsoleRotated(t *testing.T) {
	state, cfg := stateConfig(t)
	writeSandbox(t, state, "dddd4444", map[string]string{
		"console.log.1": "old1\r\nold2\r",
		"console.log":   "\nnew1\r\nnew2\r\n",
	})
	r := runCLI(t, t.TempDir(), t.TempDir(), "debug", "console", "--config", cfg, "dddd")
	if want := "old1\nold2\nnew1\nnew2\n"; r.code != 0 || r.stdout != want {
		t.Errorf("debug console: exit %d stdout %q (want %q) stderr %q", r.code, r.stdout, want, r.stderr)
	}
	r = runCLI(t, t.TempDir(), t.TempDir(), "debug", "console", "--config", cfg, "-n", "3", "dddd")
	if want := "old2\nnew1\nnew2\n"; r.code != 0 || r.stdout != want {
		t.Errorf("debug console -n 3: exit %d stdout %q (want %q) stderr %q", r.code, r.stdout, want, r.stderr)
	}
}

func TestCRLFWriter(t *testing.T) {
	var b strings.Builder
	w := &crlfWriter{w: &b}
	for _, chunk := range []string{"a\r", "\nb\r", "x\r\r\n", "c"} {
		if n, err := w.Write([]byte(chunk)); err != nil || n != len(chunk) {
			t.Fatalf("Write(%q) = %d, %v", chunk, n, err)
		}
	}
	if got, want := b.String(), "a\nb\rx\r\nc"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
