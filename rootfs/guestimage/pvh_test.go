package guestimage

import (
	"bytes"
	"context"
	"debug/elf"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podvm/podvm/internal/pvh"
	"github.com/podvm/podvm/internal/testutil"
)

// writeKernelELF writes an x86-64 ELF whose only segment is a PT_NOTE holding notes, as a
// kernel's vmlinux carries its PVH entry.
func writeKernelELF(t *testing.T, path string, notes []byte) []byte {
	t.Helper()
	b := testutil.ELF(0, []testutil.ELFSegment{{Type: elf.PT_NOTE, Data: notes}})
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// pvhNotes are the notes of a kernel with a PVH entry, after another note as Linux has them.
var pvhNotes = append(testutil.ELFNote("GNU", 3, []byte("build-id")), testutil.ELFNote("Xen", pvh.XenPhys32EntryNote, []byte{0xa0, 0x04, 0, 1, 0, 0, 0, 0})...)

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
	writeKernelELF(t, filepath.Join(tree, "boot", "vmlinux-"+ver), testutil.ELFNote("Xen", 17, make([]byte, 8)))
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
