// Package hostcgroup puts a pod's VM into the pod's cgroup on the host: the cgroup the
// sandbox's OCI spec names (linux.cgroupsPath, from the CRI CgroupParent), sized from the VM.
// The shim enters it before it starts virtiofsd and QEMU, so they and every vCPU thread are
// charged to the pod and held to its CPU quota, as Kata's sandbox_cgroup_only does.
package hostcgroup

import (
	"fmt"
	"path"
	"strings"
)

// Path turns an OCI linux.cgroupsPath into a path below the cgroup mount: a cgroupfs path
// ("/kubepods/burstable/pod1/abc") is kept; a systemd one ("slice:prefix:name", as containerd
// writes for a parent ending in .slice) is expanded the way runc's systemd driver names it:
// "kubepods-pod1.slice:cri-containerd:abc" is
// "/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope".
func Path(cgroupsPath string) (string, error) {
	if cgroupsPath == "" {
		return "", fmt.Errorf("empty cgroups path")
	}
	if strings.HasPrefix(cgroupsPath, "/") {
		p := path.Clean(cgroupsPath)
		if p == "/" {
			return "", fmt.Errorf("cgroups path %q: the root cgroup; give the pod a cgroup of its own", cgroupsPath)
		}
		return p, nil
	}
	parts := strings.Split(cgroupsPath, ":")
	if len(parts) != 3 {
		return "", fmt.Errorf("cgroups path %q: neither an absolute cgroupfs path nor systemd's slice:prefix:name", cgroupsPath)
	}
	slice, err := expandSlice(parts[0])
	if err != nil {
		return "", fmt.Errorf("cgroups path %q: %w", cgroupsPath, err)
	}
	name := parts[2]
	if name == "" || strings.Contains(name, "/") {
		return "", fmt.Errorf("cgroups path %q: bad unit name %q", cgroupsPath, name)
	}
	if parts[1] != "" {
		name = parts[1] + "-" + name
	}
	return path.Join(slice, name+".scope"), nil
}

// expandSlice turns a systemd slice name into its cgroup path: "a-b-c.slice" is
// "/a.slice/a-b.slice/a-b-c.slice"; "" and "-.slice" are the root slice.
func expandSlice(slice string) (string, error) {
	if slice == "" || slice == "-.slice" {
		return "/", nil
	}
	base, ok := strings.CutSuffix(slice, ".slice")
	if !ok || base == "" || strings.Contains(base, "/") || strings.HasPrefix(base, "-") ||
		strings.HasSuffix(base, "-") || strings.Contains(base, "--") {
		return "", fmt.Errorf("bad systemd slice %q", slice)
	}
	p, prefix := "/", ""
	for _, comp := range strings.Split(base, "-") {
		prefix += comp
		p = path.Join(p, prefix+".slice")
		prefix += "-"
	}
	return p, nil
}
