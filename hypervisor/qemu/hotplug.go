package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qmp"
)

// maxSerial is virtio-blk's limit on the serial the guest sees.
const maxSerial = 20

// pluggedBlock is a hot-plugged virtio-blk device in root port slot.
type pluggedBlock struct {
	slot     int
	fdset    int64  // add-fd set holding the image's descriptor
	node     string // block node name (format layer)
	dev      string // QEMU device id
	devGone  bool   // device_del completed; only the block node is left
	unplugIs bool   // device_del was accepted at least once
}

// Names derive from the root port, not from the caller's ID, so any ID works and QEMU's
// 31-character node-name limit is never hit.
func blockNames(slot int) (node, dev string) {
	rp := rootPort(slot)
	return rp + "-drive", rp + "-disk"
}

// Hotplug implements hypervisor.Hypervisor. Block devices become virtio-blk-pci devices on
// a free PCIe root port; hot-plugging NICs is not supported (cold-plug them via
// Config.NetDevices).
func (v *VM) Hotplug(ctx context.Context, d hypervisor.Device) error {
	switch dev := d.(type) {
	case *hypervisor.BlockDevice:
		if err := v.hotplugBlock(ctx, dev); err != nil {
			return fmt.Errorf("hot-plugging block device %q: %w", dev.ID, err)
		}
		return nil
	case *hypervisor.NetDevice:
		return fmt.Errorf("hot-plugging network device %q: %w; pass it in Config.NetDevices to add it at boot", dev.ID, errdefs.ErrNotImplemented)
	case nil:
		return fmt.Errorf("hot-plugging: nil device: %w", errdefs.ErrInvalidArgument)
	default:
		return fmt.Errorf("hot-plugging %T %q: unsupported device type: %w", d, d.DeviceID(), errdefs.ErrInvalidArgument)
	}
}

// blockVM is what of the VM a disk's arguments depend on.
type blockVM struct {
	noIOUring   bool // the host refused io_uring: aio io_uring becomes threads
	kicksInVCPU bool // the disk takes its queue's notifications in the vCPU's thread
}

// diskKicksInVCPU says whether a VM's disks take their queue notifications in the thread of
// the vCPU that writes them (ioeventfd=off), which they do under TCG. With an ioeventfd, a
// guest's write to the queue's notify register signals an eventfd, and QEMU's main loop,
// woken on another thread, then reads the queue and submits the requests. Under KVM that
// keeps the write in the kernel; TCG emulates the write in QEMU anyway, where the eventfd
// only adds a thread's wake-up to every request (docs/benchmarks.md, 2026-12-07). NICs keep
// theirs: virtio-net hands a transmit kick to the main loop whatever thread takes it.
func diskKicksInVCPU(accel string) bool { return accel == AccelTCG }

// blockdevArgs validates d and returns the blockdev-add and device_add arguments. QEMU opens
// the image as /dev/fdset/<fdset>: the descriptor d.File, passed with add-fd.
func blockdevArgs(d *hypervisor.BlockDevice, slot int, fdset int64, vm blockVM) (blockdev, device map[string]any, err error) {
	if d.ID == "" {
		return nil, nil, fmt.Errorf("ID: required: %w", errdefs.ErrInvalidArgument)
	}
	if d.File == nil {
		return nil, nil, fmt.Errorf("device %q (%s): no open File; the VM is given descriptors, never paths: %w", d.ID, d.Path, errdefs.ErrInvalidArgument)
	}
	o, err := resolveBlockOptions(d)
	if err != nil {
		return nil, nil, err
	}
	if vm.noIOUring && o.aio == "io_uring" {
		o.aio = "threads"
	}
	driver, err := blockFileDriver(d)
	if err != nil {
		return nil, nil, err
	}
	node, dev := blockNames(slot)
	cache := map[string]any{"direct": o.direct, "no-flush": false}
	blockdev = map[string]any{
		"driver":    o.format,
		"node-name": node,
		"read-only": d.ReadOnly,
		"cache":     cache,
		"file": map[string]any{
			"driver":    driver,
			"filename":  fmt.Sprintf("/dev/fdset/%d", fdset),
			"aio":       o.aio,
			"read-only": d.ReadOnly,
			"cache":     cache,
		},
	}
	device = map[string]any{
		"driver": "virtio-blk-pci",
		"id":     dev,
		"drive":  node,
		"bus":    rootPort(slot),
		"serial": o.serial,
	}
	if vm.kicksInVCPU {
		device["ioeventfd"] = false
	}
	return blockdev, device, nil
}

// blockOptions are a BlockDevice's settings with the defaults filled in.
type blockOptions struct {
	format string // image format: raw or qcow2
	serial string // the serial the guest sees
	direct bool   // O_DIRECT (Cache none)
	aio    string // threads, native or io_uring
}

