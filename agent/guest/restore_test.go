package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/agent/api"
)

type fakeRestoreSys struct {
	entropy  []byte
	clock    int64
	adjusted time.Duration
	polls    int
	// readyAfter is the poll from which the devices are present.
	readyAfter int
	order      []string
	// what the last poll looked for
	macs []string
	fs   bool
}

func (f *fakeRestoreSys) sys() restoreSys {
	return restoreSys{
		addEntropy: func(b []byte) error { f.entropy = b; f.order = append(f.order, "entropy"); return nil },
		setClock:   func(ns int64) error { f.clock = ns; f.order = append(f.order, "clock"); return nil },
		adjustClock: func(d time.Duration, step bool) error {
			f.adjusted += d
			f.order = append(f.order, map[bool]string{true: "step", false: "slew"}[step])
			return nil
		},
		present: func(macs []net.HardwareAddr, fs bool) (bool, error) {
			f.macs, f.fs = nil, fs
			for _, m := range macs {
				f.macs = append(f.macs, m.String())
			}
			f.polls++
			f.order = append(f.order, "poll")
			return f.polls > f.readyAfter, nil
		},
		tick: time.Millisecond,
	}
}

func TestPrepareRestored(t *testing.T) {
	seed := bytes.Repeat([]byte{7}, 64)
	f := &fakeRestoreSys{readyAfter: 3}
	err := prepareRestored(context.Background(), &api.PrepareRestoredRequest{
		Entropy: seed, RealtimeNs: 1_700_000_000_000_000_000,
	}, f.sys())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.entropy, seed) || f.clock != 1_700_000_000_000_000_000 || f.polls != 0 {
		t.Errorf("entropy %x clock %d polls %d", f.entropy, f.clock, f.polls)
	}
	if f.order[0] != "entropy" {
		t.Errorf("first step %q, want the entropy before anything else", f.order[0])
	}
}

func TestPrepareRestoredRejects(t *testing.T) {
	good := func() *api.PrepareRestoredRequest {
		return &api.PrepareRestoredRequest{Entropy: make([]byte, 32), RealtimeNs: 1}
	}
	for name, mod := range map[string]func(*api.PrepareRestoredRequest){
		"short entropy": func(r *api.PrepareRestoredRequest) { r.Entropy = r.Entropy[:31] },
		"long entropy":  func(r *api.PrepareRestoredRequest) { r.Entropy = make([]byte, 513) },
		"no clock":      func(r *api.PrepareRestoredRequest) { r.RealtimeNs = 0 },
	} {
		t.Run(name, func(t *testing.T) {
			f := &fakeRestoreSys{}
			r := good()
			mod(r)
			err := prepareRestored(context.Background(), r, f.sys())
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("err = %v, want invalid argument", err)
			}
			if f.entropy != nil || f.clock != 0 {
				t.Error("changed the guest despite a bad request")
			}
		})
	}
}

// SetupSandbox sets the guest's clock to the host's it carries, before anything else.
func TestSetHostClock(t *testing.T) {
	f := &fakeRestoreSys{}
	if err := setHostClock(&api.SetupSandboxRequest{RealtimeNs: 1_700_000_000_123_456_789}, f.sys()); err != nil || f.clock != 1_700_000_000_123_456_789 {
		t.Fatalf("set the clock: %v, clock %d", err, f.clock)
	}
	f = &fakeRestoreSys{}
	if err := setHostClock(&api.SetupSandboxRequest{}, f.sys()); err != nil || len(f.order) != 0 {
		t.Fatalf("no clock sent: %v, steps %q; want the clock left alone", err, f.order)
	}
	if err := setHostClock(&api.SetupSandboxRequest{RealtimeNs: -1}, f.sys()); !errors.Is(err, errdefs.ErrInvalidArgument) || len(f.order) != 0 {
		t.Fatalf("a negative clock: %v, steps %q; want invalid argument and the clock left alone", err, f.order)
	}
}

