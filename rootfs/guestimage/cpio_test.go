package guestimage

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// cpioEntry is an entry as read back by readCPIO.
type cpioEntry struct {
	ino, mode, nlink, mtime uint32
	rmaj, rmin              uint32
	name                    string
	data                    []byte
	offset                  int // where the header starts
}

// readCPIO is a minimal, independent newc reader: it checks the magic, the 4-byte alignment of
// headers and data, and the trailer.
func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	field := func(i int) uint32 {
		s := string(b[off+6+8*i : off+6+8*i+8])
		v, err := strconv.ParseUint(s, 16, 32)
		if err != nil {
			t.Fatalf("offset %d field %d: %q: %v", off, i, s, err)
		}
		return uint32(v)
	}
	for {
		if off%4 != 0 {
			t.Fatalf("header at offset %d is not 4-byte aligned", off)
		}
		if off+110 > len(b) {
			t.Fatalf("truncated archive at offset %d (no trailer)", off)
		}
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic %q at offset %d", b[off:off+6], off)
		}
		e := cpioEntry{ino: field(0), mode: field(1), nlink: field(4), mtime: field(5), rmaj: field(9), rmin: field(10), offset: off}
		if uid, gid := field(2), field(3); uid != 0 || gid != 0 {
			t.Errorf("entry at %d: owner %d:%d, want 0:0", off, uid, gid)
		}
		size, namesize := int(field(6)), int(field(11))
		nameStart := off + 110
		if b[nameStart+namesize-1] != 0 {
			t.Fatalf("entry at %d: name not NUL-terminated", off)
		}
		e.name = string(b[nameStart : nameStart+namesize-1])
		dataStart := (nameStart + namesize + 3) &^ 3
		for _, c := range b[nameStart+namesize : dataStart] {
			if c != 0 {
				t.Fatalf("entry %q: non-zero name padding", e.name)
			}
		}
		e.data = b[dataStart : dataStart+size]
		off = (dataStart + size + 3) &^ 3
		if e.name == "TRAILER!!!" {
			for _, c := range b[off:] {
				if c != 0 {
					t.Fatalf("non-zero bytes after the trailer")
				}
			}
			if len(b)%512 != 0 {
				t.Errorf("archive length %d is not a multiple of 512", len(b))
			}
			return out
		}
		out = append(out, e)
	}
}

