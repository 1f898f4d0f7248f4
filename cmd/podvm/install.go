package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	iofs "io/fs"
	"os"
	"path/filepath"

	"github.com/podvm/podvm/deploy"
	"github.com/podvm/podvm/deploy/installer"
	"github.com/podvm/podvm/rootfs/guestimage"
)

// InstallManifest is where podvm install records what it installed onto a node (relative
// to its root), for podvm uninstall. A staging root gets none: packages track their files.
const InstallManifest = "var/lib/podvm/install.json"

// installFlags are podvm install's flags.
type installFlags struct {
	root, prefix, imageDir string
	record                 bool
}

// runInstall installs podvm onto a node, or into a staging root for node images.
func runInstall(ctx context.Context, e *env, args []string) error {
	const name = "podvm install"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var f installFlags
	fs.StringVar(&f.root, "root", "/", "install under this `DIR` (a node image's staging root); paths inside the files stay the final ones")
	fs.StringVar(&f.prefix, "prefix", "/usr/local", "binaries go to `PREFIX`/bin")
	fs.StringVar(&f.imageDir, "image", "", "`DIR` with vmlinuz, root.img, initrd.img and image.json from 'podvm image build' (default: _output/image beside the binaries' bin/, else none)")
	fs.BoolVar(&f.record, "record", false, "record what was installed in ROOT/"+InstallManifest+" for 'podvm uninstall' (default: true when --root is /)")
	setUsage(fs, name+" [flags]",
		"Installs podvm: this podvm binary and containerd-shim-podvm-v2 beside it into PREFIX/bin,\nthe guest image into /usr/share/podvm, the containerd drop-in\n/etc/containerd/conf.d/podvm.toml, the RuntimeClass manifest\n/usr/share/podvm/runtimeclass.yaml, and /etc/podvm/config.toml unless one exists (it is never\noverwritten). Onto / it records what it wrote (and the directories it made) for\n'podvm uninstall'. Then restart containerd and run 'podvm check'.")
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	recordSet := false
	fs.Visit(func(fl *flag.Flag) { recordSet = recordSet || fl.Name == "record" })
	if !recordSet {
		f.record = filepath.Clean(f.root) == "/"
	}
	say := func(format string, a ...any) { fmt.Fprintf(e.stdout, "podvm install: "+format+"\n", a...) }
	if !f.record {
		if err := stageInstall(e, f, f.root, say); err != nil {
			return err
		}
	} else if err := recordedInstall(ctx, e, f, say); err != nil {
		return err
	}
	say("done. containerd reads the drop-in only if its config has imports = [\"/etc/containerd/conf.d/*.toml\"]; restart containerd, then run 'podvm check'")
	return nil
}

// recordedInstall stages the tree in a temporary directory, then installs it onto the root
// with the node installer, which records every file and directory it made.
func recordedInstall(ctx context.Context, e *env, f installFlags, say func(string, ...any)) error {
	tmp, err := os.MkdirTemp("", "podvm-install-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	if err := stageInstall(e, f, tmp, func(string, ...any) {}); err != nil {
		return err
	}
	in := &installer.Installer{HostRoot: f.root, DistRoot: tmp, ManifestFile: InstallManifest, LeaveContainerdConfig: true}
	configExisted := exists(filepath.Join(f.root, installer.ConfigPath)) && !in.Installed()
	if err := in.Install(ctx); err != nil {
		return err
	}
	return filepath.WalkDir(tmp, func(p string, d iofs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(tmp, p)
		switch {
		case err != nil:
			return err
		case rel == installer.ConfigPath && configExisted:
			say("keeping %s (podvm config prints the defaults it leaves out)", filepath.Join(f.root, rel))
		default:
			say("%s", filepath.Join(f.root, rel))
		}
		return nil
	})
}

