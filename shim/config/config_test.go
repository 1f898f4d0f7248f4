package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"
)

const file = "/etc/podvm/config.toml"

func TestLoadDefaults(t *testing.T) {
	dir := t.TempDir()
	def := filepath.Join(dir, "config.toml")
	want := Default()

	// No file at the default path: built-in defaults, no Path.
	for _, p := range []string{"", def} {
		c, err := load(p, def)
		if err != nil {
			t.Fatalf("load(%q): %v", p, err)
		}
		if !reflect.DeepEqual(c, want) {
			t.Errorf("load(%q) = %+v, want defaults %+v", p, c, want)
		}
	}

	// No file at an explicit path: an error wrapping fs.ErrNotExist that says what to do.
	missing := filepath.Join(dir, "other.toml")
	_, err := load(missing, def)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("load(missing explicit) = %v, want fs.ErrNotExist", err)
	}
	wantMsg := "podvm config " + missing + ": file does not exist; create it (make install puts a commented one at /etc/podvm/config.toml) or fix the path given by containerd's runtime option ConfigPath or $PODVM_CONFIG"
	if err.Error() != wantMsg {
		t.Errorf("error:\n got %s\nwant %s", err, wantMsg)
	}

	// An empty file is the defaults too, with Path set.
	if err := os.WriteFile(def, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := load("", def)
	if err != nil || c.Path != def {
		t.Fatalf("empty file: %+v, %v", c, err)
	}
	c.Path = ""
	if !reflect.DeepEqual(c, want) {
		t.Errorf("empty file = %+v, want defaults", c)
	}

	if d := Default(); d.Sandbox.MaxVCPUs != min(runtime.NumCPU(), MaxVCPUsLimit) {
		t.Errorf("default max_vcpus = %d, want the host's %d CPUs", d.Sandbox.MaxVCPUs, runtime.NumCPU())
	}
}

func TestLoadFullFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "podvm.toml")
	err := os.WriteFile(p, []byte(`
[hypervisor]
qemu_path = "/opt/qemu/bin/qemu-system-x86_64"
accel = "tcg"
kernel = "/srv/podvm/vmlinuz"
initrd = "/srv/podvm/initrd.img"
kernel_params = ["loglevel=7", "tsc=reliable"]
firmware = "/usr/share/qemu/qboot.rom"
virtiofsd_path = "/usr/libexec/virtiofsd"
agent_transport = "serial"
debug = true
hotplug_slots = 0
uid_base = 500000
uid_count = 4096

[sandbox]
default_vcpus = 2
default_memory = "1Gi"
max_vcpus = 8
max_memory = 34359738368
memory_overhead = "100M"
state_dir = "/run/pv"
agent_timeout = "2m30s"
agent_ping_interval = "0s"

[annotations]
allowed = ["vcpus", "memory", "disk.*"]

[virtiofs]
cache = "never"

[block]
cache = "writeback"
aio = "io_uring"
max_disk_size = "1Ti"
`), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Hypervisor: Hypervisor{
			Kind: "qemu", QEMUPath: "/opt/qemu/bin/qemu-system-x86_64", Accel: "tcg",
			Kernel: "/srv/podvm/vmlinuz", Initrd: "/srv/podvm/initrd.img",
			KernelParams: []string{"loglevel=7", "tsc=reliable"},
			Firmware:     "/usr/share/qemu/qboot.rom", VirtiofsdPath: "/usr/libexec/virtiofsd",
			AgentTransport: "serial", Debug: true, HotplugSlots: 0,
			UIDBase: 500000, UIDCount: 4096,
		},
		Sandbox: Sandbox{
			DefaultVCPUs: 2, DefaultMemory: GiB, MaxVCPUs: 8, MaxMemory: 32 * GiB,
			MemoryOverhead: 100_000_000, StateDir: "/run/pv", AgentTimeout: Duration{150 * time.Second}, AgentPingInterval: Duration{0},
		},
		Annotations: Annotations{Allowed: []string{"vcpus", "memory", "disk.*"}},
		Virtiofs:    Virtiofs{Cache: "never"},
		Block:       Block{Cache: "writeback", AIO: "io_uring", MaxDiskSize: 1 << 40},
		Path:        p,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Load =\n%+v\nwant\n%+v", got, want)
	}

	// TOML round-trips.
	b, err := got.TOML()
	if err != nil {
		t.Fatal(err)
	}
	again, err := Parse(b, p)
	if err != nil {
		t.Fatalf("Parse(TOML()): %v\n%s", err, b)
	}
	if !reflect.DeepEqual(again, got) {
		t.Errorf("round trip =\n%+v\nwant\n%+v\n%s", again, got, b)
	}
}

