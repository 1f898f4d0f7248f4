package main

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/shim/config"
)

// fakeHost is a host with the files in files (path -> contents; "" = a directory when the path
// ends in "/", else an empty file); everything else does not exist.
type fakeHost struct {
	files map[string]string
	kvm   bool
}

type fakeInfo struct {
	fs.FileInfo
	size int64
	dir  bool
}

func (f fakeInfo) Size() int64 { return f.size }
func (f fakeInfo) Mode() fs.FileMode {
	if f.dir {
		return fs.ModeDir | 0o755
	}
	return 0o755
}
func (f fakeInfo) IsDir() bool { return f.dir }

func (h fakeHost) probe() hostProbe {
	find := func(p string) (string, bool, bool) {
		if c, ok := h.files[p]; ok {
			return c, ok, false
		}
		_, ok := h.files[p+"/"]
		return "", ok, true
	}
	return hostProbe{
		lookPath: func(name string) (string, error) {
			if strings.Contains(name, "/") {
				if _, ok, _ := find(name); ok {
					return name, nil
				}
				return "", errors.New("not found")
			}
			if _, ok, _ := find("/usr/bin/" + name); ok {
				return "/usr/bin/" + name, nil
			}
			return "", errors.New("not found")
		},
		stat: func(p string) (fs.FileInfo, error) {
			c, ok, dir := find(p)
			if !ok {
				return nil, &fs.PathError{Op: "stat", Path: p, Err: unix.ENOENT}
			}
			return fakeInfo{size: int64(len(c)), dir: dir}, nil
		},
		readFile: func(p string) ([]byte, error) {
			c, ok, dir := find(p)
			if !ok || dir {
				return nil, &fs.PathError{Op: "open", Path: p, Err: unix.ENOENT}
			}
			return []byte(c), nil
		},
		access: func(p string, _ uint32) error {
			if _, ok, _ := find(p); !ok {
				return unix.ENOENT
			}
			return nil
		},
		detectAccel: func() string {
			if h.kvm {
				return "kvm"
			}
			return "tcg"
		},
		version: func(_ context.Context, p string) (string, error) { return "QEMU emulator version 7.2.22", nil },
	}
}

func goodHost() fakeHost {
	return fakeHost{kvm: true, files: map[string]string{
		"/usr/bin/qemu-system-x86_64":       "",
		"/usr/share/podvm/vmlinuz":          "kernel",
		"/usr/share/podvm/initrd.img":       "initrd",
		"/usr/share/podvm/root.img":         strings.Repeat("r", 2<<20),
		"/usr/share/podvm/image.json":       `{"kernelVersion":"6.1.0-test","modules":[{"name":"virtio"}],"buildTime":"2026-01-02T03:04:05Z"}`,
		"/usr/lib/qemu/virtiofsd":           "",
		"/dev/vhost-vsock":                  "",
		"/dev/vhost-net":                    "",
		"/dev/net/tun":                      "",
		"/run/":                             "",
		"/usr/bin/containerd-shim-podvm-v2": "",
	}}
}

