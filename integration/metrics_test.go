package integration

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// TestPodvmMetrics runs two podvm pods, one with a container, and reads the node's metrics
// endpoint (`podvm metrics`, on loopback) as Prometheus would: both sandboxes' boot time,
// host-side and guest-side memory, agent RPC latencies and state are there, and the pods are counted as ready. Then
// `podvm overhead` measures them. Once the pods are gone, so are their series.
func TestPodvmMetrics(t *testing.T) {
	opts := podvmOptions(t)
	env := harness.Start(t, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	podvm := podvmCLI(ctx, t)

	a := runPod(ctx, t, env, "podvm", "metrics-a")
	b := runPod(ctx, t, env, "podvm", "metrics-b")
	if _, err := env.PullImage(ctx, env.BusyboxImage, a.Config); err != nil {
		t.Fatal(err)
	}
	startSleeper(ctx, t, env, a, "sleeper")

	url := startMetrics(ctx, t, podvm, opts.PodvmConfigPath)
	body := scrapeMetrics(ctx, t, url)
	for _, id := range []string{a.ID, b.ID} {
		for _, want := range []string{
			`podvm_sandbox_boot_seconds{sandbox_id="` + id + `"} `,
			`podvm_sandbox_state{sandbox_id="` + id + `",state="ready"} 1`,
			`podvm_process_proportional_memory_bytes{process="qemu",sandbox_id="` + id + `"} `,
			`podvm_process_resident_memory_bytes{process="virtiofsd",sandbox_id="` + id + `"} `,
			`podvm_process_resident_memory_bytes{process="shim",sandbox_id="` + id + `"} `,
			`podvm_guest_memory_touched_bytes{sandbox_id="` + id + `"} `,
			`podvm_guest_memory_total_bytes{sandbox_id="` + id + `"} `,
			`podvm_guest_memory_used_bytes{sandbox_id="` + id + `"} `,
			`podvm_agent_rpc_duration_seconds_count{method="SetupSandbox",outcome="ok",sandbox_id="` + id + `"} 1`,
		} {
			if !strings.Contains(body, want) {
				t.Errorf("metrics lack %s", want)
			}
		}
	}
	if !strings.Contains(body, `podvm_agent_rpc_duration_seconds_count{method="CreateContainer",outcome="ok",sandbox_id="`+a.ID+`"} `) {
		t.Errorf("no CreateContainer latency for the pod with a container")
	}
	if !strings.Contains(body, `podvm_pods{state="ready"} 2`) {
		t.Errorf("podvm_pods does not count 2 ready pods")
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", body)
	} else {
		for _, line := range strings.Split(body, "\n") {
			if strings.HasPrefix(line, "podvm_guest_memory") || strings.HasPrefix(line, "podvm_sandbox_boot_seconds") {
				t.Log(line)
			}
		}
	}

	out, err := exec.CommandContext(ctx, podvm, "overhead", "--config", opts.PodvmConfigPath, "--window", "5s").CombinedOutput()
	t.Logf("podvm overhead:\n%s", out)
	if err != nil || !strings.Contains(string(out), "podFixed:") {
		t.Errorf("podvm overhead: %v", err)
	}

	removePod(ctx, t, env, a)
	removePod(ctx, t, env, b)
	if body := scrapeMetrics(ctx, t, url); strings.Contains(body, a.ID) || !strings.Contains(body, `podvm_pods{state="ready"} 0`) {
		t.Errorf("series of removed pods are still served:\n%s", body)
	}
	env.AssertNoLeaks(t)
}

// podvmCLI returns the podvm binary: the one in PODVM_BIN, else one built for the test.
func podvmCLI(ctx context.Context, t *testing.T) string {
	t.Helper()
	p := filepath.Join(os.Getenv("PODVM_BIN"), "podvm")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	p = filepath.Join(t.TempDir(), "podvm")
	if err := harness.GoBuild(ctx, p, "./cmd/podvm"); err != nil {
		t.Fatal(err)
	}
	return p
}

// startMetrics runs `podvm metrics` on a loopback port it picks, until the test ends, and
// returns its URL.
func startMetrics(ctx context.Context, t *testing.T, podvm, cfg string) string {
	t.Helper()
	cmd := exec.CommandContext(ctx, podvm, "metrics", "--config", cfg, "--listen", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("podvm metrics: %v", err)
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	m := regexp.MustCompile(`(http://\S+/metrics)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("podvm metrics printed %q, want its URL", line)
	}
	return m[1]
}

func scrapeMetrics(ctx context.Context, t *testing.T, url string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	return string(b)
}
