package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/shim/config"
)

const msrAbort = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"

var (
	tcgBooted = qemu.Attempt{Accel: "tcg", Booted: true, BootTime: 1816 * time.Millisecond}
	hostAbort = qemu.Attempt{Accel: "kvm", CPU: "host", Aborted: true, Reason: msrAbort}
	maskSlow  = qemu.Attempt{Accel: "kvm", CPU: "host,arch-capabilities=off", Reason: "no answer from the guest agent within 1.816s"}
	// This machine: -cpu host aborts, the masked model is slower than TCG.
	nested = qemu.ProbeResult{Accel: "tcg", TCG: tcgBooted, KVM: []qemu.Attempt{hostAbort, maskSlow},
		Reason: "KVM -cpu host: QEMU aborted: " + msrAbort + "; -cpu host,arch-capabilities=off: no answer from the guest agent within 1.816s, slower than under TCG (1.816s)"}
	bareMetal = qemu.ProbeResult{Accel: "kvm", CPU: "host", TCG: tcgBooted,
		KVM: []qemu.Attempt{{Accel: "kvm", CPU: "host", Booted: true, BootTime: 312 * time.Millisecond}}}
	masked = qemu.ProbeResult{Accel: "kvm", CPU: "host,arch-capabilities=off", TCG: tcgBooted,
		KVM: []qemu.Attempt{hostAbort, {Accel: "kvm", CPU: "host,arch-capabilities=off", Booted: true, BootTime: 400 * time.Millisecond}}}
	// A host whose KVM is PVM (module kvm_pvm): an ordinary guest kernel never answers.
	pvmSlow = qemu.ProbeResult{Accel: "tcg", TCG: tcgBooted,
		KVM:    []qemu.Attempt{{Accel: "kvm", CPU: "host", Reason: "no answer from the guest agent within 1.816s"}},
		Reason: "KVM -cpu host: no answer from the guest agent within 1.816s, slower than under TCG (1.816s)"}
	noKVM = qemu.ProbeResult{Accel: "tcg", TCG: tcgBooted, Reason: "/dev/kvm is not usable: stat /dev/kvm: no such file or directory"}
)

// checkBootTest is a `podvm check` on a host whose accelerator probe gives res (or err).
type checkBootTest struct {
	name   string
	accel  string
	res    qemu.ProbeResult
	err    error
	euid   int
	broken bool     // no guest kernel
	pvm    bool     // the host's KVM is PVM (/sys/module/kvm_pvm)
	want   []string // the boot lines, in order, as prefixes or (after "~") substrings
}

