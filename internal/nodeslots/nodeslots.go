// Package nodeslots bounds how many processes on a node do one thing at once: n slots, each a
// lock file in a directory held with flock(2), so that a holder that dies frees its slot with
// its last descriptor and nothing needs cleaning up.
//
// Waiters queue on one more lock file, blocked in the kernel: only the first of them looks for
// a free slot, so a long queue costs the node no CPU.
package nodeslots

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/internal/flock"
)

// queueFile is the lock file waiters queue on.
const queueFile = "queue"

// Slot is a slot held; Release frees it.
type Slot struct{ f *os.File }

// Release frees the slot (closing the lock file's descriptor drops the flock). It may be called
// more than once and on a nil Slot.
func (s *Slot) Release() {
	if s != nil && s.f != nil {
		_ = s.f.Close()
		s.f = nil
	}
}

// Acquire takes one of the n slots in dir, which it makes (0700) if missing, and returns how
// long it waited. While every slot is held it queues behind the other waiters and, first in
// the queue, tries the slots again every poll, until ctx ends. dir must be a directory only
// root can write (the lock files are opened by name).
func Acquire(ctx context.Context, dir string, n int, poll time.Duration) (*Slot, time.Duration, error) {
	if n < 1 {
		return nil, 0, fmt.Errorf("%d slots: want at least 1", n)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, 0, fmt.Errorf("slots dir: %w", err)
	}
	start := time.Now()
	slots, err := openLocks(dir, n)
	if err != nil {
		return nil, 0, err
	}
	defer closeAll(slots)
	if s, err := tryAll(slots); s != nil || err != nil {
		return s, time.Since(start), err
	}
	// Every slot is held: queue.
	q, err := openLock(filepath.Join(dir, queueFile))
	if err != nil {
		return nil, 0, err
	}
	if err := lockWaiting(ctx, q); err != nil {
		return nil, time.Since(start), fmt.Errorf("all %d slots held for %v: %w", n, time.Since(start).Round(time.Millisecond), err)
	}
	defer func() { _ = q.Close() }() // the next in the queue looks next
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		if s, err := tryAll(slots); s != nil || err != nil {
			return s, time.Since(start), err
		}
		select {
		case <-ctx.Done():
			return nil, time.Since(start), fmt.Errorf("all %d slots held for %v: %w", n, time.Since(start).Round(time.Millisecond), context.Cause(ctx))
		case <-tick.C:
		}
	}
}

// tryAll takes the first free slot, if any, and takes its file out of slots.
func tryAll(slots []*os.File) (*Slot, error) {
	for i, f := range slots {
		ok, err := flock.Try(int(f.Fd()))
		if err != nil {
			return nil, fmt.Errorf("slot %d: %w", i, err)
		}
		if ok {
			slots[i] = nil
			return &Slot{f: f}, nil
		}
	}
	return nil, nil
}

// lockWaiting takes an exclusive flock on f, blocked in the kernel until it is free or ctx ends.
// A lock that comes after ctx ended is dropped at once (f is closed).
func lockWaiting(ctx context.Context, f *os.File) error {
	got := make(chan error) // unbuffered: a send is taken only by a waiter still waiting
	go func() {
		var err error
		for err = unix.EINTR; errors.Is(err, unix.EINTR); {
			err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		}
		select {
		case got <- err:
		case <-ctx.Done():
			_ = f.Close()
		}
	}()
	select {
	case err := <-got:
		if err != nil {
			_ = f.Close()
			return fmt.Errorf("queue: flock: %w", err)
		}
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func openLocks(dir string, n int) ([]*os.File, error) {
	files := make([]*os.File, n)
	for i := range files {
		f, err := openLock(filepath.Join(dir, strconv.Itoa(i)))
		if err != nil {
			closeAll(files)
			return nil, fmt.Errorf("slot %d: %w", i, err)
		}
		files[i] = f
	}
	return files, nil
}

func openLock(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
}

func closeAll(files []*os.File) {
	for _, f := range files {
		if f != nil {
			_ = f.Close()
		}
	}
}
