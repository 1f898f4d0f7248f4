package testutil

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
)

// ELFNote encodes one ELF note as Linux's .notes has them: name and desc padded to 4 bytes.
func ELFNote(owner string, typ uint32, desc []byte) []byte {
	var b bytes.Buffer
	name := append([]byte(owner), 0)
	for _, v := range []uint32{uint32(len(name)), uint32(len(desc)), typ} {
		_ = binary.Write(&b, binary.LittleEndian, v)
	}
	pad := func() {
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	b.Write(name)
	pad()
	b.Write(desc)
	pad()
	return b.Bytes()
}

// ELFSegment is a segment of a test ELF: Data at Paddr (and at the kernel's virtual address
// for it), Memsz long (0: Data's length; zeros after Data), aligned to Align (0: 4).
type ELFSegment struct {
	Type  elf.ProgType
	Paddr uint64
	Data  []byte
	Memsz uint64
	Align uint64
}

// ELF is a little-endian x86-64 executable with entry point entry and segs, the headers in
// the first page and each segment's data at the next page boundary.
func ELF(entry uint64, segs []ELFSegment) []byte {
	hdr := elf.Header64{Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Entry: entry, Phoff: 64, Ehsize: 64, Phentsize: 56, Phnum: uint16(len(segs))}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS], hdr.Ident[elf.EI_DATA], hdr.Ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)
	var progs []elf.Prog64
	var body bytes.Buffer
	for _, s := range segs {
		progs = append(progs, elf.Prog64{Type: uint32(s.Type), Flags: uint32(elf.PF_R), Off: 4096 + uint64(body.Len()),
			Vaddr: 0xffffffff80000000 + s.Paddr, Paddr: s.Paddr, Filesz: uint64(len(s.Data)),
			Memsz: max(s.Memsz, uint64(len(s.Data))), Align: max(s.Align, 4)})
		body.Write(s.Data)
		for body.Len()%4096 != 0 {
			body.WriteByte(0)
		}
	}
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, hdr)
	_ = binary.Write(&b, binary.LittleEndian, progs)
	b.Write(make([]byte, 4096-b.Len()))
	b.Write(body.Bytes())
	return b.Bytes()
}
