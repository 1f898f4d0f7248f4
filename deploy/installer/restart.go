package installer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// DefaultContainerdConfig is the config containerd reads without --config.
const DefaultContainerdConfig = "/etc/containerd/config.toml"

// containerdConfigOf says whether argv is a containerd daemon and which config it reads
// (its --config/-c flag, else DefaultContainerdConfig).
func containerdConfigOf(argv []string) (string, bool) {
	if len(argv) == 0 || filepath.Base(argv[0]) != "containerd" {
		return "", false
	}
	for i, a := range argv[1:] {
		for _, f := range []string{"--config", "-config", "-c", "--c"} {
			if a == f && i+2 < len(argv) {
				return filepath.Clean(argv[i+2]), true
			}
			if v, ok := strings.CutPrefix(a, f+"="); ok {
				return filepath.Clean(v), true
			}
		}
	}
	return DefaultContainerdConfig, true
}

// containerdPids lists the pids, under the proc filesystem at proc, of containerd daemons
// reading config (a node path).
func containerdPids(proc, config string) []int {
	entries, _ := os.ReadDir(proc)
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(proc, e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		argv := strings.Split(string(bytes.TrimRight(b, "\x00")), "\x00")
		if c, ok := containerdConfigOf(argv); ok && c == filepath.Clean(config) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// SignalContainerd makes containerd load its config again through its supervisor: it sends
// SIGTERM to the containerd daemon reading config (a node path; it must see the node's
// processes under proc, as a hostPID pod does) and waits up to timeout until that process
// is gone and a new one reads the same config. That is how a supervisor that restarts
// containerd when it exits (systemd's Restart=always, as containerd's own unit has) brings
// it back; running containers live on in their shims meanwhile.
func SignalContainerd(ctx context.Context, proc, config string, timeout time.Duration) error {
	old := containerdPids(proc, config)
	if len(old) == 0 {
		return fmt.Errorf("no containerd process reads %s (searched %s; the installer pod needs hostPID: true); restart containerd yourself, or use --restart-containerd=systemctl", config, proc)
	}
	for _, pid := range old {
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("SIGTERM to containerd (pid %d): %w", pid, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if now := containerdPids(proc, config); len(now) > 0 && !overlaps(now, old) {
			return nil
		}
		select {
		case <-ctx.Done():
			const msg = "containerd (pid %v, config %s) was sent SIGTERM but no new containerd reads that config after %v: nothing restarts it when it exits (with systemd, Restart=always does); start it by hand, or use --restart-containerd=systemctl"
			return fmt.Errorf(msg, old, config, timeout)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func overlaps(a, b []int) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}
