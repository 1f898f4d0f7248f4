package qemu

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/podvm/podvm/hypervisor"
)

func baseConfig() Config {
	return Config{
		ID:             "pod1",
		StateDir:       "/run/podvm/pod1",
		Binary:         "/usr/bin/qemu-system-x86_64",
		Accel:          AccelTCG,
		AgentTransport: TransportSerial,
		Kernel:         "/usr/share/podvm/vmlinuz",
		Initrd:         "/usr/share/podvm/initrd",
		Firmware:       "/usr/share/qemu/qboot.rom",
		HotplugSlots:   2,
	}
}

// The taps are descriptor numbers only: Args and ExtraFiles never touch them.
var (
	testTap1, testTap2 = os.NewFile(100, "tap1"), os.NewFile(101, "tap2")
	testStub           = os.NewFile(103, "stub")
	testMAC, _         = net.ParseMAC("02:00:00:00:00:01")
	testMAC2, _        = net.ParseMAC("02:00:00:00:00:02")
)

// argsTests are the command lines TestArgs expects, each from baseConfig changed by mod.
var argsTests = []struct {
	name    string
	mod     func(c *Config)
	want    []string // consecutive argument pairs or single args that must appear
	notWant []string // substrings no argument may contain
}{
	{
		name: "tcg serial defaults",
		want: []string{
			"-name podvm-pod1,debug-threads=on",
			"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
			"-machine q35,sata=off,smbus=off,vmport=off,smm=off,i8042=off,acpi=off",
			"-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
			"-accel tcg,tb-size=96", "-smp 1", "-m 512M",
			"-object memory-backend-memfd,id=mem,size=512M,share=on", "-numa node,memdev=mem",
			"-bios /usr/share/qemu/qboot.rom",
			"-kernel /usr/share/podvm/vmlinuz", "-initrd /usr/share/podvm/initrd",
			"-append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce acpi=off podvm.agent=serial quiet lapic_timer_khz=1000000 keep_initmem noreplace-smp no_timer_check mitigations=off keep_thunks",
			"-add-fd fd=3,set=1000,opaque=console",
			"-chardev file,id=console,path=/dev/fdset/1000,append=on", "-serial chardev:console",
			"-chardev socket,id=qmp,path=/run/podvm/pod1/qmp.sock,server=on,wait=off", "-mon chardev=qmp,mode=control",
			"-pidfile /run/podvm/pod1/qemu.pid",
			"-device virtio-serial-pci,id=vser",
			"-chardev socket,id=agent,path=/run/podvm/pod1/agent.sock,server=on,wait=off",
			"-device virtserialport,bus=vser.0,chardev=agent,name=podvm.agent",
			"-device pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
			"-device pcie-root-port,id=hp1,bus=pcie.0,chassis=2",
			"-runas 2000131047:2000131047", "-chroot /run/podvm/pod1/root",
			"-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
		},
		notWant: []string{"vhost-vsock", "vhost-user-fs", "-cpu", "kvm", "hp2", "netdev", "console.log", "tsc=reliable"},
	},
	{
		name: "kvm vsock debug sized",
		mod: func(c *Config) {
			c.Accel, c.AgentTransport, c.VsockCID = AccelKVM, TransportVsock, 42
			c.VCPUs, c.MemoryMiB, c.Debug = 4, 2048, true
			c.KernelParams = []string{"init=/podvm-agent", "panic=0"}
			c.HotplugSlots = 0
			c.Initrd, c.Firmware = "", ""
		},
		want: []string{
			"-accel kvm", "-cpu host", "-smp 4", "-m 2048M",
			"-object memory-backend-memfd,id=mem,size=2048M,share=on",
			"-append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce acpi=off podvm.agent=vsock podvm.debug init=/podvm-agent panic=0",
			"-device vhost-vsock-pci,id=vsock,guest-cid=42",
		},
		notWant: []string{"tcg", "virtio-serial", "quiet", "noapictimer", "lapic_timer_khz", "keep_initmem", "noreplace-smp", "mitigations=off", "keep_thunks", "-initrd", "-bios", "pcie-root-port"},
	},
	{
		name: "root image",
		mod: func(c *Config) {
			c.Initrd, c.RootImage, c.RootImageSize = "", "/usr/share/podvm/root,1.img", 12<<20
		},
		want: []string{
			"-m 512M,maxmem=549453824",
			"-object memory-backend-file,id=rootimg,mem-path=/usr/share/podvm/root,,1.img,size=12582912,share=on,readonly=on",
			"-device virtio-pmem-pci,id=rootimg,memdev=rootimg",
			"-append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce root=/dev/pmem0 rootfstype=ext4 rootflags=dax=always ro init=/init acpi=off memmap=0xc00000$0x100000000 podvm.agent=serial quiet lapic_timer_khz=1000000 keep_initmem noreplace-smp no_timer_check mitigations=off keep_thunks",
		},
		notWant: []string{"-initrd"},
	},
	{
		name: "root image above RAM above 4 GiB",
		mod: func(c *Config) {
			// q35 puts 2 GiB of the 3 GiB below 4 GiB, the rest from 4 GiB; the memory
			// devices start at the next GiB.
			c.Initrd, c.RootImage, c.RootImageSize, c.MemoryMiB = "", "/usr/share/podvm/root.img", 12<<20, 3072
		},
		want: []string{"-m 3072M,maxmem=3233808384", "-append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce root=/dev/pmem0 rootfstype=ext4 rootflags=dax=always ro init=/init acpi=off memmap=0xc00000$0x140000000 podvm.agent=serial quiet lapic_timer_khz=1000000 keep_initmem noreplace-smp no_timer_check mitigations=off keep_thunks"},
	},
	{
		name: "virtio-fs",
		mod: func(c *Config) {
			c.SharedDir, c.VirtiofsdPath, c.VirtiofsCache = "/run/podvm/pod1/shared", "/usr/lib/qemu/virtiofsd", "auto"
		},
		want: []string{
			"-chardev socket,id=fs,path=/run/podvm/pod1/virtiofsd.sock",
			"-device vhost-user-fs-pci,id=fs,chardev=fs,tag=podvm",
		},
	},
	{
		name: "net devices",
		mod: func(c *Config) {
			c.NetDevices = []*hypervisor.NetDevice{
				{ID: "eth0", MAC: testMAC, MTU: 1450, TapFiles: []*os.File{testTap1}},
				{ID: "eth1", TapFiles: []*os.File{testTap1, testTap2}, VhostNet: true},
			}
			c.HotplugSlots = 3
		},
		want: []string{
			"-netdev tap,id=net-eth0,vhost=off,fd=3",
			"-device virtio-net-pci,id=nic-eth0,netdev=net-eth0,romfile=,mac=02:00:00:00:00:01,host_mtu=1450",
			"-netdev tap,id=net-eth1,vhost=on,fds=4:5",
			"-device virtio-net-pci,id=nic-eth1,netdev=net-eth1,romfile=,mq=on,vectors=6",
			"-device pcie-root-port,id=hp2,bus=pcie.0,chassis=3",
		},
	},
	{
		name: "tcg told the tsc frequency",
		mod:  func(c *Config) { c.TSCkHz = 2095971 },
		want: []string{
			"-append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce acpi=off podvm.agent=serial quiet lapic_timer_khz=1000000 tsc_early_khz=2095971 keep_initmem noreplace-smp no_timer_check mitigations=off keep_thunks",
		},
	},
	{
		name: "tcg with several vCPUs trusts their TSCs",
		mod:  func(c *Config) { c.VCPUs = 2 },
		want: []string{
			"-smp 2",
			"-append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce acpi=off podvm.agent=serial quiet lapic_timer_khz=1000000 keep_initmem noreplace-smp no_timer_check mitigations=off keep_thunks tsc=reliable",
		},
	},
	{
		name: "tcg with several vCPUs told the tsc frequency presets their delay loops",
		mod:  func(c *Config) { c.VCPUs, c.TSCkHz = 2, 2095971 },
		want: []string{
			"-append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce acpi=off podvm.agent=serial quiet lapic_timer_khz=1000000 tsc_early_khz=2095971 keep_initmem noreplace-smp no_timer_check mitigations=off keep_thunks tsc=reliable lpj=8383884",
		},
	},
	{
		name:    "kvm with several vCPUs leaves the TSC to the kernel",
		mod:     func(c *Config) { c.Accel, c.VCPUs, c.TSCkHz, c.Firmware = AccelKVM, 2, 2095971, "" },
		notWant: []string{"tsc=reliable", "lpj="},
	},
	{
		name:    "kvm ignores the tsc frequency",
		mod:     func(c *Config) { c.Accel, c.TSCkHz, c.Firmware = AccelKVM, 2095971, "" },
		notWant: []string{"tsc_early_khz"},
	},
	{
		name: "kernel preloaded into the guest RAM",
		mod: func(c *Config) {
			c.MemoryFile, c.KernelStub = testMem, testStub
			c.NetDevices = []*hypervisor.NetDevice{{ID: "eth0", TapFiles: []*os.File{testTap1}}}
		},
		want: []string{
			"-object memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/3,share=on",
			"-kernel /proc/self/fd/4",
			"-netdev tap,id=net-eth0,vhost=off,fd=5",
			"-add-fd fd=6,set=1000,opaque=console",
		},
		notWant: []string{"memory-backend-memfd", "/usr/share/podvm/vmlinuz"},
	},
	{
		name: "commas in paths are escaped",
		mod:  func(c *Config) { c.StateDir = "/run/a,b" },
		want: []string{"-chardev socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off"},
	},
}

