package guestimage

import (
	"bytes"
	"context"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBuildDebianKernel builds an image from the Debian cloud kernel `make deps` downloads and
// checks the module list against the modules themselves: each module's .modinfo "depends="
// names must all be loaded before it.
func TestBuildDebianKernel(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the build from the real kernel package")
	}
	deb, err := FindKernelPackage(DefaultKernelDir)
	if err != nil {
		requirePrereq(t, "%v", err)
	}
	for _, tool := range []string{"dpkg-deb", "depmod"} {
		if _, err := exec.LookPath(tool); err != nil {
			requirePrereq(t, "%s", tool)
		}
	}
	out := t.TempDir()
	var steps []string
	m, err := Build(context.Background(), Options{
		Kernel:    deb,
		Agent:     buildStaticAgent(t),
		OutputDir: out,
		Progress:  func(s Step) { steps = append(steps, s.String()) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: kernel %s\n%s", deb, m.KernelVersion, strings.Join(steps, "\n"))
	var names []string
	for _, mod := range m.Modules {
		names = append(names, mod.Name)
	}
	t.Logf("load order (%d): %s", len(names), strings.Join(names, " "))
	// Debian's kernel has virtio-pmem and the pmem driver as modules: it cannot mount its root
	// from pmem before loading them, so the initrd stays its only root.
	if _, err := os.Stat(filepath.Join(out, RootImageFile)); m.RootImageSize != 0 || err == nil {
		t.Errorf("Debian kernel got a root image (%d bytes)", m.RootImageSize)
	}
	if !strings.HasPrefix(filepath.Base(deb), "linux-image-"+m.KernelVersion+"_") {
		t.Errorf("kernel version %q does not match the package %s", m.KernelVersion, filepath.Base(deb))
	}

	files := readInitrd(t, filepath.Join(out, InitrdFile))
	list := strings.Fields(string(files[strings.TrimPrefix(ModulesListPath, "/")].data))
	if len(list) != len(m.Modules) {
		t.Fatalf("podvm.modules lists %d modules, image.json %d", len(list), len(m.Modules))
	}
	loaded := map[string]int{}
	for i, p := range list {
		if p != m.Modules[i].Path {
			t.Errorf("podvm.modules line %d = %s, image.json has %s", i+1, p, m.Modules[i].Path)
		}
		if !strings.HasPrefix(p, "/lib/modules/"+m.KernelVersion+"/") || !strings.HasSuffix(p, ".ko") {
			t.Errorf("module path %s is not a plain .ko under /lib/modules/%s/", p, m.KernelVersion)
		}
		e, ok := files[strings.TrimPrefix(p, "/")]
		if !ok {
			t.Errorf("%s is listed but not in the initrd", p)
			continue
		}
		info := modinfo(t, p, e.data)
		if !strings.HasPrefix(info["vermagic"], m.KernelVersion+" ") {
			t.Errorf("%s: vermagic %q is not for %s", p, info["vermagic"], m.KernelVersion)
		}
		if info["depends"] != "" {
			for _, d := range strings.Split(info["depends"], ",") {
				if _, ok := loaded[ModuleName(d)]; !ok {
					t.Errorf("%s needs %s, which is not loaded before it", p, d)
				}
			}
		}
		loaded[ModuleName(p)] = i
	}
	for _, w := range DefaultModules() {
		if _, ok := loaded[w]; !ok && !strings.Contains(strings.Join(m.Builtin, " "), w) {
			t.Errorf("default module %s is neither in the initrd nor built in", w)
		}
	}
	fi, err := os.Stat(filepath.Join(out, KernelFile))
	if err != nil || fi.Size() < 1<<20 {
		t.Errorf("vmlinuz: %v, %v", fi, err)
	}
}

// modinfo returns the key=value pairs of a module's .modinfo section.
func modinfo(t *testing.T, name string, data []byte) map[string]string {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("%s is not ELF (still compressed?): %v", name, err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		t.Fatalf("%s has no .modinfo", name)
	}
	b, err := sec.Data()
	if err != nil {
		t.Fatal(err)
	}
	info := map[string]string{}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			info[k] = v
		}
	}
	return info
}
