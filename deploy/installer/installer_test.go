package installer

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/podvm/podvm/deploy"
)

// distTree writes a small dist tree like make dist's.
func distTree(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	for p, body := range map[string]string{
		"usr/bin/podvm":                     "cli",
		"usr/bin/containerd-shim-podvm-v2":  "shim",
		"usr/share/podvm/vmlinuz":           "kernel",
		"usr/share/podvm/runtimeclass.yaml": "rc",
		DropIn:                              "[plugins]\n",
		ConfigPath:                          "[sandbox]\n",
	} {
		writeFile(t, filepath.Join(d, p), body)
	}
	return d
}

func writeFile(t *testing.T, p, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// listing is every path under root with its contents (dirs as "/").
func listing(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			out[rel] = "/"
			return nil
		}
		b, err := os.ReadFile(p)
		out[rel] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// hostRoot is a node's / with the directories every Debian system has.
func hostRoot(t *testing.T) string {
	t.Helper()
	h := t.TempDir()
	for _, d := range []string{"etc", "usr/bin", "usr/share", "var/lib"} {
		if err := os.MkdirAll(filepath.Join(h, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// recorder is a fake containerd restart and node labeller.
type recorder struct{ calls []string }

func (r *recorder) installer(host, dist string) *Installer {
	return &Installer{HostRoot: host, DistRoot: dist,
		RestartContainerd: func(context.Context) error { r.calls = append(r.calls, "restart"); return nil },
		Label: func(_ context.Context, on bool) error {
			r.calls = append(r.calls, map[bool]string{true: "label", false: "unlabel"}[on])
			return nil
		}}
}

func diff(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s = %q, want %q", what, k, got[k], v)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: %s left behind", what, k)
		}
	}
}

// TestInstallUninstallFreshNode: on a node without containerd config or podvm, install puts
// every file, a containerd config importing the drop-in and the label; uninstall leaves the
// node exactly as before.
func TestInstallUninstallFreshNode(t *testing.T) {
	host, dist := hostRoot(t), distTree(t)
	if err := os.Mkdir(filepath.Join(host, "run"), 0o755); err != nil {
		t.Fatal(err)
	}
	before := listing(t, host)
	var r recorder
	in := r.installer(host, dist)
	ctx := t.Context()
	if err := in.Install(ctx); err != nil {
		t.Fatal(err)
	}
	got := listing(t, host)
	for rel, body := range listing(t, dist) {
		if got[rel] != body {
			t.Errorf("installed %s = %q, want %q", rel, got[rel], body)
		}
	}
	if c := got[ContainerdConfig]; !strings.Contains(c, `imports = ["/etc/containerd/conf.d/podvm.toml"]`) || !strings.Contains(c, "version = 3") {
		t.Errorf("containerd config:\n%s", c)
	}
	if err := in.Install(ctx); err != nil { // a restarted DaemonSet pod installs again
		t.Fatal(err)
	}
	// What the shim leaves in its default state dir at run time: the accelerator probe's
	// cache and lock, the start slots, and VM templates (a node that turned templated start on).
	for _, f := range []string{"run/podvm/accel.json", "run/podvm/accel.lock", "run/podvm/start-slots/0", "run/podvm/templates/.lock",
		"run/podvm/templates/0123456789abcdef/memory", "run/podvm/templates/0123456789abcdef/template.json"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(host, f)), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(host, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := in.Uninstall(ctx); err != nil {
		t.Fatal(err)
	}
	diff(t, "after uninstall", listing(t, host), before)
	if _, err := os.Lstat(filepath.Join(host, "run/podvm")); err == nil {
		t.Errorf("run/podvm left after uninstall")
	}
	if want := "restart label restart label unlabel restart"; strings.Join(r.calls, " ") != want {
		t.Errorf("calls %v, want %s", r.calls, want)
	}
	if err := in.Uninstall(ctx); err != nil { // nothing installed: nothing to do
		t.Fatal(err)
	}
}

// TestInstallKeepsTheAdminsFiles: an existing node config is neither replaced nor removed, one
// the admin edited after install stays, and an existing containerd config gets one line
// first, removed again on uninstall.
func TestInstallKeepsTheAdminsFiles(t *testing.T) {
	for _, tc := range []struct {
		name        string
		config      string // existing node config, "" for none
		editConfig  bool   // the admin edits the installed config
		wantConfig  string // after uninstall, "" for none
		containerd  string
		wantImports bool // an imports line was added
	}{
		{name: "own config", config: "[sandbox]\nmax_memory = \"4Gi\"\n", wantConfig: "[sandbox]\nmax_memory = \"4Gi\"\n",
			containerd: "version = 3\n\n[plugins]\n", wantImports: true},
		{name: "edited after install", editConfig: true, wantConfig: "edited", containerd: "version = 2\n", wantImports: true},
		{name: "imports glob", containerd: "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, dist := hostRoot(t), distTree(t)
			writeFile(t, filepath.Join(host, ContainerdConfig), tc.containerd)
			if tc.config != "" {
				writeFile(t, filepath.Join(host, ConfigPath), tc.config)
			}
			before := listing(t, host)
			in := (&recorder{}).installer(host, dist)
			if err := in.Install(t.Context()); err != nil {
				t.Fatal(err)
			}
			c, _ := os.ReadFile(filepath.Join(host, ContainerdConfig))
			if added := strings.HasPrefix(string(c), "imports = "); added != tc.wantImports || !strings.HasSuffix(string(c), tc.containerd) {
				t.Errorf("containerd config after install:\n%s", c)
			}
			if tc.config != "" {
				if b, _ := os.ReadFile(filepath.Join(host, ConfigPath)); string(b) != tc.config {
					t.Errorf("install replaced the node config: %q", b)
				}
			}
			if tc.editConfig {
				writeFile(t, filepath.Join(host, ConfigPath), "edited")
				if err := in.Install(t.Context()); err != nil {
					t.Fatal(err)
				}
			}
			if err := in.Uninstall(t.Context()); err != nil {
				t.Fatal(err)
			}
			want := before
			if tc.wantConfig != "" {
				want[ConfigPath], want["etc/podvm"] = tc.wantConfig, "/"
			}
			diff(t, "after uninstall", listing(t, host), want)
		})
	}
}

// TestInstallRefusesForeignImports: a containerd config whose imports miss the drop-in is not
// rewritten; the error says what to add, and uninstall still removes the files.
func TestInstallRefusesForeignImports(t *testing.T) {
	host, dist := hostRoot(t), distTree(t)
	writeFile(t, filepath.Join(host, ContainerdConfig), "imports = [\"/etc/other.toml\"]\n")
	before := listing(t, host)
	var r recorder
	in := r.installer(host, dist)
	err := in.Install(t.Context())
	if err == nil || !strings.Contains(err.Error(), `add "/etc/containerd/conf.d/podvm.toml"`) {
		t.Fatalf("Install: %v", err)
	}
	if len(r.calls) != 0 {
		t.Errorf("restarted or labelled after a failed install: %v", r.calls)
	}
	if err := in.Uninstall(t.Context()); err != nil {
		t.Fatal(err)
	}
	diff(t, "after uninstall", listing(t, host), before)
}

// TestRestartFailureReported: a failed containerd restart fails the install, naming it.
func TestRestartFailureReported(t *testing.T) {
	in := &Installer{HostRoot: hostRoot(t), DistRoot: distTree(t),
		RestartContainerd: func(context.Context) error { return errors.New("no systemd") }}
	if err := in.Install(t.Context()); err == nil || !strings.Contains(err.Error(), "restart containerd: no systemd") {
		t.Fatalf("Install: %v", err)
	}
}

// TestInstallUnderAnotherRoot: with a host root that is not the node's / (NodeRoot), the
// installed drop-in, node config and containerd imports name the node paths under it, the
// drop-in runs the installed shim by path, and uninstall still leaves the root as it was.
func TestInstallUnderAnotherRoot(t *testing.T) {
	host, dist := hostRoot(t), distTree(t)
	writeFile(t, filepath.Join(dist, DropIn), string(deploy.ContainerdDropIn))
	writeFile(t, filepath.Join(dist, ConfigPath), string(deploy.ConfigTOML))
	writeFile(t, filepath.Join(dist, "usr/share/podvm/root.img"), "image")
	writeFile(t, filepath.Join(dist, ShimPath), "shim")
	writeFile(t, filepath.Join(host, ContainerdConfig), "version = 3\n")
	before := listing(t, host)
	in := (&recorder{}).installer(host, dist)
	in.NodeRoot = "/srv/node1"
	if err := in.Install(t.Context()); err != nil {
		t.Fatal(err)
	}
	got := listing(t, host)
	var dropIn struct {
		Plugins map[string]struct {
			Containerd struct {
				Runtimes map[string]struct {
					RuntimeType string `toml:"runtime_type"`
					RuntimePath string `toml:"runtime_path"`
					Options     struct {
						ConfigPath string
					} `toml:"options"`
				} `toml:"runtimes"`
			} `toml:"containerd"`
		} `toml:"plugins"`
	}
	if err := toml.Unmarshal([]byte(got[DropIn]), &dropIn); err != nil {
		t.Fatalf("relocated drop-in: %v\n%s", err, got[DropIn])
	}
	rt := dropIn.Plugins["io.containerd.cri.v1.runtime"].Containerd.Runtimes["podvm"]
	if rt.RuntimeType != "io.containerd.podvm.v2" || rt.RuntimePath != "/srv/node1/"+ShimPath || rt.Options.ConfigPath != "/srv/node1/"+ConfigPath {
		t.Errorf("relocated drop-in: %+v\n%s", rt, got[DropIn])
	}
	var cfg struct {
		Hypervisor struct{ Kernel, Image string }
	}
	if err := toml.Unmarshal([]byte(got[ConfigPath]), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Hypervisor.Image != "/srv/node1/usr/share/podvm/root.img" || cfg.Hypervisor.Kernel != "/srv/node1/usr/share/podvm/vmlinuz" {
		t.Errorf("relocated node config: %+v", cfg.Hypervisor)
	}
	if want := `imports = ["/srv/node1/etc/containerd/conf.d/podvm.toml"]`; !strings.HasPrefix(got[ContainerdConfig], want) {
		t.Errorf("containerd config:\n%s", got[ContainerdConfig])
	}
	if err := in.Uninstall(t.Context()); err != nil {
		t.Fatal(err)
	}
	diff(t, "after uninstall", listing(t, host), before)
}
