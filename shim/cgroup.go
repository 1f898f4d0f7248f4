package shim

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/podvm/podvm/shim/config"
	"github.com/podvm/podvm/shim/hostcgroup"
)

// hostCgroup is the pod's cgroup on the host, which the shim entered (hostcgroup.Cgroup).
type hostCgroup interface {
	Leave() error
}

// enterHostCgroup is the production backend.enterCgroup.
func enterHostCgroup(path string, lim hostcgroup.Limits) (hostCgroup, error) {
	cg, err := hostcgroup.Enter(path, lim)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return cg, nil
}

// podCgroup is where a sandbox's VM runs on the host and how big that cgroup is: the
// sandbox spec's linux.cgroupsPath (containerd makes it from the CRI CgroupParent and the
// sandbox id); "" when the spec names none (a standalone container run without one).
type podCgroup struct {
	path   string
	limits hostcgroup.Limits
}

// sandboxCgroup decides the pod cgroup from the sandbox spec and the VM size: memory is the
// guest's RAM plus memory_overhead (QEMU, virtiofsd and the shim themselves); the CPU quota
// and shares are the pod's, from containerd's sandbox annotations (the sum of the
// containers' limits), so the vCPU threads share them.
func sandboxCgroup(cfg *config.Config, size config.VMSize, spec *specs.Spec) (podCgroup, error) {
	if spec.Linux == nil || spec.Linux.CgroupsPath == "" {
		return podCgroup{}, nil
	}
	p, err := hostcgroup.Path(spec.Linux.CgroupsPath)
	if err != nil {
		return podCgroup{}, fmt.Errorf("sandbox spec linux.cgroupsPath: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	a := spec.Annotations
	lim := hostcgroup.Limits{MemoryBytes: int64(size.MemoryMiB)*int64(config.MiB) + int64(cfg.Sandbox.MemoryOverhead)}
	quota, errQ := strconv.ParseInt(a[config.CRISandboxCPUQuota], 10, 64)
	period, errP := strconv.ParseUint(a[config.CRISandboxCPUPeriod], 10, 64)
	if errQ == nil && errP == nil && quota > 0 && period > 0 {
		lim.CPUQuota, lim.CPUPeriod = quota, period
	}
	if shares, err := strconv.ParseUint(a[config.CRISandboxCPUShares], 10, 64); err == nil && shares > 0 {
		lim.CPUShares = shares
	} else if r := spec.Linux.Resources; r != nil && r.CPU != nil && r.CPU.Shares != nil {
		lim.CPUShares = *r.CPU.Shares
	}
	return podCgroup{path: p, limits: lim}, nil
}

// enterCgroup moves the shim into the pod's cgroup, before it starts virtiofsd and QEMU, so
// that they and every vCPU thread are the pod's on the host too.
func (sb *sandbox) enterCgroup(ctx context.Context, b backend, pc podCgroup) error {
	if pc.path == "" {
		return nil
	}
	cg, err := b.enterCgroup(pc.path, pc.limits)
	if err != nil {
		return fmt.Errorf("the pod's cgroup: %w", err)
	}
	sb.cgroup = cg
	log.G(ctx).WithFields(log.Fields{"cgroup": pc.path, "memory": pc.limits.MemoryBytes,
		"cpu_quota": pc.limits.CPUQuota, "cpu_period": pc.limits.CPUPeriod}).Debug("shim in the pod's cgroup")
	return nil
}

// leaveCgroup moves the shim out of the pod's cgroup, so that it can be removed.
func (sb *sandbox) leaveCgroup(ctx context.Context) {
	if sb.cgroup == nil {
		return
	}
	if err := sb.cgroup.Leave(); err != nil {
		log.G(ctx).WithError(err).Warn("the pod's cgroup will stay until this shim exits")
	}
}

// removeCgroup removes a pod's cgroup once its VM processes are gone.
func removeCgroup(ctx context.Context, path string) {
	if path == "" {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := hostcgroup.Remove(ctx, path); err != nil {
		log.G(ctx).WithError(err).Warn("remove the pod's cgroup")
	}
}
