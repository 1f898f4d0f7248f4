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

// Names inside the sandbox's state dir and inside a container's directory of the share.
const (
	// StagingDir is the shim's own, writable side of the share: a small tmpfs that only the
	// shim writes, never exported as it is.
	StagingDir = "staging"
	// ExportDir is the guest's side: a read-only bind of StagingDir that virtiofsd exports.
	// Mounts made under StagingDir appear here (and in virtiofsd) by propagation, with their
	// own flags: the guest can write a container's rootfs and its writable volumes, and
	// nothing else, in particular no name in the share's directories.
	// Both are mounted only in the share's own mount namespace (mountns.go); in the node's
	// they are empty directories.
	ExportDir = "shared"
	// MountDir is where, in the node's namespace, containerd's rootfs mounts of a container
	// are made for a moment, to be cloned into the share (mnt/<container-id>).
	MountDir = "mnt"

	rootfsDir = "rootfs"
	mountsDir = "mounts"
)

// stagingOptions bound the staging tmpfs: it only ever holds directories and empty mount
// points, so a guest that somehow wrote to it could not fill the node's /run.
const stagingOptions = "size=1m,nr_inodes=16384,mode=0755"

// Provider makes a container's filesystems visible to the guest. *Share is the virtio-fs
// implementation; Fake is for tests of its callers.
type Provider interface {
	// ExportDir is the host directory the VM exports to the guest (virtio-fs), a path in
	// the namespace InMountNS runs in.
	ExportDir() string
	// InMountNS runs f on a thread in the mount namespace ExportDir is mounted in (the
	// share's own); a process started by f is born there. virtiofsd must be.
	InMountNS(f func() error) error
	// Prepare makes the filesystems of one container visible to the guest and returns the
	// spec rewritten for the guest. On error nothing of it is left behind.
	Prepare(ctx context.Context, containerID, bundle string, spec *specs.Spec, rootfs []mount.Mount) (*Attachment, error)
	// Release undoes Prepare for one container; releasing an unknown container is a no-op.
	Release(ctx context.Context, containerID string) error
	// Close detaches what the share mounted and ends its mount namespace (once the
	// processes started in it are gone too); Cleanup removes the directories.
	Close() error
}

// Attachment is what the guest needs to create one container.
type Attachment struct {
	// Spec is the guest's spec: Root.Path is <guestDir>/<id>/rootfs and bind mount sources
	// are guest paths. The caller's spec is not modified.
	Spec *specs.Spec
	// BlockDevices are to be hot-plugged before the container is created (block volumes,
	// disk images), and unplugged when it is released. Their Files are open: Close them
	// once they are plugged (or not).
	BlockDevices []*hypervisor.BlockDevice
	// BlockMounts are the disks the guest mounts before creating the container.
	BlockMounts []*api.BlockMount
	// Devices are block device nodes to create in the container from hot-plugged disks.
	Devices []*api.DeviceNode
	// PodTmpfs are the memory-backed emptyDirs the container uses: tmpfs in the guest, of the
	// size kubelet gave the host's (which stays unused).
	PodTmpfs []*api.PodTmpfs
}

// Close closes the block devices' files.
func (a *Attachment) Close() {
	if a == nil {
		return
	}
	closeDevices(a.BlockDevices)
}

func closeDevices(ds []*hypervisor.BlockDevice) {
	for _, d := range ds {
		if d.File != nil {
			_ = d.File.Close()
		}
	}
}

// Share is what one sandbox shares with its guest through virtio-fs: a small tmpfs at
// <stateDir>/staging that only the shim writes, exported read-only as <stateDir>/shared and
// seen as guestDir in the guest, both mounted in a mount namespace of the share's own
// (mountns.go). All its work under staging goes through the descriptor of that tmpfs it
// opened when it mounted it (see fsat.go). It is safe for concurrent use by different
// containers and keeps no other state (the mount table is the state).
type Share struct {
	stateDir string // real path
	guestDir string
	block    BlockOptions

	ns     *mountNS
	root   *os.File // O_PATH descriptor of the staging tmpfs's root
	dev    uint64   // its device, the only one removals may touch
	mnt    *os.File // O_PATH descriptor of <stateDir>/mnt, in the node's namespace
	mntDev uint64   // its device (the state dir's)
}

var _ Provider = (*Share)(nil)

