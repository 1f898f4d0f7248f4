package guestimage

import (
	"path/filepath"
	"strings"
	"testing"
)

// A made-up modules.dep: a diamond (top needs left and right, both need base), a chain, a
// module with a '-' in its file name, a compressed one, and depmod's transitive listing.
const testModulesDep = `kernel/drivers/top.ko: kernel/drivers/left.ko kernel/drivers/right.ko kernel/lib/base.ko
kernel/drivers/left.ko: kernel/lib/base.ko
kernel/drivers/right.ko: kernel/lib/base.ko
kernel/lib/base.ko:
kernel/net/chain-c.ko.xz: kernel/net/chain_b.ko kernel/net/chain_a.ko
kernel/net/chain_b.ko: kernel/net/chain_a.ko
kernel/net/chain_a.ko:

kernel/fs/solo.ko.zst:
`

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/fs/fuse/virtiofs.ko":    "virtiofs",
		"kernel/fs/fuse/virtiofs.ko.xz": "virtiofs",
		"kernel/net/chain-c.ko.zst":     "chain_c",
		"x.ko.gz":                       "x",
		"virtio-net":                    "virtio_net",
		"virtio_net":                    "virtio_net",
		"weird.gz":                      "weird.gz",
	} {
		if got := ModuleName(in); got != want {
			t.Errorf("ModuleName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestResolveModules(t *testing.T) {
	builtin := map[string]bool{"ext4": true, "crc32c_generic": true}
	tests := []struct {
		name    string
		dep     string // modules.dep, testModulesDep if empty
		wanted  []string
		want    string // module names in order, space separated
		wantErr string
	}{
		{name: "diamond", wanted: []string{"top"}, want: "base right left top"},
		{name: "leaf", wanted: []string{"base"}, want: "base"},
		{name: "shared deps listed once", wanted: []string{"left", "top", "right"}, want: "base left right top"},
		{name: "dash and underscore", wanted: []string{"chain_c", "chain-b"}, want: "chain_a chain_b chain_c"},
		{name: "duplicates", wanted: []string{"solo", "solo", "solo "}, want: "solo"},
		{name: "builtin skipped", wanted: []string{"ext4", "solo"}, want: "solo"},
		{name: "nothing wanted", wanted: nil, want: ""},
		{name: "unknown", wanted: []string{"top", "nope", "ext4", "gone-too"}, wantErr: "unknown kernel module(s) nope, gone_too"},
		{name: "empty name", wanted: []string{" "}, wantErr: "empty module name"},
		{
			name:    "cycle",
			dep:     "a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n",
			wanted:  []string{"a"},
			wantErr: "module dependency cycle: a -> b -> c -> a",
		},
		{
			name:   "direct deps only",
			dep:    "d.ko: c.ko\nc.ko: b.ko\nb.ko: a.ko\na.ko:\n",
			wanted: []string{"d"},
			want:   "a b c d",
		},
		{
			name:   "order follows wanted list",
			dep:    "x.ko: z.ko\ny.ko: z.ko\nz.ko:\n",
			wanted: []string{"y", "x"},
			want:   "z y x",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := tt.dep
			if src == "" {
				src = testModulesDep
			}
			dep, err := ParseModulesDep(strings.NewReader(src))
			if err != nil {
				t.Fatalf("ParseModulesDep: %v", err)
			}
			mods, err := ResolveModules(dep, builtin, tt.wanted)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, m := range mods {
				names = append(names, m.Name)
				if p, _ := dep.Path(m.Name); p != m.Path {
					t.Errorf("module %s: path %q, want %q", m.Name, m.Path, p)
				}
			}
			if got := strings.Join(names, " "); got != tt.want {
				t.Errorf("order = %q, want %q", got, tt.want)
			}
			checkDepOrder(t, dep, mods)
		})
	}
}

// checkDepOrder fails if a module comes before one of its dependencies or a dependency is missing.
func checkDepOrder(t *testing.T, dep *ModulesDep, mods []Module) {
	t.Helper()
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Path] = i
	}
	for i, m := range mods {
		for _, d := range dep.Deps(m.Path) {
			j, ok := pos[d]
			if !ok {
				t.Errorf("%s needs %s, which is not in the list", m.Path, d)
			} else if j > i {
				t.Errorf("%s (position %d) comes before its dependency %s (position %d)", m.Path, i, d, j)
			}
		}
	}
}

func TestParseModulesDepErrors(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"no colon", "kernel/a.ko kernel/b.ko\n", "line 1"},
		{"absolute path", "/lib/modules/x/a.ko:\n", "not a clean relative path"},
		{"escaping dep", "a.ko: ../../etc/b.ko\n", "not a clean relative path"},
		{"not a module", "a.ko: b.so\n", "not a module file"},
		{"bare .ko", ".ko:\n", "not a module file"},
		{"twice", "a.ko:\nb.ko:\na.ko:\n", "line 3: a.ko listed twice"},
		{"self", "a.ko: a.ko\n", "depends on itself"},
		{"dangling dep", "a.ko: b.ko\n", "a.ko depends on b.ko, which has no line of its own"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseModulesDep(strings.NewReader(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestParseModulesDepNoTrailingNewline(t *testing.T) {
	dep, err := ParseModulesDep(strings.NewReader("# comment\na.ko: b.ko\r\nb.ko:"))
	if err != nil {
		t.Fatal(err)
	}
	if dep.Len() != 2 {
		t.Errorf("Len() = %d, want 2", dep.Len())
	}
	if d := dep.Deps("a.ko"); len(d) != 1 || d[0] != "b.ko" {
		t.Errorf("Deps(a.ko) = %q", d)
	}
}

func TestParseModulesBuiltin(t *testing.T) {
	set, err := ParseModulesBuiltin(strings.NewReader("kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c-generic.ko\n\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !set["ext4"] || !set["crc32c_generic"] || len(set) != 2 {
		t.Errorf("builtin = %v", set)
	}
}

func FuzzParseModulesDep(f *testing.F) {
	f.Add(testModulesDep)
	f.Add("a.ko: b.ko\nb.ko: a.ko\n")
	f.Add("a.ko:\n/abs.ko:\n")
	f.Add("kernel/x.ko.xz: ../y.ko\n")
	f.Add(":\n::\n")
	f.Fuzz(func(t *testing.T, in string) {
		dep, err := ParseModulesDep(strings.NewReader(in))
		if err != nil {
			return
		}
		// Whatever parsed must resolve without panicking and, if it resolves, in a valid order.
		var wanted []string
		for _, p := range dep.paths {
			wanted = append(wanted, ModuleName(p))
			if !isModuleFile(p) || !filepath.IsLocal(p) {
				t.Fatalf("accepted non-module path %q", p)
			}
		}
		mods, err := ResolveModules(dep, nil, wanted)
		if err != nil {
			return
		}
		checkDepOrder(t, dep, mods)
	})
}
