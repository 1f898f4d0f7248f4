package guestimage

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/buildinfo"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// DefaultOutputDir is where the node looks for the guest assets.
const DefaultOutputDir = "/usr/share/podvm"

// Output file names inside the output directory.
const (
	// KernelFile is the kernel QEMU boots (-kernel), in either KernelFormat.
	KernelFile   = "vmlinuz"
	InitrdFile   = "initrd.img"
	ManifestFile = "image.json"
)

// ModulesListPath is the file in the guest's root (initrd and root image) listing the modules to
// load, one absolute path a line, in load order. The agent reads it first thing and loads each
// with finit_module.
const ModulesListPath = "/lib/modules/podvm.modules"

// Compression is how initrd.img is compressed.
type Compression string

// Supported initrd compressions.
const (
	CompressNone Compression = "none"
	CompressGzip Compression = "gzip"
)

// ParseCompression checks a compression name; "" means CompressNone.
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case "", CompressNone:
		return CompressNone, nil
	case CompressGzip:
		return c, nil
	}
	return "", fmt.Errorf("compression %q: use %q or %q", s, CompressNone, CompressGzip)
}

// Options says what to build from and where to put it.
type Options struct {
	// Kernel is a Debian kernel package (.deb) or an extracted tree holding boot/vmlinuz-<version>
	// and lib/modules/<version>/.
	Kernel string
	// KernelVersion picks one kernel when the tree holds several; empty means the only one.
	KernelVersion string
	// Agent is the static podvm-agent binary; it becomes /init.
	Agent string
	// OutputDir receives vmlinuz, initrd.img, root.img (see RootImageSupport) and image.json; empty
	// means DefaultOutputDir.
	OutputDir string
	// Modules are the modules the guest needs (their dependencies are added); nil means
	// DefaultModules(), an empty non-nil slice means none.
	Modules []string
	// Compress is the initrd compression; empty means CompressNone.
	Compress Compression
	// Progress, if set, is called after each step.
	Progress func(Step)
}

// Step reports one finished build step.
type Step struct {
	Name     string // e.g. "resolve modules"
	Detail   string // e.g. "17 modules"; may be empty
	Duration time.Duration
}

// String renders the step as "name: detail in 1.2s", or "name: 1.2s" without a detail.
func (s Step) String() string {
	d := s.Duration.Round(100 * time.Millisecond)
	if s.Duration < time.Second {
		d = s.Duration.Round(time.Millisecond)
	}
	if s.Detail == "" {
		return fmt.Sprintf("%s: %v", s.Name, d)
	}
	return fmt.Sprintf("%s: %s in %v", s.Name, s.Detail, d)
}

// Manifest describes a built image; Build writes it as image.json.
type Manifest struct {
	KernelVersion string `json:"kernelVersion"`
	KernelSource  string `json:"kernelSource"`
	// KernelFormat is what vmlinuz holds; empty in manifests written before it was recorded
	// (a bzImage).
	KernelFormat KernelFormat   `json:"kernelFormat,omitempty"`
	Modules      []InitrdModule `json:"modules"`           // in load order
	Builtin      []string       `json:"builtin,omitempty"` // wanted modules built into the kernel
	AgentSHA256  string         `json:"agentSHA256"`
	InitrdSize   int64          `json:"initrdSize"`
	InitrdSHA256 string         `json:"initrdSHA256"`
	Compression  Compression    `json:"compression"`
	// RootImageSize and RootImageSHA256 describe root.img; both are empty when the kernel cannot
	// boot from a root image and the initrd is the guest's only root.
	RootImageSize   int64     `json:"rootImageSize,omitempty"`
	RootImageSHA256 string    `json:"rootImageSHA256,omitempty"`
	BuildTime       time.Time `json:"buildTime"`
}

// InitrdModule is a module as stored in the initrd (and the root image).
type InitrdModule struct {
	Name string `json:"name"`
	Path string `json:"path"` // absolute path inside the initrd, always a plain .ko
}

