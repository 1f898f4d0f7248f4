package guestimage

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// CPIOHeader describes one entry of a newc cpio archive.
type CPIOHeader struct {
	// Name is the entry's path. A leading "/" or "./" is dropped ("/init" is stored as "init", as
	// the kernel's initramfs unpacker expects); ".." components are refused.
	Name string
	// Mode holds the type bits (fs.ModeDir, fs.ModeSymlink, fs.ModeDevice, fs.ModeCharDevice, or
	// none for a regular file), the permission bits and setuid/setgid/sticky.
	Mode fs.FileMode
	// Size is the length of a regular file's data, which must follow through Write.
	Size int64
	// Linkname is a symlink's target; the writer stores it as the entry's data.
	Linkname string
	// DevMajor and DevMinor are a device node's numbers.
	DevMajor, DevMinor uint32
}

// CPIOWriter writes a newc ("070701") cpio archive, the format the Linux kernel unpacks as an
// initramfs. Every entry is owned by root with mtime 0, and inode numbers count up from 1 in
// write order, so the same sequence of entries always gives the same bytes. Use it like
// archive/tar: WriteHeader, then Write the data of regular files, then Close.
type CPIOWriter struct {
	w       io.Writer
	off     int64 // bytes written to w
	ino     uint32
	remain  int64 // data bytes still expected for the current entry
	names   map[string]bool
	closed  bool
	lastErr error
}

// NewCPIOWriter returns a writer that writes an archive to w.
func NewCPIOWriter(w io.Writer) *CPIOWriter {
	return &CPIOWriter{w: w, names: make(map[string]bool)}
}

const (
	cpioMagic     = "070701"
	cpioHeaderLen = 110
	cpioTrailer   = "TRAILER!!!"
	maxCPIOSize   = 1<<32 - 1

	sIFDIR  = 0o040000
	sIFCHR  = 0o020000
	sIFBLK  = 0o060000
	sIFREG  = 0o100000
	sIFLNK  = 0o120000
	sIFIFO  = 0o010000
	sISUID  = 0o4000
	sISGID  = 0o2000
	sISVTX  = 0o1000
	permMax = 0o777
)

// cpioName normalizes an entry name: no leading "/" or "./", cleaned, never escaping the root.
func cpioName(name string) (string, error) {
	n := strings.TrimLeft(name, "/")
	n = path.Clean(n)
	if n == "." || n == "" {
		return "", fmt.Errorf("cpio entry %q: empty name", name)
	}
	if n == ".." || strings.HasPrefix(n, "../") {
		return "", fmt.Errorf("cpio entry %q: name escapes the archive root", name)
	}
	return n, nil
}

// unixMode converts an fs.FileMode to the st_mode bits cpio stores.
func unixMode(m fs.FileMode) (uint32, error) {
	mode := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		mode |= sISUID
	}
	if m&fs.ModeSetgid != 0 {
		mode |= sISGID
	}
	if m&fs.ModeSticky != 0 {
		mode |= sISVTX
	}
	switch t := m.Type(); t {
	case 0:
		mode |= sIFREG
	case fs.ModeDir:
		mode |= sIFDIR
	case fs.ModeSymlink:
		mode |= sIFLNK
	case fs.ModeDevice | fs.ModeCharDevice:
		mode |= sIFCHR
	case fs.ModeDevice:
		mode |= sIFBLK
	case fs.ModeNamedPipe:
		mode |= sIFIFO
	default:
		return 0, fmt.Errorf("file type %v cannot be stored in a cpio archive", t)
	}
	return mode, nil
}

// WriteHeader starts a new entry. The previous regular file must have received all its data.
func (c *CPIOWriter) WriteHeader(h *CPIOHeader) error {
	if err := c.finishEntry(); err != nil {
		return err
	}
	name, err := cpioName(h.Name)
	if err != nil {
		return err
	}
	if name == cpioTrailer {
		return fmt.Errorf("cpio entry %q: name is reserved for the trailer", h.Name)
	}
	if c.names[name] {
		return fmt.Errorf("cpio entry %q: duplicate name", name)
	}
	mode, err := unixMode(h.Mode)
	if err != nil {
		return fmt.Errorf("cpio entry %q: %w", name, err)
	}
	var size int64
	nlink := uint32(1)
	var data []byte
	switch h.Mode.Type() {
	case 0:
		if h.Size < 0 || h.Size > maxCPIOSize {
			return fmt.Errorf("cpio entry %q: size %d out of range for newc (0 to 4 GiB-1)", name, h.Size)
		}
		size = h.Size
	case fs.ModeSymlink:
		if h.Linkname == "" {
			return fmt.Errorf("cpio entry %q: symlink without a target", name)
		}
		data = []byte(h.Linkname)
		size = int64(len(data))
	case fs.ModeDir:
		nlink = 2
	}
	var rmaj, rmin uint32
	if h.Mode&fs.ModeDevice != 0 {
		rmaj, rmin = h.DevMajor, h.DevMinor
	}
	c.ino++
	hdr := fmt.Sprintf("%s%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		cpioMagic, c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name)+1, 0)
	if err := c.write([]byte(hdr + name + "\x00")); err != nil {
		return err
	}
	if err := c.pad(); err != nil {
		return err
	}
	c.names[name] = true
	c.remain = size
	if data != nil {
		if _, err := c.Write(data); err != nil {
			return err
		}
	}
	return nil
}

// Write writes data of the current regular file; more than its header's Size is an error.
func (c *CPIOWriter) Write(p []byte) (int, error) {
	if c.closed {
		return 0, errors.New("cpio: write after close")
	}
	if int64(len(p)) > c.remain {
		return 0, fmt.Errorf("cpio: write of %d bytes exceeds the %d left in the entry", len(p), c.remain)
	}
	if err := c.write(p); err != nil {
		return 0, err
	}
	c.remain -= int64(len(p))
	return len(p), nil
}

// Close finishes the last entry, writes the trailer and pads the archive to 512 bytes. It does
// not close the underlying writer.
func (c *CPIOWriter) Close() error {
	if c.closed {
		return c.lastErr
	}
	if err := c.finishEntry(); err != nil {
		return err
	}
	hdr := fmt.Sprintf("%s%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		cpioMagic, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(cpioTrailer)+1, 0)
	if err := c.write([]byte(hdr + cpioTrailer + "\x00")); err != nil {
		return err
	}
	if err := c.pad(); err != nil {
		return err
	}
	if r := c.off % 512; r != 0 {
		if err := c.write(make([]byte, 512-r)); err != nil {
			return err
		}
	}
	c.closed = true
	return nil
}

// Len returns the number of bytes written so far.
func (c *CPIOWriter) Len() int64 { return c.off }

func (c *CPIOWriter) finishEntry() error {
	if c.closed {
		return errors.New("cpio: archive already closed")
	}
	if c.lastErr != nil {
		return c.lastErr
	}
	if c.remain != 0 {
		return fmt.Errorf("cpio: previous entry is %d bytes short of its size", c.remain)
	}
	return c.pad()
}

// pad aligns the output to 4 bytes, as newc requires after the name and after the data.
func (c *CPIOWriter) pad() error {
	if r := c.off % 4; r != 0 {
		return c.write(make([]byte, 4-r))
	}
	return nil
}

func (c *CPIOWriter) write(p []byte) error {
	if c.lastErr != nil {
		return c.lastErr
	}
	n, err := c.w.Write(p)
	c.off += int64(n)
	if err != nil {
		c.lastErr = fmt.Errorf("cpio: %w", err)
		return c.lastErr
	}
	return nil
}
