package rootfs

import (
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// emptyDirPlugin is the directory kubelet keeps a pod's emptyDir volumes in:
// <kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<volume name>.
const emptyDirPlugin = "kubernetes.io~empty-dir"

// memoryEmptyDir tells whether the opened bind source fd is a memory-backed emptyDir
// (`emptyDir: {medium: Memory}`) as kubelet makes it: a tmpfs mounted exactly at the volume's
// directory. If so it returns the pod tmpfs the guest mounts in its place: at
// agent.GuestPodTmpfsDir/<volume name>, as big as kubelet made the host's (its sizeLimit).
// The guest's pages are then the pod's VM memory, not host tmpfs outside it.
func memoryEmptyDir(fd int) (*api.PodTmpfs, error) {
	path, err := fdPath(fd)
	if err != nil {
		return nil, err
	}
	if filepath.Base(filepath.Dir(path)) != emptyDirPlugin {
		return nil, nil
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", path, err)
	}
	if sfs.Type != unix.TMPFS_MAGIC {
		return nil, nil // a disk-backed emptyDir: shared as it is
	}
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS, &stx); err != nil {
		return nil, fmt.Errorf("statx %s: %w", path, err)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 || stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		return nil, nil // inside a tmpfs, not one of its own: shared as it is
	}
	name := unsafeName.ReplaceAllString(filepath.Base(path), "_")
	return &api.PodTmpfs{
		MountPoint: filepath.Join(agent.GuestPodTmpfsDir, name),
		SizeBytes:  sfs.Blocks * uint64(sfs.Bsize),
	}, nil
}
