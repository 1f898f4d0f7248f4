package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/hypervisor"
)

var testMem = os.NewFile(102, "memory") // a descriptor number only, like the taps

func templatedConfig() Config {
	c := baseConfig()
	c.Templated, c.MemoryFile = true, testMem
	c.setPureDefaults()
	return c
}

// templateNIC is the template's NIC as a template and each of its clones has it.
const templateNICDevice = "-netdev tap,id=net-template,vhost=off,fd=4 -device virtio-net-pci,id=nic-template,netdev=net-template,bus=tp1,mac=02:70:6f:64:76:6d,romfile="

// TestTemplatedArgs: a template and its clones have the same devices: no virtio-fs device,
// root ports for it and the second NIC, the template's NIC (on its root port, with the
// template's MAC), and guest RAM in the inherited memory file; a clone waits paused for its
// state.
func TestTemplatedArgs(t *testing.T) {
	c := templatedConfig()
	c.NetDevices = []*hypervisor.NetDevice{{ID: "template", TapFiles: []*os.File{testTap1}}}
	args, err := c.Args()
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/3,share=on",
		"pcie-root-port,id=tp0,bus=pcie.0,chassis=31", "pcie-root-port,id=tp2,bus=pcie.0,chassis=33",
		"pcie-root-port,id=tp2,bus=pcie.0,chassis=33 " + templateNICDevice,
		"fd=5,set=1000",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("template command line lacks %q:\n%s", want, joined)
		}
	}
	if files := c.ExtraFiles(); !slices.Equal(files, []*os.File{testMem, testTap1}) {
		t.Errorf("template ExtraFiles = %v, want the memory file and the NIC's tap", files)
	}
	// A template keeps ACPI and its hot-plug: its clones' devices are plugged at restore.
	for _, not := range []string{"-incoming", "vhost-user-fs", "memory-backend-memfd", "acpi=off", "acpi-pci-hotplug", "memmap="} {
		if strings.Contains(joined, not) {
			t.Errorf("template command line has %q", not)
		}
	}
	// Under TCG a template's guest rewrites its thunk sites as it boots, once for all its
	// clones, which resume with the rewritten text; a booted VM leaves them (TestArgs).
	if cl := c.KernelCmdline(); !strings.Contains(cl, " mitigations=off") || strings.Contains(cl, "keep_thunks") {
		t.Errorf("template kernel command line %q: want mitigations=off without keep_thunks", cl)
	}
	clone := templatedConfig()
	clone.Incoming = testMem
	clone.SharedDir, clone.VirtiofsdPath, clone.VirtiofsCache = "/run/podvm/pod1/shared", "/usr/lib/qemu/virtiofsd", "auto"
	clone.NetDevices = []*hypervisor.NetDevice{
		{ID: "eth0", TapFiles: []*os.File{testTap1}, MAC: testMAC, MTU: 1400},
		{ID: "eth1", TapFiles: []*os.File{testTap2}, MAC: testMAC2},
	}
	cargs, err := clone.Args()
	if err != nil {
		t.Fatal(err)
	}
	// The same NIC as the template's, whatever the pod's first NIC's MAC and MTU (the agent
	// sets them); the second is hot-plugged.
	if got := strings.Join(cargs, " "); !strings.HasSuffix(strings.SplitN(got, " -runas", 2)[0], templateNICDevice+" -incoming defer -S") ||
		strings.Contains(got, "vhost-user-fs") || strings.Count(got, "virtio-net") != 1 {
		t.Errorf("clone command line:\n%s", got)
	}
	// The memory and the first NIC's tap are inherited: the others are hot-plugged by descriptor.
	if files := clone.ExtraFiles(); !slices.Equal(files, []*os.File{testMem, testTap1}) {
		t.Errorf("clone ExtraFiles = %v, want the memory file and the first tap", files)
	}
	clone.NetDevices[0].VhostNet = true
	if cargs, _ = clone.Args(); !strings.Contains(strings.Join(cargs, " "), "-netdev tap,id=net-template,vhost=on,fd=4 ") {
		t.Errorf("clone with vhost-net: %s", cargs)
	}
}

