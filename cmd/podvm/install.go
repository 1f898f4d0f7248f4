package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/podvm/podvm/deploy"
	"github.com/podvm/podvm/rootfs/guestimage"
)

// runInstall installs podvm onto a node, or into a staging root for node images.
func runInstall(ctx context.Context, e *env, args []string) error {
	const name = "podvm install"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	root := fs.String("root", "/", "install under this `DIR` (a node image's staging root); paths inside the files stay the final ones")
	prefix := fs.String("prefix", "/usr/local", "binaries go to `PREFIX`/bin")
	imageDir := fs.String("image", "", "`DIR` with vmlinuz, initrd.img and image.json from 'podvm image build' (default: _output/image beside the binaries' bin/, else none)")
	setUsage(fs, name+" [flags]",
		"Installs podvm: this podvm binary and containerd-shim-podvm-v2 beside it into PREFIX/bin,\nthe guest image into /usr/share/podvm, the containerd drop-in\n/etc/containerd/conf.d/podvm.toml, the RuntimeClass manifest\n/usr/share/podvm/runtimeclass.yaml, and /etc/podvm/config.toml unless one exists (it is never\noverwritten). Then restart containerd and run 'podvm check'.")
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	self, err := e.executable()
	if err != nil {
		return err
	}
	binDir := filepath.Dir(self)
	at := func(p string) string { return filepath.Join(*root, p) }
	say := func(format string, a ...any) { fmt.Fprintf(e.stdout, "podvm install: "+format+"\n", a...) }

	for _, b := range []string{"podvm", shimName} {
		src := filepath.Join(binDir, b)
		if b == "podvm" {
			src = self
		}
		dst := at(filepath.Join(*prefix, "bin", b))
		if err := copyFile(src, dst, 0o755); err != nil {
			return fmt.Errorf("install %s: %w (build it with 'make build')", b, err)
		}
		say("%s", dst)
	}
	img := *imageDir
	if img == "" {
		if guess := filepath.Join(filepath.Dir(binDir), "_output", "image"); exists(filepath.Join(guess, guestimage.InitrdFile)) {
			img = guess
		}
	}
	if img != "" {
		for _, f := range []string{guestimage.KernelFile, guestimage.InitrdFile, guestimage.ManifestFile} {
			dst := at(filepath.Join(guestimage.DefaultOutputDir, f))
			if err := copyFile(filepath.Join(img, f), dst, 0o644); err != nil {
				return fmt.Errorf("install the guest image: %w (build it with 'podvm image build' or 'make image')", err)
			}
			say("%s", dst)
		}
	} else {
		say("no guest image given (--image): build one into %s with 'podvm image build'", guestimage.DefaultOutputDir)
	}
	for _, f := range []struct {
		path string
		data []byte
		keep bool
	}{
		{"/usr/share/podvm/runtimeclass.yaml", deploy.RuntimeClass, false},
		{"/etc/containerd/conf.d/podvm.toml", deploy.ContainerdDropIn, false},
		{"/etc/podvm/config.toml", deploy.ConfigTOML, true},
	} {
		dst := at(f.path)
		if f.keep && exists(dst) {
			say("keeping %s (podvm config prints the defaults it leaves out)", dst)
			continue
		}
		if err := writeFile(dst, f.data, 0o644); err != nil {
			return err
		}
		say("%s", dst)
	}
	say("done. containerd reads the drop-in only if its config has imports = [\"/etc/containerd/conf.d/*.toml\"]; restart containerd, then run 'podvm check'")
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