// CreateShare sets up the share of a sandbox in its state dir (which the shim owns and no
// guest can write): a mount namespace of its own and in it the staging tmpfs, a shared mount
// so what is mounted in it later propagates to virtiofsd, and its read-only, nosuid, nodev,
// noexec export. guestDir is where the guest mounts it (normally agent.GuestSharedDir). On
// error nothing is left.
func CreateShare(ctx context.Context, stateDir, guestDir string) (_ *Share, retErr error) {
	dir, err := filepath.EvalSymlinks(stateDir)
	if err != nil {
		return nil, fmt.Errorf("state dir %s: %w", stateDir, err)
	}
	for _, d := range []string{StagingDir, ExportDir, MountDir} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("creating the sandbox's share: %w", err)
		}
	}
	s := &Share{stateDir: dir, guestDir: filepath.Clean(guestDir)}
	defer func() {
		if retErr != nil {
			s.closeFiles()
			if s.ns != nil {
				s.ns.close() // its mounts go with it
			}
			if err := Cleanup(context.WithoutCancel(ctx), dir); err != nil {
				log.G(ctx).WithError(err).Warn("undoing a failed share setup")
			}
		}
	}()
	if s.mnt, s.mntDev, err = openDir(filepath.Join(dir, MountDir)); err != nil {
		return nil, fmt.Errorf("opening the share's mount dir: %w", err)
	}
	if s.ns, err = newMountNS(); err != nil {
		return nil, err
	}
	if err := s.ns.run(func() error {
		var err error
		s.root, s.dev, err = mountShare(filepath.Join(dir, StagingDir), filepath.Join(dir, ExportDir))
		return err
	}); err != nil {
		return nil, err
	}
	return s, nil
}

// mountShare mounts the staging tmpfs and its export, in the calling thread's namespace, and
// opens the tmpfs.
func mountShare(staging, export string) (*os.File, uint64, error) {
	if err := unix.Mount("podvm-share", staging, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, stagingOptions); err != nil {
		return nil, 0, fmt.Errorf("mounting the share's tmpfs on %s: %w", staging, err)
	}
	// Its own peer group: shared with its export (and virtiofsd's slave copy), nothing else.
	for _, flag := range []uintptr{unix.MS_PRIVATE, unix.MS_SHARED} {
		if err := unix.Mount("", staging, "", flag, ""); err != nil {
			return nil, 0, fmt.Errorf("setting propagation of %s: %w", staging, err)
		}
	}
	if err := unix.Mount(staging, export, "", unix.MS_BIND, ""); err != nil {
		return nil, 0, fmt.Errorf("binding %s on %s: %w", staging, export, err)
	}
	if err := unix.Mount("", export, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return nil, 0, fmt.Errorf("making %s read-only: %w", export, err)
	}
	root, dev, err := openDir(staging)
	if err != nil {
		return nil, 0, fmt.Errorf("opening the share: %w", err)
	}
	return root, dev, nil
}