// bareHost is goodHost without KVM, vhost devices or image.json.
func bareHost() fakeHost {
	h := goodHost()
	h.kvm = false
	for _, p := range []string{"/dev/vhost-vsock", "/dev/vhost-net", "/usr/share/podvm/image.json"} {
		delete(h.files, p)
	}
	return h
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	noConfig := filepath.Join(dir, "none.toml")
	badConfig := writeConfig(t, dir, "bad.toml", "[hypervisor]\naccel = \"hvf\"\n")
	tcgConfig := writeConfig(t, dir, "tcg.toml", "[hypervisor]\naccel = \"tcg\"\n")
	kvmConfig := writeConfig(t, dir, "kvm.toml", "[hypervisor]\naccel = \"kvm\"\nagent_transport = \"vsock\"\n")
	initrdConfig := writeConfig(t, dir, "initrd.toml", "[hypervisor]\naccel = \"tcg\"\ninitrd = \"/usr/share/podvm/initrd.img\"\n")
	badImage := goodHost()
	badImage.files["/usr/share/podvm/root.img"] = "short"
	bare := bareHost()
	broken := fakeHost{files: map[string]string{"/": ""}}

	tests := []struct {
		name   string
		host   fakeHost
		config string
		want   []string // lines, in order, as prefixes
	}{
		{"all good", goodHost(), tcgConfig, []string{
			"ok    config          " + tcgConfig + " loads",
			"ok    qemu            /usr/bin/qemu-system-x86_64: QEMU emulator version 7.2.22",
			"ok    guest kernel    /usr/share/podvm/vmlinuz (6 bytes)",
			"ok    guest rootfs    /usr/share/podvm/root.img (2097152 bytes)",
			"ok    guest image     kernel 6.1.0-test, 1 modules, built 2026-01-02T03:04:05Z",
			"ok    virtiofsd       /usr/lib/qemu/virtiofsd",
			`ok    kvm             accel = "tcg" forced (software emulation, slow); /dev/kvm usable: set accel = "auto" to use it`,
			"ok    vhost-vsock     /dev/vhost-vsock: agent over vsock",
			"ok    vhost-net       /dev/vhost-net: virtio-net with vhost",
			"ok    tun             /dev/net/tun",
			"ok    state dir       /run/podvm (created by the shim at the first pod)",
			"ok    templates       off",
			"ok    shim            /usr/bin/containerd-shim-podvm-v2",
		}},
		{"initrd", goodHost(), initrdConfig, []string{
			"ok    config", "ok    qemu", "ok    guest kernel",
			"ok    guest initrd    /usr/share/podvm/initrd.img (6 bytes)",
			"ok    guest image", "ok    virtiofsd", "ok    kvm", "ok    vhost-vsock", "ok    vhost-net",
			"ok    tun", "ok    state dir", "ok    templates", "ok    shim",
		}},
		{"root image of a bad size", badImage, tcgConfig, []string{
			"ok    config", "ok    qemu", "ok    guest kernel",
			"FAIL  guest rootfs    /usr/share/podvm/root.img: 5 bytes, not a multiple of 2 MiB (the guest maps it in 2 MiB sections); rebuild it with 'podvm image build'",
			"ok    guest image", "ok    virtiofsd", "ok    kvm", "ok    vhost-vsock", "ok    vhost-net",
			"ok    tun", "ok    state dir", "ok    templates", "ok    shim",
		}},
		{"no kvm, no vhost", bare, noConfig, []string{
			"FAIL  config          podvm config " + noConfig + ": file does not exist",
			"ok    qemu", "ok    guest kernel", "ok    guest rootfs",
			"warn  guest image     /usr/share/podvm/image.json: no such file or directory; the kernel version is unknown",
			"ok    virtiofsd",
			`warn  kvm             /dev/kvm not usable (missing, no permission, or KVM_CREATE_VM fails): accel "auto" will use TCG (slow)`,
			"warn  vhost-vsock     no /dev/vhost-vsock: agent over virtio-serial",
			"warn  vhost-net       no /dev/vhost-net: virtio-net without vhost",
			"ok    tun", "ok    state dir", "ok    templates", "ok    shim",
		}},
		{"forced kvm and vsock without them", bare, kvmConfig, []string{
			"ok    config", "ok    qemu", "ok    guest kernel", "ok    guest rootfs", "warn  guest image", "ok    virtiofsd",
			`FAIL  kvm             accel = "kvm" but /dev/kvm is not usable`,
			`FAIL  vhost-vsock     agent_transport = "vsock" but /dev/vhost-vsock: no such file or directory; modprobe vhost_vsock`,
			"warn  vhost-net", "ok    tun", "ok    state dir", "ok    templates", "ok    shim",
		}},
		{"nothing installed", broken, badConfig, []string{
			`FAIL  config          podvm config ` + badConfig + `: hypervisor.accel = "hvf": must be "auto", "kvm" or "tcg"; use e.g. accel = "tcg" (the checks below use the built-in defaults)`,
			"FAIL  qemu            qemu-system-x86_64: not found or not executable; install QEMU (Debian: apt-get install qemu-system-x86) or set hypervisor.qemu_path",
			"FAIL  guest kernel    /usr/share/podvm/vmlinuz: no such file or directory; run 'make install' (or 'podvm image build --output /usr/share/podvm') or set hypervisor.kernel",
			"FAIL  guest rootfs    /usr/share/podvm/root.img: no such file or directory; run 'make install' (or 'podvm image build --output /usr/share/podvm') or set hypervisor.image",
			"warn  guest image",
			"FAIL  virtiofsd       not in /usr/libexec, PATH or /usr/lib/qemu",
			"warn  kvm",
			"warn  vhost-vsock",
			"warn  vhost-net",
			"FAIL  tun             /dev/net/tun: no such file or directory; modprobe tun",
			"ok    state dir       /run/podvm (created by the shim at the first pod)",
			"ok    templates       off",
			"FAIL  shim            containerd-shim-podvm-v2 not in PATH; run 'make install'",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			rs := tt.host.probe().check(ctx, tt.config)
			if len(rs) != len(tt.want) {
				t.Errorf("%d results, want %d", len(rs), len(tt.want))
			}
			for i := range min(len(rs), len(tt.want)) {
				if got := rs[i].String(); !strings.HasPrefix(got, tt.want[i]) {
					t.Errorf("line %d:\n got %s\nwant %s...", i+1, got, tt.want[i])
				}
			}
		})
	}
}

func TestStateDir(t *testing.T) {
	h := fakeHost{files: map[string]string{"/run/podvm/": "", "/run/file": ""}}.probe()
	for dir, want := range map[string]string{
		"/run/podvm":   "ok: /run/podvm writable",
		"/run/file":    "FAIL: /run/file: not a directory; remove it or set sandbox.state_dir",
		"/var/x/podvm": "FAIL: /var/x/podvm does not exist and / is not writable (no such file or directory); create it or set sandbox.state_dir",
	} {
		s, _, detail := h.stateDir(dir)
		if got := string(s) + ": " + detail; got != want {
			t.Errorf("stateDir(%s) = %s, want %s", dir, got, want)
		}
	}
}

