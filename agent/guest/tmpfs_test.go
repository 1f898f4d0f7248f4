package guest

import (
	"errors"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/agent/api"
)

func TestPodTmpfsRefusesOtherPlaces(t *testing.T) {
	dir := t.TempDir()
	for _, mp := range []string{"/etc", dir, dir + "/a/b", dir + "/..", "relative", ""} {
		err := mountTmpfsOnce(dir, &api.PodTmpfs{MountPoint: mp, SizeBytes: 1 << 20})
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("mount point %q: err %v, want invalid argument", mp, err)
		}
	}
}
