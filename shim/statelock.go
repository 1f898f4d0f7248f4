package shim

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/internal/flock"
)

// stateLock is an exclusive lock on a sandbox's state dir (flock on the dir itself, which
// only the shim writes: the guest-writable share is a dir below it). The shim that runs the
// sandbox holds it from making the dir until it has removed it, so `shim delete`, which
// containerd runs beside a live shim when it gives up on it, waits for that shim's clean-up
// instead of doing the same work at the same time, and cleans up alone once the shim died (the
// kernel drops the lock with the process).
type stateLock struct {
	fd int
}

// stateLockPoll is how often a waiter tries the lock again.
const stateLockPoll = 20 * time.Millisecond

// errStateDirGone says the state dir went before its lock could be taken.
var errStateDirGone = errors.New("state dir removed")

// lockStateDir takes dir's lock, waiting until ctx ends. It fails with errStateDirGone
// (wrapped) when dir does not exist or was removed by the holder the wait was for.
func lockStateDir(ctx context.Context, dir string) (*stateLock, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("lock %s: %w", dir, errStateDirGone)
	}
	if err != nil {
		return nil, fmt.Errorf("lock state dir %s: %w", dir, err)
	}
	l := &stateLock{fd: fd}
	if err := flock.Wait(ctx, fd, stateLockPoll); err != nil {
		l.unlock()
		return nil, fmt.Errorf("lock state dir %s: %w", dir, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		l.unlock()
		return nil, fmt.Errorf("lock state dir %s: %w", dir, err)
	}
	if st.Nlink == 0 {
		// The holder removed the dir before it let go: nothing is left to do in it.
		l.unlock()
		return nil, fmt.Errorf("lock %s: %w", dir, errStateDirGone)
	}
	return l, nil
}

// unlock lets go of the lock; nil-safe and idempotent.
func (l *stateLock) unlock() {
	if l == nil || l.fd < 0 {
		return
	}
	_ = unix.Close(l.fd) // closing the only fd drops the flock
	l.fd = -1
}
