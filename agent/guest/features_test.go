package guest

import (
	"slices"
	"testing"

	"github.com/opencontainers/runc/libcontainer/specconv"

	"github.com/podvm/podvm/agent"
)

// TestFeaturesAreLibcontainers keeps the features the shim advertises in step with the
// libcontainer the agent links.
func TestFeaturesAreLibcontainers(t *testing.T) {
	f := agent.Features()
	if want := specconv.KnownMountOptions(); !slices.Equal(f.MountOptions, want) {
		t.Errorf("agent.Features mount options\n%q\nlibcontainer knows\n%q", f.MountOptions, want)
	}
	if want := specconv.KnownNamespaces(); !slices.Equal(f.Linux.Namespaces, want) {
		t.Errorf("agent.Features namespaces %q, libcontainer knows %q", f.Linux.Namespaces, want)
	}
}
