package rootfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// The shim works on the share only through directory descriptors it opened itself: every
// lookup below is relative to such a descriptor and refuses symlinks and ".." escapes, so
// nothing a guest (or a racing process) renames or links can redirect a mount, an unmount
// or a removal to another host path.

// beneath is how every lookup under a descriptor resolves: no symlink at any component, no
// magic /proc links, never above the descriptor.
const beneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// openBeneath opens name (a relative path) under dirfd with flags (O_CLOEXEC added), never
// following a symlink.
func openBeneath(dirfd int, name string, flags int) (int, error) {
	for {
		fd, err := unix.Openat2(dirfd, name, &unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: beneath})
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue // EAGAIN: a concurrent rename elsewhere in the mount; retry the lookup
		}
		if err != nil {
			return -1, &os.PathError{Op: "openat2", Path: name, Err: err}
		}
		return fd, nil
	}
}

// mkdirOpen creates directory name in dirfd (it must not exist) and opens it O_PATH.
func mkdirOpen(dirfd int, name string) (int, error) {
	if err := unix.Mkdirat(dirfd, name, 0o755); err != nil {
		return -1, &os.PathError{Op: "mkdirat", Path: name, Err: err}
	}
	return openBeneath(dirfd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW)
}

// makeTargetAt creates the mount point of a bind in dirfd, a directory or an empty file, and
// opens it O_PATH.
func makeTargetAt(dirfd int, name string, dir bool) (int, error) {
	if dir {
		return mkdirOpen(dirfd, name)
	}
	fd, err := unix.Openat(dirfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return -1, &os.PathError{Op: "create", Path: name, Err: err}
	}
	_ = unix.Close(fd)
	return openBeneath(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW)
}

// procFd is the magic link of an open descriptor, for the few calls that take only paths
// (mount(2) of containerd's rootfs mounts, umount2): the kernel resolves it to the very
// file the descriptor holds, whatever its path has become since.
func procFd(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// fdPath is the path the kernel currently gives an open descriptor (for messages and checks).
func fdPath(fd int) (string, error) {
	return os.Readlink(procFd(fd))
}

// hostAttrs are the flags every host-side mount of the share gets: the guest may put setuid
// binaries and device nodes in what it can write, and the host must never honour them.
const hostAttrs = unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV

// cloneTree makes a detached copy of the tree at srcfd (with everything mounted below it),
// for attachTree to attach in the share's namespace; the caller closes the returned
// descriptor. It must run in the namespace srcfd's mount is in (the node's). The copy is
// nosuid,nodev throughout; ro makes its top mount read-only and rro every mount of it
// (runc's semantics: sub-mounts of a "ro" volume stay as they are). The copy is configured
// while detached, so the share never shows a half-configured mount.
func cloneTree(srcfd int, ro, rro bool) (int, error) {
	tree, err := unix.OpenTree(srcfd, "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH|unix.AT_RECURSIVE)
	if err != nil {
		return -1, fmt.Errorf("open_tree: %w", err)
	}
	attr := &unix.MountAttr{Attr_set: hostAttrs}
	if rro {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, attr); err != nil {
		_ = unix.Close(tree)
		return -1, fmt.Errorf("mount_setattr: %w", err)
	}
	if ro && !rro {
		if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
			_ = unix.Close(tree)
			return -1, fmt.Errorf("mount_setattr ro: %w", err)
		}
	}
	return tree, nil
}

// attachTree attaches a detached tree (cloneTree) on the mount point targetfd. It must run
// in the namespace targetfd's mount is in (the share's).
func attachTree(tree, targetfd int) error {
	if err := unix.MoveMount(tree, "", targetfd, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount: %w", err)
	}
	return nil
}

// mountUnder is one mount at or below a directory, as the mount table names it.
type mountUnder struct {
	rel   string // path relative to the directory ("." for the directory itself)
	id    int
	depth int
}

// mountsBelow lists the mounts at or below dir (a real, symlink-free path the shim made)
// from the calling thread's mount table, shallowest first.
func mountsBelow(dir string) ([]mountUnder, error) {
	dir = filepath.Clean(dir)
	infos, err := threadMounts(dir)
	if err != nil {
		return nil, err
	}
	out := make([]mountUnder, 0, len(infos))
	for _, m := range infos {
		rel, err := filepath.Rel(dir, m.Mountpoint)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
			continue
		}
		out = append(out, mountUnder{rel: rel, id: m.ID, depth: strings.Count(rel, "/")})
	}
	slices.SortStableFunc(out, func(a, b mountUnder) int { return a.depth - b.depth })
	return out, nil
}

