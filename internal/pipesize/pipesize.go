// Package pipesize lets a pipe hold more while it is backed up, and gives the room back once
// it is not.
//
// A stdio stream between the host and a pod's guest moves one round trip per call, and a call
// carries at most what the pipe behind it holds: Linux's default 64 KiB. A pipe grown to the
// size of a call carries a busy stream in a sixteenth of the calls. But the kernel charges a
// pipe's capacity, not what it holds, to the user that made it, and once root's pipes add up
// to fs.pipe-user-pages-soft (64 MiB), root's processes without CAP_SYS_RESOURCE or
// CAP_SYS_ADMIN get pipes of 8 KiB: a node's runc containers, a guest's own containers. So a
// pipe is grown only while it is found full, and shrunk back when it is found holding less
// than it held at first.
package pipesize

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// Sizer sizes one pipe. The nil Sizer, for anything that is not a pipe, does nothing.
type Sizer struct {
	rc          syscall.RawConn
	base, limit int
	grown       bool
}

// New returns a Sizer for the pipe or fifo behind f, which may grow to limit bytes, or nil
// when f has no file descriptor or it is not a pipe. For a containerd fifo opened
// without blocking it waits until the fifo is open, or closed.
func New(f any, limit int) *Sizer {
	sc, ok := f.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	base := -1
	if err := rc.Control(func(fd uintptr) { base, _ = unix.FcntlInt(fd, unix.F_GETPIPE_SZ, 0) }); err != nil || base <= 0 || base >= limit {
		return nil
	}
	return &Sizer{rc: rc, base: base, limit: limit}
}

// Fill tells s that n bytes are waiting to be read from the pipe, or are about to be written
// into it, or were just read from it: the pipe grows to limit when n fills it at its first
// size, and shrinks back when n is less than that. A pipe the kernel will not resize stays as
// it is (a shrink that would drop what it holds is refused, and tried again next time).
func (s *Sizer) Fill(n int) {
	if s != nil {
		_ = s.rc.Control(func(fd uintptr) { s.FillFD(fd, n) })
	}
}

// FillFD is Fill for a caller that holds the pipe's descriptor fd already (in a RawConn's
// callback).
func (s *Sizer) FillFD(fd uintptr, n int) {
	if s == nil {
		return
	}
	switch {
	case !s.grown && n >= s.base:
		if _, err := unix.FcntlInt(fd, unix.F_SETPIPE_SZ, s.limit); err == nil {
			s.grown = true
		}
	case s.grown && n < s.base:
		if _, err := unix.FcntlInt(fd, unix.F_SETPIPE_SZ, s.base); err == nil {
			s.grown = false
		}
	}
}

// Grown says whether the pipe is at its grown size.
func (s *Sizer) Grown() bool { return s != nil && s.grown }
