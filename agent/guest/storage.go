package guest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
		if e, _ := sysfsEntry(sysRoot, "serial", serial); e != "" {
			return "/dev/" + e, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("no disk with serial %q appeared in the guest: %w", serial, errdefs.ErrNotFound)
		case <-tick:
		}
	}
}

// storage is what prepareStorage did for a container: the guest mount points of its disks,
// and the disks (their /sys/block names).
type storage struct {
	mounts []string
	disks  []string
}

// prepareStorage mounts the container's disks in the guest and adds its block device nodes to
// the spec. What it did is undone with release when the container goes.
func prepareStorage(ctx context.Context, mounts []*api.BlockMount, devices []*api.DeviceNode, spec *specs.Spec) (_ *storage, retErr error) {
	st := &storage{}
	defer func() {
		if retErr != nil {
			st.release(ctx)
		}
	}()
	for _, m := range mounts {
		dev, err := findDisk(ctx, sysBlock, m.Serial)
		if err != nil {
			return nil, err
		}
		st.disks = append(st.disks, filepath.Base(dev))
		if m.MountPoint == "" {
			continue
		}
		if err := os.MkdirAll(m.MountPoint, 0o755); err != nil {
			return nil, err
		}
		flags, data := mountOptions(m.Options)
		if err := unix.Mount(dev, m.MountPoint, m.FsType, flags, data); err != nil {
			return nil, fmt.Errorf("mount disk %s (%s) on %s: %w", m.Serial, dev, m.MountPoint, err)
		}
		st.mounts = append(st.mounts, m.MountPoint)
	}
	for _, d := range devices {
		dev, err := findDisk(ctx, sysBlock, d.Serial)
		if err != nil {
			return nil, err
		}
		st.disks = append(st.disks, filepath.Base(dev))
		var sb unix.Stat_t
		if err := unix.Stat(dev, &sb); err != nil {
			return nil, err
		}
		major, minor := int64(unix.Major(sb.Rdev)), int64(unix.Minor(sb.Rdev))
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
	return st, nil
}

// release unmounts the container's disks and hands them back: it powers off the PCIe slot
// of each, which QEMU takes as the guest's consent to unplug it there and then; the host's
// unplug (device_del) that follows finds it gone. Without it, a guest with native PCIe
// hot-plug (no ACPI, the default) would wait out the 5 s a pressed attention button gives
// to change one's mind. pciehp turns the slot's power indicator off, the second half of
// what QEMU waits for, a second after the power: release waits for that, so that the
// host's device_del does not press the button of a slot being powered off.
func (st *storage) release(ctx context.Context) {
	if st == nil {
		return
	}
	for i := len(st.mounts) - 1; i >= 0; i-- {
		if err := unix.Unmount(st.mounts[i], unix.MNT_DETACH); err != nil {
			log.G(ctx).WithError(err).Warnf("unmount %s", st.mounts[i])
		}
	}
	var wg sync.WaitGroup
	for _, d := range st.disks {
		slot, err := diskSlot(sysBlock, sysSlots, d)
		if err != nil {
			log.G(ctx).WithError(err).Warnf("disk %s: not releasing its slot; the host's unplug asks for it", d)
			continue
		}
		wg.Go(func() {
			if err := os.WriteFile(filepath.Join(slot, "power"), []byte("0"), 0); err != nil {
				log.G(ctx).WithError(err).Warnf("disk %s: powering off slot %s", d, slot)
			}
		})
	}
	wg.Wait()
}

// sysSlots is where the guest kernel lists its hot-plug slots.
const sysSlots = "/sys/bus/pci/slots"

// diskSlot returns the hot-plug slot (a directory under slotsRoot) the virtio-blk disk name
// (under sysRoot) is in: the slot whose address is its PCI function's bus and device.
func diskSlot(sysRoot, slotsRoot, name string) (string, error) {
	dev, err := filepath.EvalSymlinks(filepath.Join(sysRoot, name, "device"))
	if err != nil {
		return "", err
	}
	// .../0000:01:00.0/virtio3: the PCI function is the virtio device's parent.
	fn := filepath.Base(filepath.Dir(dev))
	addr, _, ok := strings.Cut(fn, ".")
	if !ok {
		return "", fmt.Errorf("%s is not on a PCI function (%s)", name, dev)
	}
	e, err := sysfsEntry(slotsRoot, "address", addr)
	if err != nil {
		return "", err
	}
	if e == "" {
		return "", fmt.Errorf("no hot-plug slot has address %s", addr)
	}
	return filepath.Join(slotsRoot, e), nil
}

// sysfsEntry returns the name of the entry of the sysfs directory dir whose attribute attr
// reads value, or "" if none does.
func sysfsEntry(dir, attr, value string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), attr))
		if err == nil && strings.TrimSpace(string(b)) == value {
			return e.Name(), nil
		}
	}
	return "", nil
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