var checkBootTests = []checkBootTest{
	{name: "nested, auto: warning", accel: "auto", res: nested, want: []string{
		"ok    boot tcg        accel tcg: guest agent answered 1.816s after QEMU start",
		"warn  boot kvm        accel kvm, -cpu host: QEMU aborted: " + msrAbort,
		"warn  boot kvm        accel kvm, -cpu host,arch-capabilities=off: no answer from the guest agent within 1.816s",
		`warn  accel           accel "auto" uses TCG (pods run, slower): KVM -cpu host: QEMU aborted: ` + msrAbort,
		"~This looks like nested virtualisation",
	}},
	{name: "nested, forced kvm: failure", accel: "kvm", res: nested, want: []string{
		"ok    boot tcg", "warn  boot kvm", "warn  boot kvm",
		`FAIL  accel           accel = "kvm" but KVM -cpu host: QEMU aborted`,
		`~set accel = "auto" (picks TCG here) or "tcg"`,
	}},
	{name: "nested, forced tcg", accel: "tcg", res: nested, want: []string{
		"ok    boot tcg", "warn  boot kvm", "warn  boot kvm",
		`ok    accel           accel = "tcg" forced; KVM would not help: KVM -cpu host: QEMU aborted`,
	}},
	{name: "bare metal, auto", accel: "auto", res: bareMetal, want: []string{
		"ok    boot tcg",
		"ok    boot kvm        accel kvm, -cpu host: guest agent answered 312ms after QEMU start",
		`ok    accel           accel "auto" uses KVM with -cpu host (312ms against TCG's 1.816s)`,
	}},
	{name: "bare metal, forced tcg", accel: "tcg", res: bareMetal, want: []string{
		"ok    boot tcg", "ok    boot kvm",
		`ok    accel           accel = "tcg" forced, but KVM (-cpu host) works (312ms against TCG's 1.816s): set accel = "auto" to use it`,
	}},
	{name: "masked MSR, auto", accel: "auto", res: masked, want: []string{
		"ok    boot tcg", "warn  boot kvm", "ok    boot kvm",
		`ok    accel           accel "auto" uses KVM with -cpu host,arch-capabilities=off`,
	}},
	{name: "masked MSR, forced kvm", accel: "kvm", res: masked, want: []string{
		"ok    boot tcg", "warn  boot kvm", "ok    boot kvm",
		`FAIL  accel           accel = "kvm" runs -cpu host, which does not work here`,
		`~while -cpu host,arch-capabilities=off does: set accel = "auto"`,
	}},
	{name: "PVM, auto", accel: "auto", res: pvmSlow, pvm: true, want: []string{
		"ok    boot tcg", "warn  boot kvm",
		`warn  accel           accel "auto" uses TCG (pods run, slower): KVM -cpu host: no answer`,
		"~This host's KVM is PVM (module kvm_pvm)",
		"~kernels built as PVM guests (CONFIG_PVM_GUEST)",
	}},
	{name: "PVM, forced kvm", accel: "kvm", res: pvmSlow, pvm: true, want: []string{
		"ok    boot tcg", "warn  boot kvm",
		`FAIL  accel           accel = "kvm" but KVM -cpu host: no answer`,
		"~This host's KVM is PVM (module kvm_pvm)",
	}},
	{name: "slow KVM, not PVM", accel: "auto", res: pvmSlow, want: []string{
		"ok    boot tcg", "warn  boot kvm",
		`warn  accel           accel "auto" uses TCG (pods run, slower): KVM -cpu host: no answer`,
		"~KVM works but guests boot slower than under TCG",
	}},
	{name: "no /dev/kvm", accel: "auto", res: noKVM, want: []string{
		"ok    boot tcg",
		`warn  accel           accel "auto" uses TCG (pods run, slower): /dev/kvm is not usable`,
		"~load kvm_intel or kvm_amd",
	}},
	{name: "nothing boots", accel: "auto",
		res: qemu.ProbeResult{TCG: qemu.Attempt{Accel: "tcg", Aborted: true, Reason: "could not load kernel"}, KVM: []qemu.Attempt{hostAbort}},
		err: errors.New("the guest image boots under no accelerator: TCG: could not load kernel"),
		want: []string{
			"FAIL  boot tcg        accel tcg: QEMU aborted: could not load kernel",
			"warn  boot kvm",
			"FAIL  accel           the guest image boots under no accelerator",
		}},
	{name: "probe cannot start", accel: "auto", err: errors.New("accelerator probe: stat /x: no such file or directory"), want: []string{
		"FAIL  boot            accelerator probe: stat /x",
	}},
	{name: "not root", accel: "auto", euid: 1000, want: []string{"warn  boot            not tried: booting a guest as pods do needs root"}},
	{name: "no kernel", accel: "auto", broken: true, want: []string{"warn  boot            not tried: the guest cannot boot until the guest kernel check above passes"}},
}

func TestCheckBoot(t *testing.T) {
	dir := t.TempDir()
	configs := map[string]string{}
	for _, a := range []string{"auto", "kvm", "tcg"} {
		configs[a] = writeConfig(t, dir, a+".toml", "[hypervisor]\naccel = \""+a+"\"\n")
	}
	for _, tt := range checkBootTests {
		t.Run(tt.name, func(t *testing.T) { runCheckBoot(t, configs[tt.accel], tt) })
	}
}

// writeConfig writes a node config named name into dir.
func writeConfig(t *testing.T, dir, name, data string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func runCheckBoot(t *testing.T, configPath string, tt checkBootTest) {
	host := goodHost()
	if tt.broken {
		delete(host.files, "/usr/share/podvm/vmlinuz")
	}
	if tt.pvm {
		host.files["/sys/module/kvm_pvm"] = ""
	}
	h := host.probe()
	probed := false
	h.probeAccel = func(_ context.Context, cfg *config.Config) (qemu.ProbeResult, error) {
		probed = true
		if cfg.Hypervisor.Accel != tt.accel {
			t.Errorf("probe got accel %q", cfg.Hypervisor.Accel)
		}
		return tt.res, tt.err
	}
	h.euid = func() int { return tt.euid }
	rs := h.check(context.Background(), configPath)
	var lines []string
	for _, r := range rs {
		if strings.HasPrefix(r.name, "boot") || r.name == "accel" || r.name == "kvm" {
			lines = append(lines, r.String())
		}
	}
	if probed != (tt.euid == 0 && !tt.broken) {
		t.Errorf("probed = %v", probed)
	}
	matchBootLines(t, lines, tt.want)
}

// matchBootLines checks lines against want: each entry the prefix of the next line, or after
// "~" a substring of any line; no line left over.
func matchBootLines(t *testing.T, lines, want []string) {
	t.Helper()
	all := strings.Join(lines, "\n")
	i := 0
	for _, w := range want {
		if s, ok := strings.CutPrefix(w, "~"); ok {
			if !strings.Contains(all, s) {
				t.Errorf("output lacks %q:\n%s", s, all)
			}
			continue
		}
		if i >= len(lines) || !strings.HasPrefix(lines[i], w) {
			t.Errorf("line %d: want prefix %q in:\n%s", i+1, w, all)
		}
		i++
	}
	if i != len(lines) {
		t.Errorf("%d lines, want %d:\n%s", len(lines), i, all)
	}
}
