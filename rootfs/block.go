package rootfs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// DiskAnnotationPrefix starts the pod annotation that turns a filesystem volume into a
// disk image: podvm.io/disk.<volume-name>=<size>. The node config must allow it
// (annotations.allowed containing "disk.*" or "disk.<volume-name>").
const DiskAnnotationPrefix = "podvm.io/disk."

// DiskImageName is the file in the volume's directory that backs a disk-image volume.
const DiskImageName = "disk.img"

// GuestDiskDir is where the agent mounts disk-image volumes in the guest, one directory per
// disk serial; the container's bind mount takes its source from there.
const GuestDiskDir = "/run/podvm/disks"

// Disk sizes a disk-image annotation may ask for.
const (
	MinDiskSize int64 = 16 << 20 // ext4 with a journal needs a few MiB; 16Mi leaves room
	MaxDiskSize int64 = 64 << 40 // a sanity bound, far above what a sparse test would use
	// DefaultMaxDiskSize is the node's cap ([block] max_disk_size) when the config sets none.
	DefaultMaxDiskSize int64 = 32 << 30
)

// PodUIDAnnotation is the pod UID containerd's CRI puts on every container of a pod; a disk
// image is only ever made in a volume directory of that pod.
const PodUIDAnnotation = "io.kubernetes.cri.sandbox-uid"

// BlockOptions is how a Share hot-plugs disks: the node config's [block] section and its
// annotation allow-list.
type BlockOptions struct {
	// Cache and AIO go to every hypervisor.BlockDevice ([block] cache and aio); empty means
	// the hypervisor's default (none, threads).
	Cache, AIO string
	// Allowed reports whether pods may set a podvm.io annotation (a full key); nil allows
	// none, so disk-image annotations are ignored.
	Allowed func(key string) bool
	// Mkfs is the mkfs.ext4 binary; empty means "mkfs.ext4" from PATH.
	Mkfs string
	// MaxDiskSize caps the size a disk-image annotation may ask for ([block] max_disk_size);
	// 0 means DefaultMaxDiskSize.
	MaxDiskSize int64
}

// WithBlock sets how the share hot-plugs block volumes and disk images, and returns s.
func (s *Share) WithBlock(o BlockOptions) *Share {
	s.block = o
	return s
}

// ParseDiskSize parses the value of a disk-image annotation: a whole number of bytes with an
// optional binary (Ki, Mi, Gi, Ti) or decimal (k, K, M, G, T) suffix, as in a Kubernetes
// quantity ("1Gi", "500M", "1073741824"). The result is rounded up to a multiple of 1 MiB
// and must lie within MinDiskSize..MaxDiskSize. The value is untrusted: it never panics.
func ParseDiskSize(s string) (int64, error) {
	v := strings.TrimSpace(s)
	if v == "" {
		return 0, errors.New("empty size; give one such as 1Gi or 512Mi")
	}
	i := 0
	for i < len(v) && v[i] >= '0' && v[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q does not start with a whole number; give one such as 1Gi or 512Mi", truncate(s))
	}
	n, err := strconv.ParseInt(v[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: number out of range", truncate(s))
	}
	var mult int64
	switch v[i:] {
	case "":
		mult = 1
	case "k", "K":
		mult = 1000
	case "M":
		mult = 1000 * 1000
	case "G":
		mult = 1000 * 1000 * 1000
	case "T":
		mult = 1000 * 1000 * 1000 * 1000
	case "Ki":
		mult = 1 << 10
	case "Mi":
		mult = 1 << 20
	case "Gi":
		mult = 1 << 30
	case "Ti":
		mult = 1 << 40
	default:
		return 0, fmt.Errorf("size %q: unknown unit (use Ki, Mi, Gi, Ti or k, M, G, T)", truncate(s))
	}
	if n > MaxDiskSize/mult {
		return 0, fmt.Errorf("size %q is above the limit of %d GiB", truncate(s), MaxDiskSize>>30)
	}
	size := n * mult
	const mib = 1 << 20
	if size%mib != 0 {
		size += mib - size%mib
	}
	if size < MinDiskSize {
		return 0, fmt.Errorf("size %q is below the minimum of %d MiB", truncate(s), MinDiskSize>>20)
	}
	if size > MaxDiskSize {
		return 0, fmt.Errorf("size %q is above the limit of %d GiB", truncate(s), MaxDiskSize>>30)
	}
	return size, nil
}

// truncate keeps untrusted values in error messages short.
func truncate(s string) string {
	if len(s) > 32 {
		return s[:32] + "…"
	}
	return s
}

// serialFor is the virtio-blk serial (and hypervisor device ID) of a disk: a kind letter and
// a hash of the container and the disk's name in it, so it is stable, unique in the VM for
// practical purposes, and within virtio-blk's 20 bytes.
func serialFor(kind byte, containerID, name string) string {
	h := sha256.Sum256([]byte(containerID + "\x00" + name))
	return string(kind) + "-" + hex.EncodeToString(h[:])[:14]
}

// isPrivileged reports whether the spec allows every device in its cgroup rules, which CRI
// does for privileged containers (and then lists every host device in linux.devices).
func isPrivileged(spec *specs.Spec) bool {
	if spec.Linux == nil || spec.Linux.Resources == nil {
		return false
	}
	for _, r := range spec.Linux.Resources.Devices {
		if r.Allow && (r.Type == "" || r.Type == "a") && r.Major == nil && r.Minor == nil {
			return true
		}
	}
	return false
}

// hostBlockNode finds the host device node of block device major:minor: /dev/block/<maj>:<min>
// where udev made it, else /dev/<DEVNAME> from sysfs. It checks the node's numbers.
func hostBlockNode(major, minor int64) (string, error) {
	id := fmt.Sprintf("%d:%d", major, minor)
	var candidates []string
	if p, err := filepath.EvalSymlinks("/dev/block/" + id); err == nil {
		candidates = append(candidates, p)
	}
	if b, err := os.ReadFile("/sys/dev/block/" + id + "/uevent"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if name, ok := strings.CutPrefix(line, "DEVNAME="); ok && name != "" && !strings.Contains(name, "..") {
				candidates = append(candidates, filepath.Join("/dev", name))
			}
		}
	}
	for _, p := range candidates {
		if sameBlockDevice(p, major, minor) {
			return p, nil
		}
	}
	return "", fmt.Errorf("no host device node for block device %s (neither /dev/block/%s nor sysfs's DEVNAME names one): %w", id, id, errdefs.ErrNotFound)
}

