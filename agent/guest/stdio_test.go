package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"
	"time"

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

// TestStdoutReadTakesWhatWaits: what a process wrote while the host was busy comes back in
// one ReadStdio reply (each reply is a round trip to the host), and a short write in a reply
// sized to it, not to the most a reply may carry.
func TestStdoutReadTakesWhatWaits(t *testing.T) {
	s, err := newStdio(&api.Stdio{Stdout: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	defer s.closeChild()
	const n = 600 << 10
	done := make(chan error, 1)
	go func() {
		_, err := s.out.Write(bytes.Repeat([]byte("x"), n))
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("a process's %d KiB write to its stdout blocks until the host reads: the pipe holds less", n>>10)
	}
	data, eof, err := s.stdout.read(context.Background(), 0)
	if err != nil || eof {
		t.Fatalf("read: eof=%v, err=%v", eof, err)
	}
	if len(data) != n {
		t.Fatalf("one read returned %d of the %d bytes waiting", len(data), n)
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
}