// resolveBlockOptions checks d's Format, Serial, Cache and AIO and fills in their defaults.
func resolveBlockOptions(d *hypervisor.BlockDevice) (blockOptions, error) {
	o := blockOptions{format: d.Format, serial: d.Serial, direct: true, aio: d.AIO}
	switch o.format {
	case "":
		o.format = "raw"
	case "raw", "qcow2":
	default:
		return o, fmt.Errorf("image format %q (Format): must be raw or qcow2: %w", d.Format, errdefs.ErrInvalidArgument)
	}
	if o.serial == "" {
		o.serial = d.ID
	}
	if len(o.serial) > maxSerial {
		return o, fmt.Errorf("serial %q (Serial): longer than virtio-blk's %d bytes; set a shorter Serial: %w", o.serial, maxSerial, errdefs.ErrInvalidArgument)
	}
	switch d.Cache {
	case "", "none":
	case "writeback":
		o.direct = false
	default:
		return o, fmt.Errorf("cache mode %q (Cache): must be none or writeback: %w", d.Cache, errdefs.ErrInvalidArgument)
	}
	switch o.aio {
	case "":
		o.aio = "io_uring"
	case "threads", "io_uring":
	case "native":
		if !o.direct {
			return o, fmt.Errorf("AIO native needs Cache none (O_DIRECT): %w", errdefs.ErrInvalidArgument)
		}
	default:
		return o, fmt.Errorf("AIO %q: must be threads, native or io_uring: %w", d.AIO, errdefs.ErrInvalidArgument)
	}
	return o, nil
}

// blockFileDriver returns QEMU's protocol driver for d.File (host_device for a block device,
// file for a regular file), after checking that the descriptor's access mode fits ReadOnly.
func blockFileDriver(d *hypervisor.BlockDevice) (string, error) {
	st, err := d.File.Stat()
	if err != nil {
		return "", fmt.Errorf("device %q (%s): %w", d.ID, d.Path, err)
	}
	driver := "file"
	switch {
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		driver = "host_device"
	case st.Mode().IsRegular():
	default:
		return "", fmt.Errorf("device %q (%s): neither a block device nor a regular file: %w", d.ID, d.Path, errdefs.ErrInvalidArgument)
	}
	if err := checkAccessMode(d.File, d.ReadOnly); err != nil {
		return "", fmt.Errorf("device %q (%s): %w", d.ID, d.Path, err)
	}
	return driver, nil
}

func (v *VM) hotplugBlock(ctx context.Context, d *hypervisor.BlockDevice) error {
	mon, err := v.monitor()
	if err != nil {
		return err
	}
	v.hp.Lock()
	defer v.hp.Unlock()
	if _, ok := v.plugged[d.ID]; ok {
		return fmt.Errorf("already plugged: %w", errdefs.ErrAlreadyExists)
	}
	slot := -1
	for i, id := range v.slots {
		if id == "" {
			slot = i
			break
		}
	}
	if slot < 0 {
		return fmt.Errorf("all %d PCIe root ports for hot-plug are in use; raise hypervisor.hotplug_slots in the node config: %w", len(v.slots), errdefs.ErrResourceExhausted)
	}
	// Validate before QEMU holds anything; the fdset id is only known after add-fd.
	if _, _, err := blockdevArgs(d, slot, 0, v.blockVM()); err != nil {
		return err
	}
	var added struct {
		FdsetID int64 `json:"fdset-id"`
	}
	if err := mon.ExecuteWithFiles(ctx, "add-fd", map[string]any{"opaque": d.ID}, &added, d.File); err != nil {
		return fmt.Errorf("passing %s to qemu: %w", d.Path, err)
	}
	blockdev, device, err := blockdevArgs(d, slot, added.FdsetID, v.blockVM())
	if err != nil {
		v.removeFdset(ctx, mon, added.FdsetID)
		return err
	}
	node, dev := blockNames(slot)
	err = mon.Execute(ctx, "blockdev-add", blockdev, nil)
	if ioUringRefused(err) && !v.noIOUring {
		// kernel.io_uring_disabled, or a seccomp profile without io_uring: the disk works
		// with a thread pool too, only slower per request.
		v.logger(ctx).WithError(err).Warn("the host refuses io_uring: block devices use aio threads")
		v.noIOUring = true
		blockdev, device, _ = blockdevArgs(d, slot, added.FdsetID, v.blockVM())
		err = mon.Execute(ctx, "blockdev-add", blockdev, nil)
	}
	if err != nil {
		v.removeFdset(ctx, mon, added.FdsetID)
		return err
	}
	p := &pluggedBlock{slot: slot, fdset: added.FdsetID, node: node, dev: dev}
	if err := mon.Execute(ctx, "device_add", device, nil); err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), quitGrace)
		defer cancel()
		if derr := mon.Execute(cctx, "blockdev-del", map[string]any{"node-name": node}, nil); derr != nil {
			v.logger(ctx).WithError(derr).Warn("removing block node after failed device_add")
			// The node is still there: keep the slot taken so its name is not reused.
			p.devGone = true
			v.slots[slot] = d.ID
			v.plugged[d.ID] = p
		} else {
			v.removeFdset(cctx, mon, added.FdsetID)
		}
		return err
	}
	v.slots[slot] = d.ID
	v.plugged[d.ID] = p
	return nil
}

