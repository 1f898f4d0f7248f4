package guestimage

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// DefaultModules returns the modules the agent needs on Debian's cloud kernel: virtio PCI
// transport, virtio-serial and vsock for the agent connection, virtio-fs and overlay for container
// root filesystems, virtio-net and virtio-blk for pod networking and block volumes, ext4 for disk
// images. Their dependencies are added by ResolveModules.
func DefaultModules() []string {
	return []string{
		"virtio_pci", "virtio_console", "virtiofs", "vmw_vsock_virtio_transport",
		"virtio_net", "virtio_blk", "overlay", "ext4",
	}
}

// compressedSuffixes are the module compressions Linux's Kbuild can produce.
var compressedSuffixes = [...]string{".xz", ".zst", ".gz"}

// ModuleName returns the name modprobe uses for a module file or a module name: the base name
// without ".ko" and any compression suffix, with '-' replaced by '_'
// ("kernel/fs/fuse/virtiofs.ko.xz" → "virtiofs", "virtio-net" → "virtio_net").
func ModuleName(s string) string {
	s = path.Base(s)
	for _, c := range compressedSuffixes {
		if t, ok := strings.CutSuffix(s, c); ok && strings.HasSuffix(t, ".ko") {
			s = t
			break
		}
	}
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// isModuleFile reports whether p names a module file: *.ko, optionally compressed.
func isModuleFile(p string) bool {
	if strings.HasSuffix(p, ".ko") {
		return len(path.Base(p)) > len(".ko")
	}
	for _, c := range compressedSuffixes {
		if t, ok := strings.CutSuffix(p, c); ok {
			return strings.HasSuffix(t, ".ko") && len(path.Base(t)) > len(".ko")
		}
	}
	return false
}

// ModulesDep is a parsed modules.dep: every module's path relative to lib/modules/<version>/ and
// the paths of the modules it depends on.
type ModulesDep struct {
	paths []string            // module paths in file order
	deps  map[string][]string // module path → dependency paths as listed
	names map[string]string   // module name → path (the first entry with that name)
}

// ParseModulesDep parses modules.dep as written by depmod: one line per module,
// "kernel/path/mod.ko: kernel/dep1.ko kernel/dep2.ko". Paths must be relative and stay inside the
// modules directory, every dependency must have a line of its own, and a module may appear only
// once; anything else is an error naming the line.
func ParseModulesDep(r io.Reader) (*ModulesDep, error) {
	m := &ModulesDep{deps: make(map[string][]string), names: make(map[string]string)}
	br := bufio.NewReader(r)
	for lineNo := 1; ; lineNo++ {
		line, err := br.ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("modules.dep: %w", err)
		}
		if err := m.parseLine(line); err != nil {
			return nil, fmt.Errorf("modules.dep line %d: %w", lineNo, err)
		}
		if err != nil {
			break
		}
	}
	for _, p := range m.paths {
		for _, d := range m.deps[p] {
			if _, ok := m.deps[d]; !ok {
				return nil, fmt.Errorf("modules.dep: %s depends on %s, which has no line of its own", p, d)
			}
		}
	}
	return m, nil
}

func (m *ModulesDep) parseLine(line string) error {
	line = strings.TrimSpace(line)
	if line == "" || strings.HasPrefix(line, "#") {
		return nil
	}
	mod, rest, ok := strings.Cut(line, ":")
	if !ok {
		return fmt.Errorf("%q: expected \"module.ko: dependencies\"", truncate(line))
	}
	mod = strings.TrimSpace(mod)
	if err := checkModulePath(mod); err != nil {
		return err
	}
	if _, dup := m.deps[mod]; dup {
		return fmt.Errorf("%s listed twice", mod)
	}
	deps := strings.Fields(rest)
	for _, d := range deps {
		if err := checkModulePath(d); err != nil {
			return err
		}
		if d == mod {
			return fmt.Errorf("%s depends on itself", mod)
		}
	}
	m.paths = append(m.paths, mod)
	m.deps[mod] = deps
	if name := ModuleName(mod); m.names[name] == "" {
		m.names[name] = mod
	}
	return nil
}