// Build makes the guest kernel, the initrd and, when the kernel can boot from it, the root image
// from opts and installs them, with image.json, into the output directory. The files are staged
// and renamed into place once all are complete; a root.img left by an earlier build is removed
// when this kernel gets none.
func Build(ctx context.Context, opts Options) (*Manifest, error) {
	b := builder{opts: opts}
	if b.opts.OutputDir == "" {
		b.opts.OutputDir = DefaultOutputDir
	}
	if b.opts.Modules == nil {
		b.opts.Modules = DefaultModules()
	}
	c, err := ParseCompression(string(b.opts.Compress))
	if err != nil {
		return nil, err
	}
	b.opts.Compress = c
	return b.build(ctx)
}

type builder struct {
	opts Options
}

func (b *builder) step(name, detail string, start time.Time) {
	if b.opts.Progress != nil {
		b.opts.Progress(Step{Name: name, Detail: detail, Duration: time.Since(start)})
	}
}

// kernelInfo is the opened kernel and what its module lists say.
type kernelInfo struct {
	tree       kernelTree
	mods       []Module        // modules the guest loads, in load order
	builtin    []string        // wanted modules built into the kernel
	builtinAll map[string]bool // every module modules.builtin lists
}

// configPath is the kernel's config file, boot/config-<version> next to the image.
func (k kernelInfo) configPath() string {
	return filepath.Join(filepath.Dir(k.tree.vmlinuz), "config-"+k.tree.version)
}

