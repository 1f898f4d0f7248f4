package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/podvm/podvm/internal/logfile"
)

func writePidFile(path string, pid int) error {
	if err := os.WriteFile(path, []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		return fmt.Errorf("writing pid file: %w", err)
	}
	return nil
}

// readPidFile returns the pid in path, 0 when the file does not exist.
func readPidFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s: %q is not a pid", path, bytes.TrimSpace(b))
	}
	return pid, nil
}

// processArgs returns /proc/<pid>/cmdline split into arguments, nil if pid is gone.
func processArgs(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// processIs reports whether pid is alive and its command line has an argv[0] whose base
// name contains binary and an argument containing marker (a path inside the state dir), so
// a recycled pid is never mistaken for ours.
func processIs(pid int, binary, marker string) bool {
	args := processArgs(pid)
	if !runs(args, binary) {
		return false
	}
	for _, a := range args[1:] {
		if strings.Contains(a, marker) {
			return true
		}
	}
	return false
}

// runs reports whether a process with command line args runs binary: argv[0]'s base name
// contains it.
func runs(args []string, binary string) bool {
	return len(args) > 0 && strings.Contains(args[0][strings.LastIndexByte(args[0], '/')+1:], binary)
}

// processLogsTo reports whether pid is alive, its argv[0]'s base name contains binary, and
// its stderr is the file logPath (which the shim opened for it in the state dir), so a
// recycled pid is never mistaken for ours.
func processLogsTo(pid int, binary, logPath string) bool {
	if !runs(processArgs(pid), binary) {
		return false
	}
	target, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/2")
	return err == nil && target == logPath
}

// killAndWait SIGKILLs pid (not our child, so it cannot be waited for) and polls until it
// is gone or ctx ends.
func killAndWait(ctx context.Context, pid int) error {
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		return fmt.Errorf("killing pid %d: %w", pid, err)
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		// A zombie (waited for by nobody yet) has an empty cmdline; count it as gone.
		if processArgs(pid) == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for pid %d to exit: %w", pid, ctx.Err())
		case <-t.C:
		}
	}
}

// logTail returns the last lines of a log file (at most 2 KiB of it), for error messages.
func logTail(path string) string {
	b, err := logfile.ReadTail(path, 2048)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "(" + path + " is empty)"
	}
	return path + ": " + s
}
