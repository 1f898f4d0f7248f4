package rootfs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// GuestShmDir is the guest tmpfs that becomes /dev/shm of every container of the pod (see
// the package doc). The agent mounts it at boot.
const GuestShmDir = "/dev/shm"

// Names inside a container's directory of the share.
const (
	rootfsDir = "rootfs"
	mountsDir = "mounts"
)

// Provider makes a container's filesystems visible to the guest. *Share is the virtio-fs
// implementation; Fake is for tests of its callers.
type Provider interface {
	// Prepare makes the filesystems of one container visible to the guest and returns the
	// spec rewritten for the guest. On error nothing of it is left behind.
	Prepare(ctx context.Context, containerID, bundle string, spec *specs.Spec, rootfs []mount.Mount) (*Attachment, error)
	// Release undoes Prepare for one container; releasing an unknown container is a no-op.
	Release(ctx context.Context, containerID string) error
}

// Attachment is what the guest needs to create one container.
type Attachment struct {
	// Spec is the guest's spec: Root.Path is <guestDir>/<id>/rootfs and bind mount sources
	// are guest paths. The caller's spec is not modified.
	Spec *specs.Spec
	// BlockDevices are to be hot-plugged before the container is created (block volumes,
	// disk images), and unplugged when it is released.
	BlockDevices []*hypervisor.BlockDevice
	// BlockMounts are the disks the guest mounts before creating the container.
	BlockMounts []*api.BlockMount
	// Devices are block device nodes to create in the container from hot-plugged disks.
	Devices []*api.DeviceNode
}

// Share is what one sandbox shares with its guest through the virtio-fs directory: hostDir
// on the host, seen as guestDir in the guest. It is safe for concurrent use by different
// containers and keeps no state of its own (the mount table is the state).
type Share struct {
	hostDir  string
	guestDir string
	block    BlockOptions
}

var _ Provider = (*Share)(nil)

// NewShare returns the share of a sandbox whose virtio-fs directory is hostDir on the host
// and guestDir (normally agent.GuestSharedDir) in the guest.
func NewShare(hostDir, guestDir string) *Share {
	return &Share{hostDir: filepath.Clean(hostDir), guestDir: filepath.Clean(guestDir)}
}

