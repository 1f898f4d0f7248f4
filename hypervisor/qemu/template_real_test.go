//go:build realvm

package qemu

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// TestRealTemplate builds a VM template from the real guest image, restores two VMs from it
// with a virtio-fs share each, and checks that each one's agent answers, reseeds, finds its
// hot-plugged virtio-fs device and mounts the share; that a clone whose virtiofsd fails does
// not start; then that nothing is left running.
func TestRealTemplate(t *testing.T) {
	kernel, initrd := guestImageFiles(t)
	base := realConfig(t, kernel)
	base.Initrd, base.KernelParams, base.Debug, base.MemoryMiB = initrd, nil, false, 512
	dir := filepath.Join(t.TempDir(), "templates")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	start := time.Now()
	tmpl, err := FindTemplate(ctx, hypervisor.Config(base), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("template %s built in %v", tmpl.Key(), time.Since(start))
	again, err := FindTemplate(ctx, hypervisor.Config(base), dir)
	if err != nil || again.Key() != tmpl.Key() {
		t.Fatalf("second lookup: %v, key %v want %s", err, again, tmpl.Key())
	}
	for i := range 2 {
		cfg := base
		cfg.ID = "clone" + string(rune('a'+i))
		cfg.StateDir = filepath.Join(filepath.Dir(base.StateDir), cfg.ID)
		restoreOne(ctx, t, tmpl, cfg)
	}
	// A clone's QEMU starts while its virtiofsd does: a virtiofsd that fails fails the start
	// with its own complaint, and takes the clone's QEMU with it (leftovers, below).
	cfg := base
	cfg.ID = "clone-nofs"
	cfg.StateDir = filepath.Join(filepath.Dir(base.StateDir), cfg.ID)
	cfg.VirtiofsdPath = failingVirtiofsd(t)
	restoreFails(ctx, t, tmpl, cfg, "virtiofsd exited", "fake virtiofsd: refusing to start")
	for _, l := range leftovers(t, filepath.Dir(base.StateDir)) {
		t.Errorf("leak: %s", l)
	}
}

// failingVirtiofsd is a virtiofsd that answers --help as the C one does and fails to start.
func failingVirtiofsd(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "virtiofsd")
	script := "#!/bin/sh\n" +
		"if [ \"$1\" = --help ]; then echo 'usage: virtiofsd [options]'; echo '    -o source=PATH'; exit 0; fi\n" +
		"echo 'fake virtiofsd: refusing to start' >&2; exit 1\n"
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// restoreFails restores cfg from tmpl and wants the start to fail with an error that says
// every one of want.
func restoreFails(ctx context.Context, t *testing.T, tmpl *Template, cfg Config, want ...string) {
	t.Helper()
	hc := hypervisor.Config(cfg)
	if err := tmpl.Clone(ctx, &hc); err != nil {
		t.Fatal(err)
	}
	vm, err := New(ctx, hc)
	if err != nil {
		t.Fatal(err)
	}
	err = vm.Start(ctx)
	if err == nil {
		_ = vm.Stop(ctx) // the test fails either way; this only stops the VM
		t.Fatalf("%s: started, want an error saying %q", cfg.ID, want)
	}
	t.Logf("%s: start failed: %v", cfg.ID, err)
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%s: start failed with %v, want it to say %q", cfg.ID, err, w)
		}
	}
	if err := vm.Stop(ctx); err != nil {
		t.Errorf("%s: Stop after the failed start: %v", cfg.ID, err)
	}
}

func restoreOne(ctx context.Context, t *testing.T, tmpl *Template, cfg Config) {
	t.Helper()
	hc := hypervisor.Config(cfg)
	start := time.Now()
	if err := tmpl.Clone(ctx, &hc); err != nil {
		t.Fatal(err)
	}
	cloned := time.Since(start)
	vm, err := New(ctx, hc)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := vm.Stop(context.Background()); err != nil {
			t.Error(err)
		}
	}()
	started := time.Since(start)
	c, err := agent.Connect(ctx, vm.DialAgent, vm.Done())
	if err != nil {
		t.Fatalf("agent after restore: %v; console:\n%s", err, logTail(vm.ConsolePath()))
	}
	defer c.Close()
	connected := time.Since(start)
	seed := make([]byte, 64)
	_, _ = rand.Read(seed)
	if _, err := c.PrepareRestored(ctx, &api.PrepareRestoredRequest{Entropy: seed, RealtimeNs: time.Now().UnixNano()}); err != nil {
		t.Fatalf("PrepareRestored: %v; console:\n%s", err, logTail(vm.ConsolePath()))
	}
	prepared := time.Since(start)
	// The share was hot-plugged at the restore: SetupSandbox waits for the guest to find it.
	if _, err := c.SetupSandbox(ctx, &api.SetupSandboxRequest{Hostname: cfg.ID, SharedFsTag: hypervisor.SharedFSTag, HotPlugged: true}); err != nil {
		t.Fatalf("SetupSandbox: %v", err)
	}
	t.Logf("%s: clone memory %v, QEMU+restore %v, agent %v, prepared %v, set up %v", cfg.ID, cloned, started, connected, prepared, time.Since(start))
	if _, err := os.Stat(cfg.SharedDir); err != nil {
		t.Fatal(err)
	}
}