// TestDefaultVCPUs: a file that leaves default_vcpus out gets 2, or max_vcpus if that is
// lower, so that lowering max_vcpus alone never makes a config invalid; one that sets it
// gets what it says.
func TestDefaultVCPUs(t *testing.T) {
	for _, tt := range []struct {
		data string
		want int
	}{
		{"[sandbox]\nmax_vcpus = 8\n", 2},
		{"[sandbox]\nmax_vcpus = 1\n", 1},
		{"[sandbox]\ndefault_vcpus = 1\nmax_vcpus = 8\n", 1},
		{"[sandbox]\ndefault_vcpus = 3\nmax_vcpus = 4\n", 3},
	} {
		c, err := Parse([]byte(tt.data), file)
		if err != nil {
			t.Fatalf("%q: %v", tt.data, err)
		}
		if c.Sandbox.DefaultVCPUs != tt.want {
			t.Errorf("%q: default_vcpus %d, want %d", tt.data, c.Sandbox.DefaultVCPUs, tt.want)
		}
	}
	if got, want := Default().Sandbox.DefaultVCPUs, min(DefaultVCPUs, runtime.NumCPU()); got != want {
		t.Errorf("built-in default_vcpus %d on a %d-CPU host, want %d", got, runtime.NumCPU(), want)
	}
}

// parseErrorTest is a config (data) that Parse must refuse with the error want.
type parseErrorTest struct {
	name, data, want string
}

func runParseErrors(t *testing.T, tests []parseErrorTest) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.data), file)
			if err == nil {
				t.Fatalf("Parse = %+v, want error %s", c, tt.want)
			}
			if err.Error() != tt.want {
				t.Errorf("error:\n got %s\nwant %s", err, tt.want)
			}
			var ce *Error
			if !errors.As(err, &ce) || ce.File != file {
				t.Errorf("error %T is not a *config.Error for %s", err, file)
			}
		})
	}
}

// TestParseErrors: TOML that does not decode into the config (unknown keys, syntax, a value of
// the wrong TOML type) is refused with the line, what was wrong and what to write.
func TestParseErrors(t *testing.T) {
	runParseErrors(t, []parseErrorTest{
		{"unknown key", "[hypervisor]\nqemu_pth = 'x'\n",
			"podvm config /etc/podvm/config.toml: line 2: unknown key hypervisor.qemu_pth; the [hypervisor] keys are: kind, qemu_path, accel, kernel, initrd, image, kernel_params, firmware, virtiofsd_path, agent_transport, debug, hotplug_slots, uid_base, uid_count"},
		{"unknown keys", "version = 3\n[sandbox]\nmemory = '1Gi'\n",
			"podvm config /etc/podvm/config.toml: 2 problems:\n" +
				"  line 1: unknown key version; the sections are: hypervisor, sandbox, annotations, virtiofs, block, template\n" +
				"  line 3: unknown key sandbox.memory; the [sandbox] keys are: default_vcpus, default_memory, max_vcpus, max_memory, memory_overhead, state_dir, agent_timeout, agent_ping_interval, max_parallel_starts"},
		{"unknown section", "[hypervisors]\naccel = 'kvm'\n",
			"podvm config /etc/podvm/config.toml: line 1: unknown key hypervisors; the sections are: hypervisor, sandbox, annotations, virtiofs, block, template"},
		{"syntax", "[sandbox\n",
			"podvm config /etc/podvm/config.toml: line 1 column 9: expected ']' to close table name"},
		{"int as string", "[sandbox]\ndefault_vcpus = \"two\"\n",
			`podvm config /etc/podvm/config.toml: line 2: sandbox.default_vcpus: want a whole number, got a TOML string; use e.g. default_vcpus = 1`},
		{"bool as int", "[hypervisor]\ndebug = 1\n",
			`podvm config /etc/podvm/config.toml: line 2: hypervisor.debug: want true or false, got a TOML integer; use e.g. debug = true`},
		{"list as string", "[annotations]\nallowed = \"memory\"\n",
			`podvm config /etc/podvm/config.toml: line 2: annotations.allowed: want an array of strings, got a TOML string; use e.g. allowed = ["vcpus", "memory", "disk.*"]`},
		{"section as value", "sandbox = 1\n",
			`podvm config /etc/podvm/config.toml: line 1: sandbox: want a table, got a TOML integer; use e.g. [sandbox]`},
		{"bad size", "[sandbox]\ndefault_memory = \"512MB\"\n",
			`podvm config /etc/podvm/config.toml: line 2: sandbox.default_memory: "512MB" is not a size; use e.g. default_memory = "512Mi"`},
		{"float size", "[sandbox]\nmax_memory = 1e9\n",
			`podvm config /etc/podvm/config.toml: sandbox.max_memory: want a size (a string like "512Mi" or "1Gi", or a whole number of bytes), got a TOML float; use e.g. max_memory = "16Gi"`},
		{"bool size", "[sandbox]\nmemory_overhead = true\n",
			`podvm config /etc/podvm/config.toml: sandbox.memory_overhead: want a size (a string like "512Mi" or "1Gi", or a whole number of bytes), got a TOML boolean; use e.g. memory_overhead = "256Mi"`},
		{"bad duration", "[sandbox]\nagent_timeout = \"soon\"\n",
			`podvm config /etc/podvm/config.toml: line 2: sandbox.agent_timeout: "soon" is not a duration; use e.g. agent_timeout = "60s"`},
		{"duration as int", "[sandbox]\nagent_timeout = 60\n",
			`podvm config /etc/podvm/config.toml: sandbox.agent_timeout: want a duration string like "60s", got a TOML integer; use e.g. agent_timeout = "60s"`},
	})
}

