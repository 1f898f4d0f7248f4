package hypervisor

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"sync"
)

// Fake is a Hypervisor for unit tests of its callers: it records what was asked of it and
// runs nothing.
type Fake struct {
	// StartErr, if set, is returned by Start.
	StartErr error
	// DialAgentFunc, if set, serves DialAgent.
	DialAgentFunc func(ctx context.Context) (net.Conn, error)
	// Console is what ConsolePath returns.
	Console string
	// VMPid is what Pid returns once started.
	VMPid int

	mu       sync.Mutex
	started  bool
	stopped  bool
	devices  map[string]Device
	done     chan struct{}
	doneOnce sync.Once
}

// NewFake returns a Fake that is not started.
func NewFake() *Fake {
	return &Fake{devices: map[string]Device{}, done: make(chan struct{})}
}

var _ Hypervisor = (*Fake)(nil)

// Pid implements Hypervisor: VMPid once started, else 0.
func (f *Fake) Pid() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.started {
		return 0
	}
	return f.VMPid
}

// Start implements Hypervisor.
func (f *Fake) Start(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.StartErr != nil {
		return f.StartErr
	}
	f.started = true
	return nil
}

// Stop implements Hypervisor; the VM counts as exited afterwards.
func (f *Fake) Stop(ctx context.Context) error {
	f.mu.Lock()
	f.stopped = true
	f.mu.Unlock()
	f.Exit()
	return nil
}

// Exit makes the fake VM exit, as if QEMU died.
func (f *Fake) Exit() { f.doneOnce.Do(func() { close(f.done) }) }

// Done implements Hypervisor.
func (f *Fake) Done() <-chan struct{} { return f.done }

// Hotplug implements Hypervisor.
func (f *Fake) Hotplug(ctx context.Context, d Device) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.devices[d.DeviceID()]; ok {
		return errors.New("device " + d.DeviceID() + " already plugged")
	}
	f.devices[d.DeviceID()] = d
	return nil
}

// Unplug implements Hypervisor.
func (f *Fake) Unplug(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.devices[id]; !ok {
		return errors.New("device " + id + " not plugged")
	}
	delete(f.devices, id)
	return nil
}

// DialAgent implements Hypervisor.
func (f *Fake) DialAgent(ctx context.Context) (net.Conn, error) {
	if f.DialAgentFunc != nil {
		return f.DialAgentFunc(ctx)
	}
	return nil, errors.New("fake hypervisor: no agent")
}

// ConsolePath implements Hypervisor.
func (f *Fake) ConsolePath() string { return f.Console }

// FakeKind is the kind of FakeDriver.
const FakeKind = "fake"

// FakeDriver is a Driver of kind FakeKind for tests of its users: New is newVM, Cleanup does
// nothing and the console log is console.log in the state dir.
func FakeDriver(newVM func(context.Context, Config) (Hypervisor, error)) Driver {
	return Driver{
		Kind:        FakeKind,
		New:         newVM,
		Cleanup:     func(context.Context, string) error { return nil },
		ConsolePath: func(stateDir string) string { return filepath.Join(stateDir, "console.log") },
	}
}

// State reports what happened to the fake: started, stopped, and the plugged device IDs.
func (f *Fake) State() (started, stopped bool, devices []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for id := range f.devices {
		devices = append(devices, id)
	}
	return f.started, f.stopped, devices
}

// FakeTemplate is a Template for tests of its users: Clone marks the config Templated (and
// gives it no files), Discard records that it was called.
type FakeTemplate struct {
	ID string
	// CloneErr, if set, is returned by Clone.
	CloneErr error

	mu        sync.Mutex
	clones    int
	discarded bool
}

var _ Template = (*FakeTemplate)(nil)

// Key implements Template.
func (t *FakeTemplate) Key() string { return t.ID }

// Clone implements Template.
func (t *FakeTemplate) Clone(ctx context.Context, cfg *Config) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.CloneErr != nil {
		return t.CloneErr
	}
	t.clones++
	cfg.Templated = true
	return nil
}

// Discard implements Template.
func (t *FakeTemplate) Discard(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.discarded = true
	return nil
}

// State reports how many clones were made and whether the template was discarded.
func (t *FakeTemplate) State() (clones int, discarded bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.clones, t.discarded
}
