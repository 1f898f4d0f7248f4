package logfile

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// newCapped opens a capped console.log of limit bytes in a new directory.
func newCapped(t *testing.T, limit int64) (string, *Capped) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := NewCapped(path, limit)
	if err != nil {
		t.Fatal(err)
	}
	return path, l
}

func TestCappedLogFloodStaysBounded(t *testing.T) {
	const limit = 4096
	path, l := newCapped(t, limit)
	// Far more than the cap, in odd-sized writes that straddle the rotations.
	var last string
	for i := 0; i < 20000; i++ {
		last = fmt.Sprintf("line %06d %s\n", i, strings.Repeat("x", i%37))
		if n, err := l.Write([]byte(last)); err != nil || n != len(last) {
			t.Fatalf("Write = %d, %v", n, err)
		}
		if i%1000 == 0 {
			checkLogSizes(t, path, limit)
		}
	}
	big := bytes.Repeat([]byte("B"), 10*limit) // one write larger than the cap
	for _, p := range [][]byte{big, []byte("the end\n")} {
		if n, err := l.Write(p); err != nil || n != len(p) {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkLogSizes(t, path, limit)
	cur, _ := os.ReadFile(path)
	prev, _ := os.ReadFile(path + RotatedSuffix)
	if !bytes.HasSuffix(cur, []byte("the end\n")) {
		t.Fatalf("newest bytes lost: console.log ends %q", tailOf(cur))
	}
	// Rotation only drops the oldest bytes: the two parts are the newest bytes written, at
	// least a cap's worth of them.
	both := append(prev, cur...)
	body := both[:len(both)-len("the end\n")]
	if len(both) < limit || len(bytes.Trim(body, "B")) != 0 {
		t.Fatalf("the two parts (%d bytes) are not the newest bytes: %q + %q", len(both), tailOf(prev), tailOf(cur))
	}
	if _, err := os.Stat(path + ".2"); !os.IsNotExist(err) {
		t.Fatalf("a third file appeared: %v", err)
	}
}

func TestCappedLogKeepsNewestLines(t *testing.T) {
	const limit = 1000
	path, l := newCapped(t, limit)
	for i := 0; i < 5000; i++ {
		fmt.Fprintf(l, "msg %d\r\n", i)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkLogSizes(t, path, limit)
	got := TailLines(path, 3)
	if want := "msg 4997\nmsg 4998\nmsg 4999"; got != want {
		t.Fatalf("TailLines = %q, want %q", got, want)
	}
	// The tail spans the rotation when the current part is short.
	all := LastLines(mustReadTail(t, path, 2*limit), 0)
	lines := strings.Split(all, "\n")
	if lines[len(lines)-1] != "msg 4999" || len(lines) < 150 {
		t.Fatalf("ReadTail over both parts gave %d lines ending %q", len(lines), lines[len(lines)-1])
	}
	for i := 1; i < len(lines); i++ {
		var a, b int
		_, errA := fmt.Sscanf(lines[i-1], "msg %d", &a)
		_, errB := fmt.Sscanf(lines[i], "msg %d", &b)
		if errA != nil || errB != nil || b != a+1 {
			t.Fatalf("gap or partial line across the rotation: %q then %q", lines[i-1], lines[i])
		}
	}
}

func TestCappedLogWriteErrorsDoNotBlock(t *testing.T) {
	path, l := newCapped(t, 10)
	// Make the rotation fail: console.log.1 is a non-empty directory.
	if err := os.MkdirAll(filepath.Join(path+RotatedSuffix, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		if n, err := l.Write([]byte("0123456789")); n != 10 || err != nil {
			t.Fatalf("Write after failure = %d, %v; a log must keep accepting bytes", n, err)
		}
	}
	if err := l.Close(); err == nil || !strings.Contains(err.Error(), "rotating") {
		t.Fatalf("Close = %v, want the rotation error", err)
	}
}

func TestDrainEndsAtEOF(t *testing.T) {
	path, l := newCapped(t, 100)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- Drain(r, l) }()
	for i := 0; i < 100; i++ {
		fmt.Fprintf(w, "%03d\n", i)
	}
	w.Close() // the writer (QEMU) exits
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	checkLogSizes(t, path, 100)
	if got := TailLines(path, 1); got != "099" {
		t.Fatalf("last line %q", got)
	}
}

func TestReadTail(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "log")
	var b strings.Builder
	for i := 0; i < 10000; i++ {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := ReadTail(path, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > 100 || !bytes.HasPrefix(got, []byte("line ")) || !bytes.HasSuffix(got, []byte("line 9999\n")) {
		t.Fatalf("ReadTail(100) = %q: want at most 100 bytes of whole lines ending with the last", got)
	}
	if got := LastLines(got, 2); got != "line 9998\nline 9999" {
		t.Fatalf("LastLines = %q", got)
	}
	if _, err := ReadTail(filepath.Join(dir, "missing"), 100); !os.IsNotExist(err) {
		t.Fatalf("missing file: %v", err)
	}
	if s := TailLines(filepath.Join(dir, "missing"), 5); !strings.HasPrefix(s, "(no log:") {
		t.Fatalf("TailLines of a missing file = %q", s)
	}
	// A FIFO planted where the log should be is not read (it would block).
	fifo := filepath.Join(dir, "fifo")
	if err := mkfifo(fifo); err == nil {
		if _, err := ReadTail(fifo, 10); err == nil {
			t.Fatal("ReadTail read a FIFO")
		}
	}
	if got := LastLines([]byte("a\r\nb\r\n"), 0); got != "a\nb" {
		t.Fatalf("LastLines CRLF = %q", got)
	}
}

func mustReadTail(t *testing.T, path string, limit int64) []byte {
	t.Helper()
	b, err := ReadTail(path, limit)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func checkLogSizes(t *testing.T, path string, limit int64) {
	t.Helper()
	for _, p := range []string{path, path + RotatedSuffix} {
		if st, err := os.Stat(p); err == nil && st.Size() > limit {
			t.Fatalf("%s is %d bytes, over the cap %d", filepath.Base(p), st.Size(), limit)
		}
	}
}

func tailOf(b []byte) []byte {
	if len(b) > 40 {
		return b[len(b)-40:]
	}
	return b
}

var _ io.Writer = (*Capped)(nil)

func mkfifo(path string) error { return unix.Mkfifo(path, 0o600) }
