// Package installer installs podvm onto a node from a dist tree (make dist) and removes it
// again: the file logic of the DaemonSet installer (the kata-deploy model), run by
// `podvm node install|uninstall|run` in a privileged pod with the host's / mounted.
//
// Install copies every file of the dist tree under the host root, except the node config
// when the host has one; makes containerd's main config import the podvm drop-in (adding
// an imports line, or creating the file, when needed); records all of it in a manifest on
// the host; then restarts containerd and labels the node. Uninstall undoes exactly what the
// manifest says: it removes the files it installed (the config only when it is still the
// one it wrote), reverts containerd's config, restarts containerd and removes the label.
// Both are idempotent, so a DaemonSet pod that restarts half way does no harm.
//
// The host root is normally the node's / (NodeRoot "/"). When it is another directory of the
// node (NodeRoot), the installed files name their node paths under it: the drop-in's
// ConfigPath and a runtime_path to the installed shim, the node config's guest image, and
// containerd's imports line (see relocate).
package installer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"syscall"

	"github.com/podvm/podvm/shim/config"
)

// Paths on the node (relative to the host root).
const (
	// ManifestPath records what Install did, for Uninstall.
	ManifestPath = "var/lib/podvm/installed.json"
	// ConfigPath is the node config: installed only when absent, never overwritten.
	ConfigPath = "etc/podvm/config.toml"
	// ContainerdConfig is containerd's main config.
	ContainerdConfig = "etc/containerd/config.toml"
	// DropIn is the podvm runtime for containerd (in the dist tree).
	DropIn = "etc/containerd/conf.d/podvm.toml"
	// ShimPath is the shim binary (in the dist tree).
	ShimPath = "usr/bin/containerd-shim-podvm-v2"
)

// Installer installs the dist tree DistRoot onto the node whose / is HostRoot.
type Installer struct {
	HostRoot string
	DistRoot string
	// NodeRoot is what HostRoot is on the node: "" or "/" for the node's /.
	NodeRoot string
	// ManifestFile is where the manifest goes, relative to HostRoot; default ManifestPath.
	ManifestFile string
	// LeaveContainerdConfig leaves containerd's main config alone (podvm install: the admin
	// adds the imports line).
	LeaveContainerdConfig bool
	// RestartContainerd makes containerd load its config again; nil skips it.
	RestartContainerd func(ctx context.Context) error
	// Label sets (true) or removes (false) the node label podvm.io/runtime=true; nil skips it.
	Label func(ctx context.Context, on bool) error
}

// Manifest is what Install changed on the node.
type Manifest struct {
	// Files are the installed files (relative to the host root) and their SHA-256.
	Files map[string]string `json:"files"`
	// Dirs are the directories Install created, deepest last.
	Dirs []string `json:"dirs"`
	// Containerd is how containerd's main config was changed: "" (not at all), "created"
	// or "imports-added" (a first line added).
	Containerd string `json:"containerd,omitempty"`
}

func (in *Installer) host(p string) string { return filepath.Join(in.HostRoot, p) }

func (in *Installer) manifestRel() string {
	if in.ManifestFile != "" {
		return in.ManifestFile
	}
	return ManifestPath
}

func (in *Installer) manifest() string { return in.host(in.manifestRel()) }

// NodePath is where rel, a path under the host root, is on the node.
func (in *Installer) NodePath(rel string) string {
	root := in.NodeRoot
	if root == "" {
		root = "/"
	}
	return filepath.Join(root, rel)
}

// Install installs podvm onto the node; see the package doc.
func (in *Installer) Install(ctx context.Context) error {
	m, err := in.readManifest()
	if err != nil {
		return err
	}
	if err := in.copyTree(m); err != nil {
		return errors.Join(err, in.writeManifest(m))
	}
	if m.Containerd == "" && !in.LeaveContainerdConfig {
		if err := in.mkdirAll(m, filepath.Dir(ContainerdConfig)); err != nil {
			return errors.Join(err, in.writeManifest(m))
		}
		how, err := importDropIn(in.host(ContainerdConfig), in.NodePath(DropIn))
		if err != nil {
			return errors.Join(err, in.writeManifest(m))
		}
		m.Containerd = how
	}
	if err := in.writeManifest(m); err != nil {
		return err
	}
	if in.RestartContainerd != nil {
		if err := in.RestartContainerd(ctx); err != nil {
			return fmt.Errorf("restart containerd: %w", err)
		}
	}
	if in.Label != nil {
		if err := in.Label(ctx, true); err != nil {
			return fmt.Errorf("label the node: %w", err)
		}
	}
	return nil
}

// copyTree copies the dist tree's files onto the host, recording them in m.
func (in *Installer) copyTree(m *Manifest) error {
	files, err := distFiles(in.DistRoot)
	if err != nil {
		return err
	}
	return filepath.WalkDir(in.DistRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(in.DistRoot, p)
		if err != nil || rel == "." {
			return err
		}
		dst := in.host(rel)
		if d.IsDir() {
			return in.mkdir(m, rel)
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("dist tree: %s is not a regular file", p)
		}
		if rel == ConfigPath && !in.ownsConfig(m) {
			return nil // the admin's config stays
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if data, err = in.relocate(rel, data, files); err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if err := writeAtomic(dst, data, info.Mode().Perm()); err != nil {
			return err
		}
		m.Files[rel] = digest(data)
		return nil
	})
}