func TestArgs(t *testing.T) {
	for _, tt := range argsTests {
		t.Run(tt.name, func(t *testing.T) {
			c := baseConfig()
			if tt.mod != nil {
				tt.mod(&c)
			}
			args, err := c.Args()
			if err != nil {
				t.Fatal(err)
			}
			assertArgs(t, args, tt.want, tt.notWant)
		})
	}
}

// assertArgs checks that every want ("-flag value" or "-flag") stands in args as consecutive
// arguments and that no argument contains any of notWant.
func assertArgs(t *testing.T, args, want, notWant []string) {
	t.Helper()
	joined := "\x00" + strings.Join(args, "\x00") + "\x00"
	for _, w := range want {
		if !strings.Contains(joined, "\x00"+strings.Replace(w, " ", "\x00", 1)+"\x00") {
			t.Errorf("missing %q in\n%s", w, strings.Join(args, " "))
		}
	}
	for _, nw := range notWant {
		for _, a := range args {
			if strings.Contains(a, nw) {
				t.Errorf("unexpected %q in argument %q", nw, a)
			}
		}
	}
}

func TestExtraFiles(t *testing.T) {
	c := baseConfig()
	c.NetDevices = []*hypervisor.NetDevice{{ID: "a", TapFiles: []*os.File{testTap1}}, {ID: "b", TapFiles: []*os.File{testTap2}}}
	if ef := c.ExtraFiles(); len(ef) != 2 || ef[0] != testTap1 || ef[1] != testTap2 {
		t.Fatalf("ExtraFiles %v", ef)
	}
	// A preloaded kernel's guest RAM and stub come first, as Args numbers them.
	c.MemoryFile, c.KernelStub = testMem, testStub
	if ef := c.ExtraFiles(); len(ef) != 4 || ef[0] != testMem || ef[1] != testStub || ef[2] != testTap1 || ef[3] != testTap2 {
		t.Fatalf("ExtraFiles %v", ef)
	}
	if c.ConsoleFD() != 7 {
		t.Fatalf("ConsoleFD %d; want 7", c.ConsoleFD())
	}
}