func (b *builder) build(ctx context.Context) (*Manifest, error) {
	start := time.Now()
	agent, err := checkAgent(b.opts.Agent)
	if err != nil {
		return nil, err
	}
	b.step("check agent", "static, "+mib(agent.size), start)

	tmp, err := os.MkdirTemp("", "podvm-image-")
	if err != nil {
		return nil, fmt.Errorf("temporary directory: %w", err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	k, err := b.kernelModules(ctx, tmp)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	tree, err := newRootTree(ctx, k.tree, k.mods, agent)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(b.opts.OutputDir, 0o755); err != nil {
		return nil, fmt.Errorf("output directory: %w", err)
	}
	return b.writeImage(ctx, k, tree, agent, tmp)
}

// kernelModules opens the kernel (extracting a package into tmp) and resolves the modules the
// guest loads, in load order, and those built into the kernel.
func (b *builder) kernelModules(ctx context.Context, tmp string) (kernelInfo, error) {
	start := time.Now()
	kt, extracted, err := openKernel(ctx, b.opts.Kernel, b.opts.KernelVersion, tmp)
	if err != nil {
		return kernelInfo{}, err
	}
	if extracted {
		b.step("extract kernel package", "", start)
	} else {
		b.step("open kernel tree", "", start)
	}
	start = time.Now()
	depPath, generated, err := modulesDepPath(ctx, kt, tmp)
	if err != nil {
		return kernelInfo{}, err
	}
	if generated {
		b.step("generate modules.dep with depmod", "", start)
	}
	start = time.Now()
	k, err := resolve(kt, depPath, b.opts.Modules)
	if err != nil {
		return kernelInfo{}, fmt.Errorf("kernel %s: %w", kt.version, err)
	}
	detail := fmt.Sprintf("%d modules", len(k.mods))
	if len(k.builtin) > 0 {
		detail += fmt.Sprintf(" (%s built in)", strings.Join(k.builtin, ", "))
	}
	b.step("resolve modules", detail, start)
	return k, nil
}

// writeImage writes the root image (when the kernel can boot from one), the initrd, the kernel
// and image.json into the output dir, each staged and put in place only once all are complete.
// Without a root image, one left by an earlier build is removed first: it would hold another
// agent.
func (b *builder) writeImage(ctx context.Context, k kernelInfo, tree *rootTree, agent agentInfo, tmp string) (*Manifest, error) {
	files := stagedFiles{dir: b.opts.OutputDir}
	defer files.discard()
	root, err := b.stageRootImage(ctx, &files, k, tree, agent, tmp)
	if err != nil {
		return nil, err
	}
	initrd, err := b.stageInitrd(&files, tree)
	if err != nil {
		return nil, err
	}
	format, err := b.stageKernel(&files, k.tree)
	if err != nil {
		return nil, err
	}
	m := &Manifest{
		KernelVersion: k.tree.version,
		KernelSource:  b.opts.Kernel,
		KernelFormat:  format,
		Modules:       tree.modules,
		Builtin:       k.builtin,
		AgentSHA256:   agent.sha256,
		InitrdSize:    initrd.size,
		InitrdSHA256:  initrd.sum(),
		Compression:   b.opts.Compress,
		BuildTime:     time.Now().UTC().Truncate(time.Second),
	}
	if root != nil {
		m.RootImageSize, m.RootImageSHA256 = root.size, root.sum()
	}
	start := time.Now()
	manifest, err := files.stage(ManifestFile)
	if err != nil {
		return nil, err
	}
	if err := writeManifest(manifest, m); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if root == nil {
		stale := filepath.Join(b.opts.OutputDir, RootImageFile)
		if err := os.Remove(stale); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("remove the root image of an earlier build: %w", err)
		}
	}
	// In staging order: root image, initrd, kernel, and image.json last: it describes files that
	// are already in place.
	if err := files.commit(); err != nil {
		return nil, err
	}
	if err := syncDir(b.opts.OutputDir); err != nil {
		return nil, err
	}
	b.step("install", b.opts.OutputDir, start)
	return m, nil
}

// stageRootImage writes root.img into a staged file when the kernel can boot from it; it returns
// nil when it cannot, and reports why.
func (b *builder) stageRootImage(ctx context.Context, files *stagedFiles, k kernelInfo, tree *rootTree, agent agentInfo, tmp string) (*stagedFile, error) {
	start := time.Now()
	ok, why, err := RootImageSupport(k.builtinAll, k.configPath())
	if err != nil {
		return nil, err
	}
	if !ok {
		b.step("root image", "none ("+why+"); the initrd is the guest's root", start)
		return nil, nil
	}
	f, err := files.stage(RootImageFile)
	if err != nil {
		return nil, err
	}
	if err := writeRootImage(ctx, tree, agent.sha256, f.f.Name(), tmp); err != nil {
		return nil, fmt.Errorf("write root image: %w", err)
	}
	if err := f.hashContents(); err != nil {
		return nil, err
	}
	if err := f.finish(); err != nil {
		return nil, err
	}
	b.step("write root image", mib(f.size), start)
	return f, nil
}

func (b *builder) stageInitrd(files *stagedFiles, tree *rootTree) (*stagedFile, error) {
	start := time.Now()
	f, err := files.stage(InitrdFile)
	if err != nil {
		return nil, err
	}
	if err := tree.writeCPIO(f, b.opts.Compress); err != nil {
		return nil, fmt.Errorf("write initrd: %w", err)
	}
	if err := f.finish(); err != nil {
		return nil, err
	}
	b.step("write initrd", mib(f.size), start)
	return f, nil
}

// stageKernel copies the kernel image (see kernelTree.image) into a staged vmlinuz.
func (b *builder) stageKernel(files *stagedFiles, kt kernelTree) (KernelFormat, error) {
	start := time.Now()
	src, format := kt.image()
	f, err := files.stage(KernelFile)
	if err != nil {
		return "", err
	}
	if err := copyFile(f, src); err != nil {
		return "", err
	}
	if err := f.finish(); err != nil {
		return "", err
	}
	b.step("copy kernel", fmt.Sprintf("%s, %s", format, mib(f.size)), start)
	return format, nil
}

// writeManifest writes m as indented JSON into its staged file.
func writeManifest(f *stagedFile, m *Manifest) error {
	enc := json.NewEncoder(f)
	enc.SetIndent("", "  ")
	if err := enc.Encode(m); err != nil {
		return fmt.Errorf("write %s: %w", f.final, err)
	}
	return f.finish()
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

type agentInfo struct {
	path   string
	size   int64
	sha256 string
}

// protobufModule is linked into the agent (for ttrpc) and must not be as published: its
// internal/detrand opens the running binary by path as it initialises, and as runc init
// (which starts inside a container's mount namespace) that path is the container's. `make
// agent` builds against a copy with agent/detrand in its place (docs/security.md).
const protobufModule = "google.golang.org/protobuf"

// agentDeps checks the agent's modules: protobuf, if linked, must be replaced.
func agentDeps(bi *debug.BuildInfo) error {
	for _, d := range bi.Deps {
		if d.Path == protobufModule && d.Replace == nil {
			return fmt.Errorf("links %s %s as published, whose start opens a file of the container's in every exec's runc init (docs/security.md): build podvm-agent with `make agent`, which replaces its internal/detrand",
				d.Path, d.Version)
		}
	}
	return nil
}

// checkAgent makes sure the agent is a static ELF executable (the initrd has no libc or dynamic
// loader) and hashes it.
func checkAgent(p string) (agentInfo, error) {
	if p == "" {
		return agentInfo{}, errors.New("no agent binary given: build podvm-agent with `make` and pass its path")
	}
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return agentInfo{}, fmt.Errorf("agent %s does not exist: build podvm-agent with `make`", p)
		}
		return agentInfo{}, fmt.Errorf("agent: %w", err)
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil {
		return agentInfo{}, fmt.Errorf("agent: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return agentInfo{}, fmt.Errorf("agent %s is not a regular file", p)
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return agentInfo{}, fmt.Errorf("agent %s is not an ELF executable (%v): build podvm-agent with `make`", p, err)
	}
	for _, prog := range ef.Progs {
		if prog.Type == elf.PT_INTERP {
			return agentInfo{}, fmt.Errorf("agent %s is dynamically linked, but the initrd has no dynamic loader or libc: build it static (CGO_ENABLED=0, as `make` does)", p)
		}
	}
	if ef.Type != elf.ET_EXEC && ef.Type != elf.ET_DYN {
		return agentInfo{}, fmt.Errorf("agent %s is an ELF %v, not an executable", p, ef.Type)
	}
	if bi, err := buildinfo.Read(f); err == nil { // else not Go, or no build information
		if err := agentDeps(bi); err != nil {
			return agentInfo{}, fmt.Errorf("agent %s %w", p, err)
		}
	}
	h := sha256.New()
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return agentInfo{}, fmt.Errorf("agent: %w", err)
	}
	if _, err := io.Copy(h, f); err != nil {
		return agentInfo{}, fmt.Errorf("agent %s: %w", p, err)
	}
	return agentInfo{path: p, size: fi.Size(), sha256: hex.EncodeToString(h.Sum(nil))}, nil
}

// resolve reads modules.dep and modules.builtin and orders the wanted modules with their
// dependencies. It also returns which wanted modules are built in.
func resolve(kt kernelTree, depPath string, wanted []string) (kernelInfo, error) {
	df, err := os.Open(depPath)
	if err != nil {
		return kernelInfo{}, err
	}
	defer func() { _ = df.Close() }()
	dep, err := ParseModulesDep(df)
	if err != nil {
		return kernelInfo{}, fmt.Errorf("%s: %w", depPath, err)
	}
	builtin := map[string]bool{}
	bf, err := os.Open(filepath.Join(kt.modulesDir, "modules.builtin"))
	switch {
	case err == nil:
		defer func() { _ = bf.Close() }()
		if builtin, err = ParseModulesBuiltin(bf); err != nil {
			return kernelInfo{}, err
		}
	case !errors.Is(err, fs.ErrNotExist):
		return kernelInfo{}, err
	}
	mods, err := ResolveModules(dep, builtin, wanted)
	if err != nil {
		return kernelInfo{}, err
	}
	var inKernel []string
	for _, w := range wanted {
		if n := ModuleName(strings.TrimSpace(w)); builtin[n] && !slices.Contains(inKernel, n) {
			inKernel = append(inKernel, n)
		}
	}
	return kernelInfo{tree: kt, mods: mods, builtin: inKernel, builtinAll: builtin}, nil
}

// copyN copies exactly n bytes of the file at p to w (the file must not have changed size).
func copyN(w io.Writer, p string, n int64) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if _, err := io.CopyN(w, f, n); err != nil {
		return fmt.Errorf("copy %s: %w (did it change while building?)", p, err)
	}
	return nil
}

