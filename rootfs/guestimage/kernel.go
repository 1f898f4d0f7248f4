package guestimage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

// DefaultKernelDir is where `make deps` downloads Debian's cloud kernel package.
const DefaultKernelDir = "/opt/podvm-dev/kernel"

// kernelHint tells the user what a kernel input is and how to get one.
const kernelHint = "expected a Debian kernel package (linux-image-*.deb) or a directory holding " +
	"boot/vmlinuz-<version> and lib/modules/<version>/; `make deps` downloads Debian's cloud kernel to " +
	DefaultKernelDir

// BuiltKernelLink is the name, inside the kernel directory (DefaultKernelDir), of the link to the
// kernel tree `make kernel` (kernel/build.sh) last built: podvm's own kernel, everything built in.
const BuiltKernelLink = "podvm"

// FindKernel returns the default guest kernel in dir: the tree `make kernel` built (dir/podvm),
// else the newest Debian kernel package there (see FindKernelPackage).
func FindKernel(dir string) (string, error) {
	link := filepath.Join(dir, BuiltKernelLink)
	if fi, err := os.Stat(link); err == nil && fi.IsDir() {
		return link, nil
	}
	p, err := FindKernelPackage(dir)
	if err != nil {
		return "", fmt.Errorf("no kernel built by `make kernel` (%s) and %w", link, err)
	}
	return p, nil
}

// FindKernelPackage returns the newest linux-image-*.deb in dir, comparing file names with
// numbers ordered by value (so 6.1.0-28 is newer than 6.1.0-9).
func FindKernelPackage(dir string) (string, error) {
	matches, err := filepath.Glob(filepath.Join(dir, "linux-image-*.deb"))
	if err != nil {
		return "", fmt.Errorf("look for kernel packages in %s: %w", dir, err)
	}
	if len(matches) == 0 {
		return "", fmt.Errorf("no linux-image-*.deb in %s: run `make deps` to download Debian's cloud kernel there, or pass the kernel explicitly", dir)
	}
	slices.SortFunc(matches, naturalCompare)
	return matches[len(matches)-1], nil
}

