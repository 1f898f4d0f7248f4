package shim

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// CRI annotations the shim reads (containerd's internal/cri/annotations).
const (
	annotationContainerType = "io.kubernetes.cri.container-type"
	annotationSandboxID     = "io.kubernetes.cri.sandbox-id"
	containerTypeSandbox    = "sandbox"
)

func readSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("read OCI spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("OCI spec %s/config.json: %w: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	return &spec, nil
}

// role is how a container relates to the pod's VM.
type role int

const (
	// roleSandbox is the CRI pod sandbox (pause): it boots the VM.
	roleSandbox role = iota
	// roleWorkload is a CRI container that runs in its pod's VM.
	roleWorkload
	// roleStandalone is a container without CRI annotations (ctr run): it gets a VM of its own.
	roleStandalone
)

func roleOf(spec *specs.Spec) (role, string) {
	switch spec.Annotations[annotationContainerType] {
	case containerTypeSandbox:
		return roleSandbox, ""
	case "":
		return roleStandalone, ""
	default:
		return roleWorkload, spec.Annotations[annotationSandboxID]
	}
}

// netnsPath returns the pod network namespace the spec joins. ok is false when the spec has
// no network namespace at all, i.e. it wants the host's network (hostNetwork).
func netnsPath(spec *specs.Spec) (path string, ok bool) {
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return ns.Path, true
		}
	}
	return "", false
}

// hostNamespaces names the node namespaces a spec shares instead of having its own (a pod's
// hostPID, hostIPC): in a VM pod those are the VM's, the pod's own guest, never the node's.
// (hostNetwork is refused: see sandboxOptions.)
func hostNamespaces(spec *specs.Spec) []string {
	if spec.Linux == nil {
		return nil
	}
	has := map[specs.LinuxNamespaceType]bool{}
	for _, ns := range spec.Linux.Namespaces {
		has[ns.Type] = true
	}
	var shared []string
	if !has[specs.PIDNamespace] {
		shared = append(shared, "pid")
	}
	if !has[specs.IPCNamespace] {
		shared = append(shared, "ipc")
	}
	return shared
}

// adaptSpecForGuest rewrites what in a host-made spec means nothing, or something wrong, inside
// the guest. Filesystem paths are rootfs.Provider's business; this handles the rest:
//   - the network namespace: containers use the guest's own stack, which is the pod's;
//   - other namespace paths name /proc/<pid>/ns/* of the sandbox (sandbox.prepare has pointed
//     them at the sandbox's process in the guest);
//   - hooks are host programs, and host devices (privileged containers get them all) do not
//     exist in the guest;
//   - AppArmor/SELinux labels belong to the host's policy;
//   - cpuset and hugepage limits name host CPUs, NUMA nodes and page pools;
//   - the guest always runs cgroup v2, where containerd gives every container a cgroup
//     namespace (on a cgroup v1 host it gives none), so that /sys/fs/cgroup is its own.
func adaptSpecForGuest(spec *specs.Spec) {
	var nss []specs.LinuxNamespace
	cgroupNS := false
	for _, ns := range spec.Linux.Namespaces {
		switch ns.Type {
		case specs.NetworkNamespace:
			continue
		case specs.CgroupNamespace:
			cgroupNS = true
		}
		nss = append(nss, ns)
	}
	if !cgroupNS && !privileged(spec) {
		nss = append(nss, specs.LinuxNamespace{Type: specs.CgroupNamespace})
	}
	spec.Linux.Namespaces = nss
	spec.Hooks = nil
	spec.Linux.Devices = nil
	spec.Linux.MountLabel = ""
	if spec.Process != nil {
		spec.Process.ApparmorProfile = ""
		spec.Process.SelinuxLabel = ""
	}
	if r := spec.Linux.Resources; r != nil {
		if r.CPU != nil {
			r.CPU.Cpus, r.CPU.Mems = "", ""
		}
		r.HugepageLimits = nil
		// Device cgroup rules stay: the standard devices have the same numbers in the guest.
	}
}

// privileged reports whether the spec looks like a privileged container's: containerd gives
// those the host's cgroup namespace.
func privileged(spec *specs.Spec) bool {
	if spec.Process == nil || spec.Process.Capabilities == nil {
		return false
	}
	for _, c := range spec.Process.Capabilities.Bounding {
		if c == "CAP_SYS_ADMIN" {
			return len(spec.Linux.MaskedPaths) == 0
		}
	}
	return false
}
