package integration

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qemu"
)

// vmOptions are what a test can add to the VM bootVM makes.
type vmOptions struct {
	// NetDevices are cold-plugged NICs; the VM takes over their tap files.
	NetDevices []*hypervisor.NetDevice
	// Setup is sent to the agent as is, except that an empty Hostname or SharedFsTag gets
	// bootVM's; nil sends only those.
	Setup *api.SetupSandboxRequest
}

// bootVMWith is bootVM with options: it boots a VM from the test guest image with a virtio-fs
// share and the given devices, connects to its agent and sets the sandbox up.
func bootVMWith(t testing.TB, ctx context.Context, stateDir string, o vmOptions) *guestVM {
	t.Helper()
	kernel, initrd := guestImage(t)
	shared := filepath.Join(stateDir, "shared")
	if err := os.MkdirAll(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	vm, err := qemu.New(qemu.Config{
		ID: filepath.Base(stateDir), StateDir: stateDir, Accel: testAccel(),
		VCPUs: 1, MemoryMiB: 512, Kernel: kernel, Initrd: initrd, SharedDir: shared,
		AgentTransport: qemu.TransportSerial, Debug: testDebug(), NetDevices: o.NetDevices,
	})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := vm.Start(ctx); err != nil {
		t.Fatalf("start VM: %v", err)
	}
	g := &guestVM{vm: vm, sharedDir: shared}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if g.agent != nil {
			_, _ = g.agent.Shutdown(sctx, &api.Empty{})
			g.agent.Close()
		}
		if err := vm.Stop(sctx); err != nil {
			t.Errorf("stop VM: %v", err)
		}
		if t.Failed() {
			if b, err := os.ReadFile(vm.ConsolePath()); err == nil {
				t.Logf("guest console:\n%s", tail(string(b), 60))
			}
		}
	})
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c, err := agent.Connect(cctx, vm.DialAgent, vm.Done())
	if err != nil {
		t.Fatalf("connect to agent: %v", err)
	}
	g.agent = c
	g.bootTime = time.Since(start)
	req := &api.SetupSandboxRequest{}
	if o.Setup != nil {
		req = o.Setup
	}
	if req.Hostname == "" {
		req.Hostname = "podvm-it"
	}
	if req.SharedFsTag == "" {
		req.SharedFsTag = qemu.SharedFSTag
	}
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	defer scancel()
	if _, err := c.SetupSandbox(sctx, req); err != nil {
		t.Fatalf("setup sandbox: %v", err)
	}
	return g
}
