package guest

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestFindSerialPort(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "vport1p1", "name"), "org.qemu.guest_agent.0\n")
	writeFile(t, filepath.Join(dir, "vport2p1", "name"), "podvm.agent\n")
	got, err := findSerialPort(dir, "podvm.agent")
	if err != nil || got != "/dev/vport2p1" {
		t.Fatalf("findSerialPort = %q, %v", got, err)
	}
	if _, err := findSerialPort(dir, "nope"); err == nil {
		t.Fatal("missing port did not fail")
	}
}

func TestFindDisk(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "vda", "serial"), "rootdisk")
	tick := make(chan time.Time)
	found := make(chan string, 1)
	go func() {
		dev, err := pollDisk(context.Background(), dir, "pvc-1", tick)
		if err != nil {
			dev = err.Error()
		}
		found <- dev
	}()
	// The send returns once the first look missed the disk; then it appears.
	tick <- time.Now()
	writeFile(t, filepath.Join(dir, "vdb", "serial"), "pvc-1\n")
	var got string
	for got == "" {
		select {
		case tick <- time.Now():
		case got = <-found:
		}
	}
	if got != "/dev/vdb" {
		t.Fatalf("findDisk = %q (a disk that appears late must be found)", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := findDisk(ctx, dir, "missing"); !errdefs.IsNotFound(err) {
		t.Fatalf("missing disk: %v, want not found", err)
	}
	if _, err := findDisk(context.Background(), dir, ""); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("empty serial: %v, want invalid argument", err)
	}
}

func TestGuestCgroupsPath(t *testing.T) {
	for in, want := range map[string]string{
		"":                                  "/podvm/c1",
		"/kubepods/besteffort/pod1/c1":      "/kubepods/besteffort/pod1/c1",
		"kubepods-besteffort.slice:cri:abc": "/podvm/abc",
	} {
		if got := guestCgroupsPath("c1", in); got != want {
			t.Errorf("guestCgroupsPath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestConvertProcess(t *testing.T) {
	p := &specs.Process{
		Args: []string{"sh"}, User: specs.User{UID: 1000, GID: 100, AdditionalGids: []uint32{5, 6}},
		Rlimits:      []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 512}},
		Capabilities: &specs.LinuxCapabilities{Bounding: []string{"CAP_KILL"}},
	}
	lp, err := convertProcess(p)
	if err != nil {
		t.Fatal(err)
	}
	if lp.UID != 1000 || lp.GID != 100 || len(lp.AdditionalGroups) != 2 || lp.Cwd != "/" {
		t.Fatalf("user/cwd not converted: %+v", lp)
	}
	if len(lp.Rlimits) != 1 || lp.Rlimits[0].Type != unix.RLIMIT_NOFILE || lp.Rlimits[0].Soft != 512 {
		t.Fatalf("rlimits: %+v", lp.Rlimits)
	}
	if lp.Capabilities == nil || lp.Capabilities.Bounding[0] != "CAP_KILL" {
		t.Fatal("capabilities not converted")
	}
	p.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_BOGUS"}}
	if _, err := convertProcess(p); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("unknown rlimit: %v, want invalid argument", err)
	}
}

func TestExitStatus(t *testing.T) {
	// WaitStatus encodes exit codes in bits 8-15 and signals in bits 0-6.
	if got := exitStatus(unix.WaitStatus(3 << 8)); got != 3 {
		t.Errorf("exit 3 -> %d", got)
	}
	if got := exitStatus(unix.WaitStatus(unix.SIGKILL)); got != 137 {
		t.Errorf("SIGKILL -> %d, want 137", got)
	}
}

func TestMountOptions(t *testing.T) {
	flags, data := mountOptions([]string{"ro", "noatime", "discard", "rw"})
	if flags != unix.MS_RDONLY|unix.MS_NOATIME || data != "discard" {
		t.Fatalf("flags=%#x data=%q", flags, data)
	}
}

func TestParseSpecRejects(t *testing.T) {
	for name, in := range map[string]string{
		"not json":      "{",
		"relative root": `{"root":{"path":"rootfs"},"process":{"args":["sh"]}}`,
		"no root":       `{"process":{"args":["sh"]}}`,
		"no process":    `{"root":{"path":"/r"}}`,
	} {
		if _, err := parseSpec("c", []byte(in)); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: err = %v, want invalid argument", name, err)
		}
	}
	if _, err := parseSpec("c", []byte(`{"root":{"path":"/r"},"process":{"args":["sh"]}}`)); err != nil {
		t.Fatal(err)
	}
}

func FuzzParseSpec(f *testing.F) {
	f.Add([]byte(`{"root":{"path":"/r"},"process":{"args":["sh"],"rlimits":[{"type":"RLIMIT_NOFILE","hard":1,"soft":1}]}}`))
	f.Add([]byte(`{"root":{"path":"/r"},"process":{"args":[]},"linux":{"cgroupsPath":"a:b:c"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		spec, err := parseSpec("c", b)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("decoder error is not invalid argument: %v", err)
			}
			return
		}
		_ = guestCgroupsPath("c", spec.Linux.CgroupsPath)
		if _, err := convertProcess(spec.Process); err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("process conversion error is not invalid argument: %v", err)
		}
	})
}

func TestApplyPodSysctlsRefuses(t *testing.T) {
	spec := &specs.Spec{Linux: &specs.Linux{Sysctl: map[string]string{"net.ipv4/../../x": "1"}}}
	if err := applyPodSysctls(t.TempDir(), spec); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("a sysctl name with a path: %v, want invalid argument", err)
	}
	// With a network namespace of its own, libcontainer applies them; non-net ones always.
	spec = &specs.Spec{Linux: &specs.Linux{
		Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}},
		Sysctl:     map[string]string{"net.ipv4.ip_forward": "1"},
	}}
	if err := applyPodSysctls(t.TempDir(), spec); err != nil || len(spec.Linux.Sysctl) != 1 {
		t.Fatalf("own netns: %v, sysctls %v", err, spec.Linux.Sysctl)
	}
	spec = &specs.Spec{Linux: &specs.Linux{Sysctl: map[string]string{"kernel.msgmax": "1"}}}
	if err := applyPodSysctls(t.TempDir(), spec); err != nil || len(spec.Linux.Sysctl) != 1 {
		t.Fatalf("non-net sysctl: %v, sysctls %v", err, spec.Linux.Sysctl)
	}
}

func TestToRoute(t *testing.T) {
	r, err := toRoute(&api.Route{Destination: "10.0.0.0/8", Gateway: "10.1.2.1", Source: "10.1.2.3", Metric: 5, Scope: 0})
	if err != nil {
		t.Fatal(err)
	}
	if r.Dst.String() != "10.0.0.0/8" || r.Gw.String() != "10.1.2.1" || r.Src.String() != "10.1.2.3" || r.Priority != 5 {
		t.Fatalf("route %+v", r)
	}
	for _, bad := range []*api.Route{{Destination: "10.0.0.0"}, {Gateway: "gw"}} {
		if _, err := toRoute(bad); !errdefs.IsInvalidArgument(err) {
			t.Errorf("toRoute(%v): %v, want invalid argument", bad, err)
		}
	}
}

// TestWarmSpecDecodes: warmUp's spec survives JSON both ways, so decoding it meets every type
// it was built with.
func TestWarmSpecDecodes(t *testing.T) {
	b, err := json.Marshal(warmSpec())
	if err != nil {
		t.Fatal(err)
	}
	var got specs.Spec
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&got, warmSpec()) {
		t.Errorf("warm spec after JSON: %+v, want %+v", got, warmSpec())
	}
	warmUp()
}
