// Package guestimage builds the guest's boot assets: the kernel (copied from a Debian kernel
// package or an extracted kernel tree) and an initrd that holds the podvm agent as /init plus the
// kernel modules the agent loads, in dependency order, before it does anything else.
//
// The initrd is a newc cpio archive written here (no cpio binary needed) and is byte-for-byte
// reproducible: entries are sorted, mtimes are zero, owners are root and inode numbers are
// assigned in write order. Its layout:
//
//	/init                                  the agent (static binary), mode 0755
//	/dev/console, /dev/null                character devices (5,1) and (1,3), so the kernel can
//	                                       open the console before /init runs
//	/dev /proc /sys /run /tmp /etc         empty mount points and scratch directories
//	/lib/modules/<ver>/<path>.ko           each needed module, decompressed, at its modules.dep path
//	/lib/modules/podvm.modules             absolute module paths, one a line, in load order
//
// Build writes vmlinuz, initrd.img and image.json (a Manifest) into the output directory; each
// file is replaced atomically (temp file + rename) so a node never boots a half-written initrd.
package guestimage
