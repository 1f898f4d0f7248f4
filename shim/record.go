package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/log"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/network"
	"github.com/podvm/podvm/rootfs"
	"github.com/podvm/podvm/shim/config"
)

// recordFile is written into a container's bundle (and the sandbox's state dir) so that
// `containerd-shim-podvm-v2 delete`, run after the shim died, can clean up from disk alone.
const recordFile = "podvm.json"

type record struct {
	SandboxID string `json:"sandbox_id"`
	StateDir  string `json:"state_dir"`
	Netns     string `json:"netns,omitempty"`
	// OwnsVM is true for the container whose deletion ends the VM (the pod sandbox, or a
	// standalone container).
	OwnsVM bool `json:"owns_vm"`
	// Hypervisor is the kind of the VM's driver (records without it are QEMU's).
	Hypervisor string `json:"hypervisor,omitempty"`
	// Cgroup is the pod's cgroup on the host (hostcgroup.Path form), removed with the VM.
	Cgroup string `json:"cgroup,omitempty"`
}

// driver returns the hypervisor driver of the record's VM.
func (r record) driver(drivers hypervisor.Drivers) (hypervisor.Driver, error) {
	kind := r.Hypervisor
	if kind == "" {
		kind = config.DefaultKind
	}
	return drivers.Get(kind)
}

func (r record) write(dir string) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, recordFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", recordFile, err)
	}
	return os.Rename(tmp, filepath.Join(dir, recordFile))
}

func readRecord(dir string) (*record, error) {
	b, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil {
		return nil, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s in %s: %w", recordFile, dir, err)
	}
	return &r, nil
}

// cleanupState removes what a sandbox left on the host (r owns the VM): the QEMU and
// virtiofsd processes, the taps, every mount and the state dir. Idempotent; errors are logged,
// the clean-up goes on.
func cleanupState(ctx context.Context, drv hypervisor.Driver, r record) {
	if r.StateDir == "" {
		return
	}
	if drv.Cleanup == nil {
		log.G(ctx).WithField("hypervisor", r.Hypervisor).Error("no driver to clean up the VM processes with")
	} else if err := drv.Cleanup(ctx, r.StateDir); err != nil {
		log.G(ctx).WithError(err).Warn("clean up VM processes")
	}
	removeCgroup(ctx, r.Cgroup)
	if r.Netns != "" {
		if err := network.Cleanup(ctx, r.Netns); err != nil {
			log.G(ctx).WithError(err).Warn("clean up pod network")
		}
	}
	if err := rootfs.Cleanup(ctx, r.StateDir); err != nil {
		// Something is still mounted in it: removing the state dir could reach a volume.
		log.G(ctx).WithError(err).Error("clean up shared filesystems; keeping the state dir")
		return
	}
	if err := os.RemoveAll(r.StateDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).Warn("remove state dir")
	}
}
