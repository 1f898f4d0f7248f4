package guest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// container is one OCI container in the guest and its processes.
type container struct {
	id   string
	rc   runtimeContainer
	init *process

	mu    sync.Mutex
	execs map[string]*process
	// storage is its disks.
	storage *storage
}

// parseSpec decodes and checks an OCI spec from the host.
func parseSpec(id string, b []byte) (*specs.Spec, error) {
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("container %s: spec is not valid JSON: %v: %w", id, err, errdefs.ErrInvalidArgument)
	}
	if spec.Root == nil || !filepath.IsAbs(spec.Root.Path) {
		return nil, fmt.Errorf("container %s: spec root.path must be an absolute guest path: %w", id, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil {
		return nil, fmt.Errorf("container %s: spec has no process: %w", id, errdefs.ErrInvalidArgument)
	}
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	return &spec, nil
}

// applyPodSysctls writes the spec's net.* sysctls into the guest's own network namespace
// (procSys is its /proc/sys) and drops them from the spec. Containers share the guest's
// network stack (the VM is the pod's network namespace), where libcontainer refuses net.*
// sysctls; they are pod-wide anyway.
func applyPodSysctls(procSys string, spec *specs.Spec) error {
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return nil // a network namespace of its own: libcontainer applies them there
		}
	}
	for k, v := range spec.Linux.Sysctl {
		if !strings.HasPrefix(k, "net.") {
			continue
		}
		p := filepath.Join(procSys, strings.ReplaceAll(k, ".", "/"))
		if strings.Contains(k, "/") || strings.Contains(k, "..") {
			return fmt.Errorf("sysctl %q: not a sysctl name: %w", k, errdefs.ErrInvalidArgument)
		}
		if err := os.WriteFile(p, []byte(v), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
		}
		delete(spec.Linux.Sysctl, k)
	}
	return nil
}

// guestCgroupsPath keeps cgroupfs-style paths and turns systemd-style ones
// ("slice:prefix:name") into a plain path, as the guest has no systemd.
func guestCgroupsPath(id, p string) string {
	if p == "" {
		return "/podvm/" + id
	}
	if !strings.HasPrefix(p, "/") {
		parts := strings.Split(p, ":")
		return "/podvm/" + parts[len(parts)-1]
	}
	return p
}

func (c *container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %q in container %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// kill sends SIGKILL to every process of the container, its init last.
func (c *container) kill() {
	_ = c.rc.SignalAll(unix.SIGKILL)
	_ = c.rc.Signal(unix.SIGKILL)
}