// readModule reads a module file, decompressing .ko.xz, .ko.zst and .ko.gz: the agent loads
// modules with finit_module and does not rely on in-kernel decompression. It returns the data and
// the plain file name (without the compression suffix).
func readModule(p string) ([]byte, string, error) {
	raw, err := os.ReadFile(p)
	if err != nil {
		return nil, "", err
	}
	base := filepath.Base(p)
	var r io.Reader
	switch ext := filepath.Ext(base); ext {
	case ".ko":
		return raw, base, nil
	case ".xz":
		xr, err := xz.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, "", fmt.Errorf("xz: %w", err)
		}
		r = xr
	case ".gz":
		gr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, "", fmt.Errorf("gzip: %w", err)
		}
		defer func() { _ = gr.Close() }()
		r = gr
	case ".zst":
		zr, err := zstd.NewReader(bytes.NewReader(raw), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, "", fmt.Errorf("zstd: %w", err)
		}
		defer zr.Close()
		r = zr
	default:
		return nil, "", fmt.Errorf("unknown module file type %q", ext)
	}
	// A module is a few MiB at most; refuse decompression bombs.
	const maxModule = 256 << 20
	data, err := io.ReadAll(io.LimitReader(r, maxModule+1))
	if err != nil {
		return nil, "", fmt.Errorf("decompress %s: %w", p, err)
	}
	if len(data) > maxModule {
		return nil, "", fmt.Errorf("decompress %s: larger than %d MiB", p, maxModule>>20)
	}
	return data, strings.TrimSuffix(base, filepath.Ext(base)), nil
}

