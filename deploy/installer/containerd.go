package installer

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"

	"github.com/pelletier/go-toml/v2"
)

// How Install changed containerd's main config (Manifest.Containerd).
const (
	ContainerdCreated      = "created"
	ContainerdImportsAdded = "imports-added"
	// ContainerdUnchanged: it imported the drop-in already.
	ContainerdUnchanged = "unchanged"
)

// importLine is the line Install puts first in containerd's config.
func importLine(dropIn string) string { return fmt.Sprintf("imports = [%q]\n", dropIn) }

// importDropIn makes containerd's config at file import dropIn and says how.
func importDropIn(file, dropIn string) (string, error) {
	data, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		body := "# Written by the podvm installer; removed when podvm is uninstalled.\nversion = 3\n" + importLine(dropIn)
		return ContainerdCreated, writeAtomic(file, []byte(body), 0o644)
	}
	if err != nil {
		return "", err
	}
	var top struct {
		Imports []string `toml:"imports"`
	}
	if err := toml.Unmarshal(data, &top); err != nil {
		return "", fmt.Errorf("containerd config %s: %w; fix it, containerd cannot read it either", file, err)
	}
	if top.Imports == nil {
		return ContainerdImportsAdded, writeAtomic(file, append([]byte(importLine(dropIn)), data...), modeOf(file))
	}
	for _, imp := range top.Imports {
		if ok, _ := path.Match(imp, dropIn); ok || imp == dropIn {
			return ContainerdUnchanged, nil
		}
	}
	return "", fmt.Errorf("containerd config %s: its imports %q do not include %s; add %q to them (podvm does not rewrite an imports list)",
		file, top.Imports, dropIn, dropIn)
}

// revertImport undoes importDropIn's change how.
func revertImport(file, dropIn, how string) error {
	switch how {
	case ContainerdCreated:
		data, err := os.ReadFile(file)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if !bytes.HasSuffix(data, []byte(importLine(dropIn))) || bytes.Count(data, []byte("\n")) != 3 {
			// The admin added to it: keep it, with our import (it points at nothing now).
			return nil
		}
		return os.Remove(file)
	case ContainerdImportsAdded:
		data, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		if rest, ok := bytes.CutPrefix(data, []byte(importLine(dropIn))); ok {
			return writeAtomic(file, rest, modeOf(file))
		}
	}
	return nil
}

func modeOf(file string) fs.FileMode {
	if fi, err := os.Stat(file); err == nil {
		return fi.Mode().Perm()
	}
	return 0o644
}