// Prepare makes the container's filesystems visible to the guest and returns the OCI spec
// rewritten for the guest.
//
// The rootfs: containerd's rootfs mounts (overlay snapshots, or a bind) are mounted at
// hostDir/<id>/rootfs; when rootfs is empty, spec.Root.Path (relative to bundle unless
// absolute) is bind-mounted there instead.
//
// Volumes: the source of every bind mount of the spec (files and directories: /etc/hosts,
// /etc/resolv.conf, /etc/hostname, /dev/termination-log, and kubelet's volumes) is bound
// under hostDir/<id>/mounts/ (symlinks resolved on the host), read-only ones read-only, and
// the spec's source points at the guest path. The pod's /dev/shm becomes GuestShmDir. Other
// mounts are left to the guest. On error everything done so far is undone.
func (s *Share) Prepare(ctx context.Context, containerID, bundle string, spec *specs.Spec, rootfs []mount.Mount) (_ *Attachment, retErr error) {
	if err := validID(containerID); err != nil {
		return nil, err
	}
	if spec == nil {
		return nil, fmt.Errorf("container %s: no OCI spec: %w", containerID, errdefs.ErrInvalidArgument)
	}
	if len(rootfs) == 0 && (spec.Root == nil || spec.Root.Path == "") {
		return nil, fmt.Errorf("container %s: no rootfs mounts from containerd and no root.path in the spec: %w", containerID, errdefs.ErrInvalidArgument)
	}
	gspec, err := copySpec(spec)
	if err != nil {
		return nil, fmt.Errorf("container %s: copying the OCI spec: %w", containerID, err)
	}
	// Block volumes and disk images first: they only check and rewrite the spec (and make a
	// missing image), so a bad request fails before anything is mounted.
	disks, nodes, err := s.blockVolumes(containerID, gspec)
	if err != nil {
		return nil, err
	}
	images, err := s.diskImages(ctx, containerID, gspec)
	if err != nil {
		return nil, err
	}
	onDisk := map[int]bool{}
	for _, d := range images {
		for _, i := range d.mounts {
			onDisk[i] = true
		}
	}

	hostDir, err := filepath.EvalSymlinks(s.hostDir)
	if err != nil {
		return nil, fmt.Errorf("shared dir %s of the sandbox: %w (was the VM started?)", s.hostDir, err)
	}
	ctrDir := filepath.Join(hostDir, containerID)
	if err := os.Mkdir(ctrDir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("container %s: %s exists: %w (release the container first)", containerID, ctrDir, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("container %s: creating its shared dir: %w", containerID, err)
	}
	defer func() {
		if retErr != nil {
			if err := release(ctrDir); err != nil {
				log.G(ctx).WithError(err).WithField("container", containerID).Warn("undoing a failed rootfs prepare")
			}
		}
	}()

	// The root filesystem.
	root := filepath.Join(ctrDir, rootfsDir)
	if err := os.Mkdir(root, 0o755); err != nil {
		return nil, fmt.Errorf("container %s: %w", containerID, err)
	}
	if len(rootfs) > 0 {
		if err := mount.All(rootfs, root); err != nil {
			return nil, fmt.Errorf("container %s: mounting its rootfs (%s) at %s: %w", containerID, describeMounts(rootfs), root, err)
		}
	} else {
		src := spec.Root.Path
		if !filepath.IsAbs(src) {
			src = filepath.Join(bundle, src)
		}
		resolved, err := bindSource(containerID, "/", src)
		if err != nil {
			return nil, err
		}
		if !resolved.IsDir() {
			return nil, fmt.Errorf("container %s: root.path %s is not a directory: %w", containerID, src, errdefs.ErrInvalidArgument)
		}
		if err := bind(resolved.path, root, false); err != nil {
			return nil, fmt.Errorf("container %s: binding its rootfs %s: %w", containerID, src, err)
		}
	}
	if gspec.Root == nil {
		gspec.Root = &specs.Root{}
	}
	gspec.Root.Path = filepath.Join(s.guestDir, containerID, rootfsDir)

	// The bind mounts.
	if err := os.Mkdir(filepath.Join(ctrDir, mountsDir), 0o755); err != nil {
		return nil, fmt.Errorf("container %s: %w", containerID, err)
	}
	for i := range gspec.Mounts {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("container %s: preparing its mounts: %w", containerID, err)
		}
		m := &gspec.Mounts[i]
		if !isBind(m) || onDisk[i] {
			continue
		}
		if isPodShm(m) {
			m.Source = GuestShmDir
			continue
		}
		src, err := bindSource(containerID, m.Destination, m.Source)
		if err != nil {
			return nil, err
		}
		if within(hostDir, src.path) {
			return nil, fmt.Errorf("container %s: source %s of mount %s contains the sandbox's shared dir %s; sharing it would share the share with itself (mount a narrower host path): %w", containerID, m.Source, m.Destination, s.hostDir, errdefs.ErrNotImplemented)
		}
		name := mountName(i, m.Destination)
		target := filepath.Join(ctrDir, mountsDir, name)
		if err := makeTarget(target, src.IsDir()); err != nil {
			return nil, fmt.Errorf("container %s: mount %s: %w", containerID, m.Destination, err)
		}
		if err := bind(src.path, target, isReadOnly(m.Options)); err != nil {
			return nil, fmt.Errorf("container %s: sharing %s (for %s) with the guest: %w", containerID, src.path, m.Destination, err)
		}
		m.Source = filepath.Join(s.guestDir, containerID, mountsDir, name)
	}
	att := &Attachment{Spec: gspec, BlockDevices: disks, Devices: nodes}
	s.attachDisks(att, images)
	return att, nil
}

// Release undoes Prepare for one container: it detaches every mount under the container's
// directory of the share, deepest first, and removes the directory. It is idempotent.
func (s *Share) Release(ctx context.Context, containerID string) error {
	if err := validID(containerID); err != nil {
		return err
	}
	hostDir, err := filepath.EvalSymlinks(s.hostDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("shared dir %s of the sandbox: %w", s.hostDir, err)
	}
	if err := release(filepath.Join(hostDir, containerID)); err != nil {
		return fmt.Errorf("container %s: %w", containerID, err)
	}
	return nil
}

// Cleanup unmounts everything below hostDir and removes what is in it, without any state
// but the mount table: for `shim delete` after the shim died. hostDir itself is removed
// too unless it is still a mount point (the hypervisor's shared bind of it, which its own
// cleanup undoes). It is idempotent.
func Cleanup(ctx context.Context, hostDir string) error {
	dir, err := filepath.EvalSymlinks(hostDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("shared dir %s: %w", hostDir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("cleaning up shared dir: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if err := release(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleaning up shared dir %s: %w", hostDir, err)
	}
	self, err := isMountPoint(dir)
	if err != nil {
		return err
	}
	if !self {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("removing shared dir: %w", err)
		}
	}
	log.G(ctx).WithField("dir", hostDir).Debug("rootfs share cleaned up")
	return nil
}

// validID refuses container IDs that are not a single path element.
func validID(id string) error {
	if id == "" || id == "." || id == ".." || filepath.Base(id) != id || id != filepath.Clean(id) {
		return fmt.Errorf("container id %q: must be a single path element: %w", id, errdefs.ErrInvalidArgument)
	}
	return nil
}

