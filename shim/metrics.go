package shim

import (
	"context"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/metrics"
)

// The sandbox's Prometheus metrics (package metrics): served on <state dir>/metrics.sock,
// where `podvm metrics` gathers them. A pod runs without them rather than not at all.

// startMetrics starts serving the sandbox's metrics, in state booting.
func (sb *sandbox) startMetrics(ctx context.Context) {
	sb.metrics = metrics.NewSandbox(sb.id, sb.stateDir, os.Getpid())
	srv, err := sb.metrics.Serve(filepath.Join(sb.stateDir, metrics.SocketName))
	if err != nil {
		log.G(ctx).WithError(err).Warn("this pod's metrics will not be served")
		return
	}
	sb.metricsSrv = srv
}

// rpcObservable is an agent connection that reports its calls (agent.Client).
type rpcObservable interface {
	ObserveRPCs(o agent.RPCObserver)
}

// observeAgent times the agent calls of conn for the metrics, and lets each scrape ask the
// guest for its memory.
func (sb *sandbox) observeAgent(conn agentConn) {
	if sb.metrics == nil {
		return
	}
	if o, ok := conn.(rpcObservable); ok {
		o.ObserveRPCs(sb.metrics.ObserveRPC)
	}
	sb.metrics.SetGuestMemory(func(ctx context.Context) (uint64, uint64, error) {
		r, err := conn.MemInfo(ctx, &api.Empty{})
		if err != nil {
			return 0, 0, err
		}
		return r.TotalBytes, r.AvailableBytes, nil
	})
}

// metricsReady records the booted VM.
func (sb *sandbox) metricsReady(boot time.Duration, vcpus, memoryMiB int) {
	if sb.metrics != nil {
		sb.metrics.Ready(boot, vcpus, int64(memoryMiB)<<20)
	}
}

// metricsStopping marks the sandbox stopping.
func (sb *sandbox) metricsStopping() {
	if sb.metrics != nil {
		sb.metrics.SetState(metrics.StateStopping)
	}
}

// stopMetrics stops serving, before the state dir goes.
func (sb *sandbox) stopMetrics(ctx context.Context) {
	if sb.metricsSrv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := sb.metricsSrv.Close(ctx); err != nil {
		log.G(ctx).WithError(err).Debug("stop serving metrics")
	}
	sb.metricsSrv = nil
}