// SetupSandbox of a restored VM waits for its hot-plugged devices, each NIC by the MAC it
// has in the guest; of a booted one, not.
func TestSetupWaitsForHotPlugged(t *testing.T) {
	req := func(hotPlugged bool) *api.SetupSandboxRequest {
		return &api.SetupSandboxRequest{SharedFsTag: "podvm", HotPlugged: hotPlugged,
			Interfaces: []*api.Interface{
				{Name: "eth0", Mac: "02:00:00:00:00:01", GuestMac: "02:70:6f:64:76:6d"},
				{Name: "net1", Mac: "02:00:00:00:00:02"},
			}}
	}
	f := &fakeRestoreSys{readyAfter: 3}
	if _, err := waitNICs(context.Background(), req(false), f.sys()); err != nil || f.polls != 0 {
		t.Fatalf("booted VM: %v after %d polls, want no wait", err, f.polls)
	}
	if _, err := waitShare(context.Background(), req(false), f.sys()); err != nil || f.polls != 0 {
		t.Fatalf("booted VM's share: %v after %d polls, want no wait", err, f.polls)
	}
	if _, err := waitNICs(context.Background(), req(true), f.sys()); err != nil || f.polls != 4 {
		t.Fatalf("restored VM: %v after %d polls, want the NICs after 4", err, f.polls)
	}
	if want := []string{"02:70:6f:64:76:6d", "02:00:00:00:00:02"}; !slices.Equal(f.macs, want) || f.fs {
		t.Errorf("waited for NICs %v (and virtio-fs: %v), want %v alone", f.macs, f.fs, want)
	}
	f = &fakeRestoreSys{readyAfter: 2}
	if _, err := waitShare(context.Background(), req(true), f.sys()); err != nil || f.polls != 3 || !f.fs || len(f.macs) != 0 {
		t.Fatalf("restored VM's share: %v after %d polls (fs %v, NICs %v), want virtio-fs alone after 3", err, f.polls, f.fs, f.macs)
	}
	noShare := req(true)
	noShare.SharedFsTag = ""
	f = &fakeRestoreSys{readyAfter: 1 << 30}
	if _, err := waitShare(context.Background(), noShare, f.sys()); err != nil || f.polls != 0 {
		t.Fatalf("no share: %v after %d polls, want no wait", err, f.polls)
	}
	for _, bad := range []func(*api.Interface){
		func(i *api.Interface) { i.Mac = "nope" },
		func(i *api.Interface) { i.GuestMac = "nope" },
	} {
		r := req(true)
		r.Interfaces[0].GuestMac = ""
		bad(r.Interfaces[0])
		if _, err := waitNICs(context.Background(), r, (&fakeRestoreSys{}).sys()); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("bad MAC %+v: %v, want invalid argument", r.Interfaces[0], err)
		}
	}
}

func TestHotPluggedDevicesNeverCome(t *testing.T) {
	f := &fakeRestoreSys{readyAfter: 1 << 30}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	_, err := waitShare(ctx, &api.SetupSandboxRequest{SharedFsTag: "podvm", HotPlugged: true}, f.sys())
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the deadline", err)
	}
}

func TestVirtioFSBound(t *testing.T) {
	dir := t.TempDir()
	if ok, err := virtioFSBound(filepath.Join(dir, "absent")); ok || err != nil {
		t.Fatalf("absent dir: %v %v", ok, err)
	}
	dev := func(name, id string, bound bool) {
		d := filepath.Join(dir, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "device"), []byte(id+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if bound {
			if err := os.Mkdir(filepath.Join(d, "driver"), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	dev("virtio0", "0x0003", true)
	dev("virtio1", virtioIDFS, false)
	if ok, _ := virtioFSBound(dir); ok {
		t.Fatal("an unbound virtio-fs device counts as there")
	}
	dev("virtio2", virtioIDFS, true)
	if ok, _ := virtioFSBound(dir); !ok {
		t.Fatal("a bound virtio-fs device is not found")
	}
}

// TestWarmStartAfterRestoredSetup: in a guest restored from a template, the agent runs its
// binary once ahead (warmStart) after the first container was made and the setup ended,
// and only once; a booted guest does not.
func TestWarmStartAfterRestoredSetup(t *testing.T) {
	for _, restored := range []bool{false, true} {
		t.Run(fmt.Sprintf("restored=%v", restored), func(t *testing.T) {
			r := newLRig(t)
			r.s.restoreSys = (&fakeRestoreSys{}).sys()
			r.s.setup = func(context.Context, *api.SetupSandboxRequest) error { return nil }
			warmed := make(chan struct{}, 2)
			r.s.warm = func() { warmed <- struct{}{} }
			none := func(when string) {
				t.Helper()
				select {
				case <-warmed:
					t.Fatalf("warmed %s", when)
				case <-time.After(100 * time.Millisecond):
				}
			}
			if restored {
				if _, err := r.s.PrepareRestored(r.ctx, &api.PrepareRestoredRequest{
					Entropy: bytes.Repeat([]byte{7}, 64), RealtimeNs: 1_700_000_000_000_000_000,
				}); err != nil {
					t.Fatal(err)
				}
			}
			r.create("holder", nil)
			none("before the setup ended")
			if _, err := r.s.SetupSandbox(r.ctx, &api.SetupSandboxRequest{}); err != nil {
				t.Fatal(err)
			}
			if restored {
				select {
				case <-warmed:
				case <-time.After(5 * time.Second):
					t.Fatal("a restored guest did not warm after its setup")
				}
			}
			r.create("app", nil)
			none("again")
		})
	}
}
