package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/shim/config"
)

// runDebug dispatches `podvm debug list|console|boot`.
func runDebug(ctx context.Context, e *env, args []string) error {
	return dispatch(ctx, e, "podvm debug", []command{
		{name: "list", summary: "list the pod VMs on this node", run: runDebugList},
		{name: "console", summary: "print a pod VM's serial console log", run: runDebugConsole},
		{name: "boot", summary: "boot a throw-away VM from the node's guest image and check its agent", run: runDebugBoot},
	}, args)
}

// runDebugList prints one line per sandbox state dir: id, QEMU pid and whether it runs.
func runDebugList(ctx context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("podvm debug list", flag.ContinueOnError)
	path := configFlag(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: podvm debug list [flags]\n\nLists the pod VMs in the state directory (sandbox.state_dir).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(cfg.Sandbox.StateDir)
	if errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(e.stdout, "no pod VMs (%s does not exist)\n", cfg.Sandbox.StateDir)
		return nil
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%-14s %-8s %-8s %s\n", "SANDBOX", "QEMU", "STATE", "CONSOLE LOG")
	for _, ent := range entries {
		if !ent.IsDir() {
			continue
		}
		dir := filepath.Join(cfg.Sandbox.StateDir, ent.Name())
		pid, state := "-", "stopped"
		if b, err := os.ReadFile(filepath.Join(dir, qemu.QEMUPidFile)); err == nil {
			pid = strings.TrimSpace(string(b))
			if n, err := strconv.Atoi(pid); err == nil && unix.Kill(n, 0) == nil {
				state = "running"
			}
		}
		fmt.Fprintf(e.stdout, "%-14s %-8s %-8s %s\n", short(ent.Name()), pid, state, filepath.Join(dir, qemu.ConsoleLog))
	}
	return nil
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// runDebugConsole prints the console log of the sandbox whose id starts with the argument.
func runDebugConsole(ctx context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("podvm debug console", flag.ContinueOnError)
	path := configFlag(fs)
	lines := fs.Int("n", 0, "print only the last `N` lines (0: all)")
	follow := fs.Bool("f", false, "keep printing what the guest writes, until interrupted")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: podvm debug console [flags] SANDBOX-ID-PREFIX\n\nPrints the serial console log of a pod VM: the guest kernel's messages and the agent's log\n(more of both with debug = true in the node config).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(e.stdout)
			fs.Usage()
		}
		return &usageError{cmd: fs.Name(), err: err}
	}
	if fs.NArg() != 1 {
		return usagef(fs.Name(), "give one sandbox id (or a unique prefix of it); 'podvm debug list' shows them")
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	dir, err := findSandbox(cfg.Sandbox.StateDir, fs.Arg(0))
	if err != nil {
		return err
	}
	f, err := os.Open(filepath.Join(dir, qemu.ConsoleLog))
	if err != nil {
		return fmt.Errorf("console log: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return err
	}
	out := strings.ReplaceAll(string(b), "\r\n", "\n")
	if *lines > 0 {
		ls := strings.Split(strings.TrimRight(out, "\n"), "\n")
		if len(ls) > *lines {
			ls = ls[len(ls)-*lines:]
		}
		out = strings.Join(ls, "\n") + "\n"
	}
	fmt.Fprint(e.stdout, out)
	for *follow {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
		b, err := io.ReadAll(f)
		if err != nil {
			return err
		}
		fmt.Fprint(e.stdout, strings.ReplaceAll(string(b), "\r\n", "\n"))
		if _, err := os.Stat(dir); err != nil {
			fmt.Fprintln(e.stderr, "podvm debug console: the sandbox is gone")
			return nil
		}
	}
	return nil
}

func findSandbox(stateDir, prefix string) (string, error) {
	entries, err := os.ReadDir(stateDir)
	if err != nil {
		return "", fmt.Errorf("state dir: %w", err)
	}
	var found []string
	for _, ent := range entries {
		if ent.IsDir() && strings.HasPrefix(ent.Name(), prefix) {
			found = append(found, ent.Name())
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("no sandbox %q in %s; 'podvm debug list' shows them", prefix, stateDir)
	case 1:
		return filepath.Join(stateDir, found[0]), nil
	default:
		return "", fmt.Errorf("%q matches %d sandboxes; give more of the id", prefix, len(found))
	}
}

// runDebugBoot boots the node's guest image in a throw-away VM, waits for its agent and
// reports, so a broken kernel, initrd or QEMU setup shows without containerd.
func runDebugBoot(ctx context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("podvm debug boot", flag.ContinueOnError)
	path := configFlag(fs)
	console := fs.Bool("console", false, "print the guest's console log afterwards")
	verbose := fs.Bool("debug", false, "boot with the kernel's and the agent's debug output")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: podvm debug boot [flags]\n\nBoots a VM from the node config's kernel and initrd (its accelerator, memory defaults and\nagent transport), waits for the guest agent, prints its version and the boot time, and\nstops the VM. Nothing stays behind.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.Sandbox.StateDir, 0o700); err != nil {
		return err
	}
	dir, err := os.MkdirTemp(cfg.Sandbox.StateDir, "debug-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	id := filepath.Base(dir)
	size, err := config.Size(cfg, nil)
	if err != nil {
		return err
	}
	qcfg := cfg.QEMUConfig(id, size)
	qcfg.StateDir = dir
	qcfg.Debug = qcfg.Debug || *verbose
	qcfg.VsockCID = uint32(3 + os.Getpid())
	vm, err := qemu.New(qcfg)
	if err != nil {
		return err
	}
	accel := qcfg.Accel
	if accel == "" || accel == qemu.AccelAuto {
		accel = qemu.DetectAccel()
	}
	fmt.Fprintf(e.stdout, "booting %s + %s (%s, %d vCPU, %d MiB)\n", qcfg.Kernel, qcfg.Initrd, accel, size.VCPUs, size.MemoryMiB)
	start := time.Now()
	if err := vm.Start(ctx); err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		defer cancel()
		_ = vm.Stop(sctx)
		if *console {
			if b, err := os.ReadFile(vm.ConsolePath()); err == nil {
				fmt.Fprintf(e.stdout, "--- console log ---\n%s", strings.ReplaceAll(string(b), "\r\n", "\n"))
			}
		}
	}()
	actx, cancel := context.WithTimeout(ctx, cfg.Sandbox.AgentTimeout.Duration)
	defer cancel()
	c, err := agent.Connect(actx, vm.DialAgent, vm.Done())
	if err != nil {
		b, _ := os.ReadFile(vm.ConsolePath())
		return fmt.Errorf("%w\nthe end of the console log:\n%s", err, tailLines(string(b), 30))
	}
	defer c.Close()
	fmt.Fprintf(e.stdout, "agent %s ready %s after QEMU start (guest kernel %s, %s from kernel start to agent)\n",
		c.Info.AgentVersion, time.Since(start).Round(time.Millisecond), c.Info.KernelRelease,
		time.Duration(c.Info.BootToReadyNs).Round(time.Millisecond))
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	_, _ = c.Shutdown(sctx, &api.Empty{})
	return nil
}

func tailLines(s string, n int) string {
	ls := strings.Split(strings.TrimRight(strings.ReplaceAll(s, "\r\n", "\n"), "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}
