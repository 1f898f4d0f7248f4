package network

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// Fake is an Endpoint for tests of code that uses endpoints (the shim) without a netns or root.
// Its Attach returns a NetDevice whose single "tap" file is /dev/null. Set the fields before use;
// the counters are safe to read while other goroutines call its methods.
type Fake struct {
	Iface     *api.Interface // what Guest returns; Name and Mac also name the NIC
	AttachErr error          // returned by Attach when set
	DetachErr error          // returned by Detach when set

	mu       sync.Mutex
	attached int
	detached int
}

var _ Endpoint = (*Fake)(nil)

// Name implements Endpoint.
func (f *Fake) Name() string { return f.Iface.GetName() }

// Attach implements Endpoint.
func (f *Fake) Attach(ctx context.Context) (*hypervisor.NetDevice, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if f.AttachErr != nil {
		return nil, f.AttachErr
	}
	mac, err := net.ParseMAC(f.Iface.GetMac())
	if err != nil {
		return nil, fmt.Errorf("fake endpoint %s: mac: %w", f.Name(), err)
	}
	tap, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	f.attached++
	return &hypervisor.NetDevice{ID: "fake-" + f.Name(), MAC: mac, MTU: int(f.Iface.GetMtu()), TapFiles: []*os.File{tap}}, nil
}

// Detach implements Endpoint.
func (f *Fake) Detach(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.detached++
	return f.DetachErr
}

// Guest implements Endpoint.
func (f *Fake) Guest() *api.Interface { return f.Iface }

// Attached and Detached count the calls that succeeded (Attach) or were made (Detach).
func (f *Fake) Attached() int { f.mu.Lock(); defer f.mu.Unlock(); return f.attached }

// Detached counts Detach calls.
func (f *Fake) Detached() int { f.mu.Lock(); defer f.mu.Unlock(); return f.detached }
