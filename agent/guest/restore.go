package guest

// A guest restored from a VM template is a copy of the template's guest at the moment it was
// saved: the same kernel RNG state, a wall clock that stopped then, and none of the devices
// that are the pod's own. PrepareRestored makes it the pod's before anything else runs in it;
// SetupSandbox then waits for the hot-plugged devices (waitNICs, waitShare) and gives the NIC that
// came with the template the pod's MAC.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
)

// Bounds of PrepareRestoredRequest.entropy.
const (
	minRestoreEntropy = 32
	maxRestoreEntropy = 512
)

// restoreDeviceWait bounds the wait for hot-plugged devices when the host set no deadline.
const restoreDeviceWait = 10 * time.Second

// The random(4) ioctls (linux/random.h).
const (
	ioctlRNDADDENTROPY = 0x40085203 // _IOW('R', 0x03, int[2])
	ioctlRNDRESEEDCRNG = 0x5207     // _IO('R', 0x07)
)

// virtioIDFS is virtio-fs's virtio device id, as /sys/bus/virtio/devices/*/device shows it.
const virtioIDFS = "0x001a"

// restoreSys is what the agent changes in the guest's kernel for the host (its entropy, its
// clock) and how it finds hot-plugged devices; tests replace it.
type restoreSys struct {
	addEntropy func(b []byte) error
	setClock   func(ns int64) error
	// adjustClock moves the clock by an offset, stepped or slewed (clock.go).
	adjustClock func(offset time.Duration, step bool) error
	// present reports whether every NIC (by MAC) and, if fs, a virtio-fs device is there.
	present func(macs []net.HardwareAddr, fs bool) (bool, error)
	tick    time.Duration
}

func realRestoreSys() restoreSys {
	return restoreSys{addEntropy: addEntropy, setClock: setRealtime, adjustClock: adjustRealtime, present: devicesPresent, tick: 5 * time.Millisecond}
}

// PrepareRestored implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) PrepareRestored(ctx context.Context, req *api.PrepareRestoredRequest) (*api.Empty, error) {
	if err := prepareRestored(ctx, req, s.restoreSys); err != nil {
		return nil, err
	}
	s.restored.Store(true)
	return &api.Empty{}, nil
}

func prepareRestored(ctx context.Context, req *api.PrepareRestoredRequest, sys restoreSys) error {
	if n := len(req.Entropy); n < minRestoreEntropy || n > maxRestoreEntropy {
		return fmt.Errorf("entropy: %d bytes, want %d to %d: %w", n, minRestoreEntropy, maxRestoreEntropy, errdefs.ErrInvalidArgument)
	}
	if req.RealtimeNs <= 0 {
		return fmt.Errorf("realtime_ns %d: want the host's clock in nanoseconds since the epoch: %w", req.RealtimeNs, errdefs.ErrInvalidArgument)
	}
	start := time.Now()
	// Entropy first: nothing in the guest may draw random numbers from the template's state.
	if err := sys.addEntropy(req.Entropy); err != nil {
		return fmt.Errorf("reseed the kernel RNG: %w", err)
	}
	reseeded := time.Now()
	if err := sys.setClock(req.RealtimeNs); err != nil {
		return fmt.Errorf("set the clock: %w", err)
	}
	// Each step's time (monotonic: the clock step does not affect it), for tracing a restore.
	log.G(ctx).Infof("restored from a template: RNG reseeded (%s), clock set (%s)",
		reseeded.Sub(start).Round(time.Microsecond), time.Since(reseeded).Round(time.Microsecond))
	return nil
}

// waitNICs waits, for a SetupSandbox that says its devices were hot-plugged, until the guest
// has found each of its NICs, by the MAC they have in the guest (guestMAC). It returns how
// long it waited.
func waitNICs(ctx context.Context, req *api.SetupSandboxRequest, sys restoreSys) (time.Duration, error) {
	if !req.HotPlugged {
		return 0, nil
	}
	var macs []net.HardwareAddr
	for _, ifc := range req.Interfaces {
		mac, err := guestMAC(ifc)
		if err != nil {
			return 0, err
		}
		macs = append(macs, mac)
	}
	start := time.Now()
	err := waitDevices(ctx, macs, false, sys)
	return time.Since(start), err
}

// waitShare waits, for a SetupSandbox that says its devices were hot-plugged and has a share,
// until the guest has a virtio-fs device bound to its driver. It returns how long it waited.
func waitShare(ctx context.Context, req *api.SetupSandboxRequest, sys restoreSys) (time.Duration, error) {
	if !req.HotPlugged || req.SharedFsTag == "" {
		return 0, nil
	}
	start := time.Now()
	err := waitDevices(ctx, nil, true, sys)
	return time.Since(start), err
}

// guestMAC is the MAC by which the agent finds ifc's NIC in the guest: guest_mac if the host
// set it (a clone's NIC that came with its template), else mac.
func guestMAC(ifc *api.Interface) (net.HardwareAddr, error) {
	s := ifc.Mac
	if ifc.GuestMac != "" {
		s = ifc.GuestMac
	}
	mac, err := net.ParseMAC(s)
	if err != nil {
		return nil, fmt.Errorf("interface %s: bad MAC %q: %w", ifc.Name, s, errdefs.ErrInvalidArgument)
	}
	return mac, nil
}

// waitDevices polls until the hot-plugged devices are there, or ctx (at most
// restoreDeviceWait without a deadline) ends.
func waitDevices(ctx context.Context, macs []net.HardwareAddr, fs bool, sys restoreSys) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, restoreDeviceWait)
		defer cancel()
	}
	t := time.NewTicker(sys.tick)
	defer t.Stop()
	for {
		ok, err := sys.present(macs, fs)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the hot-plugged devices (NICs %v, virtio-fs %v) did not show up in the guest: %w", macs, fs, ctx.Err())
		case <-t.C:
		}
	}
}

// addEntropy credits b to the kernel's input pool (RNDADDENTROPY) and reseeds the CRNG from
// it (RNDRESEEDCRNG), so the next random byte any process reads depends on b.
func addEntropy(b []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }() // written through ioctls only
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+(len(b)+3)/4*4)
	*(*int32)(unsafe.Pointer(&info[0])) = int32(len(b) * 8)
	*(*int32)(unsafe.Pointer(&info[4])) = int32(len(b))
	copy(info[8:], b)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ioctlRNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ioctlRNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// devicesPresent reports whether a link has each of macs and, with fs, a virtio-fs device is
// bound to its driver.
func devicesPresent(macs []net.HardwareAddr, fs bool) (bool, error) {
	if fs {
		ok, err := virtioFSBound("/sys/bus/virtio/devices")
		if err != nil || !ok {
			return false, err
		}
	}
	if len(macs) == 0 {
		return true, nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return false, err
	}
	for _, m := range macs {
		found := false
		for _, l := range links {
			if l.Attrs().HardwareAddr.String() == m.String() {
				found = true
				break
			}
		}
		if !found {
			return false, nil
		}
	}
	return true, nil
}

// virtioFSBound reports whether a virtio device under dir is virtio-fs and has its driver.
func virtioFSBound(dir string) (bool, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	for _, e := range entries {
		id, err := os.ReadFile(filepath.Join(dir, e.Name(), "device"))
		if err != nil || strings.TrimSpace(string(id)) != virtioIDFS {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, e.Name(), "driver")); err == nil {
			return true, nil
		}
	}
	return false, nil
}
