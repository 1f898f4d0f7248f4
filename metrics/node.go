package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// maxScrapeBytes bounds what the node reads from one shim.
const maxScrapeBytes = 4 << 20

// Node is the node's metrics endpoint: it gathers every sandbox's metrics from the shims'
// sockets under StateDir at each scrape.
type Node struct {
	// StateDir is sandbox.state_dir: one directory per sandbox.
	StateDir string
	// Timeout bounds the scrape of one shim.
	Timeout time.Duration
	// NotSandboxes are directories in StateDir that hold no sandbox (the VM templates).
	NotSandboxes []string
}

// Handler serves the node's metrics (the shims' and the node's own) in the Prometheus
// exposition formats.
func (n *Node) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return n.Gather(r.Context()) })
		promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}).ServeHTTP(w, r)
	})
}

// scrape is one sandbox's answer.
type scrape struct {
	id       string
	families map[string]*dto.MetricFamily
	err      error
}

// Gather returns the families of every shim that answered, merged,
// and podvm_pods by state (a sandbox whose shim did not answer is "unreachable").
func (n *Node) Gather(ctx context.Context) ([]*dto.MetricFamily, error) {
	ids, err := n.sandboxes()
	if err != nil {
		return nil, err
	}
	scrapes := make([]scrape, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			fams, err := n.scrapeOne(ctx, filepath.Join(n.StateDir, id, SocketName))
			scrapes[i] = scrape{id: id, families: fams, err: err}
		})
	}
	wg.Wait()
	merged := map[string]*dto.MetricFamily{}
	pods := map[string]float64{}
	for _, st := range append(append([]string(nil), States...), StateUnreachable) {
		pods[st] = 0
	}
	for _, s := range scrapes {
		if s.err != nil {
			pods[StateUnreachable]++
			continue
		}
		pods[currentState(s.families)]++
		for name, f := range s.families {
			if m, ok := merged[name]; ok {
				m.Metric = append(m.Metric, f.Metric...)
			} else {
				merged[name] = f
			}
		}
	}
	merged[podsFamily.GetName()] = podsGauge(pods)
	out := make([]*dto.MetricFamily, 0, len(merged))
	for _, f := range merged {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out, nil
}

// sandboxes lists the sandbox ids: the directories in StateDir.
func (n *Node) sandboxes() ([]string, error) {
	entries, err := os.ReadDir(n.StateDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil // no pod has run since boot
	}
	if err != nil {
		return nil, fmt.Errorf("podvm metrics: state dir: %w", err)
	}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && !slices.Contains(n.NotSandboxes, filepath.Join(n.StateDir, e.Name())) {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// scrapeOne reads one shim's metrics socket.
func (n *Node) scrapeOne(ctx context.Context, sock string) (map[string]*dto.MetricFamily, error) {
	timeout := n.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://shim/metrics", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", sock, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(io.LimitReader(resp.Body, maxScrapeBytes))
}

// currentState is the state whose podvm_sandbox_state series is 1.
func currentState(fams map[string]*dto.MetricFamily) string {
	for _, m := range fams[stateFamilyName].GetMetric() {
		if m.GetGauge().GetValue() != 1 {
			continue
		}
		for _, l := range m.GetLabel() {
			if l.GetName() == "state" {
				return l.GetValue()
			}
		}
	}
	return StateUnreachable
}

const stateFamilyName = namespace + "_sandbox_state"

var podsFamily = &dto.MetricFamily{
	Name: strPtr(namespace + "_pods"),
	Help: strPtr("Pod VMs on this node by state: booting, ready, stopping, or unreachable (a sandbox dir whose shim did not answer)."),
	Type: dto.MetricType_GAUGE.Enum(),
}

func podsGauge(pods map[string]float64) *dto.MetricFamily {
	f := &dto.MetricFamily{Name: podsFamily.Name, Help: podsFamily.Help, Type: podsFamily.Type}
	states := make([]string, 0, len(pods))
	for st := range pods {
		states = append(states, st)
	}
	sort.Strings(states)
	for _, st := range states {
		f.Metric = append(f.Metric, &dto.Metric{
			Label: []*dto.LabelPair{{Name: strPtr("state"), Value: strPtr(st)}},
			Gauge: &dto.Gauge{Value: floatPtr(pods[st])},
		})
	}
	return f
}

func strPtr(s string) *string     { return &s }
func floatPtr(f float64) *float64 { return &f }
