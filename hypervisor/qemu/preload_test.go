package qemu

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/internal/pvh"
	"github.com/podvm/podvm/internal/testutil"
)

// pvhNotes are the notes of a PVH kernel whose entry point is entry.
func pvhNotes(entry uint64) []byte {
	desc := binary.LittleEndian.AppendUint64(nil, entry)
	return append(testutil.ELFNote("GNU", 3, bytes.Repeat([]byte{0xab}, 20)), testutil.ELFNote("Xen", pvh.XenPhys32EntryNote, desc)...)
}

// writeKernel writes an x86-64 ELF executable with segs and returns its path.
func writeKernel(t *testing.T, segs []testutil.ELFSegment) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(path, testutil.ELF(0x1000000, segs), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// pattern is n bytes of a pattern that seed sets apart from another's and from zeros.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	return b
}

// A PVH kernel's segments land in the guest RAM file at their physical addresses (their
// zero-filled tails zero), and QEMU gets a stub with the kernel's notes and its first page
// at the same address, sealed.
func TestPreloadKernel(t *testing.T) {
	text, data := pattern(3*4096+100, 1), pattern(5000, 2)
	// Two note segments, the first 26 bytes long: the stub keeps each, the second at an
	// offset padded to its 4-byte alignment.
	notes := [][]byte{append(testutil.ELFNote("Linux", 1, []byte{1, 2}), 0, 0), pvhNotes(0x1000500)}
	path := writeKernel(t, []testutil.ELFSegment{
		{Type: elf.PT_LOAD, Paddr: 0x1000000, Data: text, Align: 0x200000},
		{Type: elf.PT_LOAD, Paddr: 0x1200000, Data: data, Memsz: 3 * 4096},
		{Type: elf.PT_NOTE, Paddr: 0x1002000, Data: notes[0], Align: 8},
		{Type: elf.PT_NOTE, Paddr: 0x1003000, Data: notes[1]},
	})
	cfg := &Config{Kernel: path, MemoryMiB: 64}
	if err := preloadKernel(cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.MemoryFile == nil || cfg.KernelStub == nil {
		t.Fatalf("not preloaded: MemoryFile %v, KernelStub %v", cfg.MemoryFile, cfg.KernelStub)
	}
	defer func() { _ = cfg.MemoryFile.Close(); _ = cfg.KernelStub.Close() }()

	st, err := cfg.MemoryFile.Stat()
	if err != nil || st.Size() != 64<<20 {
		t.Fatalf("guest RAM file: size %v, %v; want %d", st.Size(), err, 64<<20)
	}
	for _, want := range []struct {
		at   int64
		data []byte
	}{{0x1000000, text}, {0x1200000, data}, {0x1200000 + int64(len(data)), make([]byte, 3*4096-len(data))}, {0x1000000 - 4096, make([]byte, 4096)}} {
		got := make([]byte, len(want.data))
		if _, err := cfg.MemoryFile.ReadAt(got, want.at); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want.data) {
			t.Errorf("guest RAM at %#x: not the kernel's bytes", want.at)
		}
	}

	stub, err := io.ReadAll(io.NewSectionReader(cfg.KernelStub, 0, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(stub))
	if err != nil {
		t.Fatalf("the stub is no ELF: %v", err)
	}
	if f.Machine != elf.EM_X86_64 || f.Class != elf.ELFCLASS64 || f.Entry != 0x1000000 {
		t.Errorf("stub header: machine %v class %v entry %#x", f.Machine, f.Class, f.Entry)
	}
	var loads, notesSeen int
	for _, p := range f.Progs {
		b, _ := io.ReadAll(p.Open())
		switch p.Type {
		case elf.PT_LOAD:
			loads++
			if p.Paddr != 0x1000000 || p.Filesz != stubPage || p.Memsz != stubPage || !bytes.Equal(b, text[:stubPage]) {
				t.Errorf("stub segment at %#x, %d/%d bytes: want the kernel's first page", p.Paddr, p.Filesz, p.Memsz)
			}
		case elf.PT_NOTE:
			if notesSeen < len(notes) && !bytes.Equal(b, notes[notesSeen]) {
				t.Errorf("stub note segment %d differs from the kernel's", notesSeen)
			}
			if !pvh.NotesHave(b, binary.LittleEndian, "Xen", pvh.XenPhys32EntryNote) && notesSeen == 1 {
				t.Errorf("stub note segment %d has no PVH entry", notesSeen)
			}
			if p.Off%p.Align != 0 {
				t.Errorf("stub note segment %d at offset %d, not aligned to %d", notesSeen, p.Off, p.Align)
			}
			notesSeen++
		}
	}
	if loads != 1 || notesSeen != 2 {
		t.Errorf("stub has %d loaded and %d note segments; want 1 and 2", loads, notesSeen)
	}
	if _, err := cfg.KernelStub.WriteAt([]byte{0}, 0); !errors.Is(err, unix.EPERM) {
		t.Errorf("writing the stub: %v; want EPERM (sealed)", err)
	}
}

// Kernels that are not PVH ELFs, or whose segments are not in low guest RAM, and templated
// VMs are QEMU's to load: nothing is preloaded.
func TestPreloadKernelLeftToQEMU(t *testing.T) {
	page := pattern(4096, 3)
	bzImage := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(bzImage, append([]byte("MZ"), pattern(8192, 4)...), 0o644); err != nil {
		t.Fatal(err)
	}
	pvh := writeKernel(t, []testutil.ELFSegment{{Type: elf.PT_LOAD, Paddr: 0x1000000, Data: page}, {Type: elf.PT_NOTE, Data: pvhNotes(0x1000000)}})
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"bzImage", Config{Kernel: bzImage, MemoryMiB: 512}},
		{"no PVH note", Config{Kernel: writeKernel(t, []testutil.ELFSegment{{Type: elf.PT_LOAD, Paddr: 0x1000000, Data: page}, {Type: elf.PT_NOTE, Data: testutil.ELFNote("GNU", 3, page[:20])}}), MemoryMiB: 512}},
		{"below 1 MiB", Config{Kernel: writeKernel(t, []testutil.ELFSegment{{Type: elf.PT_LOAD, Paddr: 0x9000, Data: page}, {Type: elf.PT_NOTE, Data: pvhNotes(0x9000)}}), MemoryMiB: 512}},
		{"beyond the RAM", Config{Kernel: pvh, MemoryMiB: 16}},
		{"first segment under a page", Config{Kernel: writeKernel(t, []testutil.ELFSegment{{Type: elf.PT_LOAD, Paddr: 0x1000000, Data: page[:100]}, {Type: elf.PT_NOTE, Data: pvhNotes(0x1000000)}}), MemoryMiB: 512}},
		{"templated", Config{Kernel: pvh, MemoryMiB: 512, Templated: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if err := preloadKernel(&cfg); err != nil {
				t.Fatal(err)
			}
			if cfg.MemoryFile != nil || cfg.KernelStub != nil {
				t.Errorf("preloaded; want the kernel left to QEMU")
			}
		})
	}
	cfg := Config{Kernel: pvh, MemoryMiB: 512}
	if err := preloadKernel(&cfg); err != nil || cfg.KernelStub == nil {
		t.Fatalf("the same kernel in 512 MiB: %v, stub %v; want it preloaded", err, cfg.KernelStub)
	}
	_ = cfg.MemoryFile.Close()
	_ = cfg.KernelStub.Close()
}

// A kernel that cannot be read, or claims to be an ELF and is none, fails the start and says
// it is the guest kernel's fault.
func TestPreloadKernelUnreadable(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "vmlinux")
	cfg := Config{Kernel: missing, MemoryMiB: 512}
	if err := preloadKernel(&cfg); err == nil || !strings.Contains(err.Error(), "guest kernel") || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing kernel: err = %v; want one naming the guest kernel's path", err)
	}
	broken := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(broken, append([]byte(elf.ELFMAG), pattern(100, 5)...), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg = Config{Kernel: broken, MemoryMiB: 512}
	if err := preloadKernel(&cfg); err == nil || !strings.Contains(err.Error(), "guest kernel") {
		t.Errorf("broken ELF: err = %v; want one about the guest kernel", err)
	}
	if cfg.MemoryFile != nil || cfg.KernelStub != nil {
		t.Error("broken ELF: files left in the config")
	}
}
