package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/podvm/podvm/shim/config"
)

// family builds a gauge or counter family with one series per (sandbox, label value, value).
func family(name, label string, counter bool, series ...[3]any) *dto.MetricFamily {
	f := &dto.MetricFamily{Name: &name}
	for _, s := range series {
		id, lv, v := s[0].(string), s[1].(string), s[2].(float64)
		m := &dto.Metric{Label: []*dto.LabelPair{{Name: strp("sandbox_id"), Value: strp(id)}}}
		if label != "" {
			m.Label = append(m.Label, &dto.LabelPair{Name: strp(label), Value: strp(lv)})
		}
		if counter {
			m.Counter = &dto.Counter{Value: &v}
		} else {
			m.Gauge = &dto.Gauge{Value: &v}
		}
		f.Metric = append(f.Metric, m)
	}
	return f
}

func strp(s string) *string { return &s }

// TestMeasureOverhead: memory besides guest RAM is the PSS sum minus what the guest touched,
// CPU the counters' growth over the window; booting sandboxes and other prefixes are left out.
func TestMeasureOverhead(t *testing.T) {
	const mi = 1 << 20
	scrape := func(cpu float64) []*dto.MetricFamily {
		return []*dto.MetricFamily{
			family("podvm_process_proportional_memory_bytes", "process", false,
				[3]any{"aaaa", "qemu", 150.0 * mi}, [3]any{"aaaa", "virtiofsd", 4.0 * mi}, [3]any{"aaaa", "shim", 16.0 * mi},
				[3]any{"bbbb", "qemu", 90.0 * mi}),
			family("podvm_guest_memory_touched_bytes", "", false, [3]any{"aaaa", "", 110.0 * mi}, [3]any{"bbbb", "", 80.0 * mi}),
			family("podvm_sandbox_state", "state", false, [3]any{"aaaa", "ready", 1.0}, [3]any{"bbbb", "ready", 0.0}, [3]any{"bbbb", "booting", 1.0}),
			family("podvm_process_cpu_seconds_total", "process", true, [3]any{"aaaa", "qemu", cpu}, [3]any{"aaaa", "shim", 1.0}),
		}
	}
	ms := measureOverhead(scrape(10), scrape(10.5), 10*time.Second, "")
	if len(ms) != 1 || ms[0].id != "aaaa" {
		t.Fatalf("measured %+v, want only the ready sandbox aaaa", ms)
	}
	if ms[0].own != 60*mi || fmt.Sprintf("%.3f", ms[0].cpu) != "0.050" {
		t.Fatalf("own %v cpu %v, want 60Mi and 0.05 cores", ms[0].own/mi, ms[0].cpu)
	}
	if ms := measureOverhead(scrape(10), scrape(10.5), 10*time.Second, "b"); len(ms) != 0 {
		t.Fatalf("prefix b: %+v, want none ready", ms)
	}
	var out bytes.Buffer
	cfg := config.Default()
	printOverhead(&env{stdout: &out}, cfg, ms0(ms), 10*time.Second)
	// default_memory 512Mi + max(memory_overhead 256Mi, measured 60Mi) = 768Mi; 50m.
	if !strings.Contains(out.String(), "overhead:\n  podFixed:\n    memory: \"768Mi\"\n    cpu: \"50m\"\n") ||
		strings.Contains(out.String(), "Raise") {
		t.Fatalf("output:\n%s", out.String())
	}
	// Measured above memory_overhead: the measured figure counts, and the admin is told.
	out.Reset()
	cfg.Sandbox.MemoryOverhead = 40 * mi
	printOverhead(&env{stdout: &out}, cfg, ms0(ms), 10*time.Second)
	if !strings.Contains(out.String(), "memory: \"576Mi\"") || !strings.Contains(out.String(), "Raise sandbox.memory_overhead to at least 64Mi") {
		t.Fatalf("output:\n%s", out.String())
	}
}

func ms0(ms []sandboxCost) []sandboxCost {
	return append([]sandboxCost{{id: "zzzz", own: 1 << 20, cpu: 0.01}}, ms...)
}

// TestOverheadNoPods: with nothing running it says what to do.
func TestOverheadNoPods(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(cfg, []byte("[sandbox]\nstate_dir = \""+t.TempDir()+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, t.TempDir(), t.TempDir(), "overhead", "--config", cfg, "--window", "1s")
	if r.code != 1 || !strings.Contains(r.stderr, "no ready pod VM to measure") {
		t.Fatalf("%+v", r)
	}
	r = runCLI(t, t.TempDir(), t.TempDir(), "overhead", "--config", cfg, "--window", "1ms")
	if r.code != 2 || !strings.Contains(r.stderr, "too short") {
		t.Fatalf("%+v", r)
	}
}

// lockedBuffer is a bytes.Buffer safe for the command's goroutine and the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestMetricsServes: podvm metrics prints where it serves, answers /metrics with the node's
// series, and stops when interrupted.
func TestMetricsServes(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(cfg, []byte("[sandbox]\nstate_dir = \""+t.TempDir()+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr lockedBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int)
	go func() {
		done <- run(ctx, &env{stdout: &stdout, stderr: &stderr}, []string{"metrics", "--config", cfg, "--listen", "127.0.0.1:0"})
	}()
	addr := regexp.MustCompile(`http://(\S+)/metrics`)
	var m []string
	for deadline := time.Now().Add(10 * time.Second); m == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		m = addr.FindStringSubmatch(stdout.String())
	}
	if m == nil {
		cancel()
		t.Fatalf("no address printed: %q %q", stdout.String(), stderr.String())
	}
	resp, err := http.Get("http://" + m[1] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if !strings.Contains(string(b), `podvm_pods{state="ready"} 0`) {
		t.Errorf("/metrics:\n%s", b)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
}
