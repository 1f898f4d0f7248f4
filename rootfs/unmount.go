package rootfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// release detaches every mount at or below dir and removes dir. It removes the tree only
// once the mount table shows nothing mounted below it, so a failed unmount can never make
// it delete a volume's data.
func release(dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	syncOverlays(dir)
	// Lazily: virtiofsd holds O_PATH descriptors of what the guest looked up, which keeps
	// a plain unmount busy for as long as the guest caches the inodes.
	if err := mount.UnmountRecursive(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmounting %s: %w", dir, err)
	}
	left, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("mounts left under %s after unmounting: %s (unmount them by hand, then retry)", dir, strings.Join(left, ", "))
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing %s: %w", dir, err)
	}
	return nil
}

// syncOverlays flushes the overlay filesystems (container rootfs) at or below dir. Once
// detached, an overlay is unmounted for good when its last user lets go, and that is
// usually virtiofsd: its final unmount then syncs the upper dir in whatever process drops
// the last reference, which made virtiofsd exit late. Flushing here keeps that cost in
// Release, where containerd would pay it too. Errors only mean the later sync does the work.
func syncOverlays(dir string) {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return
	}
	for _, m := range infos {
		if m.FSType != "overlay" {
			continue
		}
		fd, err := unix.Open(m.Mountpoint, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		_ = unix.Syncfs(fd)
		unix.Close(fd)
	}
}

// mountsUnder lists the mount points at or below dir.
func mountsUnder(dir string) ([]string, error) {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	points := make([]string, 0, len(infos))
	for _, m := range infos {
		points = append(points, m.Mountpoint)
	}
	return points, nil
}

// isMountPoint reports whether dir itself is a mount point.
func isMountPoint(dir string) (bool, error) {
	infos, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(filepath.Clean(dir)))
	if err != nil {
		return false, fmt.Errorf("reading the mount table: %w", err)
	}
	return len(infos) > 0, nil
}
