package guest

import (
	"context"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
)

func TestHandlerPanicBecomesError(t *testing.T) {
	panicky := func(ctx context.Context, unmarshal func(any) error) (any, error) {
		var m map[string]int
		m["boom"]++ //nolint:govet,staticcheck // nilness, SA5000: a runtime panic from a nil map write is the point
		return nil, nil
	}
	_, err := toGRPCErrors(context.Background(), nil, &ttrpc.UnaryServerInfo{FullMethod: "/podvm.agent.v1.Agent/Stats"}, panicky)
	if err == nil {
		t.Fatal("a panicking handler returned no error")
	}
	if native := errgrpc.ToNative(err); !errdefs.IsUnknown(native) {
		t.Fatalf("error %v does not map to unknown", native)
	}
}
