package qemu

import (
	"context"
	"math"
	"testing"
	"time"
)

// TestHostTSCkHz: on a host whose TSC ticks at a constant rate, the frequency measured since
// the process started agrees with one measured over a fresh interval; elsewhere there is none,
// and the guest kernel measures it itself.
func TestHostTSCkHz(t *testing.T) {
	got := hostTSCkHz()
	if !haveTSC || !constantTSC() {
		if got != 0 {
			t.Fatalf("hostTSCkHz %d on a host without a constant TSC, want 0", got)
		}
		return
	}
	from, ok := sampleTSC()
	if !ok {
		t.Fatal("no TSC sample")
	}
	time.Sleep(50 * time.Millisecond)
	again := tscKHz(from)
	if got <= 0 || again <= 0 {
		t.Fatalf("measured %d and %d kHz", got, again)
	}
	// The guest kernel keeps a value within 1% and refines it; this is far tighter.
	if d := math.Abs(float64(got-again)) / float64(again); d > 0.002 {
		t.Errorf("TSC at %d kHz since the process started, %d kHz over the last 50 ms: %.2f%% apart", got, again, 100*d)
	}
	t.Logf("host TSC %d kHz", got)

	// A process that started long ago measures over a fresh interval, and gets the same.
	defer func(b tscSample) { tscBase = b }(tscBase)
	tscBase.ns -= int64(2 * tscMaxWindow)
	tscBase.tsc -= 7 // a base that would give nonsense if it were used
	start := time.Now()
	late := hostTSCkHz()
	if d := math.Abs(float64(late-again)) / float64(again); d > 0.002 {
		t.Errorf("measured %d kHz in a process that started long ago, %d kHz before: %.2f%% apart", late, again, 100*d)
	}
	if took := time.Since(start); took < tscMinWindow {
		t.Errorf("the fresh measurement took %v, less than its window %v", took, tscMinWindow)
	}
}

// TestResolveTSC: Resolve gives a TCG VM the host's TSC frequency, and neither a KVM VM (its
// kernel reads the frequency from KVM) nor a template's boot (its command line is part of
// the template's key) nor a VM whose config names one already.
func TestResolveTSC(t *testing.T) {
	want := hostTSCkHz()
	for _, tt := range []struct {
		name string
		mod  func(c *Config)
		want func(got int) bool
	}{
		{"tcg", func(c *Config) {}, func(got int) bool {
			return (got == 0) == (want == 0) && math.Abs(float64(got-want)) <= 0.002*float64(want)
		}},
		{"kvm", func(c *Config) { c.Accel = AccelKVM }, func(got int) bool { return got == 0 }},
		{"template", func(c *Config) { c.Templated = true }, func(got int) bool { return got == 0 }},
		{"given", func(c *Config) { c.TSCkHz = 1234567 }, func(got int) bool { return got == 1234567 }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := baseConfig()
			tt.mod(&c)
			r, err := c.Resolve(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if !tt.want(r.TSCkHz) {
				t.Errorf("TSCkHz %d (host: %d)", r.TSCkHz, want)
			}
		})
	}
}
