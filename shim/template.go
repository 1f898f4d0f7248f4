package shim

// Templated start ([template] enabled, docs/templating.md): the pod's VM is restored from a
// VM template instead of booting, then made the pod's own before anything runs in it.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/log"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

// restoreEntropy is how many random bytes a restored guest gets from the host.
const restoreEntropy = 64

// restoreSetupTimeout bounds PrepareRestored.
const restoreSetupTimeout = 20 * time.Second

// findTemplate returns the template the pod's VM is restored from, building it first if
// needed, or nil when the pod boots the ordinary way: templating is off, the driver has
// none, the pod has more NICs than a template has room for, or the template cannot be had
// (logged: the pod still starts, only slower). It runs before the shim enters the pod's
// cgroup, so a template VM it builds is not charged to the pod.
func (sb *sandbox) findTemplate(ctx context.Context, o *sandboxOptions) hypervisor.Template {
	if !o.cfg.Template.Enabled {
		return nil
	}
	lg := log.G(ctx).WithField("sandbox", sb.id)
	if sb.driver.Template == nil {
		lg.Warnf("[template] enabled, but hypervisor %s has no VM templates: booting the VM", sb.driver.Kind)
		return nil
	}
	vcfg := o.cfg.VMConfig(o.id, o.size)
	t, err := sb.driver.Template(ctx, vcfg, o.cfg.TemplateDir())
	if err != nil {
		lg.WithError(err).Warn("no VM template: booting the VM")
		return nil
	}
	return t
}

// restoreVM starts the pod's VM from tmpl. A saved state the VMM cannot restore
// (hypervisor.ErrRestore) means a broken template: it is discarded, so the next pod builds
// it anew, and the error says so.
func (sb *sandbox) restoreVM(ctx context.Context, tmpl hypervisor.Template, vcfg hypervisor.Config, ph *phases) error {
	if err := tmpl.Clone(ctx, &vcfg); err != nil {
		return fmt.Errorf("start the pod VM from template %s: %w", tmpl.Key(), err)
	}
	ph.done("clone")
	vm, err := sb.driver.New(ctx, vcfg)
	if err != nil {
		closeTemplateFiles(&vcfg)
		return fmt.Errorf("VM config: %w", err)
	}
	if err := vm.Start(ctx); err != nil {
		if !errors.Is(err, hypervisor.ErrRestore) {
			return fmt.Errorf("start the pod VM from template %s: %w", tmpl.Key(), err)
		}
		if derr := tmpl.Discard(context.WithoutCancel(ctx)); derr != nil {
			log.G(ctx).WithError(derr).Warn("removing the broken VM template")
		}
		return fmt.Errorf("restore the pod VM from template %s (removed: the next pod builds it anew): %w", tmpl.Key(), err)
	}
	sb.vm = vm
	ph.done("restore")
	return nil
}

// closeTemplateFiles closes what Clone opened when no VM took it over.
func closeTemplateFiles(vcfg *hypervisor.Config) {
	for _, f := range []*os.File{vcfg.MemoryFile, vcfg.Incoming} {
		if f != nil {
			_ = f.Close()
		}
	}
}

// prepareRestored makes the restored guest the pod's own before anything runs in it: fresh
// random numbers and the host's clock. Its hot-plugged NICs and share are waited for by
// SetupSandbox (hot_plugged), while the sandbox's holder is made.
func (sb *sandbox) prepareRestored(ctx context.Context) error {
	seed := make([]byte, restoreEntropy)
	if _, err := rand.Read(seed); err != nil {
		return err
	}
	req := &api.PrepareRestoredRequest{Entropy: seed}
	ctx, cancel := context.WithTimeout(ctx, restoreSetupTimeout)
	defer cancel()
	req.RealtimeNs = time.Now().UnixNano()
	if _, err := sb.agent.PrepareRestored(ctx, req); err != nil {
		return fmt.Errorf("prepare the guest restored from a template: %w", err)
	}
	return nil
}
