package guest

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// mountPodTmpfs mounts the pod's tmpfs (memory-backed emptyDirs) a container uses, those not
// mounted yet: nosuid, nodev, mode 0777 as kubelet makes an emptyDir, of the size asked.
// They stay until the VM goes, for the pod's other containers.
func (s *Server) mountPodTmpfs(ts []*api.PodTmpfs) error {
	s.tmpfsMu.Lock()
	defer s.tmpfsMu.Unlock()
	for _, t := range ts {
		if err := mountTmpfsOnce(agent.GuestPodTmpfsDir, t); err != nil {
			return err
		}
	}
	return nil
}

func mountTmpfsOnce(dir string, t *api.PodTmpfs) error {
	name := filepath.Base(t.MountPoint)
	if filepath.Dir(t.MountPoint) != dir || name == "." || name == ".." || name == "/" {
		return fmt.Errorf("pod tmpfs %q: not a directory of %s: %w", t.MountPoint, dir, errdefs.ErrInvalidArgument)
	}
	if err := os.MkdirAll(t.MountPoint, 0o755); err != nil {
		return fmt.Errorf("pod tmpfs %s: %w", t.MountPoint, err)
	}
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, t.MountPoint, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, &stx); err != nil {
		return fmt.Errorf("pod tmpfs %s: %w", t.MountPoint, err)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		return nil // another container of the pod mounted it
	}
	data := "mode=0777"
	if t.SizeBytes > 0 {
		data += ",size=" + strconv.FormatUint(t.SizeBytes, 10)
	}
	if err := unix.Mount("tmpfs", t.MountPoint, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		return fmt.Errorf("pod tmpfs %s (%s): %w", t.MountPoint, data, err)
	}
	return nil
}
