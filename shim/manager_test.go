package shim

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/shim/config"
	"github.com/podvm/podvm/version"
)

func TestManagerNameAndInfo(t *testing.T) {
	info, err := manager{}.Info(context.Background(), nil)
	if err != nil || manager.Name(manager{}) != RuntimeName || info.Name != RuntimeName || info.Version.Version != version.Version {
		t.Fatalf("info %+v %v, name %q", info, err, manager{}.Name())
	}
	// containerd reads the features as runc's: rro, user namespaces, ID-mapped mounts.
	if info.Features.GetTypeUrl() != "types.containerd.io/opencontainers/runtime-spec/1/features/Features" {
		t.Errorf("features type %q", info.Features.GetTypeUrl())
	}
	v, err := typeurl.UnmarshalAny(info.Features)
	f, ok := v.(*features.Features)
	if err != nil || !ok {
		t.Fatalf("features %T %v", v, err)
	}
	if !slices.Contains(f.MountOptions, "rro") || *f.Linux.MountExtensions.IDMap.Enabled {
		t.Errorf("features: mount options %q, idmap %v; want rro and no idmap", f.MountOptions, *f.Linux.MountExtensions.IDMap.Enabled)
	}
}

// `shim delete` runs in the bundle dir after the shim died and cleans up from the record.
func TestManagerStopCleansFromTheRecord(t *testing.T) {
	bundle, state := t.TempDir(), filepath.Join(t.TempDir(), "pod1")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Chdir(bundle)
	st, err := manager{}.Stop(context.Background(), "pod1")
	if err != nil || st.ExitStatus != int(killedBeforeStart) {
		t.Fatalf("stop without a record: %+v %v, want exit 137 and no error", st, err)
	}
	// The record names the VM's driver; delete cleans up with that one.
	var cleaned []string
	drv := hypervisor.FakeDriver(nil)
	drv.Cleanup = func(_ context.Context, dir string) error { cleaned = append(cleaned, dir); return nil }
	m := manager{drivers: hypervisor.NewDrivers(drv)}
	if err := (record{SandboxID: "pod1", StateDir: state, OwnsVM: true, Hypervisor: hypervisor.FakeKind}).write(bundle); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Stop(context.Background(), "pod1"); err != nil {
		t.Fatal(err)
	}
	if len(cleaned) != 1 || cleaned[0] != state {
		t.Errorf("driver cleanups %v, want one of %s", cleaned, state)
	}
	if _, err := os.Stat(state); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir left after shim delete: %v", err)
	}
	if err := os.WriteFile(filepath.Join(bundle, recordFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := (manager{}).Stop(context.Background(), "pod1"); err == nil {
		t.Error("stop with a broken record: no error")
	}
}

// A pod without a hostname gets the node's, as a runc container does.
func TestSandboxWithoutHostnameGetsTheNodes(t *testing.T) {
	b := backend{loadConfig: func(string) (*config.Config, error) { return config.Default(), nil }}
	spec := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: "/var/run/netns/x"}}}}
	o, err := b.sandboxOptions(context.Background(), &taskAPI.CreateTaskRequest{ID: "p"}, spec)
	if err != nil {
		t.Fatal(err)
	}
	if node, _ := os.Hostname(); o.host != node || node == "" {
		t.Errorf("hostname %q, want the node's %q", o.host, node)
	}
	spec.Hostname = "pod-a"
	if o, _ := b.sandboxOptions(context.Background(), &taskAPI.CreateTaskRequest{ID: "p"}, spec); o.host != "pod-a" {
		t.Errorf("hostname %q, want the pod's", o.host)
	}
}