// TestParseValueErrors: values that decode but are not valid are refused with what to write.
func TestParseValueErrors(t *testing.T) {
	runParseErrors(t, []parseErrorTest{
		{"accel", "[hypervisor]\naccel = \"hvf\"\n",
			`podvm config /etc/podvm/config.toml: hypervisor.accel = "hvf": must be "auto", "kvm" or "tcg"; use e.g. accel = "tcg"`},
		{"relative qemu", "[hypervisor]\nqemu_path = \"bin/qemu\"\n",
			`podvm config /etc/podvm/config.toml: hypervisor.qemu_path = "bin/qemu": must be an absolute path or a command name looked up in PATH; use e.g. qemu_path = "/usr/bin/qemu-system-x86_64"`},
		{"empty kernel", "[hypervisor]\nkernel = \"\"\n",
			`podvm config /etc/podvm/config.toml: hypervisor.kernel = "": empty; use e.g. kernel = "/usr/share/podvm/vmlinuz"`},
		{"relative initrd", "[hypervisor]\ninitrd = \"initrd.img\"\n",
			`podvm config /etc/podvm/config.toml: hypervisor.initrd = "initrd.img": must be an absolute path; use e.g. initrd = "/usr/share/podvm/initrd.img"`},
		{"kernel param with space", "[hypervisor]\nkernel_params = [\"a=1 b=2\"]\n",
			`podvm config /etc/podvm/config.toml: hypervisor.kernel_params = ["a=1 b=2"]: "a=1 b=2" is not one kernel parameter (empty or contains whitespace); give one parameter per element; use e.g. kernel_params = ["loglevel=4"]`},
		{"transport", "[hypervisor]\nagent_transport = \"tcp\"\n",
			`podvm config /etc/podvm/config.toml: hypervisor.agent_transport = "tcp": must be "" (auto), "vsock" or "serial"; use e.g. agent_transport = "serial"`},
		{"uid base root", "[hypervisor]\nuid_base = 0\n",
			`podvm config /etc/podvm/config.toml: hypervisor.uid_base/uid_count = "0/1048576": uid base 0: must be at least 1000 (root and system users are below), e.g. 2000000000; use e.g. uid_base = 2000000000 and uid_count = 1048576`},
		{"uid count negative", "[hypervisor]\nuid_count = -1\n",
			`podvm config /etc/podvm/config.toml: hypervisor.uid_count = -1: must not be negative; use e.g. uid_count = 1048576`},
		{"uid range past the top", "[hypervisor]\nuid_base = 4294967000\nuid_count = 1000\n",
			`podvm config /etc/podvm/config.toml: hypervisor.uid_base/uid_count = "4294967000/1000": uid range 4294967000..4294967999: ends above 4294967294 (the largest uid); lower the base or the count; use e.g. uid_base = 2000000000 and uid_count = 1048576`},
		{"hotplug slots", "[hypervisor]\nhotplug_slots = 31\n",
			`podvm config /etc/podvm/config.toml: hypervisor.hotplug_slots = 31: must be between 0 and 30; use e.g. hotplug_slots = 2`},
		{"no default vcpus", "[sandbox]\ndefault_vcpus = 0\n",
			`podvm config /etc/podvm/config.toml: sandbox.default_vcpus = 0: must be at least 1; use e.g. default_vcpus = 1`},
		{"default vcpus over max", "[sandbox]\ndefault_vcpus = 4\nmax_vcpus = 2\n",
			`podvm config /etc/podvm/config.toml: sandbox.default_vcpus = 4: more than max_vcpus = 2; use e.g. default_vcpus = 1`},
		{"default memory over max", "[sandbox]\ndefault_memory = \"2Gi\"\nmax_memory = \"1Gi\"\n",
			`podvm config /etc/podvm/config.toml: sandbox.default_memory = "2Gi": more than max_memory = 1Gi; use e.g. default_memory = "512Mi"`},
		{"negative overhead", "[sandbox]\nmemory_overhead = -1\n",
			`podvm config /etc/podvm/config.toml: sandbox.memory_overhead = "-1": must not be negative; use e.g. memory_overhead = "256Mi"`},
		{"relative state dir", "[sandbox]\nstate_dir = \"run/podvm\"\n",
			`podvm config /etc/podvm/config.toml: sandbox.state_dir = "run/podvm": must be an absolute path; use e.g. state_dir = "/run/podvm"`},
		{"short timeout", "[sandbox]\nagent_timeout = \"10ms\"\n",
			`podvm config /etc/podvm/config.toml: sandbox.agent_timeout = "10ms": must be at least 1s; use e.g. agent_timeout = "60s"`},
		{"negative parallel starts", "[sandbox]\nmax_parallel_starts = -1\n",
			`podvm config /etc/podvm/config.toml: sandbox.max_parallel_starts = -1: must be 0 (one for every two CPUs) or more; use e.g. max_parallel_starts = 0`},
		{"short ping interval", "[sandbox]\nagent_ping_interval = \"100ms\"\n",
			`podvm config /etc/podvm/config.toml: sandbox.agent_ping_interval = "100ms": must be "0s" (no pings) or at least 1s; use e.g. agent_ping_interval = "10s"`},
		{"allowed with prefix", "[annotations]\nallowed = [\"podvm.io/memory\"]\n",
			`podvm config /etc/podvm/config.toml: annotations.allowed = ["podvm.io/memory"]: "podvm.io/memory" starts with podvm.io/: list the key without the prefix; use e.g. allowed = ["vcpus", "memory", "disk.*"]`},
		{"allowed bad glob", "[annotations]\nallowed = [\"disk.[\"]\n",
			`podvm config /etc/podvm/config.toml: annotations.allowed = ["disk.["]: "disk.[" is not a valid glob; use e.g. allowed = ["vcpus", "memory", "disk.*"]`},
		{"virtiofs cache", "[virtiofs]\ncache = \"metadata\"\n",
			`podvm config /etc/podvm/config.toml: virtiofs.cache = "metadata": must be "keep", "auto", "always" or "never"; use e.g. cache = "keep"`},
		{"block cache", "[block]\ncache = \"directsync\"\n",
			`podvm config /etc/podvm/config.toml: block.cache = "directsync": must be "none" or "writeback"; use e.g. cache = "none"`},
		{"native with writeback", "[block]\ncache = \"writeback\"\naio = \"native\"\n",
			`podvm config /etc/podvm/config.toml: block.aio = "native": needs block.cache = "none" (O_DIRECT); with "writeback" use "threads" or "io_uring"; use e.g. aio = "threads"`},
		{"several", "[sandbox]\nmax_vcpus = 0\ndefault_memory = \"64Mi\"\n",
			"podvm config /etc/podvm/config.toml: 2 problems:\n" +
				"  sandbox.max_vcpus = 0: must be between 1 and 255; use e.g. max_vcpus = 4\n" +
				`  sandbox.default_memory = "64Mi": less than the minimum 128Mi; use e.g. default_memory = "512Mi"`},
	})
}

