package shim

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// closeOnExecFrom marks every open file descriptor >= minFD close-on-exec, so the shim's
// children (QEMU, virtiofsd, mkfs, logging binaries) get only the fds they are handed
// explicitly (os/exec's ExtraFiles are dup2'ed into the child, which clears the flag).
//
// The fd that needs it is the task API's listening socket: containerd's pkg/shim passes it to
// the serving shim as fd 3 without FD_CLOEXEC, and net.FileListener keeps it open after
// duplicating it. A child holding it could accept task API connections or keep the socket
// alive after the shim died.
//
// close_range(CLOSE_RANGE_CLOEXEC) needs Linux 5.11; older kernels (ENOSYS, or EINVAL for
// the flag) and seccomp filters (EPERM) get a walk over /proc/self/fd instead.
func closeOnExecFrom(minFD int) error {
	err := unix.CloseRange(uint(minFD), ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EPERM) {
		return fmt.Errorf("close_range(%d, ~0, CLOSE_RANGE_CLOEXEC): %w", minFD, err)
	}
	return closeOnExecByProc(minFD)
}

// closeOnExecByProc is closeOnExecFrom without close_range: it sets FD_CLOEXEC on each fd
// listed in /proc/self/fd.
func closeOnExecByProc(minFD int) error {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("list open fds: %w", err)
	}
	defer func() { _ = d.Close() }() // read-only
	names, err := d.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("list open fds: %w", err)
	}
	for _, name := range names {
		fd, err := strconv.Atoi(name)
		if err != nil || fd < minFD {
			continue
		}
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if errors.Is(err, unix.EBADF) {
			continue // the directory's own fd, closed by now, or raced with a close
		}
		if err != nil {
			return fmt.Errorf("fd %d: F_GETFD: %w", fd, err)
		}
		if flags&unix.FD_CLOEXEC != 0 {
			continue
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags|unix.FD_CLOEXEC); err != nil && !errors.Is(err, unix.EBADF) {
			return fmt.Errorf("fd %d: F_SETFD FD_CLOEXEC: %w", fd, err)
		}
	}
	return nil
}
