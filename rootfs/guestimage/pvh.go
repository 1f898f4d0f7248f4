package guestimage

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"

	"github.com/podvm/podvm/internal/pvh"
)

// KernelFormat is the format of the image's kernel file.
type KernelFormat string

// Kernel formats.
const (
	// KernelPVH is an uncompressed x86-64 ELF kernel with a PVH entry point: QEMU loads its
	// segments and starts the vCPU at that entry in 32-bit mode (docs/kernel.md).
	KernelPVH KernelFormat = "pvh"
	// KernelBzImage is a compressed bzImage, booted through the firmware's Linux loader; the
	// guest decompresses itself.
	KernelBzImage KernelFormat = "bzImage"
)

// findPVHKernel returns path when it is an ELF kernel with a PVH entry, "" when there is no file
// there. An ELF without the entry is an error: a tree that ships a vmlinux for booting means it.
func findPVHKernel(path string) (string, error) {
	f, err := elf.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("kernel %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	ok, err := hasPVHEntry(f)
	if err != nil {
		return "", fmt.Errorf("kernel %s: %w", path, err)
	}
	if !ok {
		return "", fmt.Errorf("kernel %s has no PVH entry (no Xen PHYS32_ENTRY note): build it with CONFIG_PVH=y, or remove it to boot the bzImage beside it", path)
	}
	return path, nil
}

// hasPVHEntry reports whether the ELF's note segments hold a Xen PHYS32_ENTRY note.
func hasPVHEntry(f *elf.File) (bool, error) {
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return false, fmt.Errorf("not an x86-64 ELF (%v, %v)", f.Class, f.Machine)
	}
	return pvh.HasEntry(f)
}
