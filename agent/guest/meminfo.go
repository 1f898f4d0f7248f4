package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/podvm/podvm/agent/api"
)

// MemInfo implements the RPC of that name in api.AgentService (agent.proto): the guest
// kernel's MemTotal and MemAvailable.
func (s *Server) MemInfo(ctx context.Context, _ *api.Empty) (*api.MemInfoResponse, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return nil, fmt.Errorf("meminfo: %w", err)
	}
	return parseMemInfo(b)
}

// parseMemInfo reads MemTotal and MemAvailable (in kB) from /proc/meminfo's text.
func parseMemInfo(b []byte) (*api.MemInfoResponse, error) {
	kB := map[string]uint64{}
	for line := range bytes.Lines(b) {
		f := strings.Fields(string(line))
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		if n, err := strconv.ParseUint(f[1], 10, 64); err == nil {
			kB[strings.TrimSuffix(f[0], ":")] = n
		}
	}
	total, ok1 := kB["MemTotal"]
	avail, ok2 := kB["MemAvailable"]
	if !ok1 || !ok2 {
		return nil, errors.New("meminfo: no MemTotal or MemAvailable line")
	}
	return &api.MemInfoResponse{TotalBytes: total << 10, AvailableBytes: avail << 10}, nil
}