func TestResolvePath(t *testing.T) {
	t.Setenv(EnvPath, "")
	if p := ResolvePath(""); p != DefaultPath {
		t.Errorf("ResolvePath(\"\") = %s, want %s", p, DefaultPath)
	}
	t.Setenv(EnvPath, "/env.toml")
	if p := ResolvePath(""); p != "/env.toml" {
		t.Errorf("with $%s: %s", EnvPath, p)
	}
	if p := ResolvePath("/option.toml"); p != "/option.toml" {
		t.Errorf("option over env: %s", p)
	}
}

func TestVMConfig(t *testing.T) {
	c := Default()
	c.Hypervisor.KernelParams = []string{"x=1"}
	c.Hypervisor.AgentTransport = "auto"
	q := c.VMConfig("abc", VMSize{VCPUs: 2, MemoryMiB: 768})
	if q.ID != "abc" || q.StateDir != "/run/podvm/abc" || q.VCPUs != 2 || q.MemoryMiB != 768 ||
		q.Kernel != c.Hypervisor.Kernel || q.RootImage != c.Hypervisor.Image || q.Initrd != "" || q.HotplugSlots != 2 ||
		q.AgentTransport != "auto" || q.VirtiofsCache != "keep" || q.Accel != "auto" || q.KernelParams[0] != "x=1" ||
		q.Binary != "qemu-system-x86_64" {
		t.Errorf("VMConfig = %+v", q)
	}
	if q := c.VMConfig("abc", VMSize{}); q.UIDBase != 2_000_000_000 || q.UIDCount != 1<<20 {
		t.Errorf("VMM uid range %d/%d, want the defaults", q.UIDBase, q.UIDCount)
	}
	c.Hypervisor.Image = ""
	if q := c.VMConfig("abc", VMSize{}); q.Initrd != c.Hypervisor.Initrd || q.RootImage != "" {
		t.Errorf("without an image: Initrd %q RootImage %q, want the initrd", q.Initrd, q.RootImage)
	}
	// One meaning of hotplug_slots end to end: the number of slots, 0 for none.
	c.Hypervisor.HotplugSlots = 0
	if q := c.VMConfig("abc", VMSize{}); q.HotplugSlots != 0 {
		t.Errorf("hotplug_slots 0 gives HotplugSlots %d, want 0 (none)", q.HotplugSlots)
	}
}

