package shim

import (
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"

	"github.com/podvm/podvm/agent/api"
)

// The guest's answers to Pids are bounded and name only execs the shim created.
func TestPidsRepliesAreChecked(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	r.mustExec("pod1", "e1")
	r.agent.ProcessList = &api.ListProcessesResponse{Processes: []*api.ProcessInfo{
		{Pid: 1}, {Pid: 7, ExecId: "e1"}, {Pid: 8, ExecId: "made-up-by-the-guest"},
	}}
	resp, err := r.svc.Pids(r.ctx, &taskAPI.PidsRequest{ID: "pod1"})
	if err != nil {
		t.Fatal(err)
	}
	var named []string
	for _, p := range resp.Processes {
		if p.Info == nil {
			continue
		}
		v, err := typeurl.UnmarshalAny(p.Info)
		if err != nil {
			t.Fatal(err)
		}
		named = append(named, v.(*options.ProcessDetails).ExecID)
	}
	if len(resp.Processes) != 3 || len(named) != 1 || named[0] != "e1" {
		t.Errorf("%d processes, execs named %q; want 3, [e1]", len(resp.Processes), named)
	}

	r.agent.ProcessList = &api.ListProcessesResponse{Processes: make([]*api.ProcessInfo, maxGuestPids+1)}
	if _, err := r.svc.Pids(r.ctx, &taskAPI.PidsRequest{ID: "pod1"}); !errdefs.IsOutOfRange(native(err)) {
		t.Errorf("Pids with %d processes from the guest: %v, want out of range", maxGuestPids+1, err)
	}
	if _, err := r.svc.Pids(r.ctx, &taskAPI.PidsRequest{ID: "not-mine"}); !errdefs.IsNotFound(native(err)) {
		t.Errorf("Pids of a container the shim does not run: %v, want not found", err)
	}
}

func TestStatsRepliesAreChecked(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	if _, err := r.svc.Stats(r.ctx, &taskAPI.StatsRequest{ID: "pod1"}); err != nil {
		t.Fatalf("stats: %v", err)
	}
	r.agent.StatsReply = &api.StatsResponse{Cgroup2Metrics: make([]byte, maxStatsBytes+1)}
	if _, err := r.svc.Stats(r.ctx, &taskAPI.StatsRequest{ID: "pod1"}); !errdefs.IsOutOfRange(native(err)) {
		t.Errorf("stats of %d bytes from the guest: %v, want out of range", maxStatsBytes+1, err)
	}
	if _, err := r.svc.Stats(r.ctx, &taskAPI.StatsRequest{ID: "not-mine"}); !errdefs.IsNotFound(native(err)) {
		t.Errorf("stats of a container the shim does not run: %v, want not found", err)
	}
}

// A guest clock far in the future (or no time at all) does not become the exit time.
func TestGuestExitTimeIsBounded(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	r.agent.ExitedAt = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	before := time.Now()
	r.agent.Exit("pod1", "", 0)
	w := r.wait("pod1", "")
	if at := w.ExitedAt.AsTime(); at.Before(before) || at.After(time.Now()) {
		t.Errorf("exit time %v, want the host's time of the exit", at)
	}

	now := time.Now()
	for _, tc := range []struct {
		guest int64
		want  time.Time
	}{
		{0, now}, {-1, now}, {now.Add(time.Hour).UnixNano(), now},
		{now.Add(-time.Second).UnixNano(), now.Add(-time.Second)},
	} {
		if got := guestTime(tc.guest, now); !got.Equal(tc.want) {
			t.Errorf("guestTime(%d) = %v, want %v", tc.guest, got, tc.want)
		}
	}
}
