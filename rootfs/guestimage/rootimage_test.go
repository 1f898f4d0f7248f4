package guestimage

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pmemKernelTree makes a kernel tree like builtinKernelTree's that can boot from a root image:
// virtio-pmem, the pmem driver and ext4 built in, CONFIG_FS_DAX=y. The builtin names are those of
// the real 6.1 kernel `make kernel` builds.
func pmemKernelTree(t *testing.T) (string, string) {
	t.Helper()
	root, ver := builtinKernelTree(t)
	appendFile(t, filepath.Join(root, "lib", "modules", ver, "modules.builtin"),
		"kernel/drivers/nvdimm/libnvdimm.ko\nkernel/drivers/nvdimm/nd_pmem.ko\n"+
			"kernel/drivers/nvdimm/virtio_pmem.ko\nkernel/drivers/nvdimm/nd_virtio.ko\nkernel/drivers/dax/dax.ko\n")
	appendFile(t, filepath.Join(root, "boot", "config-"+ver), "CONFIG_VIRTIO_PMEM=y\nCONFIG_FS_DAX=y\nCONFIG_EXT4_FS=y\n")
	return root, ver
}

func appendFile(t *testing.T, p, data string) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// e2fsTool returns an e2fsprogs tool's path, or skips (fails under CI) without it.
func e2fsTool(t *testing.T, name string) string {
	t.Helper()
	p, err := findE2fsprog(name)
	if err != nil {
		requirePrereq(t, "%v", err)
	}
	return p
}

// debugfsRequest runs a read-only debugfs request on img and returns its stdout.
func debugfsRequest(t *testing.T, img, req string) []byte {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(e2fsTool(t, "debugfs"), "-R", req, img)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("debugfs -R %q: %v: %s", req, err, stderr.String())
	}
	if msg := debugfsErrors(stderr.String()); msg != "" {
		t.Fatalf("debugfs -R %q: %s", req, msg)
	}
	return stdout.Bytes()
}

// e2fsck checks img read-only and fails the test on any problem.
func e2fsck(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command(e2fsTool(t, "e2fsck"), "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, out)
	}
}

var (
	statType  = regexp.MustCompile(`Type: (\S+(?: special)?)\s+Mode:\s+(\d+)`)
	statOwner = regexp.MustCompile(`User:\s+(\d+)\s+Group:\s+(\d+)`)
	statSize  = regexp.MustCompile(`Size: (\d+)`)
	statDev   = regexp.MustCompile(`Device major/minor number: (\d+):(\d+)`)
	statTime  = regexp.MustCompile(`(?m)^\s*(c|a|m|cr)time: 0x([0-9a-f]+):([0-9a-f]+)`)
)

// imageInode is what debugfs says of one inode, in the units of a cpio header.
type imageInode struct {
	mode     uint32 // st_mode: type and permission bits
	uid, gid int
	size     int64
	rmaj     uint32
	rmin     uint32
	times    []string
}

func statImage(t *testing.T, img, p string) imageInode {
	t.Helper()
	out := string(debugfsRequest(t, img, "stat "+p))
	m := statType.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("debugfs stat %s: no type in %q", p, out)
	}
	types := map[string]uint32{"regular": sIFREG, "directory": sIFDIR, "character special": sIFCHR}
	perm, _ := strconv.ParseUint(m[2], 8, 32)
	in := imageInode{mode: types[m[1]] | uint32(perm)}
	if o := statOwner.FindStringSubmatch(out); o != nil {
		in.uid, _ = strconv.Atoi(o[1])
		in.gid, _ = strconv.Atoi(o[2])
	}
	if s := statSize.FindStringSubmatch(out); s != nil {
		in.size, _ = strconv.ParseInt(s[1], 10, 64)
	}
	if d := statDev.FindStringSubmatch(out); d != nil {
		maj, _ := strconv.ParseUint(d[1], 16, 32)
		mn, _ := strconv.ParseUint(d[2], 16, 32)
		in.rmaj, in.rmin = uint32(maj), uint32(mn)
	}
	for _, tm := range statTime.FindAllStringSubmatch(out, -1) {
		in.times = append(in.times, tm[1]+"time="+tm[2]+":"+tm[3])
	}
	return in
}

