package shim

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/podvm/podvm/hypervisor"
)

// TestSandboxFromTemplate: with templating on, the pod's VM is a clone of the driver's
// template, and the guest is reseeded, given the clock and waits for its NIC and share before
// SetupSandbox, which is the agent's first call after Version.
func TestSandboxFromTemplate(t *testing.T) {
	r := newRig(t)
	r.template = &hypervisor.FakeTemplate{ID: "k1"}
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	if clones, discarded := r.template.State(); clones != 1 || discarded {
		t.Fatalf("template: %d clones, discarded %v; want 1 clone", clones, discarded)
	}
	if !r.vmCfg.Templated || len(r.vmCfg.NetDevices) != 1 || r.vmCfg.SharedDir == "" {
		t.Errorf("VM config: templated %v, %d NICs, share %q", r.vmCfg.Templated, len(r.vmCfg.NetDevices), r.vmCfg.SharedDir)
	}
	req := r.agent.Restored()
	if req == nil {
		t.Fatal("no PrepareRestored")
	}
	if len(req.Entropy) != restoreEntropy || req.RealtimeNs == 0 {
		t.Errorf("PrepareRestored = %d bytes of entropy, clock %d", len(req.Entropy), req.RealtimeNs)
	}
	// The guest waits for its hot-plugged share in SetupSandbox; its NIC came with the
	// template, with the template's MAC, and gets the pod's.
	setup := r.agent.Setup()
	if setup == nil || !setup.HotPlugged || setup.SharedFsTag == "" || len(setup.Interfaces) != 1 {
		t.Fatalf("SetupSandbox = %+v, want hot_plugged with the share and the NIC", setup)
	}
	if ifc := setup.Interfaces[0]; ifc.GuestMac != hypervisor.TemplateNICMAC || ifc.Mac == "" || ifc.Mac == ifc.GuestMac {
		t.Errorf("NIC %+v: want the pod's MAC, found by the template's", ifc)
	}
	// The guest is reseeded before anything else runs in it: its setup and the sandbox's
	// container, which are made at once.
	calls := r.agent.Calls()
	i := slices.Index(calls, "PrepareRestored")
	if i < 0 || slices.Index(calls, "SetupSandbox") < i || slices.Index(calls, "CreateContainer pod1") < i {
		t.Errorf("agent calls %q: want PrepareRestored before SetupSandbox and CreateContainer", calls)
	}
}

// TestSandboxTemplateUnavailableBoots: a template that cannot be had costs the pod its speed,
// not its start.
func TestSandboxTemplateUnavailableBoots(t *testing.T) {
	r := newRig(t)
	r.templateErr = errors.New("no room for the template")
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	if r.vmCfg.Templated || r.agent.Restored() != nil {
		t.Error("the VM was treated as restored")
	}
	if started, _, _ := r.vm.State(); !started {
		t.Fatal("the VM was not booted")
	}
}

// TestSandboxBrokenTemplateIsDiscarded: a VM that does not restore fails the pod with an error
// that says so, and the template is removed so that the next pod builds it anew.
func TestSandboxBrokenTemplateIsDiscarded(t *testing.T) {
	r := newRig(t)
	r.template = &hypervisor.FakeTemplate{ID: "k1"}
	r.vm.StartErr = fmt.Errorf("%w: load of migration failed", hypervisor.ErrRestore)
	_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
	if err == nil {
		t.Fatal("create succeeded with a VM that did not restore")
	}
	if _, discarded := r.template.State(); !discarded {
		t.Error("the broken template was kept")
	}
	for _, want := range []string{"template k1", "load of migration failed", "builds it anew"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestSandboxTemplateOff: templating off never asks the driver for a template.
func TestSandboxTemplateOff(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	if r.vmCfg.Templated || r.agent.Restored() != nil {
		t.Error("a template was used with templating off")
	}
}

// TestSandboxRestoreFailureKeepsTemplate: a VM that fails to start for another reason (here
// virtiofsd) fails the pod but keeps the template.
func TestSandboxRestoreFailureKeepsTemplate(t *testing.T) {
	r := newRig(t)
	r.template = &hypervisor.FakeTemplate{ID: "k1"}
	r.vm.StartErr = errors.New("virtiofsd exited before listening")
	if _, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns); err == nil {
		t.Fatal("create succeeded with a VM that did not start")
	}
	if _, discarded := r.template.State(); discarded {
		t.Error("the template was discarded for a failure that was not its own")
	}
}

// TestSandboxIDTemplatesIsRefused: a container named like the templates dir (ctr run ...
// templates) would make it its state dir, and remove it with itself.
func TestSandboxIDTemplatesIsRefused(t *testing.T) {
	r := newRig(t)
	_, err := r.create("templates", nil, podNetns)
	if err == nil || !strings.Contains(err.Error(), "VM templates dir") {
		t.Fatalf("create templates: %v, want a refusal naming the VM templates dir", err)
	}
}