func TestArgsRejectsBadConfig(t *testing.T) {
	tests := []struct {
		name  string
		mod   func(c *Config)
		field string
	}{
		{"empty id", func(c *Config) { c.ID = "" }, "ID"},
		{"id with comma", func(c *Config) { c.ID = "a,b" }, "ID"},
		{"relative state dir", func(c *Config) { c.StateDir = "run/x" }, "StateDir"},
		{"state dir too long for sockets", func(c *Config) { c.StateDir = "/" + strings.Repeat("x", 100) }, "StateDir"},
		{"auto accel unresolved", func(c *Config) { c.Accel = AccelAuto }, "Accel"},
		{"bad accel", func(c *Config) { c.Accel = "hvf" }, "Accel"},
		{"no kernel", func(c *Config) { c.Kernel = "" }, "Kernel"},
		{"relative initrd", func(c *Config) { c.Initrd = "initrd" }, "Initrd"},
		{"root image and initrd", func(c *Config) { c.RootImage, c.RootImageSize = "/r.img", 2<<20 }, "leave Initrd empty"},
		{"relative root image", func(c *Config) { c.Initrd, c.RootImage, c.RootImageSize = "", "r.img", 2<<20 }, "RootImage"},
		{"root image size unaligned", func(c *Config) { c.Initrd, c.RootImage, c.RootImageSize = "", "/r.img", 3<<20 }, "not a positive multiple of 2 MiB"},
		{"root image size unknown", func(c *Config) { c.Initrd, c.RootImage = "", "/r.img" }, "not a positive multiple of 2 MiB"},
		{"tiny memory", func(c *Config) { c.MemoryMiB = 16 }, "MemoryMiB"},
		{"too many vcpus", func(c *Config) { c.VCPUs = 1000 }, "VCPUs"},
		{"param with space", func(c *Config) { c.KernelParams = []string{"a b"} }, "KernelParams"},
		{"vsock without cid", func(c *Config) { c.AgentTransport = TransportVsock }, "VsockCID"},
		{"bad transport", func(c *Config) { c.AgentTransport = "tcp" }, "AgentTransport"},
		{"bad cache", func(c *Config) { c.SharedDir, c.VirtiofsdPath, c.VirtiofsCache = "/s", "/v", "none" }, "VirtiofsCache"},
		{"shared without virtiofsd", func(c *Config) { c.SharedDir = "/s" }, "VirtiofsdPath"},
		{"net without taps", func(c *Config) { c.NetDevices = []*hypervisor.NetDevice{{ID: "eth0"}} }, "NetDevices[0].TapFiles"},
		{"net bad mtu", func(c *Config) {
			c.NetDevices = []*hypervisor.NetDevice{{ID: "eth0", MTU: 10, TapFiles: []*os.File{os.Stdin}}}
		}, "NetDevices[0].MTU"},
		{"net duplicate", func(c *Config) {
			c.NetDevices = []*hypervisor.NetDevice{{ID: "e", TapFiles: []*os.File{os.Stdin}}, {ID: "e", TapFiles: []*os.File{os.Stdin}}}
		}, "NetDevices[1].ID"},
		{"too many slots", func(c *Config) { c.HotplugSlots = 99 }, "HotplugSlots"},
		{"negative tsc frequency", func(c *Config) { c.TSCkHz = -1 }, "TSCkHz"},
		{"memory file without kernel stub", func(c *Config) { c.MemoryFile = testMem }, "MemoryFile/KernelStub"},
		{"kernel stub without memory file", func(c *Config) { c.KernelStub = testStub }, "MemoryFile/KernelStub"},
		{"incoming without templated", func(c *Config) { c.Incoming = testMem }, "Incoming"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := baseConfig()
			tt.mod(&c)
			_, err := c.Args()
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tt.field) {
				t.Fatalf("error does not name %s: %v", tt.field, err)
			}
		})
	}
}

