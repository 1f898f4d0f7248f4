package guest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// sysBlock is where the guest kernel lists its disks.
const sysBlock = "/sys/block"

// findDisk waits for the virtio-blk disk with the given serial to appear (hot-plug is
// asynchronous) and returns its /dev path.
func findDisk(ctx context.Context, sysRoot, serial string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	return pollDisk(ctx, sysRoot, serial, t.C)
}

// pollDisk looks for the disk now and again at each tick, until ctx ends.
func pollDisk(ctx context.Context, sysRoot, serial string, tick <-chan time.Time) (string, error) {
	if serial == "" {
		return "", fmt.Errorf("disk serial is empty: %w", errdefs.ErrInvalidArgument)
	}
	for {
		entries, _ := os.ReadDir(sysRoot)
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(sysRoot, e.Name(), "serial"))
			if err == nil && strings.TrimSpace(string(b)) == serial {
				return "/dev/" + e.Name(), nil
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("no disk with serial %q appeared in the guest: %w", serial, errdefs.ErrNotFound)
		case <-tick:
		}
	}
}

// prepareStorage mounts the container's disks in the guest and adds its block device nodes to
// the spec. It returns the mount points to undo when the container goes.
func prepareStorage(ctx context.Context, mounts []*api.BlockMount, devices []*api.DeviceNode, spec *specs.Spec) (_ []string, retErr error) {
	var done []string
	defer func() {
		if retErr != nil {
			unmountAll(ctx, done)
		}
	}()
	for _, m := range mounts {
		dev, err := findDisk(ctx, sysBlock, m.Serial)
		if err != nil {
			return done, err
		}
		if m.MountPoint == "" {
			continue
		}
		if err := os.MkdirAll(m.MountPoint, 0o755); err != nil {
			return done, err
		}
		flags, data := mountOptions(m.Options)
		if err := unix.Mount(dev, m.MountPoint, m.FsType, flags, data); err != nil {
			return done, fmt.Errorf("mount disk %s (%s) on %s: %w", m.Serial, dev, m.MountPoint, err)
		}
		done = append(done, m.MountPoint)
	}
	for _, d := range devices {
		dev, err := findDisk(ctx, sysBlock, d.Serial)
		if err != nil {
			return done, err
		}
		var st unix.Stat_t
		if err := unix.Stat(dev, &st); err != nil {
			return done, err
		}
		major, minor := int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		mode := os.FileMode(d.FileMode)
		if mode == 0 {
			mode = 0o660
		}
		uid, gid := d.Uid, d.Gid
		spec.Linux.Devices = append(spec.Linux.Devices, specs.LinuxDevice{
			Path: d.ContainerPath, Type: "b", Major: major, Minor: minor, FileMode: &mode, UID: &uid, GID: &gid,
		})
		if spec.Linux.Resources == nil {
			spec.Linux.Resources = &specs.LinuxResources{}
		}
		spec.Linux.Resources.Devices = append(spec.Linux.Resources.Devices, specs.LinuxDeviceCgroup{
			Allow: true, Type: "b", Major: &major, Minor: &minor, Access: "rwm",
		})
	}
	return done, nil
}

func mountOptions(opts []string) (uintptr, string) {
	var flags uintptr
	var data []string
	for _, o := range opts {
		switch o {
		case "ro":
			flags |= unix.MS_RDONLY
		case "rw":
		case "noatime":
			flags |= unix.MS_NOATIME
		case "nosuid":
			flags |= unix.MS_NOSUID
		case "nodev":
			flags |= unix.MS_NODEV
		case "noexec":
			flags |= unix.MS_NOEXEC
		default:
			data = append(data, o)
		}
	}
	return flags, strings.Join(data, ",")
}

func unmountAll(ctx context.Context, points []string) {
	for i := len(points) - 1; i >= 0; i-- {
		if err := unix.Unmount(points[i], unix.MNT_DETACH); err != nil {
			log.G(ctx).WithError(err).Warnf("unmount %s", points[i])
		}
	}
}
