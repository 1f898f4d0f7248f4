package shim

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// inheritableFD opens a pipe end at a high fd number without FD_CLOEXEC, as fd 3 arrives
// from containerd.
func inheritableFD(t *testing.T) int {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	for fd := 200; fd < 400; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
			continue // in use
		}
		if err := unix.Dup3(p[0], fd, 0); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	t.Fatal("no free fd between 200 and 400")
	return -1
}

// childFDs lists the fds a child process has open.
func childFDs(t *testing.T) map[int]bool {
	t.Helper()
	out, err := exec.Command("ls", "/proc/self/fd").Output()
	if err != nil {
		t.Fatalf("ls /proc/self/fd: %v", err)
	}
	fds := map[int]bool{}
	for _, f := range strings.Fields(string(out)) {
		if n, err := strconv.Atoi(f); err == nil {
			fds[n] = true
		}
	}
	return fds
}

func TestInheritedFDsAreClosedAtExec(t *testing.T) {
	for name, mark := range map[string]func(int) error{
		"close_range":   closeOnExecFrom,
		"/proc/self/fd": closeOnExecByProc,
	} {
		t.Run(name, func(t *testing.T) {
			fd := inheritableFD(t)
			if !childFDs(t)[fd] {
				t.Fatalf("fd %d without FD_CLOEXEC did not reach the child: the test proves nothing", fd)
			}
			if err := mark(3); err != nil {
				t.Fatal(err)
			}
			if childFDs(t)[fd] {
				t.Errorf("fd %d is still open in a child", fd)
			}
			// The shim itself keeps it.
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
				t.Errorf("fd %d closed in the shim: %v", fd, err)
			}
		})
	}
}
