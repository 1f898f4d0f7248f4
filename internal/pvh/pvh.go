// Package pvh recognises x86-64 kernels with a PVH entry point: ELF files whose notes hold
// Xen's PHYS32_ENTRY note, the 32-bit entry QEMU starts such a kernel at without a
// decompressor or the bzImage's boot protocol (docs/kernel.md). The image builder uses it to
// choose the image's kernel, the QEMU driver to load that kernel into guest RAM itself.
package pvh

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
)

// XenPhys32EntryNote is XEN_ELFNOTE_PHYS32_ENTRY, the note (owner "Xen") that holds a kernel's
// 32-bit PVH entry point (Linux: arch/x86/platform/pvh/head.S; QEMU looks for it).
const XenPhys32EntryNote = 18

// HasEntry reports whether f's note segments hold the PVH entry note.
func HasEntry(f *elf.File) (bool, error) {
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data, err := io.ReadAll(io.LimitReader(p.Open(), 1<<20))
		if err != nil {
			return false, fmt.Errorf("read note segment: %w", err)
		}
		if NotesHave(data, f.ByteOrder, "Xen", XenPhys32EntryNote) {
			return true, nil
		}
	}
	return false, nil
}

// NotesHave walks ELF notes (namesz, descsz, type, name, desc; name and desc padded to 4 bytes)
// for one with the given owner and type.
func NotesHave(data []byte, bo binary.ByteOrder, owner string, typ uint32) bool {
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