func TestNewChecksFiles(t *testing.T) {
	c := baseConfig()
	c.Binary = "/bin/true"
	c.Kernel = "/nonexistent/vmlinuz"
	c.Initrd = ""
	c.Firmware = ""
	_, err := New(context.Background(), hypervisor.Config(c))
	if err == nil || !strings.Contains(err.Error(), `Kernel "/nonexistent/vmlinuz"`) {
		t.Fatalf("got %v", err)
	}
}

func TestDetectAccel(t *testing.T) {
	a := DetectAccel()
	if a != AccelKVM && a != AccelTCG {
		t.Fatalf("DetectAccel() = %q", a)
	}
	if _, err := os.Stat("/dev/kvm"); err != nil && a != AccelTCG {
		t.Fatalf("no /dev/kvm but DetectAccel() = %q", a)
	}
}

func TestRunAs(t *testing.T) {
	c := baseConfig()
	uid, gid := c.RunAs()
	if uid != gid || uid < hypervisor.DefaultUIDBase || uid >= hypervisor.DefaultUIDBase+hypervisor.DefaultUIDCount {
		t.Fatalf("RunAs() = %d:%d, want one number in the default range", uid, gid)
	}
	if u2, _ := c.RunAs(); u2 != uid {
		t.Fatalf("RunAs not deterministic: %d then %d", uid, u2)
	}
	other := baseConfig()
	other.ID = "pod2"
	if u2, _ := other.RunAs(); u2 == uid {
		t.Fatalf("pod1 and pod2 both run as %d", uid)
	}
	c.UIDBase, c.UIDCount = 500000, 10
	seen := map[uint32]bool{}
	for i := 0; i < 200; i++ {
		c.ID = "pod-" + strings.Repeat("x", i)
		u, _ := c.RunAs()
		if u < 500000 || u >= 500010 {
			t.Fatalf("ID %q: uid %d outside 500000..500009", c.ID, u)
		}
		seen[u] = true
	}
	if len(seen) < 5 {
		t.Fatalf("200 IDs used only %d of 10 uids", len(seen))
	}
}

