// Command containerd-shim-podvm-v2 is podvm's containerd shim (runtime type
// io.containerd.podvm.v2): each pod runs in its own VM.
package main

import (
	"context"

	"github.com/podvm/podvm/shim"
)

func main() {
	shim.Run(context.Background())
}
