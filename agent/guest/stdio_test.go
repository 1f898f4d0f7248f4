package guest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/containerd/console"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

func TestPullReaderKeepsBytesAcrossCancel(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pr := newPullReader(r)
	defer pr.close()

	// Nothing written yet: a read gives up with the context, and returns no data.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, _, err := pr.read(ctx, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read on empty pipe: got %v, want deadline exceeded", err)
	}
	// The cancelled read must not have eaten anything written afterwards.
	if _, err := w.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	data, eof, err := pr.read(context.Background(), 0)
	if err != nil || eof || string(data) != "hello" {
		t.Fatalf("read = %q, eof=%v, err=%v; want hello", data, eof, err)
	}
	w.Close()
	data, eof, err = pr.read(context.Background(), 0)
	if err != nil || !eof || len(data) != 0 {
		t.Fatalf("read after close = %q, eof=%v, err=%v; want eof", data, eof, err)
	}
	// EOF is sticky.
	if _, eof, _ := pr.read(context.Background(), 0); !eof {
		t.Fatal("second read after EOF is not EOF")
	}
}

func TestPullReaderCapsChunk(t *testing.T) {
	r, w, _ := os.Pipe()
	pr := newPullReader(r)
	defer pr.close()
	go func() {
		if _, err := w.Write(bytes.Repeat([]byte("x"), 10)); err != nil {
			t.Errorf("write: %v", err)
		}
		_ = w.Close()
	}()
	var got []byte
	for {
		data, eof, err := pr.read(context.Background(), 3)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) > 3 {
			t.Fatalf("read %d bytes, asked for at most 3", len(data))
		}
		got = append(got, data...)
		if eof {
			break
		}
	}
	if len(got) != 10 {
		t.Fatalf("got %d bytes, want 10", len(got))
	}
}

func TestStdioWhatWasAskedFor(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		req                   *api.Stdio
		stdin, stdout, stderr bool
	}{
		{"none", &api.Stdio{}, false, false, false},
		{"nil", nil, false, false, false},
		{"out only", &api.Stdio{Stdout: true}, false, true, false},
		{"all", &api.Stdio{Stdin: true, Stdout: true, Stderr: true}, true, true, true},
		{"terminal: stdout waits for the pty", &api.Stdio{Terminal: true, Stdin: true, Stdout: true}, false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := newStdio(tc.req)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { s.closeChild(); s.close() }()
			if (s.stdin != nil) != tc.stdin || (s.stdout != nil) != tc.stdout || (s.stderr != nil) != tc.stderr {
				t.Fatalf("stdin=%v stdout=%v stderr=%v", s.stdin != nil, s.stdout != nil, s.stderr != nil)
			}
			if _, err := s.reader(api.StdioStream_STDERR); tc.stderr != (err == nil) {
				t.Fatalf("reader(stderr) err = %v", err)
			}
			if _, err := s.reader(api.StdioStream_STDIO_STREAM_UNSPECIFIED); err == nil {
				t.Fatal("reader(unspecified) did not fail")
			}
			if err := s.resize(80, 24); err == nil {
				t.Fatal("resize without a terminal did not fail")
			}
		})
	}
}