// TestBuildRootImage: a kernel that can mount its root from virtio-pmem gets root.img, an ext4
// image e2fsck finds clean, holding exactly the initrd's files with their modes, owned by root.
func TestBuildRootImage(t *testing.T) {
	e2fsTool(t, "mke2fs")
	tree, _ := pmemKernelTree(t)
	agent := buildStaticAgent(t)
	out := t.TempDir()
	var steps []string
	m, err := Build(context.Background(), Options{Kernel: tree, Agent: agent, OutputDir: out,
		Progress: func(s Step) { steps = append(steps, s.String()) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("steps:\n%s", strings.Join(steps, "\n"))
	if !strings.Contains(strings.Join(steps, "\n"), "write root image: ") {
		t.Errorf("no root image step in %q", steps)
	}
	img := filepath.Join(out, RootImageFile)
	checkRootImageFile(t, out, m)
	e2fsck(t, img)
	stats := string(debugfsRequest(t, img, "stats"))
	for _, want := range []string{"Filesystem volume name:   podvm-root", "Block size:               4096", "Reserved block count:     0"} {
		if !strings.Contains(stats, want) {
			t.Errorf("superblock lacks %q", want)
		}
	}
	if f := regexp.MustCompile(`Filesystem features:(.*)`).FindStringSubmatch(stats); f == nil || strings.Contains(f[1], "has_journal") || !strings.Contains(f[1], "extent") {
		t.Errorf("features %q: want extents and no journal", f)
	}

	// Every initrd entry is in the image with the same type, mode, device numbers and contents.
	files := readInitrd(t, filepath.Join(out, InitrdFile))
	if len(files) < 10 {
		t.Fatalf("initrd has only %d entries", len(files))
	}
	for name, e := range files {
		in := statImage(t, img, "/"+name)
		if in.mode != e.mode || in.uid != 0 || in.gid != 0 || in.rmaj != e.rmaj || in.rmin != e.rmin {
			t.Errorf("/%s in the image: mode %o owner %d:%d dev %d,%d; initrd: mode %o owner 0:0 dev %d,%d",
				name, in.mode, in.uid, in.gid, in.rmaj, in.rmin, e.mode, e.rmaj, e.rmin)
		}
		if e.mode&0o170000 == sIFREG {
			if got := debugfsRequest(t, img, "cat /"+name); !bytes.Equal(got, e.data) {
				t.Errorf("/%s in the image: %d bytes differ from the initrd's %d", name, len(got), len(e.data))
			}
		}
		for _, tm := range in.times {
			if !strings.HasSuffix(tm, "=00000001:00000000") {
				t.Errorf("/%s in the image: %s, want the fixed time 1", name, tm)
			}
		}
	}
	// And what mke2fs made itself.
	for _, p := range []string{"/", "/lost+found"} {
		if in := statImage(t, img, p); in.uid != 0 || in.gid != 0 || len(in.times) != 4 || strings.Count(strings.Join(in.times, " "), "=00000001:00000000") != 4 {
			t.Errorf("%s in the image: owner %d:%d, times %v; want root and the fixed time 1", p, in.uid, in.gid, in.times)
		}
	}
	agentData, _ := os.ReadFile(agent)
	if init := files["init"]; init.mode != 0o100755 || !bytes.Equal(init.data, agentData) {
		t.Errorf("/init: mode %o, %d bytes", init.mode, len(init.data))
	}
	if list := files[strings.TrimPrefix(ModulesListPath, "/")]; len(list.data) != 0 {
		t.Errorf("module list %q, want empty: everything is built in", list.data)
	}
}

// checkRootImageFile: the output dir holds root.img next to the rest, its size a multiple of
// 2 MiB, and image.json has its size and hash.
func checkRootImageFile(t *testing.T, out string, m *Manifest) {
	t.Helper()
	if names := dirNames(out); names != "image.json initrd.img root.img vmlinuz" {
		t.Errorf("output dir holds %s", names)
	}
	data, err := os.ReadFile(filepath.Join(out, RootImageFile))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if m.RootImageSize != int64(len(data)) || m.RootImageSHA256 != fmt.Sprintf("%x", sum) {
		t.Errorf("manifest says %d bytes sha256 %s; root.img has %d, %x", m.RootImageSize, m.RootImageSHA256, len(data), sum)
	}
	if len(data) == 0 || len(data)%RootImageAlign != 0 {
		t.Errorf("root.img is %d bytes, not a multiple of 2 MiB", len(data))
	}
	var onDisk Manifest
	j, _ := os.ReadFile(filepath.Join(out, ManifestFile))
	if err := json.Unmarshal(j, &onDisk); err != nil {
		t.Fatal(err)
	}
	if onDisk.RootImageSize != m.RootImageSize || onDisk.RootImageSHA256 != m.RootImageSHA256 {
		t.Errorf("image.json = %s", j)
	}
}

// Same agent and kernel, built a second apart (so the staged files' ctimes differ): the same bytes.
func TestBuildRootImageReproducible(t *testing.T) {
	e2fsTool(t, "mke2fs")
	tree, _ := pmemKernelTree(t)
	agent := buildStaticAgent(t)
	var images [][]byte
	for i := range 2 {
		if i > 0 {
			time.Sleep(1100 * time.Millisecond)
		}
		out := t.TempDir()
		if _, err := Build(context.Background(), Options{Kernel: tree, Agent: agent, OutputDir: out}); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(out, RootImageFile))
		if err != nil {
			t.Fatal(err)
		}
		images = append(images, b)
	}
	if !bytes.Equal(images[0], images[1]) {
		n := 0
		for i := range images[0] {
			if i < len(images[1]) && images[0][i] != images[1][i] {
				n++
			}
		}
		t.Errorf("two builds from the same inputs differ in %d bytes", n)
	}
}

// Agents of 10 to 60 MB (and the modules' tree) fit: no build runs out of blocks or inodes.
func TestBuildRootImageLargeAgent(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the large agents")
	}
	e2fsTool(t, "mke2fs")
	tree, _ := pmemKernelTree(t)
	small := buildStaticAgent(t)
	elfData, err := os.ReadFile(small)
	if err != nil {
		t.Fatal(err)
	}
	for _, mb := range []int{10, 33, 60} {
		t.Run(fmt.Sprintf("%dMB", mb), func(t *testing.T) {
			// An ELF header followed by incompressible bytes; no zero blocks, so no holes.
			data := make([]byte, mb*1000*1000)
			copy(data, elfData)
			if _, err := rand.Read(data[len(elfData):]); err != nil {
				t.Fatal(err)
			}
			agent := filepath.Join(t.TempDir(), "podvm-agent")
			if err := os.WriteFile(agent, data, 0o755); err != nil {
				t.Fatal(err)
			}
			out := t.TempDir()
			m, err := Build(context.Background(), Options{Kernel: tree, Agent: agent, OutputDir: out})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d MB agent: root.img %d MiB", mb, m.RootImageSize>>20)
			img := filepath.Join(out, RootImageFile)
			e2fsck(t, img)
			if got := debugfsRequest(t, img, "cat /init"); !bytes.Equal(got, data) {
				t.Errorf("/init holds %d bytes, not the agent's %d", len(got), len(data))
			}
			if m.RootImageSize%RootImageAlign != 0 || m.RootImageSize > int64(len(data))+8<<20 {
				t.Errorf("root.img is %d bytes for a %d byte agent", m.RootImageSize, len(data))
			}
		})
	}
}

// Kernels that cannot mount a root image from virtio-pmem with DAX get none, and a root.img an
// earlier build left is removed: it would hold the earlier agent.
func TestBuildNoRootImage(t *testing.T) {
	e2fsTool(t, "mke2fs")
	agent := buildStaticAgent(t)
	noDAX, ver := pmemKernelTree(t)
	if err := os.WriteFile(filepath.Join(noDAX, "boot", "config-"+ver), []byte("CONFIG_VIRTIO_PMEM=y\n# CONFIG_FS_DAX is not set\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	noConfig, ver := pmemKernelTree(t)
	if err := os.Remove(filepath.Join(noConfig, "boot", "config-"+ver)); err != nil {
		t.Fatal(err)
	}
	builtinOnly, _ := builtinKernelTree(t)
	modular, _ := fakeKernelTree(t, true)
	pmem, _ := pmemKernelTree(t)
	for _, tt := range []struct {
		name, kernel, why string
	}{
		{"no pmem drivers", builtinOnly, "kernel has no virtio_pmem, nd_pmem built in"},
		{"modular kernel", modular, "kernel has no virtio_pmem, nd_pmem built in"},
		{"no FS_DAX", noDAX, "does not set CONFIG_FS_DAX=y"},
		{"no config", noConfig, "no kernel config"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out := t.TempDir()
			if _, err := Build(context.Background(), Options{Kernel: pmem, Agent: agent, OutputDir: out}); err != nil {
				t.Fatal(err)
			}
			var steps []string
			m, err := Build(context.Background(), Options{Kernel: tt.kernel, Agent: agent, OutputDir: out, Modules: []string{"ext4"},
				Progress: func(s Step) { steps = append(steps, s.String()) }})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(out, RootImageFile)); !os.IsNotExist(err) {
				t.Errorf("root.img of the earlier build is still there (stat: %v)", err)
			}
			if m.RootImageSize != 0 || m.RootImageSHA256 != "" {
				t.Errorf("manifest has a root image: %d bytes, %s", m.RootImageSize, m.RootImageSHA256)
			}
			if j, _ := os.ReadFile(filepath.Join(out, ManifestFile)); bytes.Contains(j, []byte("rootImage")) {
				t.Errorf("image.json mentions a root image: %s", j)
			}
			if s := strings.Join(steps, "\n"); !strings.Contains(s, "root image: none (") || !strings.Contains(s, tt.why) {
				t.Errorf("steps %q do not say why there is no root image (%q)", steps, tt.why)
			}
		})
	}
}

// When mke2fs or debugfs fails or is missing, the build fails with what to do, the output dir
// keeps the earlier build, and no temporary file is left anywhere.
func TestBuildRootImageToolFailure(t *testing.T) {
	e2fsTool(t, "mke2fs")
	tree, _ := pmemKernelTree(t)
	agent := buildStaticAgent(t)
	out := t.TempDir()
	if _, err := Build(context.Background(), Options{Kernel: tree, Agent: agent, OutputDir: out}); err != nil {
		t.Fatal(err)
	}
	before := dirContents(t, out)
	fakes := map[string]string{
		// Writes part of an image, then fails.
		"mke2fs": "#!/bin/sh\nfor a; do last=$prev; prev=$a; done\necho partial > \"$last\"\necho 'mke2fs: fake failure' >&2\nexit 1\n",
		// Exits 0 but reports a failed command, as debugfs does.
		"debugfs": "#!/bin/sh\necho 'debugfs 1.47.0 (5-Feb-2023)' >&2\necho '/dev/console: fake failure' >&2\nexit 0\n",
	}
	for _, tt := range []struct {
		name, fake string
		noDirs     bool
		want       []string
	}{
		{"mke2fs fails", "mke2fs", false, []string{"write root image", "mke2fs", "fake failure"}},
		{"debugfs reports an error", "debugfs", false, []string{"write root image", "debugfs", "/dev/console: fake failure"}},
		{"mke2fs missing", "", true, []string{"mke2fs not found", "apt-get install e2fsprogs"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			bin := t.TempDir()
			if tt.fake != "" {
				if err := os.WriteFile(filepath.Join(bin, tt.fake), []byte(fakes[tt.fake]), 0o755); err != nil {
					t.Fatal(err)
				}
				t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
			} else {
				t.Setenv("PATH", bin)
			}
			if tt.noDirs {
				saved := e2fsprogsDirs
				e2fsprogsDirs = []string{t.TempDir()}
				t.Cleanup(func() { e2fsprogsDirs = saved })
			}
			tmp := t.TempDir()
			t.Setenv("TMPDIR", tmp)
			_, err := Build(context.Background(), Options{Kernel: tree, Agent: agent, OutputDir: out})
			if err == nil {
				t.Fatal("Build succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if after := dirContents(t, out); !mapsEqual(before, after) {
				t.Errorf("output dir changed: %d files before, %d after", len(before), len(after))
			}
			if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
				t.Errorf("%d temporary files left in TMPDIR", len(ents))
			}
		})
	}
}

func dirContents(t *testing.T, dir string) map[string]string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = string(b)
	}
	return m
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestRootImageSize(t *testing.T) {
	for _, size := range []int64{0, 1, 10e6, 60e6, 300e6} {
		tr := &rootTree{entries: []treeEntry{{name: "dev", mode: 0o755 | os.ModeDir}, {name: "init", mode: 0o755, size: size}}}
		got := rootImageSize(tr)
		if got%RootImageAlign != 0 || got < size+1<<20 {
			t.Errorf("rootImageSize for a %d byte agent = %d", size, got)
		}
	}
}