func TestTemplatedValidate(t *testing.T) {
	for name, mod := range map[string]func(*Config){
		"no memory": func(c *Config) { c.MemoryFile = nil },
		"too many NICs": func(c *Config) {
			c.Incoming = testMem
			for i := range 3 {
				c.NetDevices = append(c.NetDevices, &hypervisor.NetDevice{ID: "n" + string(rune('0'+i)), TapFiles: []*os.File{testTap1}})
			}
		},
		"template with a share": func(c *Config) { c.SharedDir, c.VirtiofsdPath = "/s", "/v" },
		"template with a pod's NICs": func(c *Config) {
			c.NetDevices = []*hypervisor.NetDevice{{ID: "a", TapFiles: []*os.File{testTap1}}, {ID: "b", TapFiles: []*os.File{testTap2}}}
		},
		"multi-queue first NIC": func(c *Config) {
			c.Incoming = testMem
			c.NetDevices = []*hypervisor.NetDevice{{ID: "a", TapFiles: []*os.File{testTap1, testTap2}}}
		},
		"memory without templated": func(c *Config) { c.Templated = false },
	} {
		t.Run(name, func(t *testing.T) {
			c := templatedConfig()
			mod(&c)
			if err := c.Validate(); err == nil {
				t.Fatal("valid")
			}
		})
	}
}

// TestSaveState: the device state goes to the given descriptor with shared RAM left out, the
// guest stopped first.
func TestSaveState(t *testing.T) {
	v, mon := fakeVM(t)
	v.cfg.Templated = true
	mon.QueueReply("query-migrate", map[string]any{"status": "active"}, nil)
	mon.QueueReply("query-migrate", map[string]any{"status": "completed"}, nil)
	f := openDisk(t, diskImage(t), false)
	if err := v.SaveState(context.Background(), f); err != nil {
		t.Fatal(err)
	}
	want := []string{"migrate-set-capabilities", "stop", "getfd", "migrate", "query-migrate", "query-migrate"}
	if got := mon.Commands(); !slices.Equal(got, want) {
		t.Fatalf("commands %q, want %q", got, want)
	}
	calls := mon.Calls()
	if !strings.Contains(string(calls[0].Args), `"x-ignore-shared","state":true`) || calls[2].Files != 1 ||
		!strings.Contains(string(calls[3].Args), `"fd:template"`) {
		t.Errorf("calls %+v", calls)
	}
	mon.SetReply("query-migrate", map[string]any{"status": "failed", "error-desc": "disk full"}, nil)
	if err := v.SaveState(context.Background(), f); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("failed migration: %v", err)
	}
}

// TestRestore: the state is loaded, then the share and the second NIC are hot-plugged by
// descriptor on the template's ports (the first is the template's own), and only then does
// the guest run.
func TestRestore(t *testing.T) {
	v, mon := fakeVM(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, VirtiofsdSocket)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	v.cfg.StateDir, v.cfg.Templated, v.cfg.SharedDir = dir, true, dir
	v.cfg.Incoming = openDisk(t, diskImage(t), false)
	v.cfg.NetDevices = []*hypervisor.NetDevice{
		{ID: "eth0", MAC: testMAC2, TapFiles: []*os.File{openDisk(t, diskImage(t), false)}},
		{ID: "eth1", MAC: testMAC, MTU: 1400, TapFiles: []*os.File{openDisk(t, diskImage(t), false)}},
	}
	mon.SetReply("query-migrate", map[string]any{"status": "completed"}, nil)
	if err := v.restore(context.Background(), mon); err != nil {
		t.Fatal(err)
	}
	want := []string{"migrate-set-capabilities", "getfd", "migrate-incoming", "query-migrate",
		"getfd", "chardev-add", "device_add", "getfd", "netdev_add", "device_add", "cont"}
	if got := mon.Commands(); !slices.Equal(got, want) {
		t.Fatalf("commands %q, want %q", got, want)
	}
	calls := mon.Calls()
	for i, want := range map[int]string{
		2: `"fd:incoming"`, 5: `"addr":{"data":{"str":"fs-sock"},"type":"fd"}`,
		6: `"bus":"tp0"`, 8: `"fd":"tap-eth1-0"`, 9: `"mac":"02:00:00:00:00:01"`,
	} {
		if !strings.Contains(string(calls[i].Args), want) {
			t.Errorf("%s %s: want %s", calls[i].Cmd, calls[i].Args, want)
		}
	}
	if !strings.Contains(string(calls[9].Args), `"bus":"tp2"`) || !strings.Contains(string(calls[9].Args), `"host_mtu":1400`) {
		t.Errorf("NIC device_add %s", calls[9].Args)
	}
}

