package deploy

import (
	"testing"

	nodev1 "k8s.io/api/node/v1"
	"sigs.k8s.io/yaml"

	"github.com/podvm/podvm/shim/config"
)

// TestRuntimeClass: the manifest is a valid RuntimeClass for handler podvm that keeps pods on
// labelled nodes and declares at least the memory the shim adds to every VM.
func TestRuntimeClass(t *testing.T) {
	var rc nodev1.RuntimeClass
	if err := yaml.UnmarshalStrict(RuntimeClass, &rc); err != nil {
		t.Fatal(err)
	}
	if rc.Name != "podvm" || rc.Handler != "podvm" {
		t.Fatalf("name %q handler %q, want podvm", rc.Name, rc.Handler)
	}
	if rc.Scheduling == nil || rc.Scheduling.NodeSelector[NodeLabel] != "true" {
		t.Fatalf("scheduling %+v, want nodeSelector %s: \"true\"", rc.Scheduling, NodeLabel)
	}
	if rc.Overhead == nil {
		t.Fatal("no overhead")
	}
	mem, cpu := rc.Overhead.PodFixed.Memory(), rc.Overhead.PodFixed.Cpu()
	if mem.Value() <= int64(config.Default().Sandbox.MemoryOverhead) || cpu.MilliValue() <= 0 {
		t.Fatalf("podFixed memory %s cpu %s: want more than memory_overhead %s and some CPU", mem, cpu, config.Default().Sandbox.MemoryOverhead)
	}
}
