package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/internal/pipesize"
)

// maxChunk caps one ReadStdio reply. Each reply is a round trip to the host, so output moves
// as fast as replies are large: with pipes of Linux's default 64 KiB, a busy writer's output
// came at ~6.5 MB/s under TCG (docs/benchmarks.md).
const maxChunk = 1 << 20

// pullReader hands out what a process wrote, one request at a time. A read blocks until data
// or EOF and gives up, without losing bytes, when its context ends.
type pullReader struct {
	// ready is closed once f is set: a terminal's master only exists after the start.
	ready chan struct{}
	f     *os.File
	// size grows the pipe f while the process's output backs up in it (nil for a pty).
	size *pipesize.Sizer
	// terminal: f is a pty master, read on after its first read (readMore).
	terminal bool

	mu sync.Mutex
	// eof is set once the stream is drained.
	eof bool
}

func newPullReader(f *os.File) *pullReader {
	r := &pullReader{ready: make(chan struct{}), f: f}
	if f != nil {
		r.size = pipesize.New(f, maxChunk)
		close(r.ready)
	}
	return r
}

// set provides the pty master of a terminal's reader, made without it; nil means the stream
// never came.
func (r *pullReader) set(f *os.File) {
	r.f, r.terminal = f, f != nil
	close(r.ready)
}

