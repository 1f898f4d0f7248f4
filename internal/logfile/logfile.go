// Package logfile keeps logs that an untrusted party fills (a guest's serial console, a VMM's
// output) bounded on disk, and reads only their end.
package logfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

const (
	// RotatedSuffix is appended to a capped log's name for its previous part.
	RotatedSuffix = ".1"
	// DefaultTailBytes is how much of the end of a log the tail helpers read at most.
	DefaultTailBytes = 64 << 10
)

// Capped is an io.WriteCloser that appends to a file and rotates it to path+".1" once it
// reaches limit bytes. It never returns a write error (a log must not stall the VM that feeds
// it): the first failure is kept and reported by Close, later bytes are dropped.
type Capped struct {
	path  string
	limit int64

	mu   sync.Mutex
	f    *os.File
	size int64
	err  error
}

// NewCapped opens (truncating) the log at path, capped at limit bytes per part.
func NewCapped(path string, limit int64) (*Capped, error) {
	if limit <= 0 {
		return nil, fmt.Errorf("capped log %s: limit %d must be positive", path, limit)
	}
	// Best effort: a stale previous part is only old output, and the first rotation replaces
	// it; if it cannot be replaced then, that failure is kept and reported by Close.
	_ = os.Remove(path + RotatedSuffix)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating log %s: %w", path, err)
	}
	return &Capped{path: path, limit: limit, f: f}, nil
}

func (l *Capped) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(p)
	for len(p) > 0 && l.err == nil {
		if l.size >= l.limit {
			l.rotate()
			continue
		}
		chunk := p
		if room := l.limit - l.size; int64(len(chunk)) > room {
			chunk = chunk[:room]
		}
		w, err := l.f.Write(chunk)
		l.size += int64(w)
		p = p[w:]
		if err != nil {
			l.err = fmt.Errorf("writing log %s: %w", l.path, err)
		}
	}
	return n, nil
}

// rotate moves the full log to path.1 and starts an empty one. Called with mu held.
func (l *Capped) rotate() {
	if err := l.f.Close(); err != nil {
		l.err = fmt.Errorf("closing log %s: %w", l.path, err)
		return
	}
	l.f = nil
	if err := os.Rename(l.path, l.path+RotatedSuffix); err != nil {
		l.err = fmt.Errorf("rotating log %s: %w", l.path, err)
		return
	}
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		l.err = fmt.Errorf("reopening log %s: %w", l.path, err)
		return
	}
	l.f, l.size = f, 0
}

// Close closes the log and returns the first error writing it hit, if any.
func (l *Capped) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil {
		if err := l.f.Close(); err != nil && l.err == nil {
			l.err = fmt.Errorf("closing log %s: %w", l.path, err)
		}
		l.f = nil
	}
	return l.err
}

// Drain copies r into w until r ends, then closes both. It keeps reading after w fails, so
// the writer on the other side of r (QEMU) never blocks on a full pipe.
func Drain(r io.ReadCloser, w io.WriteCloser) error {
	_, err := io.Copy(w, r)
	if errors.Is(err, os.ErrClosed) {
		err = nil
	}
	_ = r.Close() // the read end, at EOF: nothing is lost if closing it fails
	return errors.Join(err, w.Close())
}

// ReadTail returns at most limit bytes from the end of the log at path. When path holds less
// than limit and a rotated path.1 exists, the rest comes from the end of path.1. It seeks, so
// it never reads more than limit bytes, however large the files are.
func ReadTail(path string, limit int64) ([]byte, error) {
	cur, err := readFileTail(path, limit)
	if err != nil {
		return nil, err
	}
	if int64(len(cur)) >= limit {
		return cur, nil
	}
	prev, err := readFileTail(path+RotatedSuffix, limit-int64(len(cur)))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return cur, nil
		}
		return nil, err
	}
	return append(prev, cur...), nil
}

// readFileTail returns the last limit bytes of one file.
func readFileTail(path string, limit int64) ([]byte, error) {
	// O_NONBLOCK: a FIFO planted at path must not hang the reader (it is refused below).
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read-only
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	off := st.Size() - limit
	if off < 0 {
		off = 0
	}
	b, err := io.ReadAll(io.NewSectionReader(f, off, st.Size()-off))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	// The cut may fall inside a line: drop the partial first line unless it is all we have.
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 && i+1 < len(b) {
			b = b[i+1:]
		}
	}
	return b, nil
}

// LastLines returns the last n lines of b (n <= 0: all of it), with "\r\n" (serial console
// line ends) turned into "\n" and no trailing newline.
func LastLines(b []byte, n int) string {
	s := strings.TrimRight(strings.ReplaceAll(string(b), "\r\n", "\n"), "\n")
	if n <= 0 || s == "" {
		return s
	}
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TailLines returns the last n lines of the log at path (and its rotated part), reading at
// most DefaultTailBytes, for error messages: an unreadable log becomes a note in the text.
func TailLines(path string, n int) string {
	b, err := ReadTail(path, DefaultTailBytes)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return LastLines(b, n)
}
