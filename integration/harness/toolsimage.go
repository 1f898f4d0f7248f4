package harness

import (
	"archive/tar"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// ToolsImage is the reference of BuildToolsImage's image in the test registry.
const ToolsImage = "podvm.test/tools:1"

// iptablesBinaries are the host's iptables (Debian's `iptables`) copied into the tools image,
// and the names it is called by.
var iptablesBinaries = map[string][]string{
	"/usr/sbin/xtables-nft-multi":    {"iptables-nft", "ip6tables-nft"},
	"/usr/sbin/xtables-legacy-multi": {"iptables-legacy", "ip6tables-legacy"},
}

// toolsExtras are plain files the tools need: iptables' extensions (loaded at run time) and
// the protocol tables they read.
var toolsExtras = []string{"/usr/lib/x86_64-linux-gnu/xtables", "/etc/protocols", "/etc/ethertypes"}

// BuildToolsImage makes the busybox image plus the host's iptables (nft and legacy), with the
// shared libraries they load at the paths ldd names, for tests of the kernel features a pod
// finds (netfilter, bridges, user namespaces).
func BuildToolsImage(ctx context.Context, busybox string) (v1.Image, error) {
	entries, err := busyboxEntries(ctx, busybox)
	if err != nil {
		return nil, err
	}
	files := map[string]bool{}
	var links []tarEntry
	for bin, names := range iptablesBinaries {
		files[bin] = true
		libs, err := sharedLibs(ctx, bin)
		if err != nil {
			return nil, err
		}
		for _, l := range libs {
			files[l] = true
		}
		for _, n := range names {
			links = append(links, tarEntry{name: "usr/sbin/" + n, typ: tar.TypeSymlink, mode: 0o777, linkname: filepath.Base(bin)})
		}
	}
	for _, p := range toolsExtras {
		if err := filepath.WalkDir(p, func(f string, de os.DirEntry, err error) error {
			switch {
			case err != nil:
				return err
			case de.Type().IsRegular():
				files[f] = true
			case de.Type()&os.ModeSymlink != 0: // the extensions' other names
				target, err := os.Readlink(f)
				if err != nil {
					return err
				}
				links = append(links, tarEntry{name: f[1:], typ: tar.TypeSymlink, mode: 0o777, linkname: target})
			}
			return nil
		}); err != nil {
			return nil, fmt.Errorf("tools image: %w", err)
		}
	}
	more, err := fileEntries(files)
	if err != nil {
		return nil, err
	}
	// iptables-legacy takes its lock in /run.
	more = append(more, tarEntry{name: "run/", typ: tar.TypeDir, mode: 0o755})
	layer, err := layerFromEntries(append(append(entries, more...), links...))
	if err != nil {
		return nil, fmt.Errorf("tools layer: %w", err)
	}
	return imageFromLayer(layer, busyboxConfig)
}

var lddPath = regexp.MustCompile(`(?m)(/[^ ]+) \(0x`)

// sharedLibs lists the libraries ldd says bin loads (the dynamic loader included).
func sharedLibs(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", bin, err)
	}
	var libs []string
	for _, m := range lddPath.FindAllStringSubmatch(string(out), -1) {
		libs = append(libs, m[1])
	}
	return libs, nil
}

// fileEntries makes tar entries for host files at the same paths, with their directories.
func fileEntries(files map[string]bool) ([]tarEntry, error) {
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	dirs := map[string]bool{"bin": true, "etc": true, "root": true, "tmp": true}
	var entries []tarEntry
	for _, p := range paths {
		rel := p[1:]
		for d := filepath.Dir(rel); d != "."; d = filepath.Dir(d) {
			if !dirs[d] {
				dirs[d] = true
				entries = append(entries, tarEntry{name: d + "/", typ: tar.TypeDir, mode: 0o755})
			}
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("tools image: %w", err)
		}
		entries = append(entries, tarEntry{name: rel, typ: tar.TypeReg, mode: 0o755, data: b})
	}
	// Parents before children.
	sort.SliceStable(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	return entries, nil
}
