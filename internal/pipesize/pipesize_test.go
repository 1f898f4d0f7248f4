package pipesize

import (
	"bytes"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func pipeSize(t *testing.T, f *os.File) int {
	t.Helper()
	n, err := unix.FcntlInt(f.Fd(), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestGrowsWhileFull: a pipe found full grows, keeps its size while it is busy, and goes back
// to its first size once it is found holding less, so that an idle pipe accounts no more to
// its user than any other.
func TestGrowsWhileFull(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	base := pipeSize(t, r)
	s := New(r, 1<<20)
	if s == nil {
		t.Fatal("New of a pipe: nil")
	}
	s.Fill(100)
	if got := pipeSize(t, r); got != base || s.Grown() {
		t.Fatalf("after 100 bytes: pipe of %d, want %d", got, base)
	}
	s.Fill(base)
	if got := pipeSize(t, r); got != 1<<20 || !s.Grown() {
		t.Fatalf("found full: pipe of %d, want %d", got, 1<<20)
	}
	// Busy: the next fill is larger still, and it stays.
	if _, err := w.Write(bytes.Repeat([]byte("x"), 3*base)); err != nil {
		t.Fatal(err)
	}
	s.Fill(3 * base)
	if got := pipeSize(t, r); got != 1<<20 {
		t.Fatalf("busy: pipe of %d, want %d", got, 1<<20)
	}
	// Found with less than its first size but holding more than that: it cannot shrink yet.
	s.Fill(10)
	if got := pipeSize(t, r); got != 1<<20 || !s.Grown() {
		t.Fatalf("holding %d bytes: pipe of %d, want it kept at %d", 3*base, got, 1<<20)
	}
	if _, err := r.Read(make([]byte, 3*base)); err != nil {
		t.Fatal(err)
	}
	s.Fill(10)
	if got := pipeSize(t, r); got != base || s.Grown() {
		t.Fatalf("calm again: pipe of %d, want %d", got, base)
	}
}

func TestNotAPipe(t *testing.T) {
	f, err := os.Create(t.TempDir() + "/f")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if s := New(f, 1<<20); s != nil {
		t.Errorf("New of a regular file: %+v, want nil", s)
	}
	if s := New(bytes.NewReader(nil), 1<<20); s != nil {
		t.Errorf("New of a bytes.Reader: %+v, want nil", s)
	}
	var s *Sizer
	s.Fill(1 << 20) // nil does nothing
}
