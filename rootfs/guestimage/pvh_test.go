package guestimage

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// elfNote encodes one ELF note.
func elfNote(owner string, typ uint32, desc []byte) []byte {
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

// writeKernelELF writes an x86-64 ELF whose only segment is a PT_NOTE holding notes, as a
// kernel's vmlinux carries its PVH entry.
func writeKernelELF(t *testing.T, path string, notes []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	hdr := elf.Header64{
		Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Phoff: 64, Ehsize: 64, Phentsize: 56, Phnum: 1, Shentsize: 64,
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS], hdr.Ident[elf.EI_DATA], hdr.Ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)
	prog := elf.Prog64{Type: uint32(elf.PT_NOTE), Flags: uint32(elf.PF_R), Off: 64 + 56, Filesz: uint64(len(notes)), Memsz: uint64(len(notes)), Align: 4}
	for _, v := range []any{hdr, prog} {
		if err := binary.Write(&b, binary.LittleEndian, v); err != nil {
			t.Fatal(err)
		}
	}
	b.Write(notes)
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// pvhNotes are the notes of a kernel with a PVH entry, after another note as Linux has them.
var pvhNotes = append(elfNote("GNU", 3, []byte("build-id")), elfNote("Xen", xenElfNotePhys32Entry, []byte{0xa0, 0x04, 0, 1, 0, 0, 0, 0})...)

// A tree with boot/vmlinux-<version> that has a PVH entry: the image's kernel is that ELF, and
// the manifest says so.
func TestBuildPVHKernel(t *testing.T) {
	tree, ver := builtinKernelTree(t)
	want := writeKernelELF(t, filepath.Join(tree, "boot", "vmlinux-"+ver), pvhNotes)
	out := t.TempDir()
	m, err := Build(context.Background(), Options{Kernel: tree, Agent: buildStaticAgent(t), OutputDir: out})
	if err != nil {
		t.Fatal(err)
	}
	if m.KernelFormat != KernelPVH {
		t.Errorf("KernelFormat = %q, want %q", m.KernelFormat, KernelPVH)
	}
	if got, _ := os.ReadFile(filepath.Join(out, KernelFile)); !bytes.Equal(got, want) {
		t.Errorf("%s holds %d bytes, want the vmlinux's %d", KernelFile, len(got), len(want))
	}
}

// A vmlinux without a PVH entry is refused with what to do, not silently replaced by the bzImage.
func TestBuildVmlinuxWithoutPVHEntry(t *testing.T) {
	tree, ver := builtinKernelTree(t)
	writeKernelELF(t, filepath.Join(tree, "boot", "vmlinux-"+ver), elfNote("Xen", 17, make([]byte, 8)))
	out := t.TempDir()
	_, err := Build(context.Background(), Options{Kernel: tree, Agent: buildStaticAgent(t), OutputDir: out})
	if err == nil || !strings.Contains(err.Error(), "no PVH entry") || !strings.Contains(err.Error(), "CONFIG_PVH=y") {
		t.Fatalf("err = %v, want one that says there is no PVH entry and how to get one", err)
	}
	if names := dirNames(out); names != "" {
		t.Errorf("output dir holds %s after a failed build", names)
	}
	// Not an ELF at all.
	if err := os.WriteFile(filepath.Join(tree, "boot", "vmlinux-"+ver), []byte("bzImage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Build(context.Background(), Options{Kernel: tree, Agent: buildStaticAgent(t), OutputDir: out}); err == nil || !strings.Contains(err.Error(), "vmlinux-"+ver) {
		t.Fatalf("err = %v, want one that names the vmlinux", err)
	}
}

func TestNotesHave(t *testing.T) {
	for _, c := range []struct {
		name string
		data []byte
		want bool
	}{
		{"PVH note second", pvhNotes, true},
		{"other Xen note", elfNote("Xen", 17, []byte{1}), false},
		{"PVH type, other owner", elfNote("Linux", xenElfNotePhys32Entry, []byte{1}), false},
		{"empty", nil, false},
		{"truncated name", pvhNotes[:len(pvhNotes)-14], false},
		{"huge sizes", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 18, 0, 0, 0}, false},
	} {
		if got := notesHave(c.data, binary.LittleEndian, "Xen", xenElfNotePhys32Entry); got != c.want {
			t.Errorf("%s: notesHave = %v, want %v", c.name, got, c.want)
		}
	}
}