func FuzzLoad(f *testing.F) {
	f.Add([]byte(""))
	f.Add([]byte("[hypervisor]\naccel = \"tcg\"\nkernel_params = [\"a\"]\n[sandbox]\ndefault_memory = \"1.5Gi\"\nagent_timeout = 60\n"))
	f.Add([]byte("[annotations]\nallowed = [\"*\", \"disk.[a-z]*\"]\n[block]\naio = \"native\"\n"))
	f.Add([]byte("sandbox = 1\n[[block]]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "fuzz.toml")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "podvm config fuzz.toml: ") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		// A config that loads prints as TOML that loads back to the same values.
		b, err := c.TOML()
		if err != nil {
			t.Fatal(err)
		}
		again, err := Parse(b, "fuzz.toml")
		if err != nil {
			t.Fatalf("Parse(TOML()) = %v\n%s", err, b)
		}
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("round trip changed the config:\n%+v\n%+v", c, again)
		}
	})
}

// TestDeployedConfig keeps deploy/config.toml, which make install puts at /etc/podvm/config.toml,
// in step with Default: every key, with its default value.
func TestDeployedConfig(t *testing.T) {
	p := filepath.Join("..", "..", "deploy", "config.toml")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse(data, p)
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Path = p
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s =\n%+v\nwant the defaults\n%+v", p, got, want)
	}
	// Every key appears, set or (max_vcpus, whose default depends on the host) commented out.
	cfg := reflect.TypeFor[Config]()
	for i := range cfg.NumField() {
		sec := cfg.Field(i)
		if tomlName(sec) == "-" {
			continue
		}
		if !strings.Contains(string(data), "\n["+tomlName(sec)+"]\n") {
			t.Errorf("%s lacks the section [%s]", p, tomlName(sec))
		}
		for _, k := range keys(sec.Type) {
			if !strings.Contains(string(data), "\n"+k+" = ") && !strings.Contains(string(data), "\n# "+k+" = ") {
				t.Errorf("%s lacks %s.%s", p, tomlName(sec), k)
			}
		}
	}
}

