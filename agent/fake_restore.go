package agent

import (
	"context"

	"github.com/podvm/podvm/agent/api"
)

// PrepareRestored implements the RPC of that name in api.AgentService (agent.proto) for tests:
// it records the request (Restored returns it) and, with RestoreGate set, answers once that
// is closed.
func (f *Fake) PrepareRestored(ctx context.Context, r *api.PrepareRestoredRequest) (*api.Empty, error) {
	if err := f.enter("PrepareRestored", ""); err != nil {
		return nil, err
	}
	if err := passGate(ctx, f.RestoreGate); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.restored = r
	f.calls = append(f.calls, "PrepareRestored done")
	return &api.Empty{}, nil
}

// Restored is the last PrepareRestored request, nil if none came.
func (f *Fake) Restored() *api.PrepareRestoredRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.restored
}
