// Command podvm-agent is PID 1 of a podvm guest: it sets the guest up, then serves the agent
// API that containerd-shim-podvm-v2 calls, and runs the pod's containers with libcontainer.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/log"
	"github.com/opencontainers/runc/libcontainer"
	_ "github.com/opencontainers/runc/libcontainer/nsenter"
	"github.com/sirupsen/logrus"

	"github.com/podvm/podvm/agent/guest"
)

func init() {
	// libcontainer re-executes this binary as "init" inside new containers (runc init);
	// nsenter's constructor has already run by now.
	if len(os.Args) > 1 && os.Args[1] == "init" {
		libcontainer.Init()
	}
}

func main() {
	logrus.SetOutput(os.Stderr)
	logrus.SetFormatter(&logrus.TextFormatter{DisableColors: true, FullTimestamp: true})
	flags := guest.FlagsFromCmdline()
	if flags.Debug {
		_ = log.SetLevel("debug")
	}
	arg := ""
	if len(os.Args) > 1 {
		arg = os.Args[1]
	}
	switch {
	case arg == "serve":
		ctx := context.Background()
		if err := serve(ctx, flags.Transport); err != nil {
			log.G(ctx).WithError(err).Error("podvm-agent: serve")
			os.Exit(1)
		}
	case arg == guest.WarmArg:
		// Started by the agent of a restored guest so that the guest code every later
		// container start runs first (the Go runtime's start, the package initialisers) is
		// translated before a container needs it (docs/templating.md).
		os.Exit(0)
	case arg == guest.HoldArg:
		// The holder runs in C before Go starts (hold.go); it takes no other argument.
		fmt.Fprintln(os.Stderr, "podvm-agent: "+guest.HoldArg+" takes no arguments")
		os.Exit(2)
	case os.Getpid() == 1:
		// Only from an initramfs: PID 1 is C where the root is a root of its own (pid1.go).
		guest.Init()
	default:
		fmt.Fprintln(os.Stderr, "podvm-agent runs as PID 1 of a podvm guest (the initrd's /init); it is not meant to be started by hand")
		os.Exit(2)
	}
}

// serve readies the guest kernel for pods and serves the agent API on transport ("": every
// transport the guest has) until it fails.
func serve(ctx context.Context, transport string) error {
	if err := guest.SetUpKernel(ctx); err != nil {
		return err
	}
	go func() {
		if err := guest.LoopbackUp(); err != nil {
			log.G(ctx).WithError(err).Warn("podvm-agent: loopback (SetupSandbox tries again)")
		}
	}()
	return guest.Serve(ctx, guest.NewServer(), transport)
}
