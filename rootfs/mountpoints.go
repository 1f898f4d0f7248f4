package rootfs

import (
	"errors"
	"path/filepath"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// A container's root often lacks the mount points of its spec's mounts: images rarely carry
// /proc or /sys, and the files CRI binds (/etc/hostname, /etc/hosts, /etc/resolv.conf) are
// not theirs. runc's init in the guest makes what is missing, and on a root shared over
// virtio-fs each costs it ~10 requests to virtiofsd (its lookups repeat for its checks, and
// virtiofsd caches no negative entry), 5–10 ms each under TCG. Prepare makes them instead,
// on the host, in the rootfs tree before it is attached in the share, where no guest can
// reach it yet: runc then finds each with one lookup.

// mountPoint is one mount point to make in a root: a path relative to it, a directory or an
// empty file.
type mountPoint struct {
	path string
	dir  bool
}

// mountPoints lists the mount points of mounts that runc would make in the root, as it would
// make them: a directory, or an empty file for the bind of a file. bound gives, for each bind
// the share serves, whether its source is a directory; other binds are left to runc, which
// resolves their source in the guest. So is what goes under an earlier mount's destination
// (/dev/pts under /dev: runc makes it on the mount), and a tmpfs without a mode, whose mode
// runc copies from the mount point it finds.
func mountPoints(mounts []specs.Mount, bound map[int]bool) []mountPoint {
	var points []mountPoint
	earlier := make([]string, 0, len(mounts))
	for i, m := range mounts {
		dest := filepath.Clean("/" + m.Destination)
		under := slices.ContainsFunc(earlier, func(e string) bool { return within(dest, e) })
		earlier = append(earlier, dest)
		if under || dest == "/" {
			continue
		}
		dir := true
		switch {
		// runc binds whatever has the option, whatever its type.
		case isBind(&m) || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind"):
			var ok bool
			if dir, ok = bound[i]; !ok {
				continue
			}
		case m.Type == "tmpfs" && !slices.ContainsFunc(m.Options, func(o string) bool { return strings.HasPrefix(o, "mode=") }):
			continue
		}
		points = append(points, mountPoint{path: dest[1:], dir: dir})
	}
	return points
}

// makeMountPoints makes each of points that is missing under root (a descriptor of the root),
// with its missing parent directories, 0755 (and 0644 for a file) as runc makes them. It
// follows no symlink: a path through one, or ending at one, is left to runc, as is any path it
// cannot make.
func makeMountPoints(root int, points []mountPoint) {
	for _, p := range points {
		makeMountPoint(root, p)
	}
}

func makeMountPoint(root int, p mountPoint) {
	parts := strings.Split(p.path, "/")
	dir := root
	defer func() {
		if dir != root {
			_ = unix.Close(dir)
		}
	}()
	for _, name := range parts[:len(parts)-1] {
		next, err := openBeneath(dir, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) {
			next, err = mkdirOpen(dir, name)
		}
		if err != nil {
			return
		}
		if dir != root {
			_ = unix.Close(dir)
		}
		dir = next
	}
	name := parts[len(parts)-1]
	if p.dir {
		_ = unix.Mkdirat(dir, name, 0o755)
		return
	}
	if fd, err := unix.Openat(dir, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644); err == nil {
		_ = unix.Close(fd)
	}
}