func sameBlockDevice(p string, major, minor int64) bool {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return false
	}
	return int64(unix.Major(st.Rdev)) == major && int64(unix.Minor(st.Rdev)) == minor
}

// openBlockDevice opens host block device node p (read-only if ro) and checks through the
// descriptor that it is block device major:minor.
func openBlockDevice(p string, major, minor int64, ro bool) (*os.File, error) {
	flag := unix.O_RDWR
	if ro {
		flag = unix.O_RDONLY
	}
	f, err := os.OpenFile(p, flag|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", p, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK ||
		int64(unix.Major(st.Rdev)) != major || int64(unix.Minor(st.Rdev)) != minor {
		_ = f.Close()
		return nil, fmt.Errorf("%s is no longer block device %d:%d: %w", p, major, minor, errdefs.ErrNotFound)
	}
	return f, nil
}

// blockVolumes takes the block devices the CRI asked for (ContainerConfig.Devices, which
// containerd writes into linux.devices with the host's major:minor) out of gspec and returns
// them as disks to hot-plug and device nodes for the agent to make. Their host-numbered cgroup
// rules go too; the agent adds rules with the guest's numbers.
//
// A privileged container also gets every host device in linux.devices; those whose path is
// the same device on the host are not the pod's to take and are left alone (the shim drops
// them), so a privileged container gets the CRI devices whose container path differs from a
// host node of the same device. Character (and other non-block) devices other than a
// privileged container's host devices cannot reach a VM and are an error.
func (s *Share) blockVolumes(containerID string, gspec *specs.Spec) ([]*hypervisor.BlockDevice, []*api.DeviceNode, error) {
	if gspec.Linux == nil || len(gspec.Linux.Devices) == 0 {
		return nil, nil, nil
	}
	privileged := isPrivileged(gspec)
	var (
		keep    []specs.LinuxDevice
		disks   []*hypervisor.BlockDevice
		nodes   []*api.DeviceNode
		removed = map[[2]int64]bool{}
	)
	for _, d := range gspec.Linux.Devices {
		if d.Type != "b" {
			if !privileged {
				return nil, nil, fmt.Errorf("container %s: device %s (type %q, %d:%d) is not a block device: only block devices (volumeMode: Block) can be given to a VM pod; use a non-VM runtime class for host character devices: %w", containerID, d.Path, d.Type, d.Major, d.Minor, errdefs.ErrNotImplemented)
			}
			keep = append(keep, d)
			continue
		}
		if privileged && sameBlockDevice(d.Path, d.Major, d.Minor) {
			keep = append(keep, d) // one of the host's devices: not for the guest
			continue
		}
		host, err := hostBlockNode(d.Major, d.Minor)
		if err != nil {
			closeDevices(disks)
			return nil, nil, fmt.Errorf("container %s: block device %s: %w", containerID, d.Path, err)
		}
		ro := !deviceWritable(gspec, d.Major, d.Minor)
		f, err := openBlockDevice(host, d.Major, d.Minor, ro)
		if err != nil {
			closeDevices(disks)
			return nil, nil, fmt.Errorf("container %s: block device %s: %w", containerID, d.Path, err)
		}
		serial := serialFor('b', containerID, d.Path)
		disks = append(disks, &hypervisor.BlockDevice{
			ID: serial, Serial: serial, File: f, Path: host, Format: "raw",
			ReadOnly: ro, Cache: s.block.Cache, AIO: s.block.AIO,
		})
		n := &api.DeviceNode{Serial: serial, ContainerPath: d.Path}
		if d.FileMode != nil {
			n.FileMode = uint32(d.FileMode.Perm())
		}
		if d.UID != nil {
			n.Uid = *d.UID
		}
		if d.GID != nil {
			n.Gid = *d.GID
		}
		nodes = append(nodes, n)
		removed[[2]int64{d.Major, d.Minor}] = true
	}
	gspec.Linux.Devices = keep
	if r := gspec.Linux.Resources; r != nil && len(removed) > 0 {
		r.Devices = slices.DeleteFunc(r.Devices, func(c specs.LinuxDeviceCgroup) bool {
			return c.Type == "b" && c.Major != nil && c.Minor != nil && removed[[2]int64{*c.Major, *c.Minor}]
		})
	}
	return disks, nodes, nil
}

// deviceWritable reports whether the spec's cgroup rules let the container write block device
// major:minor (CRI's Device.Permissions become the rule's access).
func deviceWritable(spec *specs.Spec, major, minor int64) bool {
	if spec.Linux.Resources == nil {
		return true
	}
	w := true
	for _, c := range spec.Linux.Resources.Devices {
		if c.Type != "b" || c.Major == nil || c.Minor == nil || *c.Major != major || *c.Minor != minor {
			continue
		}
		w = c.Allow && strings.Contains(c.Access, "w")
	}
	return w
}

// diskImage is one disk-image volume of a container.
type diskImage struct {
	volume  string
	key     string // the annotation
	size    int64
	dir     string // the volume's directory on the host
	serial  string
	mounts  []int // indexes into the spec's mounts
	allRO   bool
	guestAt string
	file    *os.File // the image, opened and checked by ensureImage
}

// kubeletContentPlugins are kubelet volume plugins whose directories kubelet itself fills
// (and rewrites); a disk image never replaces them.
var kubeletContentPlugins = []string{"kubernetes.io~configmap", "kubernetes.io~secret", "kubernetes.io~projected", "kubernetes.io~downward-api"}

// podVolume recognises a kubelet volume directory of the pod with UID podUID,
// …/pods/<podUID>/volumes/<plugin>/<name> (or …/<name>/mount, where CSI publishes), and
// returns the volume's name and plugin. Anything else (hostPath, another pod's volume, a
// subPath bind, containerd's own files) is not a pod volume.
func podVolume(src, podUID string) (name, plugin string, ok bool) {
	if podUID == "" {
		return "", "", false
	}
	parts := strings.Split(filepath.Clean(src), "/")
	if n := len(parts); n > 0 && parts[n-1] == "mount" && n >= 6 && parts[n-4] == "volumes" {
		parts = parts[:n-1] // CSI: …/volumes/kubernetes.io~csi/<name>/mount
	}
	n := len(parts)
	if n < 5 || parts[n-5] != "pods" || parts[n-4] != podUID || parts[n-3] != "volumes" {
		return "", "", false
	}
	return parts[n-1], parts[n-2], true
}

// diskImages finds the bind mounts of gspec that pod annotations podvm.io/disk.<volume> turn
// into disk images (see the package doc for the matching rule), creates missing images, and
// returns them. Annotations the node config does not allow are ignored.
func (s *Share) diskImages(ctx context.Context, containerID string, gspec *specs.Spec) ([]*diskImage, error) {
	byVolume, err := s.diskAnnotations(ctx, containerID, gspec.Annotations)
	if err != nil || len(byVolume) == 0 {
		return nil, err
	}
	out, err := matchDiskMounts(containerID, gspec, byVolume)
	if err != nil {
		return nil, err
	}
	if err := s.openImages(ctx, containerID, gspec.Annotations, out); err != nil {
		for _, d := range out {
			if d.file != nil {
				_ = d.file.Close()
			}
		}
		return nil, err
	}
	return out, nil
}

// diskAnnotations parses the allowed podvm.io/disk.<volume> annotations, by volume name.
func (s *Share) diskAnnotations(ctx context.Context, containerID string, ann map[string]string) (map[string]*diskImage, error) {
	var keys []string
	for k := range ann {
		if strings.HasPrefix(k, DiskAnnotationPrefix) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	byVolume := map[string]*diskImage{}
	for _, k := range keys {
		if s.block.Allowed == nil || !s.block.Allowed(k) {
			log.G(ctx).WithField("annotation", k).Warn("disk-image annotation ignored: not allowed by annotations.allowed in the node config (add \"disk.*\")")
			continue
		}
		vol := strings.TrimPrefix(k, DiskAnnotationPrefix)
		if vol == "" || vol == "." || vol == ".." || strings.ContainsAny(vol, "/\x00") {
			return nil, fmt.Errorf("container %s: annotation %s: %q is not a volume name: %w", containerID, truncate(k), truncate(vol), errdefs.ErrInvalidArgument)
		}
		size, err := ParseDiskSize(ann[k])
		if err != nil {
			return nil, fmt.Errorf("container %s: annotation %s (disk image of volume %s): %v; fix the pod's annotation: %w", containerID, k, vol, err, errdefs.ErrInvalidArgument)
		}
		byVolume[vol] = &diskImage{volume: vol, key: k, size: size, allRO: true}
	}
	return byVolume, nil
}

// matchDiskMounts finds the bind mounts of gspec whose source is this pod's own directory of
// an annotated volume, and returns the disk images in the order they are first mounted.
func matchDiskMounts(containerID string, gspec *specs.Spec, byVolume map[string]*diskImage) ([]*diskImage, error) {
	podUID := gspec.Annotations[PodUIDAnnotation]
	if podUID == "" {
		return nil, fmt.Errorf("container %s: disk-image annotations need the pod's UID (annotation %s, set by containerd's CRI) to find the pod's own volumes; run the pod through the CRI: %w", containerID, PodUIDAnnotation, errdefs.ErrInvalidArgument)
	}
	var out []*diskImage
	for i := range gspec.Mounts {
		m := &gspec.Mounts[i]
		if !isBind(m) || isPodShm(m) {
			continue
		}
		name, plugin, ok := podVolume(m.Source, podUID)
		d := byVolume[name]
		if !ok || d == nil {
			if v, sub := subPathVolume(m.Source); sub {
				if d, ok := byVolume[v]; ok {
					return nil, fmt.Errorf("container %s: mount %s uses a subPath of volume %s, which annotation %s makes a disk image: subPath is not supported for disk-image volumes; mount the whole volume: %w", containerID, m.Destination, v, d.key, errdefs.ErrNotImplemented)
				}
			}
			continue
		}
		if slices.Contains(kubeletContentPlugins, plugin) {
			return nil, fmt.Errorf("container %s: annotation %s names volume %s, a %s volume that kubelet fills; only emptyDir and persistent volumes can be disk images: %w", containerID, d.key, name, strings.TrimPrefix(plugin, "kubernetes.io~"), errdefs.ErrInvalidArgument)
		}
		src := filepath.Clean(m.Source)
		if d.dir != "" && d.dir != src {
			return nil, fmt.Errorf("container %s: annotation %s matches two different volumes, %s and %s; rename one of them: %w", containerID, d.key, d.dir, src, errdefs.ErrInvalidArgument)
		}
		if d.dir == "" {
			out = append(out, d)
		}
		d.dir = src
		d.mounts = append(d.mounts, i)
		if !isReadOnly(m.Options) {
			d.allRO = false
		}
	}
	return out, nil
}

// openImages opens (making them where missing) the images of ds, within the node's size cap.
func (s *Share) openImages(ctx context.Context, containerID string, ann map[string]string, ds []*diskImage) error {
	maxSize := s.block.MaxDiskSize
	if maxSize <= 0 {
		maxSize = DefaultMaxDiskSize
	}
	for _, d := range ds {
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.size > maxSize {
			return fmt.Errorf("container %s: annotation %s=%s asks for more than this node allows (max_disk_size %d MiB in the node config's [block]); ask for less: %w", containerID, d.key, truncate(ann[d.key]), maxSize>>20, errdefs.ErrInvalidArgument)
		}
		if err := s.ensureImage(ctx, d); err != nil {
			return fmt.Errorf("container %s: disk image of volume %s (annotation %s=%s): %w", containerID, d.volume, d.key, truncate(ann[d.key]), err)
		}
		d.serial = serialFor('d', containerID, d.volume)
		d.guestAt = filepath.Join(GuestDiskDir, d.serial)
	}
	return nil
}

// subPathVolume recognises kubelet's subPath bind sources,
// …/pods/<uid>/volume-subpaths/<volume>/<container>/<index>, and returns the volume.
func subPathVolume(src string) (string, bool) {
	parts := strings.Split(filepath.Clean(src), "/")
	for i := len(parts) - 4; i >= 0; i-- {
		if parts[i] == "volume-subpaths" {
			return parts[i+1], true
		}
	}
	return "", false
}

// ensureImage opens d's image (creating it, sparse and formatted ext4, if it is missing and
// some mount of it is writable) and checks it through the descriptor: a regular file, on
// the volume directory's filesystem, with one link, holding ext4. Nothing is done by path
// past the volume directory, so a symlink or hard link planted in the volume (by a pod that
// shares it) is refused rather than followed.
func (s *Share) ensureImage(ctx context.Context, d *diskImage) error {
	// The directory itself is kubelet's and never a symlink: one there is not the pod volume
	// the path names.
	dir, err := os.OpenFile(d.dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("volume directory %s: %w", d.dir, err)
	}
	defer func() { _ = dir.Close() }()
	var dst unix.Stat_t
	if err := unix.Fstat(int(dir.Fd()), &dst); err != nil {
		return fmt.Errorf("volume directory %s: %w", d.dir, err)
	}
	img := filepath.Join(d.dir, DiskImageName)
	f, err := openImage(int(dir.Fd()), DiskImageName, dst.Dev, d.allRO)
	switch {
	case errors.Is(err, fs.ErrNotExist) && d.allRO:
		return fmt.Errorf("%s does not exist and every mount of the volume is read-only, so no image is made; mount it read-write once to create it: %w", img, errdefs.ErrNotFound)
	case errors.Is(err, fs.ErrNotExist):
		f, err = s.createImage(ctx, int(dir.Fd()), dst.Dev, d.size)
		if err != nil {
			return err
		}
	case err != nil:
		return fmt.Errorf("%s: %w", img, err)
	}
	if err := checkExt4(f, img); err != nil {
		_ = f.Close()
		return err
	}
	if fi, err := f.Stat(); err == nil && fi.Size() != d.size {
		log.G(ctx).WithFields(log.Fields{"image": img, "size": fi.Size(), "annotation": d.size}).
			Info("disk image exists with another size; using it as it is (images are never resized)")
	}
	d.file = f
	return nil
}

// openImage opens name in dirfd without following a symlink and checks, before opening it
// for I/O, that it is a regular file on filesystem dev with a single link.
func openImage(dirfd int, name string, dev uint64, ro bool) (*os.File, error) {
	pfd, err := unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, fs.ErrNotExist
	}
	if err != nil {
		return nil, err
	}
	defer func() { _ = unix.Close(pfd) }()
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, err
	}
	switch {
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return nil, fmt.Errorf("is a symbolic link, not an image; remove it to have a new image made: %w", errdefs.ErrInvalidArgument)
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return nil, fmt.Errorf("is not a regular file; remove it to have a new image made: %w", errdefs.ErrInvalidArgument)
	case st.Dev != dev:
		return nil, fmt.Errorf("is on another filesystem than its volume: %w", errdefs.ErrInvalidArgument)
	case st.Nlink != 1:
		return nil, fmt.Errorf("has %d hard links; an image must have one (remove the others): %w", st.Nlink, errdefs.ErrInvalidArgument)
	}
	flag := unix.O_RDWR
	if ro {
		flag = unix.O_RDONLY
	}
	// Reopen the very inode checked above through its descriptor's magic link.
	return os.OpenFile(procFd(pfd), flag|unix.O_CLOEXEC, 0)
}

