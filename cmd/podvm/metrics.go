package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/podvm/podvm/metrics"
)

// defaultMetricsAddr is loopback: the endpoint names the node's pods, so exposing it beyond
// the node is the admin's choice (--listen :9477).
const defaultMetricsAddr = "127.0.0.1:9477"

// runMetrics serves the node's Prometheus endpoint until interrupted.
func runMetrics(ctx context.Context, e *env, args []string) error {
	const name = "podvm metrics"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	path := configFlag(fs)
	listen := fs.String("listen", defaultMetricsAddr, "serve on `ADDR` (host:port; port 0 picks one, printed at start)")
	setUsage(fs, name+" [flags]",
		"Serves this node's podvm metrics for Prometheus on http://ADDR/metrics until interrupted:\nper pod VM its boot time, size, state, agent RPC latencies, the RSS and PSS of its QEMU,\nvirtiofsd and shim and the guest RAM it has touched, and the node's pods by state. Each\nscrape reads every shim's metrics socket in the state dir (sandbox.state_dir); needs root.\ndocs/metrics.md lists the series.")
	cfg, err := parseConfig(e, fs, path, args)
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return usagef(name, "--listen %s: %v", *listen, err)
	}
	node := &metrics.Node{StateDir: cfg.Sandbox.StateDir, NotSandboxes: []string{cfg.TemplateDir()}, Timeout: 2 * time.Second}
	mux := http.NewServeMux()
	mux.Handle("/metrics", node.Handler())
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "podvm metrics: see /metrics")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintf(e.stdout, "podvm metrics: serving http://%s/metrics (pods in %s)\n", l.Addr(), cfg.Sandbox.StateDir)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving metrics: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