func TestTemplateSection(t *testing.T) {
	c, err := Parse([]byte("[sandbox]\nstate_dir = \"/run/x\"\n[template]\nenabled = true\n"), "t.toml")
	if err != nil {
		t.Fatal(err)
	}
	if !c.Template.Enabled || c.TemplateDir() != "/run/x/templates" {
		t.Errorf("enabled %v dir %q, want true and /run/x/templates", c.Template.Enabled, c.TemplateDir())
	}
	if Default().Template.Enabled {
		t.Error("templating is on by default")
	}
	c, err = Parse([]byte("[template]\ndir = \"/var/lib/podvm/t\"\n"), "t.toml")
	if err != nil || c.TemplateDir() != "/var/lib/podvm/t" {
		t.Fatalf("dir: %v %v", c, err)
	}
	_, err = Parse([]byte("[template]\ndir = \"rel\"\n"), "t.toml")
	if err == nil || !strings.Contains(err.Error(), "template.dir = \"rel\": must be an absolute path; use e.g. dir = \"/run/podvm/templates\"") {
		t.Fatalf("relative dir: %v", err)
	}
}

// TestBootFrom: a file that names only initrd keeps booting from it (a node on Debian's
// kernel, or configured before root images); otherwise the image is the default, and a
// non-empty image wins.
func TestBootFrom(t *testing.T) {
	def := Default().Hypervisor
	for _, tc := range []struct {
		file                                 string
		image, initrd, vmRootImage, vmInitrd string
	}{
		{"", def.Image, def.Initrd, def.Image, ""},
		{"initrd = \"/x/initrd\"\n", "", "/x/initrd", "", "/x/initrd"},
		{"image = \"/x/root.img\"\n", "/x/root.img", def.Initrd, "/x/root.img", ""},
		{"image = \"\"\n", "", def.Initrd, "", def.Initrd},
		{"image = \"/x/root.img\"\ninitrd = \"/x/initrd\"\n", "/x/root.img", "/x/initrd", "/x/root.img", ""},
	} {
		c, err := Parse([]byte("[hypervisor]\n"+tc.file), "t.toml")
		if err != nil {
			t.Fatalf("%q: %v", tc.file, err)
		}
		h := c.Hypervisor
		vm := c.VMConfig("x", VMSize{})
		if h.Image != tc.image || h.Initrd != tc.initrd || vm.RootImage != tc.vmRootImage || vm.Initrd != tc.vmInitrd {
			t.Errorf("%q: image %q initrd %q, VM root image %q initrd %q; want %q %q, %q %q",
				tc.file, h.Image, h.Initrd, vm.RootImage, vm.Initrd, tc.image, tc.initrd, tc.vmRootImage, tc.vmInitrd)
		}
	}
	if _, err := Parse([]byte("[hypervisor]\nimage = \"\"\ninitrd = \"\"\n"), "t.toml"); err == nil || !strings.Contains(err.Error(), "hypervisor.initrd") {
		t.Errorf("neither image nor initrd: %v", err)
	}
}

func TestParallelStarts(t *testing.T) {
	for _, tt := range []struct {
		data string
		want int
	}{
		{"", max(1, runtime.NumCPU()/2)},
		{"[sandbox]\nmax_parallel_starts = 0\n", max(1, runtime.NumCPU()/2)},
		{"[sandbox]\nmax_parallel_starts = 1\n", 1},
		{"[sandbox]\nmax_parallel_starts = 64\n", 64},
	} {
		c, err := Parse([]byte(tt.data), file)
		if err != nil {
			t.Fatalf("%q: %v", tt.data, err)
		}
		if got := c.Sandbox.ParallelStarts(); got != tt.want {
			t.Errorf("%q: %d starts at once, want %d", tt.data, got, tt.want)
		}
	}
}
