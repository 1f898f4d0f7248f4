// Package guestimage builds the guest's boot assets: the kernel (copied from a Debian kernel
// package or an extracted kernel tree), an initrd that holds the podvm agent as /init plus the
// kernel modules the agent loads, in dependency order, before it does anything else, and, for a
// kernel that can mount it, a root image holding the same files.
//
// The initrd is a newc cpio archive written here (no cpio binary needed) and is byte-for-byte
// reproducible: entries are sorted, mtimes are zero, owners are root and inode numbers are
// assigned in write order. Its layout, which the root image shares:
//
//	/init                                  the agent (static binary), mode 0755
//	/dev/console, /dev/null                character devices (5,1) and (1,3), so the kernel can
//	                                       open the console before /init runs
//	/dev /proc /sys /run /tmp /etc         empty mount points and scratch directories
//	/lib/modules/<ver>/<path>.ko           each needed module, decompressed, at its modules.dep path
//	/lib/modules/podvm.modules             absolute module paths, one a line, in load order
//
// The root image (root.img) is that tree as a read-only ext4 filesystem (4 KiB blocks, no
// journal, no reserved blocks, its size a multiple of 2 MiB) that QEMU maps into the guest through
// virtio-pmem and the guest mounts with DAX as its root, so every pod on a node executes the agent
// from the same host page cache. It is built only when the kernel has virtio_pmem, nd_pmem and
// ext4 built in and CONFIG_FS_DAX=y (see RootImageSupport); otherwise, as with Debian's modular
// kernel, the initrd is the guest's only root. It is made with e2fsprogs (mke2fs -d, then debugfs
// for the device nodes, owners and times) and is reproducible too: the UUID and directory hash
// seed derive from the tree, and every timestamp is fixed.
//
// The kernel file, vmlinuz, is the tree's boot/vmlinux-<version> when that is an ELF with a PVH
// entry (podvm's own kernel: QEMU enters it directly, nothing to decompress), else its bzImage;
// the manifest's KernelFormat says which.
//
// Build writes vmlinuz, initrd.img, root.img and image.json (a Manifest) into the output
// directory; each file is staged under a temporary name and renamed into place only once all are
// complete, so a node never boots a half-written image. A build without a root image removes the
// root.img an earlier build left.
package guestimage
