package shim

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestHostNamespaces(t *testing.T) {
	own := []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.NetworkNamespace, Path: "/x"}}
	if got := hostNamespaces(&specs.Spec{Linux: &specs.Linux{Namespaces: own}}); len(got) != 0 {
		t.Errorf("own namespaces: %v", got)
	}
	hostPID := []specs.LinuxNamespace{{Type: specs.IPCNamespace}, {Type: specs.NetworkNamespace, Path: "/x"}}
	if got := hostNamespaces(&specs.Spec{Linux: &specs.Linux{Namespaces: hostPID}}); len(got) != 1 || got[0] != "pid" {
		t.Errorf("hostPID: %v", got)
	}
}
