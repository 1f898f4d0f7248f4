package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/containerd/log"
)

// Cleanup stops what a VM with this state dir may have left behind when its owner died:
// the QEMU and virtiofsd recorded in the pidfiles (only after checking that the pid really
// is that process for this state dir), the lock file of a C virtiofsd started by an earlier
// podvm and the SharedDir bind mount. It does not remove the state dir. Calling it on a
// clean or missing dir is a no-op.
func Cleanup(ctx context.Context, stateDir string) error {
	if !filepath.IsAbs(stateDir) {
		return fmt.Errorf("cleaning up VM state: %q is not an absolute path", stateDir)
	}
	var errs []error
	procs := []struct {
		pidFile, binary string
		mine            func(pid int) bool
	}{
		{QEMUPidFile, "qemu", func(pid int) bool {
			return processIs(pid, "qemu", filepath.Join(stateDir, QEMUPidFile))
		}},
		// virtiofsd's command line names no path of the state dir (its socket is a
		// descriptor); its stderr is the VM's virtiofsd log.
		{VirtiofsdPid, "virtiofsd", func(pid int) bool {
			return processLogsTo(pid, "virtiofsd", filepath.Join(stateDir, VirtiofsdLog))
		}},
	}
	for _, p := range procs {
		pidFile := filepath.Join(stateDir, p.pidFile)
		pid, err := readPidFile(pidFile)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if pid == 0 {
			continue
		}
		if p.mine(pid) {
			log.G(ctx).WithField("pid", pid).WithField("binary", p.binary).Info("killing leftover process")
			if pgid, err := syscall.Getpgid(pid); err == nil && pgid == pid {
				// virtiofsd's sandboxed child too; killAndWait below checks the process itself.
				_ = syscall.Kill(-pid, syscall.SIGKILL)
			}
			if err := killAndWait(ctx, pid); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		if err := os.Remove(pidFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, s := range []string{QMPSocket, AgentSocket, VirtiofsdSocket} {
		// Best effort: nothing listens on them any more, and Start removes them again.
		_ = os.Remove(filepath.Join(stateDir, s))
	}
	if err := removeVirtiofsdLock(filepath.Join(stateDir, VirtiofsdSocket)); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleaning up VM state in %s: %w", stateDir, err)
	}
	return nil
}