// naturalCompare compares strings with runs of digits compared by numeric value.
func naturalCompare(a, b string) int {
	for a != "" && b != "" {
		da, db := isDigit(a[0]), isDigit(b[0])
		if da && db {
			na, ra := digitRun(a)
			nb, rb := digitRun(b)
			na, nb = strings.TrimLeft(na, "0"), strings.TrimLeft(nb, "0")
			if c := len(na) - len(nb); c != 0 {
				return c
			}
			if c := strings.Compare(na, nb); c != 0 {
				return c
			}
			a, b = ra, rb
			continue
		}
		if a[0] != b[0] {
			return int(a[0]) - int(b[0])
		}
		a, b = a[1:], b[1:]
	}
	return len(a) - len(b)
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func digitRun(s string) (run, rest string) {
	i := 0
	for i < len(s) && isDigit(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

// kernelTree is an extracted kernel: the image and its modules directory.
type kernelTree struct {
	version    string
	vmlinuz    string // path of boot/vmlinuz-<version>
	pvh        string // path of boot/vmlinux-<version> when it has a PVH entry, else ""
	modulesDir string // path of lib/modules/<version> (or usr/lib/modules/<version>)
}

// image is the kernel the guest image gets and its format: the uncompressed ELF when the tree has
// one with a PVH entry (QEMU enters it directly: no firmware hand-off through the real-mode setup
// and no decompression in the guest), else the bzImage.
func (t kernelTree) image() (path string, format KernelFormat) {
	if t.pvh != "" {
		return t.pvh, KernelPVH
	}
	return t.vmlinuz, KernelBzImage
}

// openKernel finds the kernel in input, a .deb or an extracted tree. A package is extracted into a
// temporary directory under tmpDir, which the caller removes.
func openKernel(ctx context.Context, input, version, tmpDir string) (kernelTree, bool, error) {
	if input == "" {
		return kernelTree{}, false, fmt.Errorf("no kernel given: %s", kernelHint)
	}
	fi, err := os.Stat(input)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return kernelTree{}, false, fmt.Errorf("kernel %s does not exist: %s", input, kernelHint)
		}
		return kernelTree{}, false, fmt.Errorf("kernel %s: %w", input, err)
	}
	root := input
	extracted := false
	switch {
	case fi.IsDir():
	case fi.Mode().IsRegular() && isDebPackage(input):
		root = filepath.Join(tmpDir, "kernel")
		if err := extractDeb(ctx, input, root); err != nil {
			return kernelTree{}, false, err
		}
		extracted = true
	default:
		return kernelTree{}, false, fmt.Errorf("kernel %s is neither a .deb package nor a directory: %s", input, kernelHint)
	}
	t, err := findKernelTree(root, version)
	if err != nil {
		return kernelTree{}, extracted, fmt.Errorf("kernel %s: %w", input, err)
	}
	return t, extracted, nil
}

// isDebPackage reports whether the file starts with the ar magic a .deb has.
func isDebPackage(p string) bool {
	f, err := os.Open(p)
	if err != nil {
		return false
	}
	defer func() { _ = f.Close() }()
	magic := make([]byte, 8)
	n, _ := f.Read(magic)
	return n == 8 && string(magic) == "!<arch>\n"
}

func extractDeb(ctx context.Context, deb, dir string) error {
	bin, err := exec.LookPath("dpkg-deb")
	if err != nil {
		return fmt.Errorf("extract %s: dpkg-deb not found; install dpkg, or extract the package yourself (`dpkg-deb -x PKG DIR`) and pass the directory", deb)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("extract %s: %w", deb, err)
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "-x", deb, dir)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("extract %s: %w", deb, ctx.Err())
		}
		return fmt.Errorf("extract %s: dpkg-deb -x: %w: %s", deb, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// findKernelTree finds boot/vmlinuz-<version> with a matching modules directory under root.
func findKernelTree(root, version string) (kernelTree, error) {
	images, err := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if err != nil {
		return kernelTree{}, err
	}
	var found []kernelTree
	for _, img := range images {
		v := strings.TrimPrefix(filepath.Base(img), "vmlinuz-")
		if version != "" && v != version {
			continue
		}
		for _, md := range []string{filepath.Join(root, "lib", "modules", v), filepath.Join(root, "usr", "lib", "modules", v)} {
			if fi, err := os.Stat(md); err == nil && fi.IsDir() {
				pvh, err := findPVHKernel(filepath.Join(root, "boot", "vmlinux-"+v))
				if err != nil {
					return kernelTree{}, err
				}
				found = append(found, kernelTree{version: v, vmlinuz: img, pvh: pvh, modulesDir: md})
				break
			}
		}
	}
	switch {
	case len(found) == 1:
		return found[0], nil
	case len(found) > 1:
		var vs []string
		for _, t := range found {
			vs = append(vs, t.version)
		}
		return kernelTree{}, fmt.Errorf("several kernels (%s): choose one with the kernel version option", strings.Join(vs, ", "))
	case version != "":
		return kernelTree{}, fmt.Errorf("no boot/vmlinuz-%s with lib/modules/%s/ in it: %s", version, version, kernelHint)
	default:
		return kernelTree{}, fmt.Errorf("no boot/vmlinuz-<version> with a matching lib/modules/<version>/ in it: %s", kernelHint)
	}
}

// modulesDepPath returns the tree's modules.dep. When the tree has none (Debian's packages ship
// none: their postinst runs depmod), it generates one with depmod under tmpDir, leaving the tree
// alone.
func modulesDepPath(ctx context.Context, t kernelTree, tmpDir string) (path string, generated bool, err error) {
	p := filepath.Join(t.modulesDir, "modules.dep")
	if _, err := os.Stat(p); err == nil {
		return p, false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", false, err
	}
	bin, err := exec.LookPath("depmod")
	if err != nil {
		return "", false, fmt.Errorf("%s has no modules.dep and depmod is not installed to generate it: install kmod (`apt-get install kmod`)", t.modulesDir)
	}
	// depmod reads and writes <base>/lib/modules/<version>. Make that a directory of our own whose
	// entries link to the tree's, so depmod's output lands here. (kmod 30 has no --outdir.)
	base := filepath.Join(tmpDir, "depmod")
	dir := filepath.Join(base, "lib", "modules", t.version)
	abs, err := filepath.Abs(t.modulesDir)
	if err != nil {
		return "", false, err
	}
	ents, err := os.ReadDir(abs)
	if err != nil {
		return "", false, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", false, err
	}
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, "modules.") && n != "modules.builtin" && n != "modules.order" && n != "modules.builtin.modinfo" {
			continue // an index depmod regenerates
		}
		if err := os.Symlink(filepath.Join(abs, n), filepath.Join(dir, n)); err != nil {
			return "", false, err
		}
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "-b", base, t.version)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return "", false, ctx.Err()
		}
		return "", false, fmt.Errorf("generate modules.dep for %s: depmod: %w: %s", t.modulesDir, err, strings.TrimSpace(stderr.String()))
	}
	p = filepath.Join(dir, "modules.dep")
	if _, err := os.Stat(p); err != nil {
		return "", false, fmt.Errorf("generate modules.dep for %s: depmod wrote no %s", t.modulesDir, p)
	}
	return p, true, nil
}