// openDir opens a directory the shim made O_PATH, and its device.
func openDir(path string) (*os.File, uint64, error) {
	f, err := os.OpenFile(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, err
	}
	st, err := fstatFd(int(f.Fd()))
	if err != nil {
		_ = f.Close()
		return nil, 0, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	return f, st.Dev, nil
}

// ExportDir implements Provider.
func (s *Share) ExportDir() string { return filepath.Join(s.stateDir, ExportDir) }

// InMountNS implements Provider.
func (s *Share) InMountNS(f func() error) error { return s.ns.run(f) }

// Close implements Provider. It is idempotent.
func (s *Share) Close() error {
	var errs []error
	err := s.ns.run(func() error {
		fd, err := unix.Open(s.stateDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("state dir %s: %w", s.stateDir, err)
		}
		defer func() { _ = unix.Close(fd) }()
		for _, name := range []string{StagingDir, ExportDir} {
			syncOverlays(fd, s.stateDir, name)
			if err := detachAll(fd, s.stateDir, name); err != nil {
				errs = append(errs, err)
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, errNSClosed) {
		errs = append(errs, err)
	}
	s.ns.close()
	s.closeFiles()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("closing the share in %s: %w", s.stateDir, err)
	}
	return nil
}

func (s *Share) closeFiles() {
	for _, f := range []**os.File{&s.root, &s.mnt} {
		if *f != nil {
			_ = (*f).Close()
			*f = nil
		}
	}
}

func (s *Share) rootfd() int { return int(s.root.Fd()) }

// Prepare makes the container's filesystems visible to the guest and returns the OCI spec
// rewritten for the guest.
//
// The rootfs: containerd's rootfs mounts (overlay snapshots, or a bind) are mounted at
// staging/<id>/rootfs; when rootfs is empty, spec.Root.Path (relative to bundle unless
// absolute) is bind-mounted there instead.
//
// Volumes: the source of every bind mount of the spec (files and directories: /etc/hosts,
// /etc/resolv.conf, /etc/hostname, /dev/termination-log, and kubelet's volumes) is opened on
// the host (symlinks resolved, as runc does) and that very tree is bound under
// staging/<id>/mounts/, nosuid and nodev, read-only ones read-only; the spec's source points
// at the guest path. The pod's /dev/shm becomes GuestShmDir. Other mounts are left to the
// guest. On error everything done so far is undone.
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
	att, onDisk, err := s.prepareDisks(ctx, containerID, gspec)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			att.Close()
		}
	}()

	ctr, err := mkdirOpen(s.rootfd(), containerID)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("container %s: its shared dir exists: %w (release the container first)", containerID, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("container %s: creating its shared dir: %w", containerID, err)
	}
	defer func() { _ = unix.Close(ctr) }()
	defer func() {
		if retErr != nil {
			if err := s.release(containerID); err != nil {
				log.G(ctx).WithError(err).WithField("container", containerID).Warn("undoing a failed rootfs prepare")
			}
		}
	}()

	// The volumes first: their sources say which mount points are files.
	tmpfs, bound, err := s.bindVolumes(ctx, containerID, ctr, gspec, onDisk)
	if err != nil {
		return nil, err
	}
	if err := s.mountRootfs(containerID, ctr, bundle, spec, rootfs, mountPoints(gspec.Mounts, bound)); err != nil {
		return nil, err
	}
	att.PodTmpfs = tmpfs
	if gspec.Root == nil {
		gspec.Root = &specs.Root{}
	}
	gspec.Root.Path = filepath.Join(s.guestDir, containerID, rootfsDir)
	return att, nil
}

// prepareDisks takes the block volumes and disk images out of gspec: an Attachment with the
// disks to plug (their files open) and gspec, and the indexes of the mounts now on a disk.
func (s *Share) prepareDisks(ctx context.Context, containerID string, gspec *specs.Spec) (*Attachment, map[int]bool, error) {
	disks, nodes, err := s.blockVolumes(containerID, gspec)
	if err != nil {
		return nil, nil, err
	}
	images, err := s.diskImages(ctx, containerID, gspec)
	if err != nil {
		closeDevices(disks)
		return nil, nil, err
	}
	onDisk := map[int]bool{}
	for _, d := range images {
		for _, i := range d.mounts {
			onDisk[i] = true
		}
	}
	att := &Attachment{Spec: gspec, BlockDevices: disks, Devices: nodes}
	s.attachDisks(att, images)
	return att, onDisk, nil
}

// bindVolumes binds the source of every bind mount of gspec (but those onDisk) under a new
// mounts dir in ctr and points the mount at its guest path. The pod's /dev/shm becomes
// GuestShmDir, and a memory-backed emptyDir a tmpfs of the pod in the guest (returned). It
// returns too, for each of those mounts (by index), whether the guest's source is a directory.
func (s *Share) bindVolumes(ctx context.Context, containerID string, ctr int, gspec *specs.Spec, onDisk map[int]bool) ([]*api.PodTmpfs, map[int]bool, error) {
	mounts, err := mkdirOpen(ctr, mountsDir)
	if err != nil {
		return nil, nil, fmt.Errorf("container %s: %w", containerID, err)
	}
	defer func() { _ = unix.Close(mounts) }()
	var tmpfs []*api.PodTmpfs
	bound := map[int]bool{}
	for i := range gspec.Mounts {
		if err := ctx.Err(); err != nil {
			return nil, nil, fmt.Errorf("container %s: preparing its mounts: %w", containerID, err)
		}
		m := &gspec.Mounts[i]
		if !isBind(m) || onDisk[i] {
			continue
		}
		if isPodShm(m) {
			m.Source = GuestShmDir
			bound[i] = true
			continue
		}
		name := mountName(i, m.Destination)
		t, dir, err := s.bindVolume(containerID, mounts, name, m)
		if err != nil {
			return nil, nil, err
		}
		bound[i] = dir
		if t != nil {
			m.Source = t.MountPoint
			tmpfs = append(tmpfs, t)
			continue
		}
		m.Source = filepath.Join(s.guestDir, containerID, mountsDir, name)
		if err := s.keepSubMountsWritable(containerID, name, m); err != nil {
			return nil, nil, err
		}
	}
	return tmpfs, bound, nil
}

