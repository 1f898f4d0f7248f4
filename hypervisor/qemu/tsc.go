package qemu

import (
	"bufio"
	"bytes"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Under TCG the guest's TSC is the host's (QEMU's rdtsc returns the host counter), so the
// host can tell the guest kernel its frequency (tsc_early_khz=) instead of having it measured
// at boot against the emulated PIT. That measurement takes ~10-15 ms when its quick method
// succeeds; when it fails (the vCPU thread held up on the host, often under load), the
// kernel falls back to timing the TSC against the HPET, ~110 ms more. The kernel still
// refines the given value against the HPET a second after boot, if it is within 1%
// ("Refined TSC clocksource calibration"); docs/kernel.md.

// tscBase is the host's TSC and clock when the process started: the reference of
// hostTSCkHz, so that when a VM is resolved, tens of milliseconds later, the measured
// interval is long enough without waiting.
var tscBase, tscBaseOK = sampleTSC()

// tscMinWindow is the shortest interval hostTSCkHz measures over. A sample's uncertainty is
// about a microsecond, so 5 ms give the frequency to ~0.05%, far inside the kernel's 1%.
const tscMinWindow = 5 * time.Millisecond

// tscMaxWindow is the longest: over a longer one the host may have been suspended (the
// monotonic clock stops, a TSC may not), and a value more than 1% off is one the guest kernel
// keeps. A shim resolves its VM well within it; a long-lived process measures anew.
const tscMaxWindow = 10 * time.Second

type tscSample struct {
	tsc uint64
	ns  int64 // CLOCK_MONOTONIC, the clock QEMU's emulated timers (HPET, PIT) run on
}

// sampleTSC reads the TSC between two reads of the clock, a few times, and keeps the
// tightest bracket, so that a preemption between the reads does not skew the sample.
func sampleTSC() (tscSample, bool) {
	if !haveTSC {
		return tscSample{}, false
	}
	var best tscSample
	width := int64(-1)
	for range 5 {
		var a, b unix.Timespec
		if unix.ClockGettime(unix.CLOCK_MONOTONIC, &a) != nil {
			return tscSample{}, false
		}
		t := rdtsc()
		if unix.ClockGettime(unix.CLOCK_MONOTONIC, &b) != nil {
			return tscSample{}, false
		}
		if w := b.Nano() - a.Nano(); width < 0 || w < width {
			width, best = w, tscSample{tsc: t, ns: a.Nano() + w/2}
		}
	}
	return best, true
}

// hostTSCkHz returns the host's TSC frequency in kHz, measured against CLOCK_MONOTONIC since
// the process started (waiting out the rest of tscMinWindow if need be; over a fresh
// tscMinWindow if the process started more than tscMaxWindow ago), or 0 where the TSC cannot
// be used: not amd64, or a TSC whose rate changes with the CPU's (no constant_tsc and
// nonstop_tsc in /proc/cpuinfo), which the guest's kernel must then measure itself.
func hostTSCkHz() int {
	if !tscBaseOK || !constantTSC() {
		return 0
	}
	from := tscBase
	if time.Duration(monotonicNow()-from.ns) > tscMaxWindow {
		var ok bool
		if from, ok = sampleTSC(); !ok {
			return 0
		}
	}
	if d := time.Duration(monotonicNow() - from.ns); d < tscMinWindow {
		time.Sleep(tscMinWindow - d)
	}
	return tscKHz(from)
}

// tscKHz is the TSC's frequency since from, 0 if it cannot be measured or is implausible.
func tscKHz(from tscSample) int {
	now, ok := sampleTSC()
	if !ok || now.ns <= from.ns || now.tsc <= from.tsc {
		return 0
	}
	khz := float64(now.tsc-from.tsc) * 1e6 / float64(now.ns-from.ns)
	if khz < 100e3 || khz > 20e6 { // 100 MHz to 20 GHz
		return 0
	}
	return int(khz + 0.5)
}

func monotonicNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) // cannot fail for this clock
	return ts.Nano()
}

// constantTSC reports whether the first CPU's flags in /proc/cpuinfo say its TSC ticks at a
// constant rate, in every power state.
func constantTSC() bool {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return false
	}
	defer func() { _ = f.Close() }()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for s.Scan() {
		name, value, ok := bytes.Cut(s.Bytes(), []byte(":"))
		if !ok || string(bytes.TrimSpace(name)) != "flags" {
			continue
		}
		flags := bytes.Fields(value)
		return slices.ContainsFunc(flags, func(f []byte) bool { return string(f) == "constant_tsc" }) &&
			slices.ContainsFunc(flags, func(f []byte) bool { return string(f) == "nonstop_tsc" })
	}
	return false
}
