package guestimage

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
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

// xenElfNotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY, the note (owner "Xen") that holds a
// kernel's 32-bit PVH entry point (Linux: arch/x86/platform/pvh/head.S; QEMU looks for it).
const xenElfNotePhys32Entry = 18

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
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data, err := io.ReadAll(io.LimitReader(p.Open(), 1<<20))
		if err != nil {
			return false, fmt.Errorf("read note segment: %w", err)
		}
		if notesHave(data, f.ByteOrder, "Xen", xenElfNotePhys32Entry) {
			return true, nil
		}
	}
	return false, nil
}

// notesHave walks ELF notes (namesz, descsz, type, name, desc; name and desc padded to 4 bytes)
// for one with the given owner and type.
func notesHave(data []byte, bo binary.ByteOrder, owner string, typ uint32) bool {
	align := func(n uint32) uint64 { return (uint64(n) + 3) &^ 3 }
	for len(data) >= 12 {
		namesz, descsz, t := bo.Uint32(data), bo.Uint32(data[4:]), bo.Uint32(data[8:])
		data = data[12:]
		if align(namesz) > uint64(len(data)) {
			return false
		}
		name := bytes.TrimRight(data[:namesz], "\x00")
		data = data[align(namesz):]
		if align(descsz) > uint64(len(data)) {
			return false
		}
		data = data[align(descsz):]
		if t == typ && string(name) == owner {
			return true
		}
	}
	return false
}
