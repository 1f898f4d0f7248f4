package rootfs

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/podvm/podvm/agent"
)

// Fake is a Provider for unit tests of its callers: it mounts nothing, rewrites the spec's
// root path as Share would, and records which containers are prepared. Set PrepareErr or
// ReleaseErr to make the calls fail.
type Fake struct {
	// GuestDir is the guest path of the share; empty means agent.GuestSharedDir.
	GuestDir string
	// Export is what ExportDir returns.
	Export     string
	PrepareErr error
	ReleaseErr error

	mu       sync.Mutex
	prepared map[string]bool
	released []string
	closed   bool
}

// ExportDir implements Provider.
func (f *Fake) ExportDir() string { return f.Export }

// InMountNS implements Provider: the fake has no namespace of its own.
func (f *Fake) InMountNS(fn func() error) error { return fn() }

// Close implements Provider.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

// Closed reports whether Close was called.
func (f *Fake) Closed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

var _ Provider = (*Fake)(nil)

// Prepare implements Provider.
func (f *Fake) Prepare(ctx context.Context, containerID, bundle string, spec *specs.Spec, rootfs []mount.Mount) (*Attachment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.PrepareErr != nil {
		return nil, f.PrepareErr
	}
	if err := validID(containerID); err != nil {
		return nil, err
	}
	if spec == nil {
		return nil, fmt.Errorf("container %s: no OCI spec: %w", containerID, errdefs.ErrInvalidArgument)
	}
	if f.prepared[containerID] {
		return nil, fmt.Errorf("container %s: already prepared: %w", containerID, errdefs.ErrAlreadyExists)
	}
	gspec, err := copySpec(spec)
	if err != nil {
		return nil, err
	}
	if gspec.Root == nil {
		gspec.Root = &specs.Root{}
	}
	dir := f.GuestDir
	if dir == "" {
		dir = agent.GuestSharedDir
	}
	gspec.Root.Path = filepath.Join(dir, containerID, rootfsDir)
	if f.prepared == nil {
		f.prepared = map[string]bool{}
	}
	f.prepared[containerID] = true
	return &Attachment{Spec: gspec}, nil
}

// Release implements Provider.
func (f *Fake) Release(ctx context.Context, containerID string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ReleaseErr != nil {
		return f.ReleaseErr
	}
	delete(f.prepared, containerID)
	f.released = append(f.released, containerID)
	return nil
}

// Prepared lists the containers prepared and not yet released.
func (f *Fake) Prepared() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for id := range f.prepared {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Released lists every Release call's container, in order.
func (f *Fake) Released() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.released...)
}
