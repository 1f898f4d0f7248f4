// Package flock takes exclusive flock(2) locks with a context: the one way podvm's processes on
// a node wait for each other on a lock file or directory. The kernel drops a lock with its
// holder's last descriptor, so a holder that dies frees it and nothing needs cleaning up.
package flock

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Try takes an exclusive lock on fd if no one holds one: false (and no error) while another
// open file description holds it.
func Try(fd int) (bool, error) {
	err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EWOULDBLOCK), errors.Is(err, unix.EINTR):
		return false, nil
	}
	return false, fmt.Errorf("flock: %w", err)
}

// Wait takes an exclusive lock on fd, trying again every poll while another holds it. When ctx
// ends first its error says the lock was held and wraps context.Cause(ctx).
func Wait(ctx context.Context, fd int, poll time.Duration) error {
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		if ok, err := Try(fd); ok || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("another process holds the lock: %w", context.Cause(ctx))
		case <-t.C:
		}
	}
}