// mountRootfs mounts the container's root filesystem on a new rootfs dir in ctr, with the
// mount points it lacks made first (makeMountPoints).
func (s *Share) mountRootfs(containerID string, ctr int, bundle string, spec *specs.Spec, rootfs []mount.Mount, points []mountPoint) error {
	target, err := mkdirOpen(ctr, rootfsDir)
	if err != nil {
		return fmt.Errorf("container %s: %w", containerID, err)
	}
	defer func() { _ = unix.Close(target) }()
	var tree int
	if len(rootfs) == 0 {
		tree, err = s.cloneBundleRootfs(containerID, bundle, spec)
	} else {
		tree, err = s.cloneMounts(containerID, rootfs)
	}
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(tree) }()
	makeMountPoints(tree, points)
	if err := s.ns.run(func() error { return attachTree(tree, target) }); err != nil {
		return fmt.Errorf("container %s: attaching its rootfs in the share: %w", containerID, err)
	}
	return nil
}

// cloneBundleRootfs clones spec.Root.Path (relative to bundle unless absolute), a directory.
func (s *Share) cloneBundleRootfs(containerID, bundle string, spec *specs.Spec) (int, error) {
	src := spec.Root.Path
	if !filepath.IsAbs(src) {
		src = filepath.Join(bundle, src)
	}
	fd, st, err := s.openSource(containerID, "/", src)
	if err != nil {
		return -1, err
	}
	defer func() { _ = unix.Close(fd) }()
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return -1, fmt.Errorf("container %s: root.path %s is not a directory: %w", containerID, src, errdefs.ErrInvalidArgument)
	}
	tree, err := cloneTree(fd, false, false)
	if err != nil {
		return -1, fmt.Errorf("container %s: binding its rootfs %s: %w", containerID, src, err)
	}
	return tree, nil
}

// cloneMounts makes containerd's rootfs mounts in the node's namespace, where their paths
// (snapshots, and mounts the snapshotter made there) resolve, on mnt/<id>; clones the result
// for the share and detaches the original.
func (s *Share) cloneMounts(containerID string, rootfs []mount.Mount) (_ int, retErr error) {
	mnt := int(s.mnt.Fd())
	tmp, err := mkdirOpen(mnt, containerID)
	if err != nil {
		return -1, fmt.Errorf("container %s: making its rootfs mount point: %w", containerID, err)
	}
	defer func() {
		_ = unix.Close(tmp)
		if err := releaseAt(mnt, filepath.Join(s.stateDir, MountDir), containerID, s.mntDev); err != nil {
			retErr = errors.Join(retErr, fmt.Errorf("container %s: its rootfs mount point: %w", containerID, err))
		}
	}()
	// containerd's mounts take a path; the descriptor's magic link is the dir just made.
	if err := mount.All(rootfs, procFd(tmp)); err != nil {
		return -1, fmt.Errorf("container %s: mounting its rootfs (%s): %w", containerID, describeMounts(rootfs), err)
	}
	top, err := openBeneath(mnt, containerID, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW)
	if err != nil {
		return -1, fmt.Errorf("container %s: its rootfs: %w", containerID, err)
	}
	defer func() { _ = unix.Close(top) }()
	tree, err := cloneTree(top, false, false)
	if err != nil {
		return -1, fmt.Errorf("container %s: cloning its rootfs for the share: %w", containerID, err)
	}
	return tree, nil
}