func copySpec(spec *specs.Spec) (*specs.Spec, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	var c specs.Spec
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, err
	}
	return &c, nil
}

// isBind reports whether an OCI mount is a bind mount (type "bind", or options naming one).
func isBind(m *specs.Mount) bool {
	if m.Type == "bind" || m.Type == "rbind" {
		return true
	}
	if m.Type != "" && m.Type != "none" {
		return false
	}
	return slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// isPodShm reports whether m is the pod's /dev/shm that CRI binds in: the sandbox's shm
// tmpfs (…/sandboxes/<id>/shm), or the host's /dev/shm for a pod with IPC=Node.
func isPodShm(m *specs.Mount) bool {
	if filepath.Clean(m.Destination) != "/dev/shm" {
		return false
	}
	src := filepath.Clean(m.Source)
	return src == "/dev/shm" ||
		(filepath.Base(src) == "shm" && filepath.Base(filepath.Dir(filepath.Dir(src))) == "sandboxes")
}

func isReadOnly(opts []string) bool {
	ro := false
	for _, o := range opts {
		switch o {
		case "ro", "rro":
			ro = true
		case "rw":
			ro = false
		}
	}
	return ro
}

// source is a resolved bind source.
type source struct {
	path string
	mode fs.FileMode
}

func (s source) IsDir() bool { return s.mode.IsDir() }

// bindSource resolves a bind source on the host and checks that virtio-fs can share it.
func bindSource(containerID, dest, src string) (source, error) {
	if src == "" {
		return source{}, fmt.Errorf("container %s: bind mount %s has no source: %w", containerID, dest, errdefs.ErrInvalidArgument)
	}
	resolved, err := filepath.EvalSymlinks(src)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return source{}, fmt.Errorf("container %s: source %s of mount %s does not exist (kubelet/containerd create it; was the volume set up?): %w", containerID, src, dest, errdefs.ErrNotFound)
		}
		return source{}, fmt.Errorf("container %s: resolving source %s of mount %s: %w", containerID, src, dest, err)
	}
	fi, err := os.Stat(resolved)
	if err != nil {
		return source{}, fmt.Errorf("container %s: source %s of mount %s: %w", containerID, src, dest, err)
	}
	mode := fi.Mode()
	switch {
	case mode.IsDir(), mode.IsRegular():
		return source{path: resolved, mode: mode}, nil
	case mode&fs.ModeSocket != 0:
		return source{}, fmt.Errorf("container %s: source %s of mount %s is a unix socket: a host socket cannot be reached from a VM pod; use a TCP service or run this pod with a non-VM runtime class: %w", containerID, src, dest, errdefs.ErrNotImplemented)
	case mode&fs.ModeDevice != 0:
		return source{}, fmt.Errorf("container %s: source %s of mount %s is a device: host devices are not shared with VM pods (not supported); use a non-VM runtime class: %w", containerID, src, dest, errdefs.ErrNotImplemented)
	default:
		return source{}, fmt.Errorf("container %s: source %s of mount %s is a %s, which virtio-fs cannot share (only files and directories; not supported): %w", containerID, src, dest, mode.Type(), errdefs.ErrNotImplemented)
	}
}

var unsafeName = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// mountName names a bind in the container's mounts dir: its index in the spec (unique) and
// the destination's base name (for people reading the mount table).
func mountName(i int, dest string) string {
	base := unsafeName.ReplaceAllString(filepath.Base(dest), "_")
	if base == "" || base == "." || base == ".." || base == "/" || base == "_" {
		base = "root"
	}
	if len(base) > 64 {
		base = base[:64]
	}
	return strconv.Itoa(i) + "-" + base
}

// makeTarget creates the mount point of a bind: a directory, or an empty file for a file.
func makeTarget(target string, dir bool) error {
	if dir {
		return os.Mkdir(target, 0o755)
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// bind bind-mounts src (with everything mounted below it) on target, read-only if ro: the
// read-only flag is applied recursively where the kernel can (mount_setattr, Linux 5.12),
// else to the top mount.
func bind(src, target string, ro bool) error {
	if err := unix.Mount(src, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", src, target, err)
	}
	if !ro {
		return nil
	}
	err := unix.MountSetattr(-1, target, unix.AT_RECURSIVE, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY})
	if errors.Is(err, unix.ENOSYS) {
		err = unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, "")
	}
	if err != nil {
		_ = mount.UnmountRecursive(target, unix.MNT_DETACH)
		return fmt.Errorf("making %s read-only: %w", target, err)
	}
	return nil
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

func describeMounts(ms []mount.Mount) string {
	s := ""
	for i, m := range ms {
		if i > 0 {
			s += ", "
		}
		s += m.Type + " " + m.Source
	}
	return s
}
