package config

import (
	"path/filepath"

	"github.com/podvm/podvm/hypervisor"
)

// SandboxDir is the state directory of the sandbox id: <state_dir>/<id>.
func (c *Config) SandboxDir(id string) string { return filepath.Join(c.Sandbox.StateDir, id) }

// VMConfig returns the VM config for sandbox id with the given size: everything the node
// config decides. The caller adds what the pod decides (SharedDir, VsockCID, NetDevices) and
// lets the hypervisor driver resolve the "auto" choices.
func (c *Config) VMConfig(id string, size VMSize) hypervisor.Config {
	h := c.Hypervisor
	if h.Image != "" {
		h.Initrd = "" // the image takes its place
	}
	return hypervisor.Config{
		ID:             id,
		StateDir:       c.SandboxDir(id),
		Binary:         h.QEMUPath,
		Accel:          h.Accel,
		VCPUs:          size.VCPUs,
		MemoryMiB:      size.MemoryMiB,
		Kernel:         h.Kernel,
		Initrd:         h.Initrd,
		RootImage:      h.Image,
		KernelParams:   append([]string(nil), h.KernelParams...),
		Debug:          h.Debug,
		Firmware:       h.Firmware,
		VirtiofsdPath:  h.VirtiofsdPath,
		VirtiofsCache:  c.Virtiofs.Cache,
		AgentTransport: h.AgentTransport,
		HotplugSlots:   h.HotplugSlots,
		UIDBase:        uint32(h.UIDBase), // Validate keeps both in uint32's range
		UIDCount:       uint32(h.UIDCount),
	}
}
