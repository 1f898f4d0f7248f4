package shim

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

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
	// The guest is reseeded before anything runs in it: the sandbox's container.
	calls := r.agent.Calls()
	i := slices.Index(calls, "PrepareRestored done")
	if i < 0 || slices.Index(calls, "CreateContainer pod1") < i {
		t.Errorf("agent calls %q: want PrepareRestored answered before CreateContainer", calls)
	}
}

// TestSandboxFromTemplateSetupMeanwhile: a clone's setup, which runs nothing in the guest,
// does not wait for the guest's reseed; the sandbox's container, the first process in it,
// does.
func TestSandboxFromTemplateSetupMeanwhile(t *testing.T) {
	r := newRig(t)
	r.template = &hypervisor.FakeTemplate{ID: "k1"}
	gate := make(chan struct{})
	r.agent.RestoreGate = gate
	done := make(chan error, 1)
	go func() {
		_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
		done <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(r.agent.Calls(), "SetupSandbox") {
		if time.Now().After(deadline) {
			t.Fatalf("no SetupSandbox while PrepareRestored was unanswered: %q", r.agent.Calls())
		}
		time.Sleep(time.Millisecond)
	}
	if calls := r.agent.Calls(); slices.ContainsFunc(calls, func(c string) bool { return strings.HasPrefix(c, "CreateContainer") }) {
		t.Fatalf("the sandbox's container was made before the guest was reseeded: %q", calls)
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	calls := r.agent.Calls()
	if i := slices.Index(calls, "PrepareRestored done"); i < 0 || slices.Index(calls, "CreateContainer pod1") < i {
		t.Errorf("agent calls %q: want CreateContainer after PrepareRestored's answer", calls)
	}
}

// TestSandboxFromTemplateReseedFails: a clone that cannot be reseeded gets no container and
// fails the pod with the reason; its setup is waited for and the VM goes.
func TestSandboxFromTemplateReseedFails(t *testing.T) {
	r := newRig(t)
	r.template = &hypervisor.FakeTemplate{ID: "k1"}
	r.agent.FailOn("PrepareRestored", errors.New("RNDADDENTROPY: operation not permitted"))
	_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
	if err == nil || !strings.Contains(err.Error(), "RNDADDENTROPY") {
		t.Fatalf("create: %v, want the reseed's error", err)
	}
	if calls := r.agent.Calls(); slices.ContainsFunc(calls, func(c string) bool { return strings.HasPrefix(c, "CreateContainer") }) {
		t.Errorf("a container was made in a guest that was not reseeded: %q", calls)
	}
	if _, stopped, _ := r.vm.State(); !stopped {
		t.Error("the VM was not stopped")
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
	r.vm.StartErr = errors.New("virtiofsd exited (exit status 1)")
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