func TestCheckCommand(t *testing.T) {
	// On the real host; the outcome depends on it, so only the shape is checked.
	cfg := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfg, []byte("[hypervisor]\naccel = \"tcg\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// --boot=false: unit tests boot no QEMU (the probe has its realvm test).
	r := runCLI(t, t.TempDir(), t.TempDir(), "check", "--boot=false", "--config", cfg)
	if !strings.HasPrefix(r.stdout, "ok    config          "+cfg+" loads\n") {
		t.Errorf("stdout = %q", r.stdout)
	}
	switch r.code {
	case 0:
		if !strings.HasSuffix(r.stdout, "podvm check: this node can run podvm pods\n") {
			t.Errorf("exit 0 without the summary: %q", r.stdout)
		}
	case 1:
		if !strings.Contains(r.stderr, "checks failed: this node cannot run podvm pods until they pass") ||
			!strings.Contains(r.stdout, "\nFAIL  ") {
			t.Errorf("exit 1 without a FAIL line and summary:\nstdout: %s\nstderr: %s", r.stdout, r.stderr)
		}
	default:
		t.Errorf("exit code %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if r := runCLI(t, t.TempDir(), t.TempDir(), "check", "extra"); r.code != 2 {
		t.Errorf("check extra: exit %d, want 2", r.code)
	}
}

func TestConfigCommand(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte("[sandbox]\ndefault_memory = \"1Gi\"\n[annotations]\nallowed = [\"memory\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, dir, dir, "config", "--config", cfg)
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	for _, s := range []string{
		"# podvm node config: " + cfg + ", with defaults for the keys it leaves out\n",
		"[hypervisor]\nkind = 'qemu'\nqemu_path = 'qemu-system-x86_64'\naccel = 'auto'\n",
		"default_memory = '1Gi'\n",
		"allowed = ['memory']\n",
		"[block]\ncache = 'none'\naio = 'io_uring'\n",
	} {
		if !strings.Contains(r.stdout, s) {
			t.Errorf("output lacks %q:\n%s", s, r.stdout)
		}
	}
	// The output is a config file that loads.
	out := filepath.Join(dir, "printed.toml")
	if err := os.WriteFile(out, []byte(r.stdout), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, dir, dir, "config", "--config", out); r.code != 0 {
		t.Errorf("printed config does not load: %s", r.stderr)
	}

	t.Setenv("PODVM_CONFIG", filepath.Join(dir, "missing.toml"))
	r = runCLI(t, dir, dir, "config")
	if r.code != 1 || !strings.Contains(r.stderr, "podvm: podvm config "+filepath.Join(dir, "missing.toml")+": file does not exist") {
		t.Errorf("missing $PODVM_CONFIG: exit %d, stderr %s", r.code, r.stderr)
	}
	if err := os.WriteFile(cfg, []byte("[sandbox]\ndefault_memory = \"lots\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r = runCLI(t, dir, dir, "config", "--config", cfg)
	if want := `podvm: podvm config ` + cfg + `: line 2: sandbox.default_memory: "lots" is not a size; use e.g. default_memory = "512Mi"`; r.code != 1 || !strings.Contains(r.stderr, want) {
		t.Errorf("bad config: exit %d, stderr %s\nwant %s", r.code, r.stderr, want)
	}
}

func TestCheckTemplates(t *testing.T) {
	h := fakeHost{files: map[string]string{"/t/abc/template.json": "{}"}}.probe()
	h.readDir = func(string) ([]os.DirEntry, error) {
		return []os.DirEntry{fakeDirEntry("abc"), fakeDirEntry("abc.tmp")}, nil
	}
	cfg := config.Default()
	cfg.Template.Dir = "/t"
	var r report
	h.checkTemplates(&r, cfg)
	if got := r[0].String(); !strings.Contains(got, "off") {
		t.Errorf("templating off: %q", got)
	}
	cfg.Template.Enabled = true
	r = nil
	h.checkTemplates(&r, cfg)
	if got := r[0]; got.status != statusOK || !strings.Contains(got.detail, "on: 1 in /t (abc)") {
		t.Errorf("one template: %v", got)
	}
	cfg.Hypervisor.AgentTransport = "vsock"
	r = nil
	h.checkTemplates(&r, cfg)
	if got := r[0]; got.status != statusWarn {
		t.Errorf("vsock: %v", got)
	}
}

type fakeDirEntry string

func (d fakeDirEntry) Name() string               { return string(d) }
func (d fakeDirEntry) IsDir() bool                { return true }
func (d fakeDirEntry) Type() fs.FileMode          { return fs.ModeDir }
func (d fakeDirEntry) Info() (fs.FileInfo, error) { return fakeInfo{dir: true}, nil }
