package shim

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/log"
)

// eventQueue hands task events to containerd's publisher in the order they were queued
// (a TaskExit must not overtake the TaskStart before it).
type eventQueue struct {
	mu sync.RWMutex
	ch chan any // nil once closed
}

// newEventQueue starts forwarding to publisher; close ends it and closes the publisher.
func newEventQueue(ctx context.Context, publisher shim.Publisher) *eventQueue {
	q := &eventQueue{ch: make(chan any, 128)}
	go q.forward(ctx, publisher, q.ch)
	return q
}

func (q *eventQueue) forward(ctx context.Context, publisher shim.Publisher, events <-chan any) {
	ns, _ := namespaces.Namespace(ctx)
	ctx = namespaces.WithNamespace(context.WithoutCancel(ctx), ns)
	for e := range events {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := publisher.Publish(pctx, runtime.GetTopic(e), e); err != nil {
			log.G(ctx).WithError(err).Error("publish event")
		}
		cancel()
	}
	if err := publisher.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("close event publisher")
	}
}

// publish queues an event; after close it is dropped.
func (q *eventQueue) publish(e any) {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.ch != nil {
		q.ch <- e
	}
}

func (q *eventQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ch != nil {
		close(q.ch)
		q.ch = nil
	}
}
