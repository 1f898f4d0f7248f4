package shim

import (
	"context"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/log"

	"github.com/podvm/podvm/agent/api"
)

// The guest's OOM events are untrusted: a hostile guest may name any container, repeat
// one forever or flood. The shim publishes TaskOOM only for its own live containers, once per
// burst, and reads the events no faster than oomRate allows.
const (
	// oomRepeatWindow: OOM kills of one container closer together than this are one burst,
	// one TaskOOM (CRI only needs to learn that the container was OOM-killed).
	oomRepeatWindow = 5 * time.Second
	// oomRate and oomBurst bound how fast the shim takes events from the guest at all.
	oomRate  = 10 // per second
	oomBurst = 20
	// oomLogEvery: drops are logged at debug level at most this often, with a count.
	oomLogEvery = 10 * time.Second
	// maxLoggedID bounds a guest-chosen container id copied into a log line.
	maxLoggedID = 80
)

// oomGuard is the state of one VM's OOM event loop. It is used by that loop alone.
type oomGuard struct {
	window time.Duration
	// a token bucket: one token per event taken from the guest.
	rate   float64 // tokens per second
	burst  float64
	tokens float64
	filled time.Time
	// last is when each of the shim's containers last had a TaskOOM published; only ids
	// the shim owns enter it, and old entries are pruned, so the guest cannot grow it.
	last map[string]time.Time
	// dropped counts events not published; dropLogged is the count at the last log line.
	dropped, dropLogged uint64
	loggedAt            time.Time
}

func newOOMGuard(now time.Time) *oomGuard {
	return &oomGuard{window: oomRepeatWindow, rate: oomRate, burst: oomBurst, tokens: oomBurst, filled: now,
		last: map[string]time.Time{}}
}

// pace takes a token and says how long to wait before handling the event.
func (g *oomGuard) pace(now time.Time) time.Duration {
	if now.After(g.filled) {
		g.tokens = min(g.burst, g.tokens+now.Sub(g.filled).Seconds()*g.rate)
		g.filled = now
	}
	g.tokens--
	if g.tokens >= 0 {
		return 0
	}
	// The wait pays back the debt; the next call sees the bucket refilled from then on.
	wait := time.Duration(-g.tokens / g.rate * float64(time.Second))
	g.tokens, g.filled = 0, now.Add(wait)
	return wait
}

// repeat reports whether id had a TaskOOM within the window, and records one now if not.
func (g *oomGuard) repeat(id string, now time.Time) bool {
	if t, ok := g.last[id]; ok && now.Sub(t) < g.window {
		return true
	}
	for k, t := range g.last {
		if now.Sub(t) >= g.window {
			delete(g.last, k)
		}
	}
	g.last[id] = now
	return false
}

// drop counts an event not published and logs, at most every oomLogEvery, how many were.
func (g *oomGuard) drop(ctx context.Context, now time.Time, id, why string) {
	g.dropped++
	if !g.loggedAt.IsZero() && now.Sub(g.loggedAt) < oomLogEvery {
		return
	}
	log.G(ctx).WithFields(log.Fields{
		"container": logSafe(id, maxLoggedID), "reason": why,
		"dropped": g.dropped - g.dropLogged, "dropped_total": g.dropped,
	}).Debug("OOM events from the guest not published")
	g.loggedAt, g.dropLogged = now, g.dropped
}

// logSafe shortens a guest-supplied string for a log line (the formatter quotes it).
func logSafe(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// watchOOM publishes the guest's OOM kills until the agent connection ends.
func (s *Service) watchOOM(ctx context.Context, sb *sandbox) {
	ctx = context.WithoutCancel(ctx)
	g := newOOMGuard(time.Now())
	for {
		ev, err := sb.agent.GetOOMEvent(ctx, &api.Empty{})
		if err != nil {
			select {
			case <-sb.agent.Done():
				return
			case <-time.After(time.Second): // a passing error: ask again
				continue
			}
		}
		if wait := g.pace(time.Now()); wait > 0 {
			select {
			case <-sb.agent.Done():
				return
			case <-time.After(wait):
			}
		}
		id, now := ev.ContainerId, time.Now()
		if why := s.oomOwner(sb, id); why != "" {
			g.drop(ctx, now, id, why)
			continue
		}
		if g.repeat(id, now) {
			g.drop(ctx, now, id, "repeat within "+g.window.String())
			continue
		}
		log.G(ctx).WithField("container", id).Info("OOM kill in the guest")
		s.events.publish(&eventstypes.TaskOOM{ContainerID: id})
	}
}

// oomOwner says why an OOM event for id is not this shim's to publish, or "" if it is: the
// container must be one this VM runs and not deleted (nor still being created).
func (s *Service) oomOwner(sb *sandbox, id string) string {
	c, current := s.pod.lookup(sb, id)
	switch {
	case !current:
		return "not (or no longer) the pod VM of this shim"
	case c == nil:
		return "not a container of this shim"
	}
	if c.init.state().status == statusDeleted {
		return "container deleted"
	}
	return ""
}
