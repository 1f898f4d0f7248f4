package rootfs

import (
	"path/filepath"

	"golang.org/x/sys/unix"
)

// syncOverlays flushes the overlay filesystems (container rootfs) at or below name in the
// staging dir (dirfd, real path dirPath), each reached by a symlink-free lookup. Once
// detached, an overlay is unmounted for good when its last user lets go, and that is usually
// virtiofsd: its final unmount then syncs the upper dir in whatever process drops the last
// reference, which made virtiofsd exit late. Flushing here keeps that cost in Release, where
// containerd would pay it too. Errors only mean the later sync does the work.
func syncOverlays(dirfd int, dirPath, name string) {
	base := filepath.Join(dirPath, name)
	infos, err := threadMounts(base)
	if err != nil {
		return
	}
	for _, m := range infos {
		if m.FSType != "overlay" {
			continue
		}
		rel, err := filepath.Rel(dirPath, m.Mountpoint)
		if err != nil {
			continue
		}
		fd, err := openBeneath(dirfd, rel, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if err != nil {
			continue
		}
		_ = unix.Syncfs(fd)
		_ = unix.Close(fd)
	}
}