// bindVolume binds the source of m on a new mount point name in the mounts dir; a
// memory-backed emptyDir is not bound but returned, to become a tmpfs in the guest. dir says
// whether the source is a directory.
func (s *Share) bindVolume(containerID string, mounts int, name string, m *specs.Mount) (_ *api.PodTmpfs, dir bool, _ error) {
	fd, st, err := s.openSource(containerID, m.Destination, m.Source)
	if err != nil {
		return nil, false, err
	}
	defer func() { _ = unix.Close(fd) }()
	if t, err := memoryEmptyDir(fd); err != nil || t != nil {
		if err != nil {
			return nil, false, fmt.Errorf("container %s: mount %s: %w", containerID, m.Destination, err)
		}
		return t, true, nil
	}
	dir = st.Mode&unix.S_IFMT == unix.S_IFDIR
	target, err := makeTargetAt(mounts, name, dir)
	if err != nil {
		return nil, false, fmt.Errorf("container %s: mount %s: %w", containerID, m.Destination, err)
	}
	defer func() { _ = unix.Close(target) }()
	ro, rro := readOnly(m.Options)
	tree, err := cloneTree(fd, ro, rro)
	if err == nil {
		err = s.ns.run(func() error { return attachTree(tree, target) })
		_ = unix.Close(tree)
	}
	if err != nil {
		return nil, false, fmt.Errorf("container %s: sharing %s (for %s) with the guest: %w", containerID, m.Source, m.Destination, err)
	}
	return nil, dir, nil
}

// keepSubMountsWritable makes a plain read-only (ro, not rro) bind with host mounts below it
// read-write in the guest's spec. In the guest the volume is one virtio-fs tree without those
// sub-mounts, so a read-only bind there would make them read-only too, where runc leaves them
// as they are. The host side of the bind stays read-only at its top (bindAt), and virtiofsd
// writes through it, so the volume's own files stay read-only while its sub-mounts keep
// their flags.
func (s *Share) keepSubMountsWritable(containerID, name string, m *specs.Mount) error {
	if ro, rro := readOnly(m.Options); !ro || rro {
		return nil
	}
	var below []mountUnder
	err := s.ns.run(func() error {
		var err error
		below, err = mountsBelow(filepath.Join(s.stateDir, StagingDir, containerID, mountsDir, name))
		return err
	})
	if err != nil {
		return fmt.Errorf("container %s: mount %s: %w", containerID, m.Destination, err)
	}
	if len(below) <= 1 {
		return nil
	}
	opts := make([]string, 0, len(m.Options))
	for _, o := range m.Options {
		if o == "ro" {
			o = "rw"
		}
		opts = append(opts, o)
	}
	m.Options = opts
	return nil
}

// Release undoes Prepare for one container: it detaches every mount under the container's
// directory of the share and removes the directory, all through the share's descriptor. It
// is idempotent.
func (s *Share) Release(ctx context.Context, containerID string) error {
	if err := validID(containerID); err != nil {
		return err
	}
	if err := s.release(containerID); err != nil {
		return fmt.Errorf("container %s: %w", containerID, err)
	}
	return nil
}

func (s *Share) release(containerID string) error {
	return s.ns.run(func() error {
		return releaseAt(s.rootfd(), filepath.Join(s.stateDir, StagingDir), containerID, s.dev)
	})
}

// releaseAt detaches what is mounted at or below name in the staging dir (dirfd, real path
// dirPath) and removes name, never leaving the staging filesystem dev. The tree is removed
// only once the mount table shows nothing mounted in it, so a failed unmount can never turn
// into deleting a volume's data.
func releaseAt(dirfd int, dirPath, name string, dev uint64) error {
	syncOverlays(dirfd, dirPath, name)
	if err := detachAll(dirfd, dirPath, name); err != nil {
		return err
	}
	return removeAt(dirfd, name, dev)
}

// Cleanup removes the share of the sandbox whose state dir is stateDir, from the mount table
// alone: for teardown and for `shim delete` after the shim died. The share's own mounts went
// with its mount namespace (Close, or the death of the shim and of virtiofsd); in the
// caller's namespace it detaches every mount under the staging, export and mount dirs
// (reached only by symlink-free lookups from the state dir: a rootfs mount a dying shim left
// in mnt/, or a share of an older shim that mounted in the node's namespace) and removes
// them. It is idempotent.
func Cleanup(ctx context.Context, stateDir string) error {
	dir, err := filepath.EvalSymlinks(stateDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("state dir %s: %w", stateDir, err)
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("state dir %s: %w", stateDir, err)
	}
	defer func() { _ = unix.Close(fd) }()
	st, err := fstatFd(fd)
	if err != nil {
		return fmt.Errorf("state dir %s: %w", stateDir, err)
	}
	var errs []error
	for _, name := range []string{StagingDir, ExportDir, MountDir} {
		if err := releaseAt(fd, dir, name, st.Dev); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleaning up the share in %s: %w", stateDir, err)
	}
	log.G(ctx).WithField("dir", stateDir).Debug("rootfs share cleaned up")
	return nil
}