// blockVM reads what blockdevArgs needs of v; v.hp must be held.
func (v *VM) blockVM() blockVM {
	return blockVM{noIOUring: v.noIOUring, kicksInVCPU: diskKicksInVCPU(v.cfg.Accel)}
}

// ioUringRefused says whether err is QEMU's refusal to set up io_uring for a block device.
func ioUringRefused(err error) bool {
	var qe *qmp.Error
	return errors.As(err, &qe) && strings.Contains(qe.Desc, "io_uring")
}

// checkAccessMode checks that f was opened for what the device needs: QEMU only takes a
// descriptor from an fdset whose access mode matches the one it asks for.
func checkAccessMode(f *os.File, readOnly bool) error {
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return fmt.Errorf("reading the descriptor's flags: %w", err)
	}
	want := unix.O_RDWR
	if readOnly {
		want = unix.O_RDONLY
	}
	if fl&unix.O_ACCMODE != want {
		return fmt.Errorf("opened with access mode %#o, want %#o (read-only %v): %w", fl&unix.O_ACCMODE, want, readOnly, errdefs.ErrInvalidArgument)
	}
	return nil
}

// removeFdset drops an fdset QEMU no longer needs (its descriptors close with it).
func (v *VM) removeFdset(ctx context.Context, mon qmp.Monitor, id int64) {
	if err := mon.Execute(ctx, "remove-fd", map[string]any{"fdset-id": id}, nil); err != nil {
		v.logger(ctx).WithError(err).WithField("fdset", id).Warn("remove-fd")
	}
}

// Unplug implements hypervisor.Hypervisor: device_del, wait for the guest to release the
// device (DEVICE_DELETED) until ctx ends, then blockdev-del. After a ctx timeout Unplug
// can be called again.
func (v *VM) Unplug(ctx context.Context, id string) error {
	if err := v.unplug(ctx, id); err != nil {
		return fmt.Errorf("unplugging device %q: %w", id, err)
	}
	return nil
}

func (v *VM) unplug(ctx context.Context, id string) error {
	mon, err := v.monitor()
	if err != nil {
		return err
	}
	v.hp.Lock()
	defer v.hp.Unlock()
	p, ok := v.plugged[id]
	if !ok {
		return fmt.Errorf("not plugged: %w", errdefs.ErrNotFound)
	}
	if !p.devGone {
		deleted := v.expectDeleted(p.dev)
		err := mon.Execute(ctx, "device_del", map[string]any{"id": p.dev}, nil)
		var qe *qmp.Error
		switch {
		case err == nil:
			p.unplugIs = true
		case errors.As(err, &qe) && qe.Class == "DeviceNotFound":
			// Gone already: the guest released it (it powers off the slot of a disk its
			// container no longer has), or its DEVICE_DELETED came after an earlier
			// Unplug gave up. The event may have closed deleted meanwhile.
			if v.forgetDeleted(p.dev) {
				close(deleted)
			}
		case errors.As(err, &qe) && p.unplugIs:
			// A previous device_del is still pending in the guest; keep waiting for it.
		default:
			v.forgetDeleted(p.dev)
			return err
		}
		select {
		case <-deleted:
		case <-ctx.Done():
			v.forgetDeleted(p.dev)
			return fmt.Errorf("waiting for the guest to release it: %w", ctx.Err())
		case <-v.done:
			return errors.New("qemu exited")
		}
		p.devGone = true
	}
	if err := blockdevDel(ctx, mon, p.node); err != nil {
		return err
	}
	v.removeFdset(ctx, mon, p.fdset)
	v.slots[p.slot] = ""
	delete(v.plugged, id)
	return nil
}

// blockdevInUseRetry is how often blockdev-del is tried again while QEMU says the node is in use.
const blockdevInUseRetry = 10 * time.Millisecond

// blockdevDel deletes block node node. QEMU 7.2 under TCG with two vCPUs has answered
// "Node ... is in use" right after the DEVICE_DELETED of the disk on it (once in a CI run: the
// container's removal then left the host device open in QEMU until the pod stopped), so that
// answer is retried until the node goes or ctx ends.
func blockdevDel(ctx context.Context, mon qmp.Monitor, node string) error {
	for {
		err := mon.Execute(ctx, "blockdev-del", map[string]any{"node-name": node}, nil)
		var qe *qmp.Error
		if err == nil || !errors.As(err, &qe) || !strings.Contains(qe.Desc, "is in use") {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w; gave up: %w", err, ctx.Err())
		case <-time.After(blockdevInUseRetry):
		}
	}
}

func (v *VM) expectDeleted(dev string) chan struct{} {
	v.waitMu.Lock()
	defer v.waitMu.Unlock()
	ch := make(chan struct{})
	v.deleted[dev] = ch
	return ch
}

// forgetDeleted stops waiting for dev's DEVICE_DELETED; it reports whether the wait was still
// there, i.e. the event has not closed its channel.
func (v *VM) forgetDeleted(dev string) bool {
	v.waitMu.Lock()
	defer v.waitMu.Unlock()
	_, ok := v.deleted[dev]
	delete(v.deleted, dev)
	return ok
}
