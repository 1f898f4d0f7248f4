package guest

import (
	"fmt"
	"path/filepath"

	"github.com/containerd/cgroups/v3/cgroup2"
	cgroupstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// guestCgroup is a container's cgroup v2 group in the guest: what every runtimeContainer does
// through its cgroup rather than through its runtime.
type guestCgroup struct {
	id string
	// path is relative to /sys/fs/cgroup.
	path  string
	stats *cgroupStats
}

func newGuestCgroup(id, path string) guestCgroup {
	return guestCgroup{id: id, path: path, stats: newCgroupStats(filepath.Join(cgroupRoot, path))}
}

// cgroupRoot is where the guest's cgroup v2 hierarchy is mounted.
const cgroupRoot = "/sys/fs/cgroup"

func (c *guestCgroup) SignalAll(sig unix.Signal) error {
	m, err := c.cgroupManager()
	if err != nil {
		return err
	}
	if sig == unix.SIGKILL {
		return m.Kill()
	}
	pids, err := m.Procs(true)
	if err != nil {
		return err
	}
	for _, pid := range pids {
		_ = unix.Kill(int(pid), sig)
	}
	return nil
}

func (c *guestCgroup) Update(r *specs.LinuxResources) error {
	m, err := c.cgroupManager()
	if err != nil {
		return err
	}
	return m.Update(cgroup2.ToResources(r))
}

// Stats reads the cgroup's statistics through descriptors kept open until closeStats.
func (c *guestCgroup) Stats() (*cgroupstats.Metrics, error) {
	m, err := c.stats.Read()
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", c.id, err)
	}
	return m, nil
}

// closeStats closes what Stats keeps open; Destroy calls it before the cgroup goes.
func (c *guestCgroup) closeStats() { c.stats.Close() }

// WatchOOM follows the oom_kill count of the cgroup's memory.events.
func (c *guestCgroup) WatchOOM(onOOM func()) error {
	m, err := c.cgroupManager()
	if err != nil {
		return err
	}
	events, errs := m.EventChan()
	go func() {
		var last uint64
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					return
				}
				if ev.OOMKill > last {
					last = ev.OOMKill
					onOOM()
				}
			case err := <-errs:
				// memory.events is gone with the cgroup (the container was deleted) or cannot
				// be read: either way no more OOM events will come.
				log.L.WithError(err).Debug("podvm-agent: OOM watch ended")
				return
			}
		}
	}()
	return nil
}

func (c *guestCgroup) cgroupManager() (*cgroup2.Manager, error) {
	m, err := cgroup2.Load(c.path)
	if err != nil {
		return nil, fmt.Errorf("container %s: cgroup %s: %w", c.id, c.path, err)
	}
	return m, nil
}
