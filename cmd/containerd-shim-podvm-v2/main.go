// Command containerd-shim-podvm-v2 is podvm's containerd shim (runtime type
// io.containerd.podvm.v2): each pod runs in its own VM.
package main

import (
	"context"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/shim"
)

func main() {
	// The hypervisors this shim can run pods on; the node config's hypervisor.kind picks one.
	shim.Run(context.Background(), qemu.Driver())
}
