package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/shim/config"
)

// probeAccel runs qemu's accelerator probe with the node config: the guest image, memory,
// agent transport and confinement a pod VM gets. With accel "auto" it refreshes the cached
// result pods use; a forced accelerator never reads the cache, so nothing is written for it.
func probeAccel(ctx context.Context, cfg *config.Config) (qemu.ProbeResult, error) {
	size, err := config.Size(cfg, nil)
	if err != nil {
		return qemu.ProbeResult{}, err
	}
	hc := cfg.VMConfig("accel-check", size)
	qc := qemu.Config(hc)
	qc.Accel = qemu.AccelTCG // resolve everything but the accelerator, which is measured
	if qc, err = qc.Resolve(ctx); err != nil {
		return qemu.ProbeResult{}, err
	}
	if hc.Accel == "" || hc.Accel == hypervisor.AccelAuto {
		return qemu.RefreshAccel(ctx, qc, cfg.Sandbox.StateDir)
	}
	return qemu.ProbeAccel(ctx, qc, cfg.Sandbox.StateDir)
}

// checkBoot boots the guest image under TCG and KVM (qemu's accelerator probe) and reports
// the measured boot times, and whether the configured accelerator works: a KVM that is
// unusable is a warning with accel "auto" (pods get TCG) and a failure with accel "kvm".
func (h hostProbe) checkBoot(ctx context.Context, r *report, cfg *config.Config) {
	for _, c := range *r {
		if c.status == statusFail && slices.Contains([]string{"qemu", "guest kernel", "guest initrd", "guest rootfs", "state dir"}, c.name) {
			r.add(statusWarn, "boot", "not tried: the guest cannot boot until the %s check above passes", c.name)
			return
		}
	}
	if h.euid() != 0 {
		r.add(statusWarn, "boot", "not tried: booting a guest as pods do needs root (QEMU drops to its own uid); run 'podvm check' as root, or --boot=false")
		return
	}
	res, err := h.probeAccel(ctx, cfg)
	accel := cfg.Hypervisor.Accel
	if res.TCG.Accel == "" { // the probe did not get to booting
		r.add(statusFail, "boot", "%v", err)
		return
	}
	tcgStatus := statusOK
	if !res.TCG.Booted && (accel == hypervisor.AccelTCG || err != nil) {
		tcgStatus = statusFail
	} else if !res.TCG.Booted {
		tcgStatus = statusWarn
	}
	r.add(tcgStatus, "boot tcg", "%s", bootLine(res.TCG))
	for _, a := range res.KVM {
		s := statusOK
		if !a.Booted {
			s = statusWarn
		}
		r.add(s, "boot kvm", "%s", bootLine(a))
	}
	if err != nil {
		r.add(statusFail, "accel", "%v; run 'podvm debug boot --console' to see the guest's console", err)
		return
	}
	_, pvmErr := h.stat(pvmModule)
	r.put(accelVerdict(res, accel, pvmErr == nil))
}

// pvmModule is there when the host's KVM is PVM, a hypervisor for cloud VMs without VT-x that
// runs only guest kernels built for it.
const pvmModule = "/sys/module/kvm_pvm"

func bootLine(a qemu.Attempt) string {
	what := "accel " + a.Accel
	if a.CPU != "" {
		what += ", -cpu " + a.CPU
	}
	if a.Booted {
		return fmt.Sprintf("%s: guest agent answered %s after QEMU start", what, a.BootTime.Round(time.Millisecond))
	}
	if a.Aborted {
		return what + ": QEMU aborted: " + a.Reason
	}
	return what + ": " + a.Reason
}

// accelVerdict says what the measurement means for the configured accelerator; pvm: the
// host's KVM is PVM.
func accelVerdict(res qemu.ProbeResult, accel string, pvm bool) (status, string, string) {
	const name = "accel"
	kvmOK := res.Accel == qemu.AccelKVM
	hostOK := kvmOK && res.CPU == qemu.CPUHost
	speed := ""
	if kvmOK && res.TCG.Booted {
		last := res.KVM[len(res.KVM)-1]
		speed = fmt.Sprintf(" (%s against TCG's %s)", last.BootTime.Round(time.Millisecond), res.TCG.BootTime.Round(time.Millisecond))
	}
	switch accel {
	case hypervisor.AccelKVM:
		if hostOK {
			return statusOK, name, "accel = \"kvm\": KVM with -cpu host boots the guest" + speed
		}
		if kvmOK {
			return statusFail, name, fmt.Sprintf("accel = \"kvm\" runs -cpu host, which does not work here (%s), while -cpu %s does: set accel = \"auto\"", firstKVMProblem(res), res.CPU)
		}
		return statusFail, name, fmt.Sprintf("accel = \"kvm\" but %s; every pod would fail or crawl: set accel = \"auto\" (picks TCG here) or \"tcg\". %s", res.Reason, kvmFix(res, pvm))
	case hypervisor.AccelTCG:
		if kvmOK {
			return statusOK, name, fmt.Sprintf("accel = \"tcg\" forced, but KVM (-cpu %s) works%s: set accel = \"auto\" to use it", res.CPU, speed)
		}
		return statusOK, name, "accel = \"tcg\" forced; KVM would not help: " + res.Reason
	}
	if kvmOK {
		return statusOK, name, fmt.Sprintf("accel \"auto\" uses KVM with -cpu %s%s", res.CPU, speed)
	}
	return statusWarn, name, fmt.Sprintf("accel \"auto\" uses TCG (pods run, slower): %s. %s", res.Reason, kvmFix(res, pvm))
}

// firstKVMProblem is what went wrong with -cpu host.
func firstKVMProblem(res qemu.ProbeResult) string {
	if len(res.KVM) == 0 {
		return res.Reason
	}
	return bootLine(res.KVM[0])
}

// kvmFix says what to do about an unusable KVM, by what the probe saw and whether the host's
// KVM is PVM.
func kvmFix(res qemu.ProbeResult, pvm bool) string {
	msr, slow := false, false
	for _, a := range res.KVM {
		msr = msr || strings.Contains(a.Reason, "MSR")
		slow = slow || (!a.Aborted && res.TCG.Booted)
	}
	switch {
	case pvm && len(res.KVM) > 0:
		return "This host's KVM is PVM (module kvm_pvm): it virtualises without VT-x/AMD-V and runs at speed only guest kernels built as PVM guests (CONFIG_PVM_GUEST). podvm's guest kernel is not one: under PVM its privileged instructions trap to be emulated, far slower than TCG, and the guest can stop on one that KVM cannot emulate. For KVM, run on bare metal or an instance type with hardware nested virtualisation."
	case len(res.KVM) == 0:
		return "For KVM: enable virtualisation (VT-x/AMD-V) in the firmware, or nested virtualisation for this VM, and load kvm_intel or kvm_amd."
	case msr && slow:
		return "This looks like nested virtualisation: the host refuses MSRs of -cpu host and the guest runs slower under KVM than under TCG. For KVM, run on bare metal or on an instance type with fast nested virtualisation; on this node accel = \"tcg\" skips the probe."
	case msr:
		return "The host refuses MSRs of every CPU model tried; update the host kernel/hypervisor, or keep TCG."
	default:
		return "KVM works but guests boot slower than under TCG (nested virtualisation without hardware support?); for KVM, run on bare metal or an instance type with fast nested virtualisation."
	}
}