func TestStdinWriteAndClose(t *testing.T) {
	s, err := newStdio(&api.Stdio{Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	in := s.in
	if _, err := s.write(context.Background(), []byte("abc")); err != nil {
		t.Fatal(err)
	}
	if err := s.closeStdin(); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 10)
	n, _ := in.Read(b)
	if string(b[:n]) != "abc" {
		t.Fatalf("child read %q", b[:n])
	}
	if _, err := s.write(context.Background(), []byte("x")); err == nil {
		t.Fatal("write after close did not fail")
	}
	s.closeChild()
}

func TestTerminalReaderWaitsForPty(t *testing.T) {
	s, err := newStdio(&api.Stdio{Terminal: true, Stdout: true})
	if err != nil {
		t.Fatal(err)
	}
	r, err := s.reader(api.StdioStream_STDOUT)
	if err != nil {
		t.Fatalf("terminal stdout must be readable before the start: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, _, err := r.read(ctx, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read before the pty: %v, want deadline exceeded", err)
	}
	// A process that never started ends the stream instead of hanging it.
	s.close()
	if _, eof, err := r.read(context.Background(), 0); err != nil || !eof {
		t.Fatalf("read after close: eof=%v err=%v", eof, err)
	}
}

// TestStdoutPipeGrowsWhileBackedUp: a process that writes faster than the host reads gets a
// stdout pipe that holds a whole ReadStdio reply (each reply is a round trip to the host), so
// what it wrote meanwhile comes back in one; once it is quiet the pipe is back to Linux's
// default size, which is what the kernel accounts against the guest's root (fs.pipe-user-
// pages-soft, past which the pod's own processes get 8 KiB pipes). A short write comes back
// in a reply sized to it, not to the most a reply may carry.
func TestStdoutPipeGrowsWhileBackedUp(t *testing.T) {
	s, err := newStdio(&api.Stdio{Stdout: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	defer s.closeChild()
	base := pipeCap(t, s.out)
	const n = 600 << 10
	done := make(chan error, 1)
	go func() {
		_, err := s.out.Write(bytes.Repeat([]byte("x"), n))
		done <- err
	}()
	waitFull(t, s.out, base)
	data, _, err := s.stdout.read(context.Background(), 0)
	if err != nil || len(data) != base {
		t.Fatalf("first read: %d bytes, %v; want the %d the pipe held", len(data), err, base)
	}
	if got := pipeCap(t, s.out); got != maxChunk {
		t.Fatalf("found full, the pipe holds %d, want %d", got, maxChunk)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the rest of a %d KiB write to stdout still blocks with the pipe grown", n>>10)
	}
	data, _, err = s.stdout.read(context.Background(), 0)
	if err != nil || len(data) != n-base {
		t.Fatalf("second read: %d bytes, %v; want the other %d in one reply", len(data), err, n-base)
	}
	if _, err := s.out.Write([]byte("line\n")); err != nil {
		t.Fatal(err)
	}
	data, _, err = s.stdout.read(context.Background(), 0)
	if err != nil || string(data) != "line\n" {
		t.Fatalf("read = %q, %v; want the line", data, err)
	}
	if cap(data) > minRead {
		t.Errorf("a %d-byte reply took a %d-byte buffer", len(data), cap(data))
	}
	if got := pipeCap(t, s.out); got != base {
		t.Errorf("quiet again, the pipe holds %d, want %d", got, base)
	}
}

// TestStdinPipeGrowsForLargeWrites: the host's WriteStdin brings up to a reply's size at once;
// the process's stdin pipe takes it whole while such writes come, and is back to its default
// size for small ones.
func TestStdinPipeGrowsForLargeWrites(t *testing.T) {
	s, err := newStdio(&api.Stdio{Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	defer s.closeChild()
	base := pipeCap(t, s.in)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.write(ctx, bytes.Repeat([]byte("x"), 600<<10)); err != nil {
		t.Fatalf("a 600 KiB write with nobody reading yet: %v", err)
	}
	if got := pipeCap(t, s.in); got != maxChunk {
		t.Fatalf("after a large write the pipe holds %d, want %d", got, maxChunk)
	}
	if _, err := io.ReadFull(s.in, make([]byte, 600<<10)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.write(ctx, []byte("line\n")); err != nil {
		t.Fatal(err)
	}
	if got := pipeCap(t, s.in); got != base {
		t.Errorf("after a small write the pipe holds %d, want %d", got, base)
	}
}

func pipeCap(t *testing.T, f *os.File) int {
	t.Helper()
	n, err := unix.FcntlInt(f.Fd(), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFull waits until the pipe behind f holds n bytes.
func waitFull(t *testing.T, f *os.File, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := unix.IoctlGetInt(int(f.Fd()), unix.TIOCINQ)
		if err != nil {
			t.Fatal(err)
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pipe holds %d bytes, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestTerminalReadTakesWhatComes: a terminal hands its reader at most its line discipline's
// 4 KiB a read, so a reply of one read would move a busy `kubectl exec -it` a page per round
// trip to the host. A reply takes what the process writes meanwhile, up to a reply's size;
// a keystroke's echo still comes back at once, in a small buffer.
func TestTerminalReadTakesWhatComes(t *testing.T) {
	s, err := newStdio(&api.Stdio{Terminal: true, Stdout: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	master, slavePath, err := console.NewPty()
	if err != nil {
		t.Fatal(err)
	}
	slave, err := os.OpenFile(slavePath, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer slave.Close()
	if err := console.ClearONLCR(slave.Fd()); err != nil {
		t.Fatal(err)
	}
	mf := os.NewFile(master.Fd(), "master")
	if err := s.setConsole(mf, 80, 24); err != nil {
		t.Fatal(err)
	}
	if _, err := slave.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	data, _, err := s.stdout.read(context.Background(), 0)
	if err != nil || string(data) != "a" {
		t.Fatalf("read = %q, %v; want the keystroke", data, err)
	}
	if cap(data) > minRead {
		t.Errorf("a 1-byte reply took a %d-byte buffer", cap(data))
	}
	const n = 256 << 10
	go func() { _, _ = slave.Write(bytes.Repeat([]byte("x"), n)) }()
	var sizes []int
	for got := 0; got < n; {
		data, _, err := s.stdout.read(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		got += len(data)
		sizes = append(sizes, len(data))
	}
	if len(sizes) > 8 {
		t.Errorf("%d KiB from a terminal took %d replies (%v), want at most 8", n>>10, len(sizes), sizes)
	}
}
