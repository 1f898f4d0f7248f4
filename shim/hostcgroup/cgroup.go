package hostcgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// unifiedMount is where cgroup v2 is mounted on a host that runs it alone.
const unifiedMount = "/sys/fs/cgroup"

// Limits are what the pod's VM may use on the host.
type Limits struct {
	// MemoryBytes is the memory limit; 0 = none.
	MemoryBytes int64
	// CPUQuota is µs of CPU time per CPUPeriod; 0 = no quota.
	CPUQuota int64
	// CPUPeriod is the CFS period in µs; 0 = the kernel's default (100000).
	CPUPeriod uint64
	// CPUShares is the cgroup v1 cpu.shares (converted to cpu.weight on v2); 0 = the default.
	CPUShares uint64
}

// v1 returns the limits as OCI resources, the form containerd's cgroup1 package takes.
func (l Limits) v1() *specs.LinuxResources {
	r := &specs.LinuxResources{Memory: &specs.LinuxMemory{}, CPU: &specs.LinuxCPU{}}
	if l.MemoryBytes > 0 {
		r.Memory.Limit = &l.MemoryBytes
	}
	if l.CPUQuota > 0 {
		r.CPU.Quota = &l.CPUQuota
		if l.CPUPeriod > 0 {
			r.CPU.Period = &l.CPUPeriod
		}
	}
	if l.CPUShares > 0 {
		r.CPU.Shares = &l.CPUShares
	}
	return r
}

// v2 returns the limits as cgroup v2 resources.
func (l Limits) v2() *cgroup2.Resources {
	r := &cgroup2.Resources{CPU: &cgroup2.CPU{}, Memory: &cgroup2.Memory{}, Pids: &cgroup2.Pids{}}
	if l.MemoryBytes > 0 {
		r.Memory.Max = &l.MemoryBytes
	}
	if l.CPUQuota > 0 {
		var period *uint64
		if l.CPUPeriod > 0 {
			period = &l.CPUPeriod
		}
		r.CPU.Max = cgroup2.NewCPUMax(&l.CPUQuota, period)
	}
	if l.CPUShares > 0 {
		w := sharesToWeight(l.CPUShares)
		r.CPU.Weight = &w
	}
	return r
}

// sharesToWeight maps cpu.shares (2..262144) onto cpu.weight (1..10000) as runc and the
// kubelet do.
func sharesToWeight(shares uint64) uint64 {
	shares = min(max(shares, 2), 262144)
	return 1 + ((shares-2)*9999)/262142
}

// Cgroup is a pod cgroup this process entered.
type Cgroup struct {
	path  string
	leave func() error
}

// Path is the cgroup's path below the cgroup mount(s).
func (c *Cgroup) Path() string { return c.path }

// Enter creates the cgroup at path (a Path result) with the limits and moves this process,
// all its threads, into it: what it starts from now on runs there too. On cgroup v1 that is
// the cpu, cpuacct, cpuset, memory and pids hierarchies; on v2 the unified one.
func Enter(path string, lim Limits) (*Cgroup, error) {
	if cgroups.Mode() == cgroups.Unified {
		return enterV2(path, lim)
	}
	return enterV1(path, lim)
}

// Leave moves this process back to the cgroups it was in before Enter; the cgroup itself
// stays (Remove it once the VM is gone).
func (c *Cgroup) Leave() error {
	if err := c.leave(); err != nil {
		return fmt.Errorf("leave cgroup %s: %w", c.path, err)
	}
	return nil
}

// v1Controllers are the cgroup v1 hierarchies a pod's VM is placed in: those kubelet sizes
// and reports a pod by.
var v1Controllers = map[cgroup1.Name]bool{
	cgroup1.Cpu: true, cgroup1.Cpuacct: true, cgroup1.Cpuset: true, cgroup1.Memory: true, cgroup1.Pids: true,
}

func v1Hierarchy() ([]cgroup1.Subsystem, error) {
	all, err := cgroup1.Default()
	if err != nil {
		return nil, err
	}
	var out []cgroup1.Subsystem
	for _, s := range all {
		if v1Controllers[s.Name()] {
			out = append(out, s)
		}
	}
	return out, nil
}

func enterV1(path string, lim Limits) (*Cgroup, error) {
	self := os.Getpid()
	orig, err := cgroup1.Load(cgroup1.PidPath(self), cgroup1.WithHierarchy(v1Hierarchy))
	if err != nil {
		return nil, fmt.Errorf("this process's cgroups: %w", err)
	}
	cg, err := cgroup1.New(cgroup1.StaticPath(path), lim.v1(), cgroup1.WithHierarchy(v1Hierarchy))
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", path, err)
	}
	if err := cg.Add(cgroup1.Process{Pid: self}); err != nil {
		_ = orig.Add(cgroup1.Process{Pid: self})
		_ = cg.Delete()
		return nil, fmt.Errorf("enter cgroup %s: %w", path, err)
	}
	return &Cgroup{path: path, leave: func() error { return orig.Add(cgroup1.Process{Pid: self}) }}, nil
}

func enterV2(path string, lim Limits) (*Cgroup, error) {
	self := uint64(os.Getpid())
	_, origPath, err := cgroups.ParseCgroupFileUnified("/proc/self/cgroup")
	if err != nil {
		return nil, fmt.Errorf("this process's cgroup: %w", err)
	}
	orig, err := cgroup2.Load(origPath)
	if err != nil {
		return nil, fmt.Errorf("this process's cgroup %s: %w", origPath, err)
	}
	m, err := cgroup2.NewManager(unifiedMount, path, lim.v2())
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", path, err)
	}
	if err := m.AddProc(self); err != nil {
		_ = m.Delete()
		return nil, fmt.Errorf("enter cgroup %s: %w", path, err)
	}
	return &Cgroup{path: path, leave: func() error { return orig.AddProc(self) }}, nil
}

// Remove deletes the cgroup at path once the processes in it are gone, waiting for them
// (a killed QEMU leaves its cgroup a moment after its death) until ctx ends. A cgroup that
// is not there is not an error.
func Remove(ctx context.Context, path string) error {
	for {
		err := remove(path)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("remove cgroup %s: %w", path, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func remove(path string) error {
	if cgroups.Mode() == cgroups.Unified {
		if _, err := os.Stat(filepath.Join(unifiedMount, path)); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		m, err := cgroup2.Load(path)
		if err != nil {
			return err
		}
		if err := m.Delete(); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path), cgroup1.WithHierarchy(v1Hierarchy))
	if errors.Is(err, cgroup1.ErrCgroupDeleted) {
		return nil
	}
	if err != nil {
		return err
	}
	return cg.Delete()
}
