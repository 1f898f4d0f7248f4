package config

import (
	"path/filepath"

	"github.com/podvm/podvm/hypervisor/qemu"
)

// SandboxDir is the state directory of the sandbox id: <state_dir>/<id>.
func (c *Config) SandboxDir(id string) string { return filepath.Join(c.Sandbox.StateDir, id) }

// QEMUConfig returns the VM config for sandbox id with the given size: everything the node
// config decides. The caller adds what the pod decides (SharedDir, VsockCID, NetDevices) and
// lets qemu.New resolve the "auto" choices. Block devices take c.Block.Cache and c.Block.AIO.
func (c *Config) QEMUConfig(id string, size VMSize) qemu.Config {
	h := c.Hypervisor
	slots := h.HotplugSlots
	if slots == 0 {
		slots = -1 // qemu.Config: 0 = its default, negative = none
	}
	transport := h.AgentTransport
	if transport == TransportAuto {
		transport = ""
	}
	return qemu.Config{
		ID:             id,
		StateDir:       c.SandboxDir(id),
		QEMUPath:       h.QEMUPath,
		Accel:          h.Accel,
		VCPUs:          size.VCPUs,
		MemoryMiB:      size.MemoryMiB,
		Kernel:         h.Kernel,
		Initrd:         h.Initrd,
		KernelParams:   append([]string(nil), h.KernelParams...),
		Debug:          h.Debug,
		Firmware:       h.Firmware,
		VirtiofsdPath:  h.VirtiofsdPath,
		VirtiofsCache:  c.Virtiofs.Cache,
		AgentTransport: transport,
		HotplugSlots:   slots,
		UIDBase:        uint32(h.UIDBase), // Validate keeps both in uint32's range
		UIDCount:       uint32(h.UIDCount),
	}
}
