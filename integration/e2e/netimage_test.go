package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/podvm/podvm/integration/harness"
)

// netToolsImage is busybox plus the host's iptables (the nft variant, Debian's default) with
// its extensions, and iproute2's ip, with their shared libraries: what an istio-init style
// container or a pod that builds its own network runs.
const netToolsImage = "podvm.test/nettools:1"

// buildNetToolsImage makes netToolsImage from the host's files.
func buildNetToolsImage(ctx context.Context) (v1.Image, error) {
	base, err := harness.BuildBusyboxImage(ctx, "/bin/busybox")
	if err != nil {
		return nil, err
	}
	bin, err := filepath.EvalSymlinks("/usr/sbin/iptables")
	if err != nil {
		return nil, fmt.Errorf("iptables on the host (apt-get install iptables): %w", err)
	}
	ip, err := filepath.EvalSymlinks("/sbin/ip")
	if err != nil {
		return nil, fmt.Errorf("ip on the host (apt-get install iproute2): %w", err)
	}
	exts, _ := filepath.Glob("/usr/lib/x86_64-linux-gnu/xtables/*.so")
	files := append([]string{bin, ip}, exts...)
	libs, err := sharedLibs(ctx, files)
	if err != nil {
		return nil, err
	}
	files = append(files, libs...)
	layer, err := hostFilesLayer(files, filepath.Base(bin), []string{"iptables", "iptables-save", "iptables-restore"})
	if err != nil {
		return nil, err
	}
	return mutate.AppendLayers(base, layer)
}

var lddPath = regexp.MustCompile(`(?:=> )?(/\S+) \(0x`)

// sharedLibs lists the libraries (and the loader) that files need, from ldd.
func sharedLibs(ctx context.Context, files []string) ([]string, error) {
	seen := map[string]bool{}
	for _, f := range files {
		out, err := exec.CommandContext(ctx, "ldd", f).Output()
		if err != nil {
			return nil, fmt.Errorf("ldd %s: %w", f, err)
		}
		for _, m := range lddPath.FindAllStringSubmatch(string(out), -1) {
			seen[m[1]] = true
		}
	}
	var libs []string
	for l := range seen {
		libs = append(libs, l)
	}
	sort.Strings(libs)
	return libs, nil
}

// hostFilesLayer is a layer with each host file (symlinks followed) at its path, /lib and
// /lib64 spelled /usr/lib and /usr/lib64 with links from the short names (merged /usr), and
// links /usr/sbin/<name> → bin for each of names.
func hostFilesLayer(files []string, bin string, names []string) (v1.Layer, error) {
	var entries []*tar.Header
	var datas [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		name := strings.TrimPrefix(f, "/")
		if strings.HasPrefix(name, "lib/") || strings.HasPrefix(name, "lib64/") {
			name = "usr/" + name
		}
		entries = append(entries, &tar.Header{Name: name, Mode: 0o755, Size: int64(len(b)), Typeflag: tar.TypeReg})
		datas = append(datas, b)
	}
	link := func(name, target string) {
		entries = append(entries, &tar.Header{Name: name, Linkname: target, Mode: 0o777, Typeflag: tar.TypeSymlink})
		datas = append(datas, nil)
	}
	for _, n := range names {
		link("usr/sbin/"+n, bin)
	}
	link("lib", "usr/lib")
	link("lib64", "usr/lib64")

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := writeDirs(tw, entries); err != nil {
		return nil, err
	}
	for i, h := range entries {
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(datas[i]); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	raw := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil })
}

// writeDirs writes a directory entry for every parent of entries, parents first.
func writeDirs(tw *tar.Writer, entries []*tar.Header) error {
	dirs := map[string]bool{}
	for _, h := range entries {
		for d := filepath.Dir(h.Name); d != "."; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	var list []string
	for d := range dirs {
		list = append(list, d)
	}
	sort.Strings(list)
	for _, d := range list {
		if err := tw.WriteHeader(&tar.Header{Name: d + "/", Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
			return err
		}
	}
	return nil
}