// roundTripFiles is an archive with every kind of entry the writer takes, and
// roundTripWant what a reader must find in it.
var (
	roundTripFiles = []struct {
		hdr  CPIOHeader
		data string
	}{
		{hdr: CPIOHeader{Name: "dev", Mode: fs.ModeDir | 0o755}},
		{hdr: CPIOHeader{Name: "/dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, DevMajor: 5, DevMinor: 1}},
		{hdr: CPIOHeader{Name: "dev/sda", Mode: fs.ModeDevice | 0o660, DevMajor: 8, DevMinor: 0}},
		{hdr: CPIOHeader{Name: "./init", Mode: 0o755, Size: 5}, data: "hello"},
		{hdr: CPIOHeader{Name: "empty", Mode: 0o644}},
		{hdr: CPIOHeader{Name: "sbin", Mode: fs.ModeDir | 0o755}},
		{hdr: CPIOHeader{Name: "sbin/init", Mode: fs.ModeSymlink | 0o777, Linkname: "/init"}},
		{hdr: CPIOHeader{Name: "suid", Mode: fs.ModeSetuid | 0o4755, Size: 3}, data: "abc"},
		{hdr: CPIOHeader{Name: "tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777}},
		{hdr: CPIOHeader{Name: "x/y.ko", Mode: 0o644, Size: 1}, data: "z"},
	}
	roundTripWant = []struct {
		name       string
		mode       uint32
		nlink      uint32
		rmaj, rmin uint32
		data       string
	}{
		{"dev", 0o040755, 2, 0, 0, ""},
		{"dev/console", 0o020600, 1, 5, 1, ""},
		{"dev/sda", 0o060660, 1, 8, 0, ""},
		{"init", 0o100755, 1, 0, 0, "hello"},
		{"empty", 0o100644, 1, 0, 0, ""},
		{"sbin", 0o040755, 2, 0, 0, ""},
		{"sbin/init", 0o120777, 1, 0, 0, "/init"},
		{"suid", 0o104755, 1, 0, 0, "abc"},
		{"tmp", 0o041777, 2, 0, 0, ""},
		{"x/y.ko", 0o100644, 1, 0, 0, "z"},
	}
)

// writeRoundTrip writes roundTripFiles and returns the archive.
func writeRoundTrip(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	for _, f := range roundTripFiles {
		if err := w.WriteHeader(&f.hdr); err != nil {
			t.Fatalf("WriteHeader(%q): %v", f.hdr.Name, err)
		}
		if f.data != "" {
			if _, err := w.Write([]byte(f.data)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if int64(buf.Len()) != w.Len() {
		t.Errorf("Len() = %d, wrote %d", w.Len(), buf.Len())
	}
	return buf.Bytes()
}

func TestCPIOWriterRoundTrip(t *testing.T) {
	got := readCPIO(t, writeRoundTrip(t))
	if len(got) != len(roundTripWant) {
		t.Fatalf("read %d entries, want %d", len(got), len(roundTripWant))
	}
	for i, w := range roundTripWant {
		g := got[i]
		if g.name != w.name || g.mode != w.mode || g.nlink != w.nlink || g.rmaj != w.rmaj || g.rmin != w.rmin || string(g.data) != w.data {
			t.Errorf("entry %d = {%q %o nlink=%d rdev=%d,%d %q}, want {%q %o nlink=%d rdev=%d,%d %q}",
				i, g.name, g.mode, g.nlink, g.rmaj, g.rmin, g.data, w.name, w.mode, w.nlink, w.rmaj, w.rmin, w.data)
		}
		if g.ino != uint32(i+1) {
			t.Errorf("entry %q: inode %d, want %d (assigned in order)", g.name, g.ino, i+1)
		}
		if g.mtime != 0 {
			t.Errorf("entry %q: mtime %d, want 0", g.name, g.mtime)
		}
	}
}

// TestCPIOWriterReadByCPIO cross-checks the round trip's archive with GNU cpio's listing.
func TestCPIOWriterReadByCPIO(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio binary not installed; skipping the cross-check with cpio -t")
	}
	archive := writeRoundTrip(t)
	cmd := exec.Command("cpio", "-t", "-v", "--quiet")
	cmd.Stdin = bytes.NewReader(archive)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -tv: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != len(roundTripWant) {
		t.Fatalf("cpio -tv listed %d entries, want %d:\n%s", len(lines), len(roundTripWant), out)
	}
	for i, l := range lines {
		if !strings.Contains(l, roundTripWant[i].name) {
			t.Errorf("cpio -tv line %d = %q, want entry %q", i, l, roundTripWant[i].name)
		}
	}
	for _, check := range []struct {
		line             int
		prefix, contains string
	}{
		{1, "crw-------", "5,"},
		{2, "brw-rw----", "8,"},
		{6, "lrwxrwxrwx", "sbin/init -> /init"},
		{7, "-rwsr-xr-x", "suid"},
		{8, "drwxrwxrwt", "tmp"},
	} {
		if l := lines[check.line]; !strings.HasPrefix(l, check.prefix) || !strings.Contains(l, check.contains) {
			t.Errorf("cpio -tv line %d = %q, want prefix %q containing %q", check.line, l, check.prefix, check.contains)
		}
	}
}

func TestCPIOWriterErrors(t *testing.T) {
	tests := []struct {
		name string
		run  func(w *CPIOWriter) error
		want string
	}{
		{"dotdot", func(w *CPIOWriter) error { return w.WriteHeader(&CPIOHeader{Name: "../etc/passwd", Mode: 0o644}) }, "escapes"},
		{"empty name", func(w *CPIOWriter) error { return w.WriteHeader(&CPIOHeader{Name: "/", Mode: fs.ModeDir}) }, "empty name"},
		{"trailer name", func(w *CPIOWriter) error { return w.WriteHeader(&CPIOHeader{Name: "TRAILER!!!", Mode: 0o644}) }, "reserved"},
		{"duplicate", func(w *CPIOWriter) error {
			if err := w.WriteHeader(&CPIOHeader{Name: "a", Mode: fs.ModeDir}); err != nil {
				return err
			}
			return w.WriteHeader(&CPIOHeader{Name: "/a", Mode: fs.ModeDir})
		}, "duplicate"},
		{"short file", func(w *CPIOWriter) error {
			if err := w.WriteHeader(&CPIOHeader{Name: "f", Size: 4}); err != nil {
				return err
			}
			if _, err := w.Write([]byte("ab")); err != nil {
				return err
			}
			return w.Close()
		}, "2 bytes short"},
		{"long file", func(w *CPIOWriter) error {
			if err := w.WriteHeader(&CPIOHeader{Name: "f", Size: 1}); err != nil {
				return err
			}
			_, err := w.Write([]byte("ab"))
			return err
		}, "exceeds"},
		{"socket", func(w *CPIOWriter) error { return w.WriteHeader(&CPIOHeader{Name: "s", Mode: fs.ModeSocket}) }, "cannot be stored"},
		{"symlink without target", func(w *CPIOWriter) error { return w.WriteHeader(&CPIOHeader{Name: "l", Mode: fs.ModeSymlink}) }, "without a target"},
		{"write after close", func(w *CPIOWriter) error {
			w.Close()
			return w.WriteHeader(&CPIOHeader{Name: "x"})
		}, "closed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.run(NewCPIOWriter(&bytes.Buffer{}))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestCPIOExtract checks the archive with the host's cpio, as the kernel would unpack it:
// extracting it reproduces the files.
func TestCPIOExtract(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio binary not installed")
	}
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	for _, h := range []CPIOHeader{
		{Name: "a", Mode: fs.ModeDir | 0o755},
		{Name: "a/b", Mode: 0o640, Size: 7},
	} {
		if err := w.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.Write([]byte("content")); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-i", "-d", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, out)
	}
	b, err := os.ReadFile(dir + "/a/b")
	if err != nil || string(b) != "content" {
		t.Fatalf("a/b = %q, %v", b, err)
	}
	if fi, _ := os.Stat(dir + "/a/b"); fi.Mode().Perm() != 0o640 {
		t.Errorf("a/b mode %v, want 0640", fi.Mode())
	}
}
