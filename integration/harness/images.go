package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image names the harness pushes. containerd resolves them through hosts.toml mirrors that point
// at the in-process registry, so they look like the usual public names.
const (
	BusyboxImage = "docker.io/library/busybox:latest"
	PauseImage   = "registry.k8s.io/pause:3.10"
)

// MirroredRegistries are the registry names whose hosts.toml points at the test registry.
// podvm.test is made up, for images that must not look like anything real.
func MirroredRegistries() []string { return []string{"docker.io", "registry.k8s.io", "podvm.test"} }

// testRegistry is an in-memory OCI registry listening on 127.0.0.1 inside the test netns.
type testRegistry struct {
	ns     *netNS
	addr   string // 127.0.0.1:port, valid inside ns only
	server *http.Server
}

func startRegistry(ns *netNS, logTo io.Writer) (*testRegistry, error) {
	l, err := ns.listen("127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen for the test registry in netns %s: %w", ns.name, err)
	}
	srv := &http.Server{
		Handler:           registry.New(registry.Logger(log.New(logTo, "registry: ", log.LstdFlags))),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = srv.Serve(l) }()
	return &testRegistry{ns: ns, addr: l.Addr().String(), server: srv}, nil
}

func (r *testRegistry) close(ctx context.Context) error { return r.server.Shutdown(ctx) }

// push stores img under ref (e.g. docker.io/library/busybox:latest). The registry part of ref is
// replaced by the test registry, which serves every mirrored registry name from one namespace.
func (r *testRegistry) push(ctx context.Context, ref string, img v1.Image) error {
	parsed, err := name.ParseReference(ref)
	if err != nil {
		return fmt.Errorf("image reference %q: %w", ref, err)
	}
	local, err := name.ParseReference(r.addr+"/"+parsed.Context().RepositoryStr()+refSuffix(parsed), name.Insecure)
	if err != nil {
		return fmt.Errorf("local reference for %q: %w", ref, err)
	}
	tr := &http.Transport{DialContext: r.ns.dialContext}
	defer tr.CloseIdleConnections()
	if err := remote.Write(local, img, remote.WithContext(ctx), remote.WithTransport(tr)); err != nil {
		return fmt.Errorf("push %s to the test registry: %w", ref, err)
	}
	return nil
}

func refSuffix(r name.Reference) string {
	switch r := r.(type) {
	case name.Tag:
		return ":" + r.TagStr()
	case name.Digest:
		return "@" + r.DigestStr()
	}
	return ""
}

// tarEntry is one file of a hand-made image layer.
type tarEntry struct {
	name     string
	typ      byte
	mode     int64
	linkname string
	data     []byte
}

func layerFromEntries(entries []tarEntry) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{
			Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.linkname,
			Size: int64(len(e.data)), ModTime: time.Unix(0, 0), Format: tar.FormatPAX,
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", e.name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, fmt.Errorf("tar data %s: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	})
}

func imageFromLayer(layer v1.Layer, cfg v1.Config) (v1.Image, error) {
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture = "amd64"
	cf.OS = "linux"
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cf.Config = cfg
	return mutate.ConfigFile(img, cf)
}

// BuildBusyboxImage makes a one-layer busybox image from the host's static busybox (Debian's
// busybox-static): /bin/busybox plus a /bin/<applet> symlink per applet, /etc/passwd and
// /etc/group with root and nobody, and /tmp.
func BuildBusyboxImage(ctx context.Context, busybox string) (v1.Image, error) {
	entries, err := busyboxEntries(ctx, busybox)
	if err != nil {
		return nil, err
	}
	layer, err := layerFromEntries(entries)
	if err != nil {
		return nil, fmt.Errorf("busybox layer: %w", err)
	}
	return imageFromLayer(layer, busyboxConfig)
}

// busyboxConfig is the image config of the busybox image and the images built on it.
var busyboxConfig = v1.Config{
	Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
	Cmd: []string{"sh"},
}

// ProbeImage is the reference of BuildProbeImage's image in the test registry.
const ProbeImage = "podvm.test/probe:1"

// BuildProbeImage makes the busybox image plus /agentprobe (integration/testimages/agentprobe,
// built into dir): what a process in a container can try against the guest's agent.
func BuildProbeImage(ctx context.Context, busybox, dir string) (v1.Image, error) {
	entries, err := busyboxEntries(ctx, busybox)
	if err != nil {
		return nil, err
	}
	probe, err := testImageBinary(ctx, dir, "agentprobe")
	if err != nil {
		return nil, err
	}
	layer, err := layerFromEntries(append(entries, probe))
	if err != nil {
		return nil, fmt.Errorf("probe layer: %w", err)
	}
	return imageFromLayer(layer, busyboxConfig)
}

// busyboxEntries are the files of the busybox image.
func busyboxEntries(ctx context.Context, busybox string) ([]tarEntry, error) {
	bin, err := os.ReadFile(busybox)
	if err != nil {
		return nil, fmt.Errorf("read busybox: %w", err)
	}
	out, err := exec.CommandContext(ctx, busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", busybox, err)
	}
	entries := []tarEntry{
		{name: "bin/", typ: tar.TypeDir, mode: 0o755},
		{name: "bin/busybox", typ: tar.TypeReg, mode: 0o755, data: bin},
		{name: "etc/", typ: tar.TypeDir, mode: 0o755},
		{name: "etc/passwd", typ: tar.TypeReg, mode: 0o644,
			data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{name: "etc/group", typ: tar.TypeReg, mode: 0o644, data: []byte("root:x:0:\nnobody:x:65534:\n")},
		{name: "root/", typ: tar.TypeDir, mode: 0o700},
		{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		entries = append(entries, tarEntry{name: "bin/" + applet, typ: tar.TypeSymlink, mode: 0o777, linkname: "busybox"})
	}
	return entries, nil
}

// BuildPauseImage compiles integration/testimages/pause (CGO_ENABLED=0) into dir and makes an
// image whose entrypoint is /pause.
func BuildPauseImage(ctx context.Context, dir string) (v1.Image, error) {
	pause, err := testImageBinary(ctx, dir, "pause")
	if err != nil {
		return nil, err
	}
	layer, err := layerFromEntries([]tarEntry{pause})
	if err != nil {
		return nil, fmt.Errorf("pause layer: %w", err)
	}
	return imageFromLayer(layer, v1.Config{Entrypoint: []string{"/pause"}})
}

// testImageBinary builds integration/testimages/<name> (CGO_ENABLED=0) into dir, as the image
// file /<name>.
func testImageBinary(ctx context.Context, dir, name string) (tarEntry, error) {
	bin := filepath.Join(dir, name)
	if err := GoBuild(ctx, bin, "github.com/podvm/podvm/integration/testimages/"+name); err != nil {
		return tarEntry{}, err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return tarEntry{}, err
	}
	return tarEntry{name: name, typ: tar.TypeReg, mode: 0o755, data: data}, nil
}

// GoBuild builds a static (CGO_ENABLED=0) binary of pkg, a package of this module, into out.
func GoBuild(ctx context.Context, out, pkg string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, pkg)
	cmd.Dir = moduleDir()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// moduleDir is the directory of this package's source, inside the podvm module.
func moduleDir() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "."
	}
	return filepath.Dir(file)
}

// hostsTOML is containerd's registry host configuration that sends every pull of one registry
// name to the test registry over plain http; there is no fallback to the real registry.
func hostsTOML(registryAddr string) string {
	u := "http://" + registryAddr
	return fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n", u, u)
}