// ext4 superblock: 1024 bytes in, magic 0xEF53 at offset 56 of it.
const (
	superblockOffset = 1024
	ext4MagicOffset  = superblockOffset + 56
	ext4Magic        = 0xEF53
)

// checkExt4 checks that the image is readable and starts with an ext2/3/4 superblock.
func checkExt4(f *os.File, img string) error {
	var b [2]byte
	if _, err := f.ReadAt(b[:], ext4MagicOffset); err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%s is too short to hold a filesystem (corrupt or truncated); restore it from a backup or remove it to have a new, empty image made: %w", img, errdefs.ErrInvalidArgument)
		}
		return fmt.Errorf("reading the image: %w", err)
	}
	if binary.LittleEndian.Uint16(b[:]) != ext4Magic {
		return fmt.Errorf("%s holds no ext4 filesystem (corrupt, or not made by podvm); restore it from a backup or remove it to have a new, empty image made: %w", img, errdefs.ErrInvalidArgument)
	}
	return nil
}

// createImage makes a sparse raw image of size bytes in dirfd, formats it ext4 through its
// descriptor, and only then gives it its name (without replacing anything). On error the
// half-made image is removed.
func (s *Share) createImage(ctx context.Context, dirfd int, dev uint64, size int64) (_ *os.File, retErr error) {
	tmp := DiskImageName + ".tmp"
	fd, err := unix.Openat(dirfd, tmp, unix.O_CREAT|unix.O_EXCL|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if errors.Is(err, unix.EEXIST) {
		// A previous attempt died half-way; nothing refers to the temporary file.
		_ = unix.Unlinkat(dirfd, tmp, 0)
		fd, err = unix.Openat(dirfd, tmp, unix.O_CREAT|unix.O_EXCL|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	}
	if err != nil {
		return nil, fmt.Errorf("creating the image: %w", err)
	}
	f := os.NewFile(uintptr(fd), tmp)
	named := false
	defer func() {
		if retErr != nil {
			_ = f.Close()
			if !named {
				_ = unix.Unlinkat(dirfd, tmp, 0)
			}
		}
	}()
	if err := f.Truncate(size); err != nil {
		return nil, fmt.Errorf("sizing the image: %w", err)
	}
	mkfs := s.block.Mkfs
	if mkfs == "" {
		mkfs = "mkfs.ext4"
	}
	// Lazy init and no discard keep formatting a sparse file fast; the guest finishes the
	// inode tables in the background. mkfs gets the descriptor, not a name.
	cmd := exec.CommandContext(ctx, mkfs, "-F", "-q", "-m", "0",
		"-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", "/dev/fd/3")
	cmd.ExtraFiles = []*os.File{f}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("formatting the image with %s: %w: %s", mkfs, err, strings.TrimSpace(out.String()))
	}
	if err := unix.Renameat2(dirfd, tmp, dirfd, DiskImageName, unix.RENAME_NOREPLACE); err != nil {
		return nil, fmt.Errorf("naming the image: %w", err)
	}
	named = true
	var st, nst unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if err := unix.Fstatat(dirfd, DiskImageName, &nst, unix.AT_SYMLINK_NOFOLLOW); err != nil || nst.Ino != st.Ino || nst.Dev != dev {
		return nil, fmt.Errorf("the new image was replaced while it was being named: %w", errdefs.ErrAborted)
	}
	return f, nil
}

// attachDisks adds the disk images to the attachment: one hot-plugged disk and one guest mount
// each, and the spec's mounts of the volume bind the guest mount point.
func (s *Share) attachDisks(att *Attachment, disks []*diskImage) {
	for _, d := range disks {
		att.BlockDevices = append(att.BlockDevices, &hypervisor.BlockDevice{
			ID: d.serial, Serial: d.serial, File: d.file, Path: filepath.Join(d.dir, DiskImageName), Format: "raw",
			ReadOnly: d.allRO, Cache: s.block.Cache, AIO: s.block.AIO,
		})
		opts := []string{"rw"}
		if d.allRO {
			opts = []string{"ro", "noload"}
		}
		att.BlockMounts = append(att.BlockMounts, &api.BlockMount{Serial: d.serial, MountPoint: d.guestAt, FsType: "ext4", Options: opts})
		for _, i := range d.mounts {
			att.Spec.Mounts[i].Source = d.guestAt
		}
	}
}
