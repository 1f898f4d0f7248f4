package agent

import (
	"context"

	"github.com/podvm/podvm/agent/api"
)

// PrepareRestored implements the RPC of that name in api.AgentService (agent.proto) for tests:
// it records the request (Restored returns it).
func (f *Fake) PrepareRestored(ctx context.Context, r *api.PrepareRestoredRequest) (*api.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("PrepareRestored", ""); err != nil {
		return nil, err
	}
	f.restored = r
	return &api.Empty{}, nil
}

// Restored is the last PrepareRestored request, nil if none came.
func (f *Fake) Restored() *api.PrepareRestoredRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.restored
}
