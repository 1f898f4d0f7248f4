package shim

import (
	"context"
	"encoding/json"
	"fmt"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/podvm/podvm/agent/api"
)

// Bounds on what the guest may answer (its replies are untrusted, see DESIGN.md).
const (
	// maxGuestPids is the most processes a Pids reply may list: the guest kernel's default
	// pid_max (32768) twice over, and still well inside containerd's message size.
	maxGuestPids = 1 << 16
	// maxStatsBytes bounds the encoded cgroup metrics of one Stats reply; real ones are a
	// few KiB.
	maxStatsBytes = 1 << 20
)

// pids lists the container's processes (guest pids); only execs this shim created are named.
func (c *container) pids(ctx context.Context) ([]*task.ProcessInfo, error) {
	ag, err := c.guest()
	if err != nil {
		return nil, err
	}
	list, err := ag.ListProcesses(ctx, &api.ContainerRequest{ContainerId: c.id})
	if err != nil {
		return nil, err
	}
	if n := len(list.Processes); n > maxGuestPids {
		return nil, fmt.Errorf("the guest listed %d processes in container %s, more than the %d the shim accepts: %w",
			n, c.id, maxGuestPids, errdefs.ErrOutOfRange)
	}
	c.mu.Lock()
	execs := make(map[string]bool, len(c.execs))
	for id := range c.execs {
		execs[id] = true
	}
	c.mu.Unlock()
	var out []*task.ProcessInfo
	for _, pi := range list.Processes {
		info := &task.ProcessInfo{Pid: pi.GetPid()}
		// Only an exec this shim created is named: the guest chooses the string.
		if execs[pi.GetExecId()] {
			a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: pi.GetExecId()})
			if err != nil {
				return nil, err
			}
			info.Info = a
		}
		out = append(out, info)
	}
	return out, nil
}

// stats returns the container's cgroup v2 metrics in the guest.
func (c *container) stats(ctx context.Context) (*anypb.Any, error) {
	ag, err := c.guest()
	if err != nil {
		return nil, err
	}
	st, err := ag.Stats(ctx, &api.ContainerRequest{ContainerId: c.id})
	if err != nil {
		return nil, err
	}
	if n := len(st.Cgroup2Metrics); n > maxStatsBytes {
		return nil, fmt.Errorf("stats of container %s from the guest: %d bytes, more than the %d the shim accepts: %w",
			c.id, n, maxStatsBytes, errdefs.ErrOutOfRange)
	}
	var m cgroupsv2.Metrics
	if err := proto.Unmarshal(st.Cgroup2Metrics, &m); err != nil {
		return nil, fmt.Errorf("stats of container %s from the guest: %w", c.id, err)
	}
	return typeurl.MarshalAnyToProto(&m)
}

// update sets the container's cgroup limits in the guest. CPU and memory-node pinning are
// the host's business and dropped.
func (c *container) update(ctx context.Context, resources *anypb.Any) error {
	ag, err := c.guest()
	if err != nil {
		return err
	}
	if resources == nil {
		return nil
	}
	v, err := typeurl.UnmarshalAny(resources)
	if err != nil {
		return fmt.Errorf("resources: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	res, ok := v.(*specs.LinuxResources)
	if !ok {
		return fmt.Errorf("resources are %T, want LinuxResources: %w", v, errdefs.ErrInvalidArgument)
	}
	if res.CPU != nil {
		res.CPU.Cpus, res.CPU.Mems = "", ""
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = ag.UpdateContainer(ctx, &api.UpdateContainerRequest{ContainerId: c.id, Resources: b})
	return err
}
