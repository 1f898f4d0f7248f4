package pvh

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"testing"

	"github.com/podvm/podvm/internal/testutil"
)

// pvhNotes are the notes of a kernel with a PVH entry, after another note as Linux has them.
var pvhNotes = append(testutil.ELFNote("GNU", 3, []byte("build-id")), testutil.ELFNote("Xen", XenPhys32EntryNote, []byte{0xa0, 0x04, 0, 1, 0, 0, 0, 0})...)

func TestNotesHave(t *testing.T) {
	for _, c := range []struct {
		name string
		data []byte
		want bool
	}{
		{"PVH note second", pvhNotes, true},
		{"other Xen note", testutil.ELFNote("Xen", 17, []byte{1}), false},
		{"PVH type, other owner", testutil.ELFNote("Linux", XenPhys32EntryNote, []byte{1}), false},
		{"empty", nil, false},
		{"truncated name", pvhNotes[:len(pvhNotes)-14], false},
		{"huge sizes", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 18, 0, 0, 0}, false},
	} {
		if got := NotesHave(c.data, binary.LittleEndian, "Xen", XenPhys32EntryNote); got != c.want {
			t.Errorf("%s: NotesHave = %v, want %v", c.name, got, c.want)
		}
	}
}

// elfWith is an x86-64 ELF with one segment of each type in types, each holding the GNU
// build-id note but the last, which holds pvhNotes.
func elfWith(t *testing.T, types []elf.ProgType) *elf.File {
	t.Helper()
	var segs []testutil.ELFSegment
	for i, typ := range types {
		data := testutil.ELFNote("GNU", 3, []byte("build-id"))
		if i == len(types)-1 {
			data = pvhNotes
		}
		segs = append(segs, testutil.ELFSegment{Type: typ, Paddr: 0x1000000, Data: data})
	}
	f, err := elf.NewFile(bytes.NewReader(testutil.ELF(0x1000000, segs)))
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// HasEntry looks in every note segment, and only in note segments.
func TestHasEntry(t *testing.T) {
	for _, c := range []struct {
		name  string
		types []elf.ProgType
		want  bool
	}{
		{"in the second note segment", []elf.ProgType{elf.PT_NOTE, elf.PT_NOTE}, true},
		{"in a loaded segment only", []elf.ProgType{elf.PT_NOTE, elf.PT_LOAD}, false},
	} {
		got, err := HasEntry(elfWith(t, c.types))
		if err != nil || got != c.want {
			t.Errorf("%s: HasEntry = %v, %v; want %v", c.name, got, err, c.want)
		}
	}
}
