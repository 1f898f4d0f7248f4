package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	msrAbort = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
	tcgBoot  = 2 * time.Second
)

// fakeBoots answers probe boots from a table: accel+" "+cpu -> attempt (Accel and CPU are
// filled in). A missing entry is a boot that runs out of time.
type fakeBoots struct {
	mu     sync.Mutex
	table  map[string]Attempt
	calls  []string
	limits []time.Duration
}

func (f *fakeBoots) boot(_ context.Context, accel, cpu string, limit time.Duration) Attempt {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := strings.TrimSpace(accel + " " + cpu)
	f.calls = append(f.calls, k)
	f.limits = append(f.limits, limit)
	a, ok := f.table[k]
	if !ok {
		a = Attempt{Reason: "no answer from the guest agent within " + limit.String()}
	}
	a.Accel, a.CPU = accel, cpu
	return a
}

func booted(d time.Duration) Attempt { return Attempt{Booted: true, BootTime: d} }
func aborted(why string) Attempt     { return Attempt{Aborted: true, Reason: why} }

func testProber(t *testing.T, f *fakeBoots, kvmErr error) *prober {
	t.Helper()
	p := newProber(Config{}, t.TempDir())
	p.boot = f.boot
	p.kvmDevice = func() error { return kvmErr }
	p.key = func() (ProbeKey, error) {
		return ProbeKey{ProbeVersion: ProbeVersion, Kernel: FileID{Path: "/k", Size: 1}}, nil
	}
	p.qemuVersion = func(context.Context) string { return "QEMU emulator version 7.2.22" }
	return p
}

// probeDecisionTests: what the probe boots (calls, in order) and decides, given how each boot
// goes (table).
var probeDecisionTests = []struct {
	name    string
	table   map[string]Attempt
	kvmErr  error
	calls   []string
	accel   string
	cpu     string
	reason  []string // substrings of the reason
	wantErr string
}{
	{
		name:  "kvm fine",
		table: map[string]Attempt{"tcg": booted(tcgBoot), "kvm host": booted(300 * time.Millisecond)},
		calls: []string{"tcg", "kvm host"},
		accel: AccelKVM, cpu: CPUHost,
	},
	{
		name: "host aborts, masked MSR boots fast",
		table: map[string]Attempt{
			"tcg": booted(tcgBoot), "kvm host": aborted(msrAbort),
			"kvm host,arch-capabilities=off": booted(400 * time.Millisecond),
		},
		calls: []string{"tcg", "kvm host", "kvm host,arch-capabilities=off"},
		accel: AccelKVM, cpu: "host,arch-capabilities=off",
	},
	{
		name: "every host model aborts, qemu64 boots",
		table: map[string]Attempt{
			"tcg": booted(tcgBoot), "kvm host": aborted(msrAbort),
			"kvm host,arch-capabilities=off": aborted("failed to set MSR 0x48"),
			"kvm qemu64":                     booted(time.Second),
		},
		calls: []string{"tcg", "kvm host", "kvm host,arch-capabilities=off", "kvm qemu64"},
		accel: AccelKVM, cpu: "qemu64",
	},
	{
		name:   "kvm aborts, then too slow (this machine)",
		table:  map[string]Attempt{"tcg": booted(tcgBoot), "kvm host": aborted(msrAbort)},
		calls:  []string{"tcg", "kvm host", "kvm host,arch-capabilities=off"},
		accel:  AccelTCG,
		reason: []string{"-cpu host: QEMU aborted: " + msrAbort, "-cpu host,arch-capabilities=off: no answer from the guest agent within 2s, slower than under TCG (2s)"},
	},
	{
		name:   "kvm boots, slower than tcg",
		table:  map[string]Attempt{"tcg": booted(tcgBoot), "kvm host": booted(tcgBoot + time.Millisecond)},
		calls:  []string{"tcg", "kvm host"},
		accel:  AccelTCG,
		reason: []string{"-cpu host: the guest booted in 2.001s, slower than under TCG (2s)"},
	},
	{
		name:  "kvm as fast as tcg",
		table: map[string]Attempt{"tcg": booted(tcgBoot), "kvm host": booted(tcgBoot)},
		calls: []string{"tcg", "kvm host"},
		accel: AccelKVM, cpu: CPUHost,
	},
	{
		name:   "every model aborts",
		table:  map[string]Attempt{"tcg": booted(tcgBoot), "kvm host": aborted(msrAbort), "kvm host,arch-capabilities=off": aborted("x"), "kvm qemu64": aborted("y")},
		calls:  []string{"tcg", "kvm host", "kvm host,arch-capabilities=off", "kvm qemu64"},
		accel:  AccelTCG,
		reason: []string{"-cpu qemu64: QEMU aborted: y"},
	},
	{
		name:   "no /dev/kvm",
		table:  map[string]Attempt{"tcg": booted(tcgBoot)},
		kvmErr: errors.New("stat /dev/kvm: no such file or directory"),
		calls:  []string{"tcg"},
		accel:  AccelTCG,
		reason: []string{"/dev/kvm is not usable: stat /dev/kvm"},
	},
	{
		name:  "tcg fails, kvm boots",
		table: map[string]Attempt{"tcg": aborted("bad"), "kvm host": booted(5 * time.Second)},
		calls: []string{"tcg", "kvm host"},
		accel: AccelKVM, cpu: CPUHost,
	},
	{
		name:    "nothing boots",
		table:   map[string]Attempt{"tcg": aborted("could not load kernel"), "kvm host": aborted(msrAbort), "kvm host,arch-capabilities=off": aborted(msrAbort), "kvm qemu64": aborted(msrAbort)},
		calls:   []string{"tcg", "kvm host", "kvm host,arch-capabilities=off", "kvm qemu64"},
		wantErr: "the guest image boots under no accelerator: TCG: could not load kernel; KVM -cpu host: QEMU aborted",
	},
}

