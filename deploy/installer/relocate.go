package installer

import (
	"bytes"
	"fmt"
	"io/fs"
	"path/filepath"
	"regexp"
	"strconv"
)

// distFiles lists the dist tree's regular files, relative to it.
func distFiles(dist string) (map[string]bool, error) {
	files := map[string]bool{}
	err := filepath.WalkDir(dist, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, err := filepath.Rel(dist, p)
		files[rel] = true
		return err
	})
	return files, err
}

// runtimeTypeLine is the drop-in's runtime_type line; relocate puts runtime_path after it.
var runtimeTypeLine = regexp.MustCompile(`(?m)^([ \t]*)runtime_type[ \t]*=.*$`)

// relocate rewrites the drop-in and the node config for a host root that is not the node's
// /: every quoted absolute path naming a file of the dist tree ("/etc/podvm/config.toml",
// "/usr/share/podvm/vmlinuz") becomes that file's node path, and the drop-in gets a
// runtime_path to the installed shim, which is then not in containerd's PATH. Other files,
// and every file when the host root is /, are installed as they are.
func (in *Installer) relocate(rel string, data []byte, files map[string]bool) ([]byte, error) {
	if in.NodePath("") == "/" || (rel != DropIn && rel != ConfigPath) {
		return data, nil
	}
	for f := range files {
		data = bytes.ReplaceAll(data, []byte(strconv.Quote("/"+f)), []byte(strconv.Quote(in.NodePath(f))))
	}
	if rel != DropIn {
		return data, nil
	}
	if !files[ShimPath] {
		return nil, fmt.Errorf("dist tree %s has no %s", in.DistRoot, ShimPath)
	}
	loc := runtimeTypeLine.FindSubmatchIndex(data)
	if loc == nil {
		return nil, fmt.Errorf("dist tree: %s has no runtime_type line to put runtime_path after", DropIn)
	}
	indent := data[loc[2]:loc[3]]
	line := fmt.Sprintf("\n%s# The shim installed under the host root %s (not in containerd's PATH).\n%sruntime_path = %s",
		indent, in.NodePath(""), indent, strconv.Quote(in.NodePath(ShimPath)))
	out := append([]byte{}, data[:loc[1]]...)
	out = append(out, line...)
	return append(out, data[loc[1]:]...), nil
}