func (r *pullReader) read(ctx context.Context, limit uint32) ([]byte, bool, error) {
	select {
	case <-r.ready:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.eof || r.f == nil {
		return nil, true, nil
	}
	data, eof, err := readOnce(ctx, r.f, limit, readOpts{size: r.size, more: r.terminal})
	r.eof = eof
	return data, eof, err
}

// deadlineReader is a reader whose blocked Read a read deadline interrupts.
type deadlineReader interface {
	io.Reader
	SetReadDeadline(time.Time) error
}

// readOnce reads at most limit bytes (maxChunk when 0 or more), blocking until there is data, the
// stream ended or ctx ends. A read that ctx interrupts loses nothing. eof reports the end of the
// stream: io.EOF, or EIO from a pty master whose terminal's last user closed it.
func readOnce(ctx context.Context, r deadlineReader, limit uint32, o readOpts) (data []byte, eof bool, err error) {
	if limit == 0 || limit > maxChunk {
		limit = maxChunk
	}
	stop := context.AfterFunc(ctx, func() { _ = r.SetReadDeadline(time.Now()) })
	buf, n, err := readWaiting(r, int(limit), o)
	if !stop() {
		_ = r.SetReadDeadline(time.Time{})
		if n > 0 {
			return buf[:n], false, nil
		}
		return nil, false, ctx.Err()
	}
	switch {
	case err == nil:
		return buf[:n], false, nil
	case errors.Is(err, io.EOF), errors.Is(err, unix.EIO):
		return buf[:n], true, nil
	default:
		return buf[:n], false, err
	}
}

// minRead is the smallest buffer readWaiting reads into: what a read finds beyond what
// FIONREAD said (a writer went on meanwhile) stays for the next.
const minRead = 4 << 10

// readOpts say how readWaiting treats what it reads from.
type readOpts struct {
	// size (nil for anything but a pipe) is told what each read finds waiting.
	size *pipesize.Sizer
	// more: read on after the first read (readMore), for a terminal.
	more bool
}

// A terminal's line discipline hands its reader at most 4 KiB a read, and a busy writer's
// next bytes reach it moments later, so a reply of one read would move a busy
// `kubectl exec -it` a page per round trip to the host. After a first read of at least
// moreAfter bytes, readMore waits up to moreWait for each next part.
const (
	moreAfter = 2 << 10
	moreWait  = 2 // milliseconds
)

// readWaiting reads once from r into a buffer the size of what is waiting in it (FIONREAD,
// which is TIOCINQ on Linux, for pipes, ptys and sockets alike),
// at least minRead and at most limit, so that a line of output does not cost a buffer of
// limit; a reader that is not a file descriptor gets one of limit. A pipe found full grows
// (o.size), so that the next reply can carry up to limit; a terminal's reply takes what more
// comes (o.more).
func readWaiting(r deadlineReader, limit int, o readOpts) ([]byte, int, error) {
	sc, ok := r.(syscall.Conn)
	if !ok {
		buf := make([]byte, limit)
		n, err := r.Read(buf)
		return buf, n, err
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, 0, err
	}
	var (
		buf  []byte
		n    int
		rerr error
	)
	err = rc.Read(func(fd uintptr) bool {
		want := minRead
		if waiting, err := unix.IoctlGetInt(int(fd), unix.TIOCINQ); err == nil {
			o.size.FillFD(fd, waiting)
			want = max(want, waiting)
		}
		buf = make([]byte, min(want, limit))
		n, rerr = readFD(int(fd), buf)
		if rerr == nil && o.more && n >= moreAfter {
			buf, n = readMore(int(fd), buf, n, limit)
		}
		return !errors.Is(rerr, unix.EAGAIN)
	})
	if err != nil {
		return nil, 0, err
	}
	if n < 0 {
		n = 0
	}
	if rerr == nil && n == 0 {
		rerr = io.EOF
	}
	return buf, n, rerr
}

// readFD is read(2), again after EINTR.
func readFD(fd int, buf []byte) (int, error) {
	for {
		n, err := unix.Read(fd, buf)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// readMore goes on reading from fd into buf, which holds n bytes, while more comes within
// moreWait of the last part, up to limit, growing buf as it fills. What ends it early (the
// stream's end, an error) the next read finds again.
func readMore(fd int, buf []byte, n, limit int) ([]byte, int) {
	for n < limit {
		if n == len(buf) {
			grown := make([]byte, min(2*len(buf), limit))
			copy(grown, buf[:n])
			buf = grown
		}
		m, err := readFD(fd, buf[n:])
		if m > 0 {
			n += m
			continue
		}
		if !errors.Is(err, unix.EAGAIN) {
			break
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if ready, err := unix.Poll(fds, moreWait); err != nil || ready == 0 {
			break
		}
	}
	return buf, n
}

func (r *pullReader) close() {
	if r == nil {
		return
	}
	select {
	case <-r.ready:
		if r.f != nil {
			_ = r.f.Close()
		}
	default:
		r.set(nil)
	}
}

// stdio is the agent's side of one process's standard streams.
type stdio struct {
	// terminal is closed when a terminal's master has arrived (or never will).
	terminal chan struct{}
	stdinMu  sync.Mutex
	stdin    io.WriteCloser // nil when the process has no stdin or it was closed
	// stdinSize grows the stdin pipe while the host sends more than it holds (nil for a pty).
	stdinSize *pipesize.Sizer
	stdout    *pullReader
	stderr    *pullReader
	console   console.Console // terminal mode only

	// the process's ends, closed in the agent once the process has them.
	child []*os.File
	// Files for the process: nil means /dev/null.
	in, out, errf *os.File
}

// newStdio makes pipes for what the host asked for; terminal mode gets its pty later from
// libcontainer (setConsole).
func newStdio(req *api.Stdio) (*stdio, error) {
	s := &stdio{}
	if req == nil {
		req = &api.Stdio{}
	}
	fail := func(err error) (*stdio, error) {
		s.closeChild()
		s.close()
		return nil, err
	}
	if req.Terminal {
		s.terminal = make(chan struct{})
		s.stdout = newPullReader(nil)
		return s, nil
	}
	if req.Stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return fail(err)
		}
		s.in, s.stdin, s.stdinSize = r, w, pipesize.New(w, maxChunk)
		s.child = append(s.child, r)
	}
	if req.Stdout {
		r, w, err := os.Pipe()
		if err != nil {
			return fail(err)
		}
		s.out, s.stdout = w, newPullReader(r)
		s.child = append(s.child, w)
	}
	if req.Stderr {
		r, w, err := os.Pipe()
		if err != nil {
			return fail(err)
		}
		s.errf, s.stderr = w, newPullReader(r)
		s.child = append(s.child, w)
	}
	return s, nil
}

// setConsole takes the pty master libcontainer sent back.
func (s *stdio) setConsole(master *os.File, width, height uint32) error {
	// Reopen non-blocking so reads can be interrupted by deadlines.
	fd, err := unix.Dup(int(master.Fd()))
	_ = master.Close()
	if err != nil {
		return err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return err
	}
	f := os.NewFile(uintptr(fd), "pty-master")
	c, err := console.ConsoleFromFile(f)
	if err != nil {
		_ = f.Close()
		return err
	}
	if width > 0 && height > 0 {
		_ = c.Resize(console.WinSize{Width: uint16(width), Height: uint16(height)})
	}
	s.stdinMu.Lock()
	s.console = c
	s.stdin = nopCloser{f}
	s.stdinMu.Unlock()
	s.stdout.set(f)
	close(s.terminal)
	return nil
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

func (s *stdio) closeChild() {
	for _, f := range s.child {
		_ = f.Close()
	}
	s.child = nil
}

func (s *stdio) reader(stream api.StdioStream) (*pullReader, error) {
	var r *pullReader
	switch stream {
	case api.StdioStream_STDOUT:
		r = s.stdout
	case api.StdioStream_STDERR:
		r = s.stderr
	default:
		return nil, fmt.Errorf("stdio stream %v: %w", stream, errdefs.ErrInvalidArgument)
	}
	if r == nil {
		return nil, fmt.Errorf("process has no %v: %w", stream, errdefs.ErrNotFound)
	}
	return r, nil
}

func (s *stdio) write(ctx context.Context, data []byte) (int, error) {
	if s.terminal != nil {
		select {
		case <-s.terminal:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	s.stdinMu.Lock()
	defer s.stdinMu.Unlock()
	if s.stdin == nil {
		return 0, fmt.Errorf("stdin is closed or was not requested: %w", errdefs.ErrFailedPrecondition)
	}
	if f, ok := s.stdin.(*os.File); ok {
		stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(time.Now()) })
		defer func() {
			if !stop() {
				_ = f.SetWriteDeadline(time.Time{})
			}
		}()
	}
	s.stdinSize.Fill(len(data))
	n, err := s.stdin.Write(data)
	if err != nil && ctx.Err() != nil {
		return n, ctx.Err()
	}
	return n, err
}

func (s *stdio) closeStdin() error {
	s.stdinMu.Lock()
	defer s.stdinMu.Unlock()
	if s.stdin == nil {
		return nil
	}
	err := s.stdin.Close()
	s.stdin = nil
	return err
}

func (s *stdio) resize(width, height uint32) error {
	s.stdinMu.Lock()
	defer s.stdinMu.Unlock()
	if s.console == nil {
		return fmt.Errorf("process has no terminal: %w", errdefs.ErrFailedPrecondition)
	}
	return s.console.Resize(console.WinSize{Width: uint16(width), Height: uint16(height)})
}

func (s *stdio) close() {
	if s.terminal != nil {
		select {
		case <-s.terminal:
		default:
			close(s.terminal)
		}
	}
	_ = s.closeStdin()
	s.stdout.close()
	s.stderr.close()
}