// ownsConfig says whether Install may write the node config: there is none, or it is still
// the one Install wrote.
func (in *Installer) ownsConfig(m *Manifest) bool {
	data, err := os.ReadFile(in.host(ConfigPath))
	if errors.Is(err, fs.ErrNotExist) {
		return true
	}
	sum, installed := m.Files[ConfigPath]
	return err == nil && installed && digest(data) == sum
}

// mkdir creates a host directory, recording it when it did not exist.
func (in *Installer) mkdir(m *Manifest, rel string) error {
	dst := in.host(rel)
	if exists(dst) {
		return nil
	}
	if err := os.Mkdir(dst, 0o755); err != nil {
		return err
	}
	m.Dirs = append(m.Dirs, rel)
	return nil
}

// mkdirAll creates a host directory and its missing parents, recording each.
func (in *Installer) mkdirAll(m *Manifest, rel string) error {
	if parent := filepath.Dir(rel); parent != "." && !exists(in.host(parent)) {
		if err := in.mkdirAll(m, parent); err != nil {
			return err
		}
	}
	return in.mkdir(m, rel)
}

// Uninstall undoes what the manifest on the node records; without one it does nothing.
func (in *Installer) Uninstall(ctx context.Context) error {
	if !exists(in.manifest()) {
		return nil
	}
	m, err := in.readManifest()
	if err != nil {
		return err
	}
	if in.Label != nil {
		if err := in.Label(ctx, false); err != nil {
			return fmt.Errorf("remove the node label: %w", err)
		}
	}
	var errs []error
	if err := revertImport(in.host(ContainerdConfig), in.NodePath(DropIn), m.Containerd); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, in.removeFiles(m)...)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if in.RestartContainerd != nil {
		if err := in.RestartContainerd(ctx); err != nil {
			return fmt.Errorf("restart containerd: %w", err)
		}
	}
	if err := os.Remove(in.manifest()); err != nil {
		return err
	}
	_ = in.removeDirs(m) // again: the manifest's own directories are empty now
	in.removeRunState()
	return nil
}

// Installed reports whether the host root has a manifest of this installer.
func (in *Installer) Installed() bool { return exists(in.manifest()) }

// runState is what the shim makes at run time in its default state dir (/run/podvm), gone
// with podvm as the Debian package's postrm removes it: the accelerator probe's cache and lock
// (hypervisor/qemu's AccelCacheFile and AccelLockFile), the start slots' lock files
// (sandbox.max_parallel_starts), and the VM templates of templated start ([template] dir "":
// <state_dir>/templates), tmpfs memory that no pod uses once it started. Only root writes
// there; no guest can.
var runState = []string{"run/podvm/accel.json", "run/podvm/accel.lock", "run/podvm/" + config.StartSlotsDirName,
	"run/podvm/" + config.TemplateDirName}

// removeRunState removes runState, and the state dir when that leaves it empty (pods still
// running keep theirs).
func (in *Installer) removeRunState() {
	for _, f := range runState {
		_ = os.RemoveAll(in.host(f))
	}
	_ = os.Remove(in.host(filepath.Dir(runState[0])))
}

// removeFiles removes the installed files (the config only when unchanged) and the
// directories Install created, when empty.
func (in *Installer) removeFiles(m *Manifest) []error {
	var errs []error
	files := make([]string, 0, len(m.Files))
	for f := range m.Files {
		files = append(files, f)
	}
	sort.Strings(files)
	for _, f := range files {
		if f == ConfigPath && !in.ownsConfig(m) {
			continue // the admin changed it: theirs now
		}
		if err := os.Remove(in.host(f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return append(errs, in.removeDirs(m)...)
}

// removeDirs removes the directories Install made, deepest first, when empty: a directory
// something else put files in stays.
func (in *Installer) removeDirs(m *Manifest) []error {
	var errs []error
	for i := len(m.Dirs) - 1; i >= 0; i-- {
		if err := os.Remove(in.host(m.Dirs[i])); err != nil && !errors.Is(err, fs.ErrNotExist) && !isNotEmpty(err) {
			errs = append(errs, err)
		}
	}
	return errs
}

func (in *Installer) readManifest() (*Manifest, error) {
	m := &Manifest{Files: map[string]string{}}
	b, err := os.ReadFile(in.manifest())
	if errors.Is(err, fs.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("%s: %w; remove it only after removing podvm's files by hand", in.manifest(), err)
	}
	if m.Files == nil {
		m.Files = map[string]string{}
	}
	return m, nil
}

func (in *Installer) writeManifest(m *Manifest) error {
	// Its directories are recorded too, so uninstall takes them away again.
	if err := in.mkdirAll(m, filepath.Dir(in.manifestRel())); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(in.manifest(), b, 0o644)
}

func digest(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func isNotEmpty(err error) bool { return errors.Is(err, syscall.ENOTEMPTY) }

// writeAtomic replaces dst with data, so a running node never sees half a file.
func writeAtomic(dst string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(data)
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), mode), os.Rename(tmp.Name(), dst)); err != nil {
		_ = os.Remove(tmp.Name())
		return err
	}
	return nil
}
