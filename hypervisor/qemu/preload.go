package qemu

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/internal/pvh"
)

// A booted VM's kernel is copied into its guest RAM by the driver, not by QEMU.
//
// Given a PVH kernel (an ELF vmlinux with Xen's PHYS32_ENTRY note, podvm's own), QEMU maps
// the file, keeps it mapped for a reset a pod VM never has (-no-reboot), and at its start
// writes the segments into guest RAM, a page fault for every page of them. On a host where a
// page fault is dear that was tens of milliseconds of every VM's start, and the mapping was
// ~16 MiB of an idle pod's PSS (docs/kernel.md). preloadKernel instead makes the guest RAM a
// memfd, writes the segments into it with file I/O before QEMU starts, and gives QEMU a
// loader stub: an ELF with the kernel's notes (QEMU reads the PVH entry point from them) and
// one segment, the kernel's first page, which QEMU copies over the identical page already
// there. The guest then boots as before from the same bytes at the same addresses.

// preloadLowRAM bounds where a preloaded kernel's segments may lie: guest RAM below 4 GiB
// starts at offset 0 of the memory file at any size up to 2 GiB (q35 keeps at least that
// much below 4 GiB), so guest-physical address and file offset agree there.
const preloadLowRAM = 2 << 30

// preloadMinAddr keeps a preloaded kernel above the first MiB (firmware, the BIOS data).
const preloadMinAddr = 1 << 20

// stubPage is the size of the one segment a loader stub has.
const stubPage = 4096

// preloadKernel gives a booted VM whose Kernel is a PVH ELF its guest RAM with the kernel in
// it (cfg.MemoryFile) and a loader stub (cfg.KernelStub) instead of the kernel for QEMU. A
// kernel that is not a PVH ELF (a bzImage) or does not fit is left to QEMU, as is any
// templated VM. The files are cfg's (closeHandedOver closes them once QEMU has them).
func preloadKernel(cfg *Config) error {
	if cfg.Templated || cfg.MemoryFile != nil || cfg.KernelStub != nil {
		return nil
	}
	k, err := os.Open(cfg.Kernel)
	if err != nil {
		return fmt.Errorf("guest kernel: %w", err)
	}
	defer func() { _ = k.Close() }() // read only
	loads, stub, err := pvhKernel(k, min(int64(cfg.MemoryMiB)<<20, preloadLowRAM))
	if err != nil || stub == nil {
		return err
	}
	mem, err := newGuestMemory(int64(cfg.MemoryMiB) << 20)
	if err != nil {
		return err
	}
	stubFile, err := sealedFile("podvm-kernel-stub", stub)
	if err != nil {
		_ = mem.Close()
		return err
	}
	for _, p := range loads {
		if err := copyRange(int(mem.Fd()), int(k.Fd()), int64(p.Off), int64(p.Paddr), int64(p.Filesz)); err != nil {
			_ = mem.Close()
			_ = stubFile.Close()
			return fmt.Errorf("copying the guest kernel into guest RAM: %w", err)
		}
	}
	cfg.MemoryFile, cfg.KernelStub = mem, stubFile
	return nil
}

// pvhKernel reads k's program headers. For a PVH ELF whose loaded segments lie in
// [preloadMinAddr, ramTop) it returns them and the loader stub's bytes; for any other
// kernel, nil and nil.
func pvhKernel(k io.ReaderAt, ramTop int64) ([]*elf.Prog, []byte, error) {
	magic := make([]byte, len(elf.ELFMAG))
	if n, _ := k.ReadAt(magic, 0); n < len(magic) || string(magic) != elf.ELFMAG { // shorter: no ELF either
		return nil, nil, nil // not an ELF: a bzImage, which QEMU loads itself
	}
	f, err := elf.NewFile(k)
	if err != nil {
		return nil, nil, fmt.Errorf("guest kernel: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		return nil, nil, nil
	}
	var loads []*elf.Prog
	var notes []noteSegment
	entry := false
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			if p.Paddr < preloadMinAddr || p.Memsz > uint64(ramTop) || p.Paddr > uint64(ramTop)-p.Memsz || p.Filesz > p.Memsz {
				return nil, nil, nil
			}
			if p.Filesz > 0 {
				loads = append(loads, p)
			}
		case elf.PT_NOTE:
			b, err := io.ReadAll(p.Open())
			if err != nil {
				return nil, nil, fmt.Errorf("guest kernel: reading its notes: %w", err)
			}
			notes = append(notes, noteSegment{p, b})
			entry = entry || pvh.NotesHave(b, f.ByteOrder, "Xen", pvh.XenPhys32EntryNote)
		}
	}
	if !entry || len(loads) == 0 || loads[0].Filesz < stubPage {
		return nil, nil, nil
	}
	stub, err := loaderStub(f, loads[0], notes)
	if err != nil {
		return nil, nil, err
	}
	return loads, stub, nil
}

// noteSegment is a note segment of a kernel and its contents.
type noteSegment struct {
	*elf.Prog
	data []byte
}

// loaderStub is an ELF with f's header, first's first page as its only loaded segment (at
// first's addresses) and f's notes, each in a note segment as in f.
func loaderStub(f *elf.File, first *elf.Prog, notes []noteSegment) ([]byte, error) {
	const ehdrSize, phdrSize = 64, 56
	page := make([]byte, stubPage)
	if _, err := first.ReadAt(page, 0); err != nil {
		return nil, fmt.Errorf("guest kernel: reading its first page: %w", err)
	}
	phnum := 1 + len(notes)
	if ehdrSize+phnum*phdrSize > stubPage {
		return nil, errors.New("guest kernel: too many note segments for a loader stub")
	}
	var ident [elf.EI_NIDENT]byte
	copy(ident[:], elf.ELFMAG)
	ident[elf.EI_CLASS], ident[elf.EI_DATA], ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)
	ident[elf.EI_OSABI] = byte(f.OSABI)
	hdr := elf.Header64{
		Ident: ident, Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Entry: f.Entry, Phoff: ehdrSize, Ehsize: ehdrSize, Phentsize: phdrSize, Phnum: uint16(phnum),
	}
	progs := []elf.Prog64{{
		Type: uint32(elf.PT_LOAD), Flags: uint32(first.Flags), Off: stubPage,
		Vaddr: first.Vaddr, Paddr: first.Paddr, Filesz: stubPage, Memsz: stubPage, Align: stubPage,
	}}
	// The notes follow the page, each at an offset aligned as its segment is.
	var tail []byte
	for _, n := range notes {
		for a := max(n.Align, 1); uint64(len(tail))%a != 0; {
			tail = append(tail, 0)
		}
		size := uint64(len(n.data))
		progs = append(progs, elf.Prog64{
			Type: uint32(elf.PT_NOTE), Flags: uint32(n.Flags), Off: 2*stubPage + uint64(len(tail)),
			Vaddr: n.Vaddr, Paddr: n.Paddr, Filesz: size, Memsz: size, Align: n.Align,
		})
		tail = append(tail, n.data...)
	}
	var b bytes.Buffer
	for _, v := range []any{hdr, progs} {
		if err := binary.Write(&b, binary.LittleEndian, v); err != nil {
			return nil, err
		}
	}
	b.Write(make([]byte, stubPage-b.Len()))
	b.Write(page)
	b.Write(tail)
	return b.Bytes(), nil
}

// sealedFile is a memfd holding b that nothing can change any more.
func sealedFile(name string, b []byte) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), name)
	if _, err := f.Write(b); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("writing %s: %w", name, err)
	}
	seals := unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, seals); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("sealing %s: %w", name, err)
	}
	return f, nil
}
