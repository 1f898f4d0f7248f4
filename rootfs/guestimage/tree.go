package guestimage

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"io/fs"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// treeEntry is one file of the guest's root file tree.
type treeEntry struct {
	name               string // relative path, no leading "/"
	mode               fs.FileMode
	devMajor, devMinor uint32 // device nodes only
	size               int64  // regular files only
	data               []byte // regular file contents, unless src is set
	src                string // regular file copied from disk (size bytes)
}

// rootTree is the guest's root file tree: the single description both the initrd (cpio) and the
// root image (ext4) are written from.
type rootTree struct {
	entries []treeEntry    // sorted by name: a directory comes before everything under it
	modules []InitrdModule // the modules in the tree, in load order
}

// newRootTree lays out the guest's root: the agent as /init, the device nodes the kernel opens
// before /init runs, mount points, and the modules with the list the agent loads them from.
func newRootTree(ctx context.Context, kt kernelTree, mods []Module, agent agentInfo) (*rootTree, error) {
	entries := map[string]treeEntry{}
	dir := func(name string, perm fs.FileMode) {
		entries[name] = treeEntry{name: name, mode: fs.ModeDir | perm}
	}
	// Mount points and scratch directories. /sys/fs/cgroup is not here: sysfs, mounted on /sys,
	// provides it.
	for _, d := range []string{"dev", "proc", "sys", "run", "etc", "lib", "lib/modules"} {
		dir(d, 0o755)
	}
	dir("tmp", 0o777|fs.ModeSticky)
	chr := fs.ModeDevice | fs.ModeCharDevice
	entries["dev/console"] = treeEntry{name: "dev/console", mode: chr | 0o600, devMajor: 5, devMinor: 1}
	entries["dev/null"] = treeEntry{name: "dev/null", mode: chr | 0o666, devMajor: 1, devMinor: 3}
	entries["init"] = treeEntry{name: "init", mode: 0o755, size: agent.size, src: agent.path}

	var list bytes.Buffer
	out := []InitrdModule{} // "modules": [] in image.json for a kernel with everything built in
	for _, m := range mods {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, plain, err := readModule(filepath.Join(kt.modulesDir, filepath.FromSlash(m.Path)))
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", m.Name, err)
		}
		name := path.Join("lib/modules", kt.version, path.Dir(m.Path), plain)
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				dir(d, 0o755)
			}
		}
		entries[name] = treeEntry{name: name, mode: 0o644, size: int64(len(data)), data: data}
		out = append(out, InitrdModule{Name: m.Name, Path: "/" + name})
		fmt.Fprintf(&list, "/%s\n", name)
	}
	listName := strings.TrimPrefix(ModulesListPath, "/")
	entries[listName] = treeEntry{name: listName, mode: 0o644, size: int64(list.Len()), data: list.Bytes()}

	t := &rootTree{modules: out}
	for _, e := range entries {
		t.entries = append(t.entries, e)
	}
	slices.SortFunc(t.entries, func(a, b treeEntry) int { return strings.Compare(a.name, b.name) })
	return t, nil
}

// writeContents writes a regular file's contents to w.
func (e *treeEntry) writeContents(w io.Writer) error {
	if e.src != "" {
		return copyN(w, e.src, e.size)
	}
	if len(e.data) > 0 {
		if _, err := w.Write(e.data); err != nil {
			return err
		}
	}
	return nil
}

// writeCPIO writes the tree as a newc cpio archive (the initrd) to w.
func (t *rootTree) writeCPIO(w io.Writer, comp Compression) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	var dst io.Writer = bw
	var gz *gzip.Writer
	if comp == CompressGzip {
		gz = gzip.NewWriter(bw) // zero header: no name, no mtime, so the output is reproducible
		dst = gz
	}
	cw := NewCPIOWriter(dst)
	for i := range t.entries {
		e := &t.entries[i]
		hdr := CPIOHeader{Name: e.name, Mode: e.mode, Size: e.size, DevMajor: e.devMajor, DevMinor: e.devMinor}
		if err := cw.WriteHeader(&hdr); err != nil {
			return err
		}
		if e.mode.IsRegular() {
			if err := e.writeContents(cw); err != nil {
				return err
			}
		}
	}
	if err := cw.Close(); err != nil {
		return err
	}
	if gz != nil {
		if err := gz.Close(); err != nil {
			return err
		}
	}
	return bw.Flush()
}