func TestValidateUIDRange(t *testing.T) {
	tests := []struct {
		base, count uint64
		wantErr     string
	}{
		{hypervisor.DefaultUIDBase, hypervisor.DefaultUIDCount, ""},
		{100000, 1, ""},
		{0, 10, "at least 1000"},
		{999, 10, "at least 1000"},
		{100000, 0, "at least 1"},
		{65000, 1000, "65534"},
		{1<<32 - 10, 100, "largest uid"},
		{1<<32 - 11, 10, ""},
	}
	for _, tt := range tests {
		err := hypervisor.ValidateUIDRange(tt.base, tt.count)
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("hypervisor.ValidateUIDRange(%d, %d) = %v, want nil", tt.base, tt.count, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("hypervisor.ValidateUIDRange(%d, %d) = %v, want an error with %q", tt.base, tt.count, err, tt.wantErr)
		}
	}
	c := baseConfig()
	c.UIDBase = 5
	if _, err := c.Args(); err == nil || !strings.Contains(err.Error(), "UIDBase/UIDCount") {
		t.Fatalf("Args with UIDBase 5: %v, want a UIDBase/UIDCount error", err)
	}
}

func TestConsoleFDFollowsTaps(t *testing.T) {
	c := baseConfig()
	c.NetDevices = []*hypervisor.NetDevice{
		{ID: "a", TapFiles: []*os.File{os.NewFile(100, "t1"), os.NewFile(101, "t2")}},
		{ID: "b", TapFiles: []*os.File{os.NewFile(102, "t3")}},
	}
	if got := c.ConsoleFD(); got != 6 {
		t.Fatalf("ConsoleFD = %d, want 6 (after fds 3, 4, 5 of the taps)", got)
	}
	args, err := c.Args()
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, w := range []string{"fds=3:4", "fd=5", "-add-fd fd=6,set=1000,opaque=console"} {
		if !strings.Contains(joined, w) {
			t.Errorf("missing %q in %s", w, joined)
		}
	}
}

func TestFindVirtiofsdPrefersRust(t *testing.T) {
	exists := func(paths ...string) func(string, uint32) error {
		return func(p string, _ uint32) error {
			for _, q := range paths {
				if p == q {
					return nil
				}
			}
			return os.ErrNotExist
		}
	}
	inPath := func(found string) func(string) (string, error) {
		return func(string) (string, error) {
			if found == "" {
				return "", os.ErrNotExist
			}
			return found, nil
		}
	}
	tests := []struct {
		name   string
		access func(string, uint32) error
		look   func(string) (string, error)
		want   string
	}{
		{"rust in libexec first", exists("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"), inPath("/usr/bin/virtiofsd"), "/usr/libexec/virtiofsd"},
		{"PATH before QEMU's C one", exists("/usr/lib/qemu/virtiofsd"), inPath("/usr/local/bin/virtiofsd"), "/usr/local/bin/virtiofsd"},
		{"C one as fallback", exists("/usr/lib/qemu/virtiofsd"), inPath(""), "/usr/lib/qemu/virtiofsd"},
		{"none", exists(), inPath(""), ""},
	}
	for _, tt := range tests {
		if got := FindVirtiofsd(tt.access, tt.look); got != tt.want {
			t.Errorf("%s: FindVirtiofsd = %q, want %q", tt.name, got, tt.want)
		}
	}
}

// TestResolveRootImage: Resolve takes the root image's size from the file, and a missing image
// says how to make one.
func TestResolveRootImage(t *testing.T) {
	img := t.TempDir() + "/root.img"
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	c := baseConfig()
	c.Initrd, c.RootImage = "", img
	r, err := c.Resolve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if r.RootImageSize != 4<<20 {
		t.Errorf("RootImageSize %d, want %d", r.RootImageSize, 4<<20)
	}
	c.RootImage = img + ".missing"
	if _, err := c.Resolve(context.Background()); err == nil || !strings.Contains(err.Error(), "podvm image build") {
		t.Errorf("missing root image: %v", err)
	}
}