// stagedFile is an output file written under a temporary name and renamed into place by commit.
type stagedFile struct {
	f     *os.File
	final string
	size  int64
	hash  hash.Hash
	done  bool
}

func newStagedFile(dir, name string) (*stagedFile, error) {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", filepath.Join(dir, name), err)
	}
	return &stagedFile{f: f, final: filepath.Join(dir, name), hash: sha256.New()}, nil
}

func (s *stagedFile) Write(p []byte) (int, error) {
	n, err := s.f.Write(p)
	s.size += int64(n)
	s.hash.Write(p[:n])
	return n, err
}

// finish flushes the data to disk and closes the temporary file.
func (s *stagedFile) finish() error {
	if err := s.f.Chmod(0o644); err != nil {
		return fmt.Errorf("write %s: %w", s.final, err)
	}
	if err := s.f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", s.final, err)
	}
	if err := s.f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", s.final, err)
	}
	return nil
}

// hashContents hashes the file as another program wrote it through its name.
func (s *stagedFile) hashContents() error {
	if _, err := s.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("write %s: %w", s.final, err)
	}
	s.hash.Reset()
	n, err := io.Copy(s.hash, s.f)
	if err != nil {
		return fmt.Errorf("write %s: %w", s.final, err)
	}
	s.size = n
	return nil
}

// sum returns the hex SHA-256 of what was written.
func (s *stagedFile) sum() string { return hex.EncodeToString(s.hash.Sum(nil)) }

func (s *stagedFile) commit() error {
	if err := os.Rename(s.f.Name(), s.final); err != nil {
		return fmt.Errorf("install %s: %w", s.final, err)
	}
	s.done = true
	return nil
}

// discard removes the temporary file unless it was committed.
func (s *stagedFile) discard() {
	if !s.done {
		_ = s.f.Close()
		_ = os.Remove(s.f.Name())
	}
}

// stagedFiles are the output files of one build, committed together in staging order.
type stagedFiles struct {
	dir   string
	files []*stagedFile
}

func (s *stagedFiles) stage(name string) (*stagedFile, error) {
	f, err := newStagedFile(s.dir, name)
	if err != nil {
		return nil, err
	}
	s.files = append(s.files, f)
	return f, nil
}

// commit renames every file into place, in staging order.
func (s *stagedFiles) commit() error {
	for _, f := range s.files {
		if err := f.commit(); err != nil {
			return err
		}
	}
	return nil
}

// discard removes the temporary files not committed.
func (s *stagedFiles) discard() {
	for _, f := range s.files {
		f.discard()
	}
}

func copyFile(dst io.Writer, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy kernel: %w", err)
	}
	defer func() { _ = f.Close() }()
	if _, err := io.Copy(dst, f); err != nil {
		return fmt.Errorf("copy kernel %s: %w", src, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer func() { _ = d.Close() }()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