// CleanupContainer undoes Prepare of one container from the mount table alone, for `shim
// delete` of a container whose shim died while the sandbox's lives on: in the caller's mount
// namespace, its dir of the staging and mount dirs.
func CleanupContainer(ctx context.Context, stateDir, containerID string) error {
	if err := validID(containerID); err != nil {
		return err
	}
	var errs []error
	for _, name := range []string{StagingDir, MountDir} {
		if err := cleanupIn(filepath.Join(stateDir, name), containerID); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("container %s: %w", containerID, err)
	}
	return nil
}

// cleanupIn detaches and removes name in dir, if dir exists.
func cleanupIn(dir, name string) error {
	rdir, err := filepath.EvalSymlinks(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("share %s: %w", dir, err)
	}
	f, dev, err := openDir(rdir)
	if err != nil {
		return fmt.Errorf("share %s: %w", dir, err)
	}
	defer func() { _ = f.Close() }()
	return releaseAt(int(f.Fd()), rdir, name, dev)
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

// readOnly reports how an OCI bind is read-only: ro (the bind's top mount) and rro (every
// mount of it, runc's recursive read-only); the last of ro/rro/rw wins.
func readOnly(opts []string) (ro, rro bool) {
	for _, o := range opts {
		switch o {
		case "ro":
			ro, rro = true, false
		case "rro":
			ro, rro = true, true
		case "rw":
			ro, rro = false, false
		}
	}
	return ro, rro
}

func isReadOnly(opts []string) bool {
	ro, _ := readOnly(opts)
	return ro
}

// openSource opens a bind source on the host (O_PATH; symlinks in the spec's path are
// resolved, as runc does) and checks through that descriptor that virtio-fs can share it
// and that it neither holds nor lies in the sandbox's state dir.
func (s *Share) openSource(containerID, dest, src string) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	if src == "" {
		return -1, st, fmt.Errorf("container %s: bind mount %s has no source: %w", containerID, dest, errdefs.ErrInvalidArgument)
	}
	fd, err := unix.Open(src, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return -1, st, fmt.Errorf("container %s: source %s of mount %s does not exist (kubelet/containerd create it; was the volume set up?): %w", containerID, src, dest, errdefs.ErrNotFound)
		}
		return -1, st, fmt.Errorf("container %s: opening source %s of mount %s: %w", containerID, src, dest, err)
	}
	fail := func(err error) (int, unix.Stat_t, error) {
		_ = unix.Close(fd)
		return -1, st, err
	}
	if st, err = fstatFd(fd); err != nil {
		return fail(fmt.Errorf("container %s: source %s of mount %s: %w", containerID, src, dest, err))
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR, unix.S_IFREG:
	case unix.S_IFSOCK:
		return fail(fmt.Errorf("container %s: source %s of mount %s is a unix socket: a host socket cannot be reached from a VM pod; use a TCP service or run this pod with a non-VM runtime class: %w", containerID, src, dest, errdefs.ErrNotImplemented))
	case unix.S_IFBLK, unix.S_IFCHR:
		return fail(fmt.Errorf("container %s: source %s of mount %s is a device: host devices are not shared with VM pods (not supported); use a non-VM runtime class: %w", containerID, src, dest, errdefs.ErrNotImplemented))
	default:
		return fail(fmt.Errorf("container %s: source %s of mount %s is a FIFO or other special file, which virtio-fs cannot share (only files and directories; not supported): %w", containerID, src, dest, errdefs.ErrNotImplemented))
	}
	realSrc, err := fdPath(fd)
	if err != nil {
		return fail(fmt.Errorf("container %s: source %s of mount %s: %w", containerID, src, dest, err))
	}
	if within(s.stateDir, realSrc) || within(realSrc, s.stateDir) {
		return fail(fmt.Errorf("container %s: source %s of mount %s overlaps the sandbox's state dir %s; sharing it would share the share with itself (mount a narrower host path): %w", containerID, src, dest, s.stateDir, errdefs.ErrNotImplemented))
	}
	return fd, st, nil
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