// stageInstall writes the install tree under root.
func stageInstall(e *env, f installFlags, root string, say func(string, ...any)) error {
	self, err := e.executable()
	if err != nil {
		return err
	}
	binDir := filepath.Dir(self)
	at := func(p string) string { return filepath.Join(root, p) }
	for _, b := range []string{"podvm", shimName} {
		src := filepath.Join(binDir, b)
		if b == "podvm" {
			src = self
		}
		dst := at(filepath.Join(f.prefix, "bin", b))
		if err := copyFile(src, dst, 0o755); err != nil {
			return fmt.Errorf("install %s: %w (build it with 'make build')", b, err)
		}
		say("%s", dst)
	}
	if err := stageImage(binDir, f.imageDir, at, say); err != nil {
		return err
	}
	for _, fl := range []struct {
		path string
		data []byte
		keep bool
	}{
		{"/usr/share/podvm/runtimeclass.yaml", deploy.RuntimeClass, false},
		{"/etc/containerd/conf.d/podvm.toml", deploy.ContainerdDropIn, false},
		{"/etc/podvm/config.toml", deploy.ConfigTOML, true},
	} {
		dst := at(fl.path)
		if fl.keep && exists(dst) {
			say("keeping %s (podvm config prints the defaults it leaves out)", dst)
			continue
		}
		if err := writeFile(dst, fl.data, 0o644); err != nil {
			return err
		}
		say("%s", dst)
	}
	return nil
}

// stageImage copies the guest image (from imageDir, else _output/image beside bin/).
func stageImage(binDir, imageDir string, at func(string) string, say func(string, ...any)) error {
	img := imageDir
	if img == "" {
		if guess := filepath.Join(filepath.Dir(binDir), "_output", "image"); exists(filepath.Join(guess, guestimage.InitrdFile)) {
			img = guess
		}
	}
	if img == "" {
		say("no guest image given (--image): build one into %s with 'podvm image build'", guestimage.DefaultOutputDir)
		return nil
	}
	// The root image first and image.json last, as 'podvm image build' puts them in place.
	// A kernel that cannot boot from a root image has none: an older one at the destination
	// would boot another agent, so it goes.
	rootImage := at(filepath.Join(guestimage.DefaultOutputDir, guestimage.RootImageFile))
	if exists(filepath.Join(img, guestimage.RootImageFile)) {
		if err := copyFile(filepath.Join(img, guestimage.RootImageFile), rootImage, 0o644); err != nil {
			return fmt.Errorf("install the guest image: %w", err)
		}
		say("%s", rootImage)
	} else if err := os.Remove(rootImage); err != nil && !errors.Is(err, iofs.ErrNotExist) {
		return fmt.Errorf("remove the root image of an earlier install: %w", err)
	}
	for _, f := range []string{guestimage.KernelFile, guestimage.InitrdFile, guestimage.ManifestFile} {
		dst := at(filepath.Join(guestimage.DefaultOutputDir, f))
		if err := copyFile(filepath.Join(img, f), dst, 0o644); err != nil {
			return fmt.Errorf("install the guest image: %w (build it with 'podvm image build' or 'make image')", err)
		}
		say("%s", dst)
	}
	return nil
}

// runUninstall undoes a recorded podvm install.
func runUninstall(ctx context.Context, e *env, args []string) error {
	const name = "podvm uninstall"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	root := fs.String("root", "/", "the root podvm install installed onto (`DIR`)")
	setUsage(fs, name+" [flags]",
		"Removes what 'podvm install' recorded in ROOT/"+InstallManifest+": its files (the node\nconfig only if unchanged), the directories it made, and the accelerator probe's cache and the VM\ntemplates in /run/podvm. Restart containerd afterwards, and remove the node's podvm.io/runtime label.")
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	in := &installer.Installer{HostRoot: *root, ManifestFile: InstallManifest, LeaveContainerdConfig: true}
	if !in.Installed() {
		return fmt.Errorf("no %s: nothing recorded to uninstall (an install from a package is removed by its package manager; else remove the files listed in docs/install.md)",
			filepath.Join(*root, InstallManifest))
	}
	if err := in.Uninstall(ctx); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "podvm uninstall: removed what podvm install put under %s; restart containerd\n", *root)
	return nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }() // read-only
	var b []byte
	if b, err = io.ReadAll(in); err != nil {
		return err
	}
	return writeFile(dst, b, mode)
}

// writeFile replaces dst atomically, so a running node never sees half a file.
func writeFile(dst string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(data)
	cerr := tmp.Close()
	// On failure the temporary file is removed best effort: the error returned is what failed.
	if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), mode)); err != nil {
		_ = os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		_ = os.Remove(tmp.Name())
		return err
	}
	return nil
}