func TestProbeDecision(t *testing.T) {
	for _, tt := range probeDecisionTests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeBoots{table: tt.table}
			r, err := testProber(t, f, tt.kvmErr).probe(context.Background())
			if !slices.Equal(f.calls, tt.calls) {
				t.Errorf("boots %q, want %q", f.calls, tt.calls)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Accel != tt.accel || r.CPU != tt.cpu {
				t.Errorf("decided %s/%q, want %s/%q (reason %s)", r.Accel, r.CPU, tt.accel, tt.cpu, r.Reason)
			}
			if tt.accel == AccelKVM && r.Reason != "" {
				t.Errorf("reason %q with KVM", r.Reason)
			}
			for _, s := range tt.reason {
				if !strings.Contains(r.Reason, s) {
					t.Errorf("reason %q lacks %q", r.Reason, s)
				}
			}
			if r.QEMUVersion == "" || r.Time.IsZero() {
				t.Errorf("result without QEMU version or time: %+v", r)
			}
		})
	}
}

// TestProbeKVMLimit: KVM's boots are cut off at TCG's boot time (it would not be used after),
// or at ProbeTimeout when TCG did not boot.
func TestProbeKVMLimit(t *testing.T) {
	f := &fakeBoots{table: map[string]Attempt{"tcg": booted(1500 * time.Millisecond), "kvm host": aborted(msrAbort)}}
	if _, err := testProber(t, f, nil).probe(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := []time.Duration{ProbeTimeout, 1500 * time.Millisecond, 1500 * time.Millisecond}
	if !slices.Equal(f.limits, want) {
		t.Errorf("limits %v, want %v", f.limits, want)
	}
	f = &fakeBoots{table: map[string]Attempt{"tcg": aborted("x")}}
	_, _ = testProber(t, f, nil).probe(context.Background())
	if f.limits[1] != ProbeTimeout {
		t.Errorf("KVM limit %v without a TCG boot, want %v", f.limits[1], ProbeTimeout)
	}
}

func TestAccelCache(t *testing.T) {
	f := &fakeBoots{table: map[string]Attempt{"tcg": booted(tcgBoot), "kvm host": aborted(msrAbort)}}
	p := testProber(t, f, nil)
	ctx := context.Background()

	// Miss: probe and store.
	r, err := p.cached(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if r.Cached || r.Accel != AccelTCG || len(f.calls) != 3 {
		t.Fatalf("first: cached %v accel %s after %d boots", r.Cached, r.Accel, len(f.calls))
	}
	if _, err := os.Stat(filepath.Join(p.nodeDir, AccelCacheFile)); err != nil {
		t.Fatal(err)
	}

	// Hit: no boot.
	r2, err := p.cached(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if !r2.Cached || r2.Accel != AccelTCG || r2.Reason != r.Reason || len(f.calls) != 3 {
		t.Fatalf("second: cached %v accel %s after %d boots", r2.Cached, r2.Accel, len(f.calls))
	}
	if r2.TCG.BootTime != tcgBoot || len(r2.KVM) != 2 || !r2.KVM[0].Aborted {
		t.Errorf("cached attempts lost: %+v", r2)
	}

	// Stale: another kernel (or QEMU, or probe version) probes again.
	old := p.key
	p.key = func() (ProbeKey, error) {
		k, err := old()
		k.Kernel.ModTime++
		return k, err
	}
	f.table["kvm host"] = booted(100 * time.Millisecond)
	r3, err := p.cached(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if r3.Cached || r3.Accel != AccelKVM || r3.CPU != CPUHost || len(f.calls) != 5 {
		t.Fatalf("stale key: cached %v accel %s/%s after %d boots", r3.Cached, r3.Accel, r3.CPU, len(f.calls))
	}

	// Refresh probes although the cache is fresh.
	if _, err := p.cached(ctx, true); err != nil || len(f.calls) != 7 {
		t.Fatalf("refresh: %v after %d boots", err, len(f.calls))
	}

	// A corrupt cache is a miss, and a failed probe is not cached.
	path := filepath.Join(p.nodeDir, AccelCacheFile)
	if err := os.WriteFile(path, []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	f.table = map[string]Attempt{"tcg": aborted("no kernel")}
	if _, err := p.cached(ctx, false); err == nil {
		t.Fatal("no error when nothing boots")
	}
	if b, _ := os.ReadFile(path); string(b) != "{" {
		t.Errorf("failed probe replaced the cache: %s", b)
	}
}

// TestAccelCacheOneProbe: shims starting at once wait for one probe instead of each booting.
func TestAccelCacheOneProbe(t *testing.T) {
	var boots atomic.Int32
	dir := t.TempDir()
	var wg sync.WaitGroup
	results := make([]ProbeResult, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f := &fakeBoots{table: map[string]Attempt{"tcg": booted(tcgBoot), "kvm host": booted(time.Second)}}
			p := testProber(t, f, nil)
			p.nodeDir = dir
			p.boot = func(ctx context.Context, accel, cpu string, limit time.Duration) Attempt {
				boots.Add(1)
				time.Sleep(20 * time.Millisecond)
				return f.boot(ctx, accel, cpu, limit)
			}
			r, err := p.cached(context.Background(), false)
			if err != nil {
				t.Error(err)
			}
			results[i] = r
		}()
	}
	wg.Wait()
	if n := boots.Load(); n != 2 {
		t.Errorf("%d boots, want 2 (one probe: tcg and kvm)", n)
	}
	for _, r := range results {
		if r.Accel != AccelKVM {
			t.Errorf("accel %s", r.Accel)
		}
	}
}

func TestLockFileCancel(t *testing.T) {
	path := filepath.Join(t.TempDir(), AccelLockFile)
	unlock, err := lockFile(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := lockFile(ctx, path); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("second lock: %v, want a deadline error", err)
	}
}

// TestLockFileRefusesSymlink: a symlink at a lock file's path is not followed, so a lock never
// creates or opens a file elsewhere.
func TestLockFileRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	target, path := filepath.Join(dir, "elsewhere"), filepath.Join(dir, TemplateLockFile)
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	if unlock, err := lockFile(t.Context(), path); err == nil {
		unlock()
		t.Fatalf("lockFile through a symlink succeeded")
	}
	if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the symlink's target was created: %v", err)
	}
}

// TestAutoAccelArgs: accel "auto" takes the accelerator and CPU model from the cached probe
// result, and the command line carries them: -cpu host where it works, the fallback model
// where the probe needed it, no -cpu under TCG. A forced accelerator ignores the cache.
func TestAutoAccelArgs(t *testing.T) {
	node := t.TempDir()
	file := func(name string) string {
		p := filepath.Join(node, name)
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	c := baseConfig()
	c.StateDir = filepath.Join(node, "pod1")
	c.Binary, c.Kernel, c.Initrd, c.Firmware = file("qemu"), file("vmlinuz"), file("initrd"), file("qboot.rom")
	key, err := probeKey(&c)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		accel   string
		cached  ProbeResult
		want    []string
		notWant []string
	}{
		{"kvm works", AccelAuto, ProbeResult{Accel: AccelKVM, CPU: CPUHost}, []string{"-accel kvm", "-cpu host"}, []string{"tcg"}},
		{"host refused", AccelAuto, ProbeResult{Accel: AccelKVM, CPU: "host,arch-capabilities=off"}, []string{"-accel kvm", "-cpu host,arch-capabilities=off"}, []string{"tcg"}},
		{"named model", "", ProbeResult{Accel: AccelKVM, CPU: "qemu64"}, []string{"-accel kvm", "-cpu qemu64"}, nil},
		{"tcg", AccelAuto, ProbeResult{Accel: AccelTCG, Reason: "KVM -cpu host: QEMU aborted"}, []string{"-accel tcg,tb-size=96"}, []string{"-cpu", "kvm"}},
		{"forced tcg ignores a kvm result", AccelTCG, ProbeResult{Accel: AccelKVM, CPU: "qemu64"}, []string{"-accel tcg,tb-size=96"}, []string{"-cpu", "kvm"}},
		{"forced kvm is -cpu host", AccelKVM, ProbeResult{Accel: AccelTCG}, []string{"-accel kvm", "-cpu host"}, []string{"tcg"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cached.Key = key
			if err := writeAccelCache(filepath.Join(node, AccelCacheFile), tt.cached); err != nil {
				t.Fatal(err)
			}
			in := c
			in.Accel = tt.accel
			r, err := in.Resolve(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			args, err := r.Args()
			if err != nil {
				t.Fatal(err)
			}
			assertArgs(t, args, tt.want, tt.notWant)
		})
	}
}

func TestCPUModel(t *testing.T) {
	for s, ok := range map[string]bool{
		"host": true, "qemu64": true, "host,arch-capabilities=off": true, "EPYC-v4,x2apic=on,pmu=off": true,
		"": false, "host,": false, "host,arch-capabilities": false, "host -cpu": false, "host,a=b=c": false, ",x=y": false,
	} {
		if got := validCPUModel(s); got != ok {
			t.Errorf("validCPUModel(%q) = %v", s, got)
		}
	}
	c := baseConfig()
	c.Accel, c.CPU = AccelKVM, "host -smp 8"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "CPU") {
		t.Errorf("bad CPU model validated: %v", err)
	}
}

func TestQEMUComplaint(t *testing.T) {
	p := filepath.Join(t.TempDir(), QEMULog)
	log := "2026-12-01T15:15:20.1Z qemu-system-x86_64: warning: host doesn't support requested feature\n" +
		"2026-12-01T15:15:20.2Z qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n" +
		"qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed.\n"
	if err := os.WriteFile(p, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := qemuComplaint(p); got != msrAbort {
		t.Errorf("got %q", got)
	}
	if err := os.WriteFile(p, []byte("x: warning: a\nqemu-system-x86_64: could not load kernel\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := qemuComplaint(p); got != "qemu-system-x86_64: could not load kernel" {
		t.Errorf("got %q", got)
	}
}

// TestCleanStaleProbes: a probe dir of a dead process goes, a live one's stays.
func TestCleanStaleProbes(t *testing.T) {
	node := t.TempDir()
	dead := filepath.Join(node, "accel-probe-999999999-kvm")
	live := filepath.Join(node, fmt.Sprintf("accel-probe-%d-tcg", os.Getpid()))
	other := filepath.Join(node, "pod1")
	for _, d := range []string{dead, live, other} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dead, QEMULog), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	cleanStaleProbes(context.Background(), node)
	for d, want := range map[string]bool{dead: false, live: true, other: true} {
		if _, err := os.Stat(d); (err == nil) != want {
			t.Errorf("%s: exists %v, want %v", d, err == nil, want)
		}
	}
}