// TestRestoreFailureStopsBeforeTheGuestRuns: a state QEMU cannot load fails the restore
// with QEMU's reason; nothing is hot-plugged and the guest never continues.
func TestRestoreFailureStopsBeforeTheGuestRuns(t *testing.T) {
	v, mon := fakeVM(t)
	v.cfg.StateDir, v.cfg.Templated = t.TempDir(), true
	v.cfg.Incoming = openDisk(t, diskImage(t), false)
	mon.SetReply("query-migrate", map[string]any{"status": "failed", "error-desc": "load of migration failed: Invalid argument"}, nil)
	err := v.restore(context.Background(), mon)
	if !errors.Is(err, hypervisor.ErrRestore) || !strings.Contains(err.Error(), "load of migration failed") {
		t.Fatalf("err = %v, want ErrRestore with QEMU's reason", err)
	}
	if slices.Contains(mon.Commands(), "cont") || slices.Contains(mon.Commands(), "device_add") {
		t.Errorf("commands %q after a failed restore", mon.Commands())
	}
}

// templateKeyConfig is a VM config whose kernel, initrd and QEMU are small files of a test's own.
func templateKeyConfig(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	c := baseConfig()
	c.Kernel, c.Initrd, c.Binary, c.Firmware = filepath.Join(dir, "k"), filepath.Join(dir, "i"), filepath.Join(dir, "q"), ""
	for _, f := range []string{c.Kernel, c.Initrd, c.Binary} {
		if err := os.WriteFile(f, []byte("v1"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c.setPureDefaults()
	return c
}

// TestTemplateKey: the key follows the kernel and initrd files and the VM's shape, not the
// pod's identity, share or NICs.
func TestTemplateKey(t *testing.T) {
	c := templateKeyConfig(t)
	c.TSCkHz = 2095971 // as Resolve measures it under TCG
	key := func(c Config) string {
		t.Helper()
		k, inputs, err := templateKey(c)
		if err != nil {
			t.Fatal(err)
		}
		if !json.Valid(inputs) {
			t.Fatalf("inputs %s", inputs)
		}
		return k
	}
	k0 := key(c)
	other := c
	other.ID, other.StateDir, other.SharedDir, other.VirtiofsdPath = "pod2", "/run/podvm/pod2", "/x", "/v"
	other.NetDevices = []*hypervisor.NetDevice{{ID: "eth0", TapFiles: []*os.File{testTap1}}}
	// Each pod's shim measures the host's TSC anew, to the odd kHz.
	other.TSCkHz = c.TSCkHz + 3
	if key(other) != k0 {
		t.Error("the key depends on the pod")
	}
	bigger := c
	bigger.MemoryMiB = 1024
	if key(bigger) == k0 {
		t.Error("the key ignores the memory size")
	}
	time.Sleep(20 * time.Millisecond) // past the coarse clock's tick that stamped v1
	if err := os.WriteFile(c.Initrd, []byte("v2"), 0o644); err != nil {
		t.Fatal(err)
	}
	if key(c) == k0 {
		t.Error("the key ignores the initrd's contents")
	}
}

// TestTemplateKeyKernelChanged: the key follows the kernel file without reading it: the same
// file gives the same key, a kernel of the same size written in place or renamed into place
// (as a package upgrade or `podvm image build` does) gives a new one.
func TestTemplateKeyKernelChanged(t *testing.T) {
	c := templateKeyConfig(t)
	key := func() string {
		t.Helper()
		k, _, err := templateKey(c)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	seen := map[string]string{key(): "first"}
	if k := key(); seen[k] != "first" {
		t.Fatal("the same kernel gives another key")
	}
	// The kernel stamps files with a coarse clock (a few ms): a write in the same tick as
	// the one before keeps the times. Wait out the tick, as any real upgrade does.
	tick := func() { time.Sleep(20 * time.Millisecond) }
	for _, change := range []struct {
		name string
		do   func() error
	}{
		{"written in place", func() error { return os.WriteFile(c.Kernel, []byte("v2"), 0o755) }},
		{"renamed into place", func() error {
			next := c.Kernel + ".new"
			if err := os.WriteFile(next, []byte("v3"), 0o755); err != nil {
				return err
			}
			return os.Rename(next, c.Kernel)
		}},
		{"touched", func() error { now := time.Now(); return os.Chtimes(c.Kernel, now, now) }},
	} {
		tick()
		if err := change.do(); err != nil {
			t.Fatal(err)
		}
		k := key()
		if prev, ok := seen[k]; ok {
			t.Errorf("kernel %s: same key as %s", change.name, prev)
		}
		seen[k] = change.name
	}
	if err := os.Remove(c.Kernel); err != nil {
		t.Fatal(err)
	}
	if _, _, err := templateKey(c); err == nil || !strings.Contains(err.Error(), c.Kernel) {
		t.Errorf("missing kernel: err = %v, want one naming %s", err, c.Kernel)
	}
}

// TestTemplateLoad: a template whose files do not match its template.json is not used.
func TestTemplateLoad(t *testing.T) {
	root := t.TempDir()
	tp := &Template{root: root, key: "k"}
	if err := tp.load(4096); !os.IsNotExist(err) {
		t.Fatalf("no template: %v", err)
	}
	if err := os.MkdirAll(tp.Dir(), 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) {
		if err := os.WriteFile(tp.path(name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	meta, _ := json.Marshal(templateMetadata{Key: "k", MemoryBytes: 4096, StateBytes: 3})
	write(templateMeta, meta)
	write(templateMemory, make([]byte, 4096))
	write(templateState, []byte("abc"))
	if err := tp.load(4096); err != nil {
		t.Fatalf("good template: %v", err)
	}
	write(templateState, []byte("ab")) // truncated
	if err := tp.load(4096); err == nil || os.IsNotExist(err) {
		t.Errorf("truncated state: %v", err)
	}
	write(templateState, []byte("abc"))
	if err := tp.load(8192); err == nil {
		t.Error("a template of another memory size was used")
	}
	write(templateMeta, []byte("{"))
	if err := tp.load(4096); err == nil || os.IsNotExist(err) {
		t.Errorf("corrupt template.json: %v", err)
	}
}

// TestCloneMemory: the copy has the template's data at the same offsets and holes where the
// template has holes.
func TestCloneMemory(t *testing.T) {
	const size = 16 << 20
	p := filepath.Join("/dev/shm", "podvm-test-"+t.Name())
	f, err := os.Create(p)
	if err != nil {
		t.Skip(err)
	}
	defer os.Remove(p)
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	a, b := bytes.Repeat([]byte{1}, 8192), bytes.Repeat([]byte{2}, 4096)
	_, _ = f.WriteAt(a, 1<<20)
	_, _ = f.WriteAt(b, size-4096)
	clone, err := newGuestMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	defer clone.Close()
	if err := sparseCopy(clone, f, size); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := clone.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want[1<<20:], a)
	copy(want[size-4096:], b)
	if !bytes.Equal(got, want) {
		t.Fatal("the clone's contents differ")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(clone.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > 1<<20 {
		t.Errorf("the clone takes %d bytes for 12 KiB of data: holes were filled", st.Blocks*512)
	}
}

// Each way copyRange may take copies n bytes from one offset of a file to another of the
// guest memory, wherever the kernel lets it: in the kernel, with sendfile, through a buffer.
func TestCopyRangeWays(t *testing.T) {
	src, err := os.Create(filepath.Join(t.TempDir(), "kernel"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	data := bytes.Repeat([]byte("podvm kernel "), 300000) // ~3.7 MiB: several buffer rounds
	if _, err := src.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	for name, copyFn := range map[string]func(dfd, sfd int, roff, woff, n int64) error{
		"copyRange": copyRange, "copyRangeSendfile": copyRangeSendfile, "copyRangeUser": copyRangeUser,
	} {
		t.Run(name, func(t *testing.T) {
			mem, err := newGuestMemory(8 << 20)
			if err != nil {
				t.Fatal(err)
			}
			defer mem.Close()
			const at = 3<<20 + 512
			if err := copyFn(int(mem.Fd()), int(src.Fd()), 4096+10, at, int64(len(data)-20)); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if _, err := mem.ReadAt(got, at-10); err != nil {
				t.Fatal(err)
			}
			want := append(append(make([]byte, 10), data[10:len(data)-10]...), make([]byte, 10)...)
			if !bytes.Equal(got, want) {
				t.Errorf("the copy at %#x differs from the source's bytes", at)
			}
		})
	}
	// A source shorter than asked for is an error, not a short copy.
	mem, err := newGuestMemory(8 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	if err := copyRange(int(mem.Fd()), int(src.Fd()), 4096, 0, int64(len(data)+8192)); err == nil {
		t.Error("copying past the source's end: no error")
	}
}

// TestFindTemplateNeedsSerial: with the vsock transport there is no template (a clone's CID
// is not set up), and nothing is made on disk.
func TestFindTemplateNeedsSerial(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "templates")
	c := baseConfig()
	c.Binary, c.AgentTransport, c.VsockCID = "/bin/true", TransportVsock, 7
	_, err := FindTemplate(context.Background(), hypervisor.Config(c), dir)
	if err == nil || !strings.Contains(err.Error(), "virtio-serial") {
		t.Fatalf("err = %v, want one naming the virtio-serial transport", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the templates dir was made: %v", err)
	}
}
