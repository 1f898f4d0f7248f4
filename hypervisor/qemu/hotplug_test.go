package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qmp"
)

// fakeVM is a running VM whose monitor is a FakeMonitor; no QEMU involved.
func fakeVM(t *testing.T) (*VM, *qmp.FakeMonitor) {
	t.Helper()
	cfg := baseConfig()
	cfg.setPureDefaults()
	v := newVM(cfg)
	mon := qmp.NewFakeMonitor()
	v.attachMonitor(context.Background(), mon)
	v.setState(stateRunning)
	mon.SetReply("add-fd", map[string]any{"fdset-id": 7, "fd": 42}, nil)
	t.Cleanup(func() { mon.Close() })
	return v, mon
}

// openDisk opens an image the way rootfs does: read-write, or read-only for a read-only disk.
func openDisk(t *testing.T, p string, ro bool) *os.File {
	t.Helper()
	flag := os.O_RDWR
	if ro {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(p, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func diskImage(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// autoDelete makes the fake emit DEVICE_DELETED for every device_del, like a guest that
// releases devices.
func autoDelete(mon *qmp.FakeMonitor) {
	mon.SetHook(func(cmd string, args json.RawMessage) (any, bool, error) {
		if cmd != "device_del" {
			return nil, false, nil
		}
		var a struct{ ID string }
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, true, err
		}
		go mon.InjectEvent(qmp.Event{Name: "DEVICE_DELETED", Data: json.RawMessage(`{"device":"` + a.ID + `","path":"/machine/peripheral/` + a.ID + `"}`)})
		return struct{}{}, true, nil
	})
}

func TestHotplugBlock(t *testing.T) {
	img := diskImage(t)
	rw, ro := openDisk(t, img, false), openDisk(t, img, true)
	tests := []struct {
		name      string
		accel     string // the VM's; TCG unless set
		dev       *hypervisor.BlockDevice
		blockdev  string // expected blockdev-add arguments (JSON)
		deviceAdd string // expected device_add arguments (JSON)
	}{
		{
			name:      "raw defaults",
			dev:       &hypervisor.BlockDevice{ID: "vol1", File: rw, Path: img},
			blockdev:  `{"cache":{"direct":true,"no-flush":false},"driver":"raw","file":{"aio":"io_uring","cache":{"direct":true,"no-flush":false},"driver":"file","filename":"/dev/fdset/7","read-only":false},"node-name":"hp0-drive","read-only":false}`,
			deviceAdd: `{"bus":"hp0","drive":"hp0-drive","driver":"virtio-blk-pci","id":"hp0-disk","ioeventfd":false,"serial":"vol1"}`,
		},
		{
			name:      "qcow2 read-only writeback with serial",
			dev:       &hypervisor.BlockDevice{ID: "a-very-long-device-identifier", File: ro, Path: img, Format: "qcow2", ReadOnly: true, Cache: "writeback", Serial: "pvc-1", AIO: "threads"},
			blockdev:  `{"cache":{"direct":false,"no-flush":false},"driver":"qcow2","file":{"aio":"threads","cache":{"direct":false,"no-flush":false},"driver":"file","filename":"/dev/fdset/7","read-only":true},"node-name":"hp0-drive","read-only":true}`,
			deviceAdd: `{"bus":"hp0","drive":"hp0-drive","driver":"virtio-blk-pci","id":"hp0-disk","ioeventfd":false,"serial":"pvc-1"}`,
		},
		{
			name:      "under kvm the disk keeps its eventfd",
			accel:     AccelKVM,
			dev:       &hypervisor.BlockDevice{ID: "vol1", File: rw, Path: img},
			blockdev:  `{"cache":{"direct":true,"no-flush":false},"driver":"raw","file":{"aio":"io_uring","cache":{"direct":true,"no-flush":false},"driver":"file","filename":"/dev/fdset/7","read-only":false},"node-name":"hp0-drive","read-only":false}`,
			deviceAdd: `{"bus":"hp0","drive":"hp0-drive","driver":"virtio-blk-pci","id":"hp0-disk","serial":"vol1"}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, mon := fakeVM(t)
			if tt.accel != "" {
				v.cfg.Accel = tt.accel
			}
			autoDelete(mon)
			ctx := context.Background()
			if err := v.Hotplug(ctx, tt.dev); err != nil {
				t.Fatal(err)
			}
			calls := mon.Calls()
			if len(calls) != 3 || calls[0].Cmd != "add-fd" || calls[1].Cmd != "blockdev-add" || calls[2].Cmd != "device_add" {
				t.Fatalf("calls %v", mon.Commands())
			}
			if calls[0].Files != 1 {
				t.Errorf("add-fd passed %d files, want the image's descriptor", calls[0].Files)
			}
			if string(calls[1].Args) != tt.blockdev {
				t.Errorf("blockdev-add %s\nwant         %s", calls[1].Args, tt.blockdev)
			}
			if string(calls[2].Args) != tt.deviceAdd {
				t.Errorf("device_add %s\nwant       %s", calls[2].Args, tt.deviceAdd)
			}
			if err := v.Unplug(ctx, tt.dev.ID); err != nil {
				t.Fatal(err)
			}
			calls = mon.Calls()[3:]
			if len(calls) != 3 || string(calls[0].Args) != `{"id":"hp0-disk"}` || calls[1].Cmd != "blockdev-del" || string(calls[1].Args) != `{"node-name":"hp0-drive"}` ||
				calls[2].Cmd != "remove-fd" || string(calls[2].Args) != `{"fdset-id":7}` {
				t.Fatalf("unplug calls %+v", calls)
			}
			if err := v.Unplug(ctx, tt.dev.ID); !errors.Is(err, errdefs.ErrNotFound) {
				t.Fatalf("second Unplug: %v", err)
			}
		})
	}
}

// hotplugErrorCase is a Hotplug that must fail: with an error containing wantErr (and
// matching is), after sending the monitor exactly cmds.
type hotplugErrorCase struct {
	name    string
	setup   func(v *VM, mon *qmp.FakeMonitor)
	dev     hypervisor.Device
	wantErr string
	is      error
	cmds    []string
}

func runHotplugErrors(t *testing.T, tests []hotplugErrorCase) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, mon := fakeVM(t)
			if tt.setup != nil {
				tt.setup(v, mon)
			}
			err := v.Hotplug(context.Background(), tt.dev)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %v, want error containing %q", err, tt.wantErr)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Fatalf("error %v is not %v", err, tt.is)
			}
			if got := strings.Join(mon.Commands(), ","); got != strings.Join(tt.cmds, ",") {
				t.Fatalf("commands %q, want %q", got, tt.cmds)
			}
		})
	}
}

// TestHotplugRejectsBadDevices: devices Hotplug refuses before it sends QEMU anything.
func TestHotplugRejectsBadDevices(t *testing.T) {
	img := diskImage(t)
	f := openDisk(t, img, false)
	dir, err := os.Open(filepath.Dir(img))
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	runHotplugErrors(t, []hotplugErrorCase{
		{name: "a path, no descriptor", dev: &hypervisor.BlockDevice{ID: "d", Path: img}, wantErr: "never paths", is: errdefs.ErrInvalidArgument},
		{name: "read-only descriptor for a writable disk", dev: &hypervisor.BlockDevice{ID: "d", File: openDisk(t, img, true), Path: img}, wantErr: "access mode", is: errdefs.ErrInvalidArgument},
		{name: "bad format", dev: &hypervisor.BlockDevice{ID: "d", File: f, Path: img, Format: "vmdk"}, wantErr: "Format"},
		{name: "long serial", dev: &hypervisor.BlockDevice{ID: "012345678901234567890", File: f, Path: img}, wantErr: "Serial"},
		{name: "native aio with writeback", dev: &hypervisor.BlockDevice{ID: "d", File: f, Path: img, AIO: "native", Cache: "writeback"}, wantErr: "AIO native"},
		{name: "directory", dev: &hypervisor.BlockDevice{ID: "d", File: dir, Path: filepath.Dir(img)}, wantErr: "neither a block device"},
		{name: "net device", dev: &hypervisor.NetDevice{ID: "eth1"}, wantErr: "Config.NetDevices", is: errdefs.ErrNotImplemented},
	})
}

// TestHotplugFailsCleanly: QMP errors, a full set of slots and a taken ID fail the plug, and
// a half-done plug is undone.
func TestHotplugFailsCleanly(t *testing.T) {
	img := diskImage(t)
	f := openDisk(t, img, false)
	plug := func(v *VM, ids ...string) {
		for _, id := range ids {
			if err := v.Hotplug(context.Background(), &hypervisor.BlockDevice{ID: id, File: f, Path: img}); err != nil {
				panic(err)
			}
		}
	}
	runHotplugErrors(t, []hotplugErrorCase{
		{
			name: "blockdev-add error keeps class",
			setup: func(v *VM, mon *qmp.FakeMonitor) {
				mon.SetReply("blockdev-add", nil, &qmp.Error{Class: "GenericError", Desc: "Could not open"})
			},
			dev:     &hypervisor.BlockDevice{ID: "d", File: f, Path: img},
			wantErr: "qmp: blockdev-add: GenericError: Could not open",
			cmds:    []string{"add-fd", "blockdev-add", "remove-fd"},
		},
		{
			name: "device_add failure removes the block node",
			setup: func(v *VM, mon *qmp.FakeMonitor) {
				mon.SetReply("device_add", nil, &qmp.Error{Class: "GenericError", Desc: "Bus 'hp0' not found"})
			},
			dev:     &hypervisor.BlockDevice{ID: "d", File: f, Path: img},
			wantErr: "Bus 'hp0' not found",
			cmds:    []string{"add-fd", "blockdev-add", "device_add", "blockdev-del", "remove-fd"},
		},
		{
			name:    "no free slot",
			setup:   func(v *VM, _ *qmp.FakeMonitor) { plug(v, "x", "y") },
			dev:     &hypervisor.BlockDevice{ID: "d", File: f, Path: img},
			wantErr: "raise hypervisor.hotplug_slots in the node config",
			is:      errdefs.ErrResourceExhausted,
			cmds:    []string{"add-fd", "blockdev-add", "device_add", "add-fd", "blockdev-add", "device_add"},
		},
		{
			name:    "duplicate id",
			setup:   func(v *VM, _ *qmp.FakeMonitor) { plug(v, "d") },
			dev:     &hypervisor.BlockDevice{ID: "d", File: f, Path: img},
			is:      errdefs.ErrAlreadyExists,
			wantErr: "already plugged",
			cmds:    []string{"add-fd", "blockdev-add", "device_add"},
		},
	})
}

// TestHotplugWithoutIOUring: a host that refuses io_uring (kernel.io_uring_disabled, a
// seccomp profile) still gets its disks, with aio threads, and the VM's later disks go there
// at once.
func TestHotplugWithoutIOUring(t *testing.T) {
	v, mon := fakeVM(t)
	img := diskImage(t)
	f := openDisk(t, img, false)
	mon.QueueReply("blockdev-add", nil, &qmp.Error{Cmd: "blockdev-add", Class: "GenericError", Desc: "Unable to use io_uring: failed to init linux io_uring ring"})
	ctx := context.Background()
	for _, id := range []string{"a", "b"} {
		if err := v.Hotplug(ctx, &hypervisor.BlockDevice{ID: id, File: f, Path: img}); err != nil {
			t.Fatalf("Hotplug %s on a host without io_uring: %v", id, err)
		}
	}
	var aio []string
	for _, c := range mon.Calls() {
		if c.Cmd == "blockdev-add" {
			var args struct {
				File struct {
					AIO string `json:"aio"`
				} `json:"file"`
			}
			if err := json.Unmarshal(c.Args, &args); err != nil {
				t.Fatal(err)
			}
			aio = append(aio, args.File.AIO)
		}
	}
	if got := strings.Join(aio, ","); got != "io_uring,threads,threads" {
		t.Errorf("blockdev-add aio %s, want io_uring refused, then threads for both disks", got)
	}
}

func TestHotplugFreesSlotOnUnplug(t *testing.T) {
	v, mon := fakeVM(t)
	autoDelete(mon)
	img := diskImage(t)
	f := openDisk(t, img, false)
	ctx := context.Background()
	for _, id := range []string{"a", "b"} {
		if err := v.Hotplug(ctx, &hypervisor.BlockDevice{ID: id, File: f, Path: img}); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Unplug(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := v.Hotplug(ctx, &hypervisor.BlockDevice{ID: "c", File: f, Path: img}); err != nil {
		t.Fatal(err)
	}
	last := mon.Calls()[len(mon.Calls())-1]
	if !strings.Contains(string(last.Args), `"bus":"hp0"`) {
		t.Fatalf("c did not reuse slot hp0: %s", last.Args)
	}
}

// vmWithDisk is a fake VM with disk "d" plugged into slot hp0.
func vmWithDisk(t *testing.T) (*VM, *qmp.FakeMonitor) {
	t.Helper()
	v, mon := fakeVM(t)
	img := diskImage(t)
	if err := v.Hotplug(context.Background(), &hypervisor.BlockDevice{ID: "d", File: openDisk(t, img, false), Path: img}); err != nil {
		t.Fatal(err)
	}
	return v, mon
}

func TestUnplugTimeoutThenRetry(t *testing.T) {
	v, mon := vmWithDisk(t)
	ctx := context.Background()
	// The guest does not release the device in time.
	tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := v.Unplug(tctx, "d"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
	// It does later; the event went unobserved, so QEMU now says the device is gone.
	mon.SetReply("device_del", nil, &qmp.Error{Class: "DeviceNotFound", Desc: "Device 'hp0-disk' not found"})
	if err := v.Unplug(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	if cmds := mon.Commands(); cmds[len(cmds)-2] != "blockdev-del" || cmds[len(cmds)-1] != "remove-fd" {
		t.Fatalf("commands %v", cmds)
	}
}

// TestUnplugNodeStillInUse: QEMU may still hold the disk's node for a moment after its
// DEVICE_DELETED; Unplug tries blockdev-del again until the node goes, and gives up with
// QEMU's answer when ctx ends.
func TestUnplugNodeStillInUse(t *testing.T) {
	inUse := &qmp.Error{Cmd: "blockdev-del", Class: "GenericError", Desc: "Node hp0-drive is in use"}
	v, mon := vmWithDisk(t)
	autoDelete(mon)
	mon.QueueReply("blockdev-del", nil, inUse)
	mon.QueueReply("blockdev-del", nil, inUse)
	if err := v.Unplug(context.Background(), "d"); err != nil {
		t.Fatal(err)
	}
	if cmds := mon.Commands(); !slices.Equal(cmds[len(cmds)-5:], []string{"device_del", "blockdev-del", "blockdev-del", "blockdev-del", "remove-fd"}) {
		t.Fatalf("commands %v", cmds)
	}

	v, mon = vmWithDisk(t)
	// The caller gives up after QEMU refused the third time: a deadline would come before
	// the device_del and its DEVICE_DELETED on a machine loaded enough (it did at 100 ms and
	// at 1 s, beside benchmarks' VMs).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	refused := 0
	mon.SetHook(func(cmd string, args json.RawMessage) (any, bool, error) {
		switch cmd {
		case "device_del":
			var a struct{ ID string }
			if err := json.Unmarshal(args, &a); err != nil {
				return nil, true, err
			}
			go mon.InjectEvent(qmp.Event{Name: "DEVICE_DELETED", Data: json.RawMessage(`{"device":"` + a.ID + `","path":"/machine/peripheral/` + a.ID + `"}`)})
			return struct{}{}, true, nil
		case "blockdev-del":
			if refused++; refused == 3 {
				cancel()
			}
			return nil, true, inUse
		}
		return nil, false, nil
	})
	if err := v.Unplug(ctx, "d"); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "is in use") {
		t.Fatalf("Unplug of a node that stays in use: %v", err)
	}
	if cmds := mon.Commands(); slices.Contains(cmds, "remove-fd") {
		t.Fatalf("the fdset went while its node stayed: %v", cmds)
	}
}

// TestUnplugReleasedByTheGuest: a guest that powers off the slot of a disk it no longer
// uses has QEMU unplug it; the host's device_del then finds no device, and the
// DEVICE_DELETED may come in between.
func TestUnplugReleasedByTheGuest(t *testing.T) {
	v, mon := vmWithDisk(t)
	ctx := context.Background()
	mon.SetHook(func(cmd string, _ json.RawMessage) (any, bool, error) {
		if cmd != "device_del" {
			return nil, false, nil
		}
		mon.InjectEvent(qmp.Event{Name: "DEVICE_DELETED", Data: json.RawMessage(`{"device":"hp0-disk","path":"/machine/peripheral/hp0-disk"}`)})
		time.Sleep(50 * time.Millisecond) // the VM's event loop takes it
		return nil, true, &qmp.Error{Class: "DeviceNotFound", Desc: "Device 'hp0-disk' not found"}
	})
	if err := v.Unplug(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	if cmds := mon.Commands(); cmds[len(cmds)-2] != "blockdev-del" || cmds[len(cmds)-1] != "remove-fd" {
		t.Fatalf("commands %v", cmds)
	}
}

func TestPauseResumeAndState(t *testing.T) {
	ctx := context.Background()
	v, mon := fakeVM(t)
	if err := v.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := v.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	mon.SetReply("cont", nil, &qmp.Error{Class: "GenericError", Desc: "nope"})
	var qe *qmp.Error
	if err := v.Resume(ctx); !errors.As(err, &qe) || qe.Class != "GenericError" {
		t.Fatalf("got %v", err)
	}
	if got := strings.Join(mon.Commands(), ","); got != "stop,cont,cont" {
		t.Fatalf("commands %s", got)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if !mon.Closed() {
		t.Fatal("monitor not closed by Stop")
	}
	if err := v.Pause(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Pause after Stop: %v", err)
	}
	if err := v.Start(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Start after Stop: %v", err)
	}

	nv := newVM(baseConfig())
	if err := nv.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-nv.Done():
	default:
		t.Fatal("Done open after Stop of a never-started VM")
	}
}
