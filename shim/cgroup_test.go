package shim

import (
	"errors"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/podvm/podvm/shim/config"
	"github.com/podvm/podvm/shim/hostcgroup"
)

func TestSandboxCgroup(t *testing.T) {
	cfg := config.Default() // memory_overhead 256Mi
	size := config.VMSize{VCPUs: 1, MemoryMiB: 640}
	shares := uint64(2)
	for _, tc := range []struct {
		name string
		spec *specs.Spec
		want podCgroup
	}{
		{"no cgroups path", &specs.Spec{Linux: &specs.Linux{}}, podCgroup{}},
		{"no linux section", &specs.Spec{}, podCgroup{}},
		{"cgroupfs, CPU limit", &specs.Spec{
			Annotations: map[string]string{config.CRISandboxCPUQuota: "50000", config.CRISandboxCPUPeriod: "100000",
				config.CRISandboxCPUShares: "512"},
			Linux: &specs.Linux{CgroupsPath: "/kubepods/pod1/sb"}},
			podCgroup{path: "/kubepods/pod1/sb", limits: hostcgroup.Limits{MemoryBytes: 896 << 20,
				CPUQuota: 50000, CPUPeriod: 100000, CPUShares: 512}}},
		{"systemd, no CPU limit, spec shares", &specs.Spec{
			Annotations: map[string]string{config.CRISandboxCPUQuota: "0", config.CRISandboxCPUPeriod: "100000"},
			Linux: &specs.Linux{CgroupsPath: "kubepods-pod1.slice:cri-containerd:sb",
				Resources: &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &shares}}}},
			podCgroup{path: "/kubepods.slice/kubepods-pod1.slice/cri-containerd-sb.scope",
				limits: hostcgroup.Limits{MemoryBytes: 896 << 20, CPUShares: 2}}},
	} {
		got, err := sandboxCgroup(cfg, size, tc.spec)
		if err != nil || got != tc.want {
			t.Errorf("%s: sandboxCgroup = %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
	_, err := sandboxCgroup(cfg, size, &specs.Spec{Linux: &specs.Linux{CgroupsPath: "not-a-path"}})
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("bad cgroups path: err %v, want invalid argument", err)
	}
}
