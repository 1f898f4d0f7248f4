// Package rootfs decides what the guest sees as filesystems: each container's root filesystem
// and the volumes its OCI spec binds in, shared with the guest through the sandbox's virtio-fs
// directory, and block volumes and disk images hot-plugged as virtio-blk (block.go;
// docs/storage.md describes both for users).
//
// # Layout of the shared directory
//
// The sandbox's virtio-fs SharedDir (host: /run/podvm/<sandbox-id>/shared, guest:
// agent.GuestSharedDir) holds one directory per container:
//
//	<hostDir>/<container-id>/rootfs       containerd's rootfs mounts (overlay), or a bind of the bundle's rootfs
//	<hostDir>/<container-id>/mounts/<n>-<name>  one bind per bind mount of the spec (dir or file)
//
// The staging tmpfs is a shared mount, so mounts made in it later propagate into virtiofsd's
// sandbox. Nothing but what the spec names is shared. All of it is mounted in a mount
// namespace of the share's own (mountns.go), where virtiofsd is started; the node's namespace
// has none of it, so no copy of a volume keeps the node's directories busy.
//
// # What is rewritten in the spec
//
//   - Root.Path becomes <guestDir>/<id>/rootfs; Root.Readonly stays (the guest enforces it).
//   - Every bind mount's Source becomes its guest path; options (ro, rro, propagation such as
//     rprivate/rslave/rshared, nosuid, ...) stay as they are, the guest applies them. Read-only
//     binds are also made read-only (recursively) on the host side, so virtiofsd itself cannot
//     write through them.
//   - Non-bind mounts (proc, sysfs, tmpfs, devpts, mqueue, cgroup, ...) stay unchanged: the
//     guest makes them.
//   - /dev/shm: CRI binds the sandbox's host shm tmpfs (…/sandboxes/<id>/shm, or the host's
//     /dev/shm for an IPC=Node pod) at /dev/shm of every container of the pod. That host tmpfs
//     is not shared with the guest: shared memory between processes of one pod must be guest
//     memory (mmap over virtio-fs is neither coherent nor fast). Instead the source becomes
//     GuestShmDir, the guest's own /dev/shm tmpfs that the agent mounts at boot, so all
//     containers of the pod (the whole VM is the pod) see the same shm. Its size is bounded by
//     the guest's memory rather than CRI's 64 MiB default. A /dev/shm that is some other volume
//     (e.g. an emptyDir with medium Memory) is shared like any other bind.
//
// # Block volumes and disk images
//
// Block entries of linux.devices (CRI Devices: PVCs with volumeMode Block) become disks to
// hot-plug, found on the host by major:minor, and device nodes for the agent; they and their
// host-numbered cgroup rules leave the spec. A privileged container's own host devices stay
// for the shim to drop; other non-block devices are refused. A pod annotation
// podvm.io/disk.<volume>=<size>, when the node config allows it, makes the bind mounts whose
// source's base name is <volume> a disk: <source>/disk.img (created sparse and formatted
// ext4 if missing), mounted by the agent under GuestDiskDir, which the mounts then bind.
//
// # What cannot be shared
//
// virtio-fs carries files and directories. A bind source that is a device, a socket or a
// FIFO is refused with an error (a host socket or device would not reach the host from the
// guest); a missing bind source is an error too, since kubelet creates every source first.
//
// # Cleanup
//
// Share keeps no state in memory: Release and Cleanup find what to undo in the mount table
// (the share's namespace's, or after a crash the node's, where only directories and maybe a
// rootfs mount in mnt/ are left: the share's namespace died with the shim), so they also work
// in a new shim process. Mounts are detached lazily
// (MNT_DETACH) because virtiofsd keeps O_PATH descriptors of every file the guest has looked
// up, which makes a plain unmount fail with EBUSY. Overlay rootfs mounts are synced before
// they are detached, so their final unmount (when virtiofsd lets go) has nothing to flush.
// A tree is removed only once the mount table shows nothing mounted in it, so a failed
// unmount can never turn into deleting a volume's data.
package rootfs