// detachAll lazily detaches every mount at or below rel under dirfd (dirPath is dirfd's real
// path, used only to read the mount table). Each mount is reached by a symlink-free lookup
// from dirfd and detached through its descriptor, shallowest first (a lazy detach takes
// what is mounted below along). A mount point that can no longer be reached without a
// symlink is reported, never followed. Detaching is lazy because virtiofsd holds O_PATH
// descriptors of what the guest looked up, which keeps a plain unmount busy.
func detachAll(dirfd int, dirPath, rel string) error {
	base := filepath.Join(dirPath, rel)
	// Stacked mounts and mounts that appear by propagation while we work: a bounded number
	// of rounds, each re-reading the table.
	for round := 0; round < 64; round++ {
		ms, err := mountsBelow(base)
		if err != nil {
			return err
		}
		if len(ms) == 0 {
			return nil
		}
		var errs []error
		top := ms[0].depth
		for _, m := range ms {
			if m.depth != top {
				break
			}
			name := filepath.Join(rel, m.rel)
			fd, err := openBeneath(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW)
			if err != nil {
				errs = append(errs, fmt.Errorf("reaching mount %s: %w", name, err))
				continue
			}
			err = unix.Unmount(procFd(fd), unix.MNT_DETACH)
			_ = unix.Close(fd)
			if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: gone meanwhile
				errs = append(errs, fmt.Errorf("detaching mount %s: %w", name, err))
			}
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
	}
	left, err := mountsBelow(base)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("%d mounts still under %s after detaching them (unmount them by hand, then retry)", len(left), base)
	}
	return nil
}

// removeAt removes name from dirfd and, if it is a directory, everything in it. Symlinks are
// removed as links; it never crosses into another filesystem (dev is the one it may touch),
// so a mount left behind makes it fail instead of deleting a volume's data.
func removeAt(dirfd int, name string, dev uint64) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return &os.PathError{Op: "fstatat", Path: name, Err: err}
	}
	if st.Dev != dev {
		return fmt.Errorf("%s is on another filesystem (still mounted?); not removing it", name)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if err := unix.Unlinkat(dirfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return &os.PathError{Op: "unlinkat", Path: name, Err: err}
		}
		return nil
	}
	fd, err := openBeneath(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(fd), name)
	names, err := d.Readdirnames(-1) // the share's dirs are small: a tmpfs with an inode cap
	var errs []error
	if err != nil {
		errs = append(errs, &os.PathError{Op: "readdir", Path: name, Err: err})
	}
	for _, n := range names {
		if err := removeAt(fd, n, dev); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	_ = d.Close()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "rmdir", Path: name, Err: err}
	}
	return nil
}

// threadMounts lists the mounts at or below dir in the calling thread's mount namespace,
// which is not the process's on the share's thread (so not /proc/self).
func threadMounts(dir string) ([]*mountinfo.Info, error) {
	f, err := os.Open("/proc/thread-self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	defer func() { _ = f.Close() }()
	infos, err := mountinfo.GetMountsFromReader(f, mountinfo.PrefixFilter(dir))
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	return infos, nil
}

// fstatFd stats an open descriptor.
func fstatFd(fd int) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Fstat(fd, &st)
	return st, err
}