// checkModulePath refuses paths that are not module files or that would leave the modules
// directory when joined to it: modules.dep comes from a package we did not build.
func checkModulePath(p string) error {
	if !isModuleFile(p) {
		return fmt.Errorf("%q is not a module file (*.ko, *.ko.xz, *.ko.zst, *.ko.gz)", truncate(p))
	}
	if !filepath.IsLocal(p) || path.Clean(p) != p || strings.Contains(p, `\`) {
		return fmt.Errorf("module path %q is not a clean relative path", truncate(p))
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Len returns the number of modules listed.
func (m *ModulesDep) Len() int { return len(m.paths) }

// Path returns the path of the module called name ('-' and '_' are equivalent).
func (m *ModulesDep) Path(name string) (string, bool) {
	p, ok := m.names[ModuleName(name)]
	return p, ok
}

// Deps returns the dependencies of the module at path p as modules.dep lists them.
func (m *ModulesDep) Deps(p string) []string { return slices.Clone(m.deps[p]) }

// ParseModulesBuiltin parses modules.builtin (one module path a line) into a set of module names.
func ParseModulesBuiltin(r io.Reader) (map[string]bool, error) {
	set := make(map[string]bool)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		set[ModuleName(line)] = true
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules.builtin: %w", err)
	}
	return set, nil
}

// Module is one module to load.
type Module struct {
	Name string // as modprobe spells it, with '_'
	Path string // relative to lib/modules/<version>/, as in modules.dep (possibly compressed)
}

// ResolveModules returns the wanted modules and everything they depend on, each after all of its
// dependencies. Wanted modules that are built into the kernel (in builtin) are skipped. The order is
// deterministic: wanted modules in the order given, each preceded by its not yet listed
// dependencies, visited the way modprobe loads them (the last listed dependency first). Unknown
// names and dependency cycles are errors.
func ResolveModules(dep *ModulesDep, builtin map[string]bool, wanted []string) ([]Module, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := make(map[string]int)
	var (
		order   []Module
		stack   []string
		unknown []string
	)
	var visit func(p string) error
	visit = func(p string) error {
		switch state[p] {
		case done:
			return nil
		case visiting:
			i := slices.Index(stack, p)
			cycle := append(slices.Clone(stack[i:]), p)
			for j := range cycle {
				cycle[j] = ModuleName(cycle[j])
			}
			return fmt.Errorf("module dependency cycle: %s", strings.Join(cycle, " -> "))
		}
		state[p] = visiting
		stack = append(stack, p)
		deps := dep.deps[p]
		for i := len(deps) - 1; i >= 0; i-- {
			if _, ok := dep.deps[deps[i]]; !ok {
				return fmt.Errorf("module %s depends on %s, which modules.dep does not list", ModuleName(p), deps[i])
			}
			if err := visit(deps[i]); err != nil {
				return err
			}
		}
		stack = stack[:len(stack)-1]
		state[p] = done
		order = append(order, Module{Name: ModuleName(p), Path: p})
		return nil
	}
	for _, w := range wanted {
		w = strings.TrimSpace(w)
		if w == "" {
			return nil, errors.New("empty module name in the module list")
		}
		name := ModuleName(w)
		if builtin[name] {
			continue
		}
		p, ok := dep.names[name]
		if !ok {
			if !slices.Contains(unknown, name) {
				unknown = append(unknown, name)
			}
			continue
		}
		if err := visit(p); err != nil {
			return nil, err
		}
	}
	if len(unknown) > 0 {
		return nil, fmt.Errorf("unknown kernel module(s) %s: neither in modules.dep nor built in; check the names with `modinfo` or drop them from the module list",
			strings.Join(unknown, ", "))
	}
	return order, nil
}
