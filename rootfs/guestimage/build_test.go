package guestimage

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// requirePrereq skips the test for a missing prerequisite, or fails it when CI=true: CI must run
// everything.
func requirePrereq(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("missing prerequisite (CI=true, so this fails instead of skipping): "+format, args...)
	}
	t.Skipf("missing prerequisite: "+format, args...)
}

// buildStaticAgent builds a tiny static Go program to stand in for podvm-agent.
func buildStaticAgent(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	src := "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"podvm test agent\") }\n"
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return goBuildStatic(t, dir, "main.go", "GOFLAGS=-buildvcs=false", "GO111MODULE=off")
}

// buildProtoAgent builds testdata/protoagent, a static program that links
// google.golang.org/protobuf as published, as a plain `go build` of podvm-agent would.
func buildProtoAgent(t *testing.T) string {
	t.Helper()
	return goBuildStatic(t, "", "./testdata/protoagent")
}

// goBuildStatic builds pkg (in dir, "" for the test's own) into a static Linux binary named
// agent in a temp dir, with env added to the build's environment, and returns its path.
func goBuildStatic(t *testing.T, dir, pkg string, env ...string) string {
	t.Helper()
	// go test puts its own GOROOT/bin first in PATH, so this is the toolchain running the test.
	gobin, err := exec.LookPath("go")
	if err != nil {
		requirePrereq(t, "go toolchain to build a static test agent")
	}
	out := filepath.Join(t.TempDir(), "agent")
	cmd := exec.Command(gobin, "build", "-o", out, pkg)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux"), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// An agent whose protobuf is replaced (as `make agent` builds it) or that links no protobuf
// passes; one with protobuf as published does not (TestBuildErrors builds one for real).
func TestAgentDeps(t *testing.T) {
	pb := func(replaced bool) *debug.Module {
		m := &debug.Module{Path: protobufModule, Version: "v1.36.12"}
		if replaced {
			m.Replace = &debug.Module{Path: "./_output/agent-mod/protobuf", Version: "(devel)"}
		}
		return m
	}
	other := &debug.Module{Path: "github.com/containerd/ttrpc", Version: "v1.2.9"}
	for _, tc := range []struct {
		name string
		deps []*debug.Module
		ok   bool
	}{
		{"replaced", []*debug.Module{other, pb(true)}, true},
		{"no protobuf", []*debug.Module{other}, true},
		{"as published", []*debug.Module{other, pb(false)}, false},
	} {
		err := agentDeps(&debug.BuildInfo{Deps: tc.deps})
		if (err == nil) != tc.ok {
			t.Errorf("%s: agentDeps = %v, want ok %v", tc.name, err, tc.ok)
		}
	}
}

// fakeKernelTree makes a kernel tree with a made-up modules.dep and module files (plain, xz, gz
// and zst), returning the tree and each module's plain contents by name.
func fakeKernelTree(t *testing.T, withDep bool) (string, map[string]string) {
	t.Helper()
	root := t.TempDir()
	const ver = "6.1.0-test-amd64"
	md := filepath.Join(root, "lib", "modules", ver)
	write := func(p string, data []byte) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(root, "boot", "vmlinuz-"+ver), []byte("fake kernel image"))
	contents := map[string]string{}
	mod := func(rel, name string) {
		data := "module " + name + strings.Repeat(".", 100)
		contents[name] = data
		var buf bytes.Buffer
		switch filepath.Ext(rel) {
		case ".ko":
			buf.WriteString(data)
		case ".xz":
			w, err := xz.NewWriter(&buf)
			compress(t, w, err, data)
		case ".gz":
			compress(t, gzip.NewWriter(&buf), nil, data)
		case ".zst":
			w, err := zstd.NewWriter(&buf)
			compress(t, w, err, data)
		}
		write(filepath.Join(md, rel), buf.Bytes())
	}
	mod("kernel/drivers/virtio/virtio_ring.ko", "virtio_ring")
	mod("kernel/drivers/virtio/virtio.ko.xz", "virtio")
	mod("kernel/drivers/virtio/virtio_pci.ko.gz", "virtio_pci")
	mod("kernel/fs/overlayfs/overlay.ko.zst", "overlay")
	mod("kernel/drivers/block/unused.ko", "unused")
	if withDep {
		write(filepath.Join(md, "modules.dep"), []byte(`kernel/drivers/virtio/virtio_pci.ko.gz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/fs/overlayfs/overlay.ko.zst:
kernel/drivers/block/unused.ko:
`))
	}
	write(filepath.Join(md, "modules.builtin"), []byte("kernel/fs/ext4/ext4.ko\n"))
	return root, contents
}

// compress writes data through the compressor w (whose constructor returned err) and
// closes it, which flushes the compressed stream.
func compress(t *testing.T, w io.WriteCloser, err error, data string) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(w, data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func readInitrd(t *testing.T, p string) map[string]cpioEntry {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.HasPrefix(b, []byte{0x1f, 0x8b}) {
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		if b, err = io.ReadAll(zr); err != nil {
			t.Fatal(err)
		}
	}
	m := map[string]cpioEntry{}
	for _, e := range readCPIO(t, b) {
		m[e.name] = e
	}
	return m
}

func TestBuildFakeKernel(t *testing.T) {
	tree, contents := fakeKernelTree(t, true)
	agent := buildStaticAgent(t)
	agentData, _ := os.ReadFile(agent)
	out := t.TempDir()
	var steps []string
	m, err := Build(context.Background(), Options{
		Kernel:    tree,
		Agent:     agent,
		OutputDir: out,
		Modules:   []string{"virtio-pci", "overlay", "ext4"},
		Progress:  func(s Step) { steps = append(steps, s.String()) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("steps:\n%s", strings.Join(steps, "\n"))
	if m.KernelVersion != "6.1.0-test-amd64" {
		t.Errorf("KernelVersion = %q", m.KernelVersion)
	}
	const prefix = "/lib/modules/6.1.0-test-amd64/kernel/"
	wantMods := []InitrdModule{
		{"virtio_ring", prefix + "drivers/virtio/virtio_ring.ko"},
		{"virtio", prefix + "drivers/virtio/virtio.ko"},
		{"virtio_pci", prefix + "drivers/virtio/virtio_pci.ko"},
		{"overlay", prefix + "fs/overlayfs/overlay.ko"},
	}
	if len(m.Modules) != len(wantMods) {
		t.Fatalf("Modules = %v, want %v", m.Modules, wantMods)
	}
	for i := range wantMods {
		if m.Modules[i] != wantMods[i] {
			t.Errorf("Modules[%d] = %v, want %v", i, m.Modules[i], wantMods[i])
		}
	}
	if len(m.Builtin) != 1 || m.Builtin[0] != "ext4" {
		t.Errorf("Builtin = %v, want [ext4]", m.Builtin)
	}
	for _, s := range []string{"check agent", "open kernel tree", "resolve modules: 4 modules (ext4 built in)", "write initrd", "copy kernel", "install"} {
		if !strings.Contains(strings.Join(steps, "\n"), s) {
			t.Errorf("no step %q reported", s)
		}
	}
	checkOutputDir(t, out, m)
	checkInitrd(t, readInitrd(t, filepath.Join(out, "initrd.img")), agentData, wantMods, contents)
}

// checkOutputDir: no temporaries left, the kernel copied, image.json matching the result.
func checkOutputDir(t *testing.T, out string, m *Manifest) {
	t.Helper()
	if names := dirNames(out); names != "image.json initrd.img vmlinuz" {
		t.Errorf("output dir holds %s", names)
	}
	if k, _ := os.ReadFile(filepath.Join(out, "vmlinuz")); string(k) != "fake kernel image" {
		t.Errorf("vmlinuz = %q", k)
	}
	var onDisk Manifest
	j, _ := os.ReadFile(filepath.Join(out, "image.json"))
	if err := json.Unmarshal(j, &onDisk); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(filepath.Join(out, "initrd.img")); onDisk.InitrdSize != fi.Size() || onDisk.AgentSHA256 != m.AgentSHA256 || len(onDisk.Modules) != 4 {
		t.Errorf("image.json = %s", j)
	}
}

// checkInitrd: the initrd holds the agent as /init, the device nodes and directories the
// guest needs, the wanted modules decompressed and listed in podvm.modules, and no other.
func checkInitrd(t *testing.T, files map[string]cpioEntry, agentData []byte, wantMods []InitrdModule, contents map[string]string) {
	t.Helper()
	init := files["init"]
	if init.mode != 0o100755 || !bytes.Equal(init.data, agentData) {
		t.Errorf("/init mode %o, %d bytes; want 100755 and the agent's %d bytes", init.mode, len(init.data), len(agentData))
	}
	if c := files["dev/console"]; c.mode != 0o020600 || c.rmaj != 5 || c.rmin != 1 {
		t.Errorf("/dev/console = mode %o rdev %d,%d", c.mode, c.rmaj, c.rmin)
	}
	if c := files["dev/null"]; c.mode&0o170000 != 0o020000 || c.rmaj != 1 || c.rmin != 3 {
		t.Errorf("/dev/null = mode %o rdev %d,%d", c.mode, c.rmaj, c.rmin)
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "etc", "lib/modules/6.1.0-test-amd64/kernel/fs/overlayfs"} {
		if files[d].mode&0o170000 != 0o040000 {
			t.Errorf("directory %s missing (mode %o)", d, files[d].mode)
		}
	}
	var list []string
	for _, mod := range wantMods {
		list = append(list, mod.Path)
		if got := string(files[strings.TrimPrefix(mod.Path, "/")].data); got != contents[mod.Name] {
			t.Errorf("%s holds %q, want the decompressed module %q", mod.Path, got, contents[mod.Name])
		}
	}
	if got := string(files["lib/modules/podvm.modules"].data); got != strings.Join(list, "\n")+"\n" {
		t.Errorf("podvm.modules = %q", got)
	}
	if _, ok := files["lib/modules/6.1.0-test-amd64/kernel/drivers/block/unused.ko"]; ok {
		t.Error("initrd holds a module nobody asked for")
	}
}

func TestBuildDeterministic(t *testing.T) {
	tree, _ := fakeKernelTree(t, true)
	agent := buildStaticAgent(t)
	for _, comp := range []Compression{CompressNone, CompressGzip} {
		t.Run(string(comp), func(t *testing.T) {
			var images [][]byte
			for range 2 {
				out := t.TempDir()
				m, err := Build(context.Background(), Options{Kernel: tree, Agent: agent, OutputDir: out, Modules: []string{"virtio_pci", "overlay"}, Compress: comp})
				if err != nil {
					t.Fatal(err)
				}
				if m.Compression != comp {
					t.Errorf("Compression = %q", m.Compression)
				}
				b, err := os.ReadFile(filepath.Join(out, "initrd.img"))
				if err != nil {
					t.Fatal(err)
				}
				images = append(images, b)
			}
			if !bytes.Equal(images[0], images[1]) {
				t.Error("two builds from the same inputs differ")
			}
			if gz := bytes.HasPrefix(images[0], []byte{0x1f, 0x8b}); gz != (comp == CompressGzip) {
				t.Errorf("gzip magic present = %v with compression %q", gz, comp)
			}
		})
	}
}

// TestBuildGeneratesModulesDep covers trees without modules.dep (Debian's packages ship none).
func TestBuildGeneratesModulesDep(t *testing.T) {
	if _, err := exec.LookPath("depmod"); err != nil {
		requirePrereq(t, "depmod (kmod)")
	}
	// depmod needs real ELF modules to find dependencies; with fake ones it still lists them.
	tree, _ := fakeKernelTree(t, false)
	out := t.TempDir()
	var steps []string
	m, err := Build(context.Background(), Options{Kernel: tree, Agent: buildStaticAgent(t), OutputDir: out, Modules: []string{"overlay"},
		Progress: func(s Step) { steps = append(steps, s.String()) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Modules) != 1 || m.Modules[0].Name != "overlay" {
		t.Errorf("Modules = %v", m.Modules)
	}
	if !strings.Contains(strings.Join(steps, "\n"), "generate modules.dep with depmod") {
		t.Errorf("steps %q do not mention depmod", steps)
	}
	if _, err := os.Stat(filepath.Join(tree, "lib/modules/6.1.0-test-amd64/modules.dep")); err == nil {
		t.Error("depmod wrote into the input tree")
	}
}

func TestBuildErrors(t *testing.T) {
	tree, _ := fakeKernelTree(t, true)
	agent := buildStaticAgent(t)
	notDeb := filepath.Join(t.TempDir(), "kernel.deb")
	if err := os.WriteFile(notDeb, []byte("not an ar archive"), 0o644); err != nil {
		t.Fatal(err)
	}
	protoAgent := buildProtoAgent(t)
	empty := t.TempDir()
	script := filepath.Join(t.TempDir(), "agent.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		opts Options
		want []string
	}{
		{"missing kernel", Options{Kernel: "/nonexistent/linux.deb", Agent: agent}, []string{"does not exist", "make deps", "/opt/podvm-dev/kernel"}},
		{"no kernel", Options{Agent: agent}, []string{"no kernel given", "make deps"}},
		{"not a deb", Options{Kernel: notDeb, Agent: agent}, []string{"neither a .deb package nor a directory", "boot/vmlinuz-<version>"}},
		{"empty dir", Options{Kernel: empty, Agent: agent}, []string{"no boot/vmlinuz-<version>", "make deps"}},
		{"wrong version", Options{Kernel: tree, KernelVersion: "9.9", Agent: agent}, []string{"no boot/vmlinuz-9.9"}},
		{"unknown module", Options{Kernel: tree, Agent: agent, Modules: []string{"virtio_pci", "nosuch"}}, []string{"kernel 6.1.0-test-amd64", "unknown kernel module(s) nosuch"}},
		{"missing agent", Options{Kernel: tree, Agent: "/nonexistent/podvm-agent"}, []string{"does not exist", "make"}},
		{"script agent", Options{Kernel: tree, Agent: script}, []string{"not an ELF executable"}},
		{"dynamic agent", Options{Kernel: tree, Agent: "/bin/sh"}, []string{"dynamically linked", "CGO_ENABLED=0"}},
		{"agent with protobuf as published", Options{Kernel: tree, Agent: protoAgent}, []string{"links google.golang.org/protobuf v", "make agent"}},
		{"bad compression", Options{Kernel: tree, Agent: agent, Compress: "lz4"}, []string{`compression "lz4"`, "gzip"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.OutputDir = t.TempDir()
			_, err := Build(context.Background(), tt.opts)
			if err == nil {
				t.Fatal("Build succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if ents, _ := os.ReadDir(tt.opts.OutputDir); len(ents) != 0 {
				t.Errorf("failed build left %d files in the output dir", len(ents))
			}
		})
	}
}

func TestFindKernelPackage(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{
		"linux-image-6.1.0-9-cloud-amd64_6.1.27-1_amd64.deb",
		"linux-image-6.1.0-28-cloud-amd64_6.1.119-1_amd64.deb",
		"linux-image-6.1.0-3-cloud-amd64_6.1.8-1_amd64.deb",
		"linux-headers-6.1.0-99-cloud-amd64_6.1.999-1_amd64.deb",
	} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := FindKernelPackage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(got) != "linux-image-6.1.0-28-cloud-amd64_6.1.119-1_amd64.deb" {
		t.Errorf("FindKernelPackage = %s", got)
	}
	if _, err := FindKernelPackage(t.TempDir()); err == nil || !strings.Contains(err.Error(), "make deps") {
		t.Errorf("empty dir: error = %v", err)
	}
}

func TestFindKernel(t *testing.T) {
	dir := t.TempDir()
	deb := filepath.Join(dir, "linux-image-6.1.0-28-cloud-amd64_6.1.119-1_amd64.deb")
	if err := os.WriteFile(deb, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := FindKernel(dir); err != nil || got != deb {
		t.Errorf("without a built kernel: FindKernel = %s, %v; want the package", got, err)
	}
	built, _ := builtinKernelTree(t)
	if err := os.Symlink(built, filepath.Join(dir, BuiltKernelLink)); err != nil {
		t.Fatal(err)
	}
	if got, err := FindKernel(dir); err != nil || got != filepath.Join(dir, BuiltKernelLink) {
		t.Errorf("with a built kernel: FindKernel = %s, %v; want the link", got, err)
	}
	if _, err := FindKernel(t.TempDir()); err == nil || !strings.Contains(err.Error(), "make kernel") {
		t.Errorf("empty dir: error = %v", err)
	}
}

// builtinKernelTree makes a tree as kernel/build.sh installs it: a kernel with no loadable
// modules, an empty modules.dep and modules.builtin listing what a guest needs.
func builtinKernelTree(t *testing.T) (string, string) {
	t.Helper()
	root := t.TempDir()
	const ver = "6.1.192-podvm"
	md := filepath.Join(root, "lib", "modules", ver)
	if err := os.MkdirAll(md, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "boot"), 0o755); err != nil {
		t.Fatal(err)
	}
	var builtin strings.Builder
	for _, p := range []string{
		"kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio_pci.ko",
		"kernel/drivers/char/virtio_console.ko", "kernel/fs/fuse/fuse.ko", "kernel/fs/fuse/virtiofs.ko",
		"kernel/net/vmw_vsock/vsock.ko", "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
		"kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko", "kernel/drivers/net/virtio_net.ko",
		"kernel/drivers/block/virtio_blk.ko", "kernel/fs/overlayfs/overlay.ko", "kernel/fs/ext4/ext4.ko",
	} {
		builtin.WriteString(p + "\n")
	}
	for name, data := range map[string]string{
		filepath.Join(md, "modules.builtin"):        builtin.String(),
		filepath.Join(md, "modules.dep"):            "",
		filepath.Join(root, "boot", "vmlinuz-"+ver): "bzImage",
		filepath.Join(root, "boot", "config-"+ver):  "# CONFIG_MODULES is not set\n",
	} {
		if err := os.WriteFile(name, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root, ver
}

// A kernel with everything built in: no module in the initrd, an empty load list for the agent,
// and every default module reported as built in.
func TestBuildBuiltinKernel(t *testing.T) {
	tree, ver := builtinKernelTree(t)
	out := t.TempDir()
	m, err := Build(context.Background(), Options{Kernel: tree, Agent: buildStaticAgent(t), OutputDir: out})
	if err != nil {
		t.Fatal(err)
	}
	if m.KernelVersion != ver || len(m.Modules) != 0 {
		t.Errorf("KernelVersion %q, Modules %v; want %s and none", m.KernelVersion, m.Modules, ver)
	}
	if m.KernelFormat != KernelBzImage {
		t.Errorf("KernelFormat = %q, want %q: the tree has no vmlinux", m.KernelFormat, KernelBzImage)
	}
	if len(m.Builtin) != len(DefaultModules()) {
		t.Errorf("Builtin = %v, want all of %v", m.Builtin, DefaultModules())
	}
	files := readInitrd(t, filepath.Join(out, InitrdFile))
	list, ok := files[strings.TrimPrefix(ModulesListPath, "/")]
	if !ok || len(list.data) != 0 {
		t.Errorf("module list in the initrd: present %v, %q; want an empty list", ok, list.data)
	}
	for name := range files {
		if strings.HasSuffix(name, ".ko") {
			t.Errorf("initrd holds a module: %s", name)
		}
	}
	// A module the kernel has neither built in nor loadable is an error, not a silent gap.
	_, err = Build(context.Background(), Options{Kernel: tree, Agent: buildStaticAgent(t), OutputDir: t.TempDir(), Modules: []string{"xfs"}})
	if err == nil || !strings.Contains(err.Error(), "xfs") {
		t.Errorf("missing module: error = %v", err)
	}
}

func TestStepString(t *testing.T) {
	for _, tt := range []struct {
		s    Step
		want string
	}{
		{Step{Name: "extract kernel package", Duration: 1234e6}, "extract kernel package: 1.2s"},
		{Step{Name: "write initrd", Detail: "21.3 MiB", Duration: 312345678}, "write initrd: 21.3 MiB in 312ms"},
	} {
		if got := tt.s.String(); got != tt.want {
			t.Errorf("String() = %q, want %q", got, tt.want)
		}
	}
}

// dirNames lists dir's entries, sorted, separated by spaces.
func dirNames(dir string) string {
	ents, _ := os.ReadDir(dir)
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return strings.Join(names, " ")
}
