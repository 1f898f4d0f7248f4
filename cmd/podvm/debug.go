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
	"github.com/podvm/podvm/internal/logfile"
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
	setUsage(fs, "podvm debug list [flags]",
		"Lists the pod VMs in the state directory (sandbox.state_dir).")
	cfg, err := parseConfig(e, fs, path, args)
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
		dir := filepath.Join(cfg.Sandbox.StateDir, ent.Name())
		if !ent.IsDir() || dir == cfg.TemplateDir() { // VM templates are no pod VMs
			continue
		}
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
	setUsage(fs, "podvm debug console [flags] SANDBOX-ID-PREFIX",
		"Prints the serial console log of a pod VM: the guest kernel's messages and the agent's log\n(more of both with debug = true in the node config).")
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
	return printConsole(ctx, e, filepath.Join(dir, qemu.ConsoleLog), *lines, *follow, dir)
}

// printConsole prints a console log: its last n lines (read from the end of the file), or
// with n 0 the rotated part and the log itself, streamed. follow keeps printing what is
// appended, across rotations, until ctx ends or dir goes away.
func printConsole(ctx context.Context, e *env, path string, n int, follow bool, dir string) error {
	out := &crlfWriter{w: e.stdout}
	if n > 0 {
		b, err := logfile.ReadTail(path, min(int64(n)*1024, 2*qemu.ConsoleLogMax))
		if err != nil {
			return fmt.Errorf("console log: %w", err)
		}
		if s := logfile.LastLines(b, n); s != "" {
			fmt.Fprintln(e.stdout, s)
		}
	} else if err := streamFile(out, path+logfile.RotatedSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("console log: %w", err)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("console log: %w", err)
	}
	defer func() { _ = f.Close() }() // read-only (and f may be replaced below)
	if n > 0 {
		if _, err := f.Seek(0, io.SeekEnd); err != nil {
			return fmt.Errorf("console log: %w", err)
		}
	} else if _, err := io.Copy(out, f); err != nil {
		return fmt.Errorf("console log: %w", err)
	}
	for follow {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
		if _, err := io.Copy(out, f); err != nil {
			return fmt.Errorf("console log: %w", err)
		}
		// Rotated: what was console.log is console.log.1 now, and f has all of it.
		if cur, err := os.Stat(path); err == nil {
			if old, err := f.Stat(); err == nil && !os.SameFile(cur, old) {
				if nf, err := os.Open(path); err == nil {
					_ = f.Close() // read-only
					f = nf
					continue
				}
			}
		}
		if _, err := os.Stat(dir); err != nil {
			fmt.Fprintln(e.stderr, "podvm debug console: the sandbox is gone")
			return nil
		}
	}
	return nil
}

func streamFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }() // read-only
	_, err = io.Copy(w, f)
	return err
}

// crlfWriter turns the serial console's "\r\n" line ends into "\n" while streaming.
type crlfWriter struct {
	w  io.Writer
	cr bool // the last byte written was a '\r', held back
}

func (c *crlfWriter) Write(p []byte) (int, error) {
	buf := make([]byte, 0, len(p)+1)
	for _, b := range p {
		if c.cr && b != '\n' {
			buf = append(buf, '\r')
		}
		c.cr = b == '\r'
		if !c.cr {
			buf = append(buf, b)
		}
	}
	if _, err := c.w.Write(buf); err != nil {
		return 0, err
	}
	return len(p), nil
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
	setUsage(fs, "podvm debug boot [flags]",
		"Boots a VM from the node config's kernel and root image or initrd (its accelerator, memory defaults and\nagent transport), waits for the guest agent, prints its version and the boot time, and\nstops the VM. Nothing stays behind.")
	cfg, err := parseConfig(e, fs, path, args)
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
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			fmt.Fprintf(e.stderr, "podvm debug boot: removing its state dir: %v\n", err)
		}
	}()
	id := filepath.Base(dir)
	size, err := config.Size(cfg, nil)
	if err != nil {
		return err
	}
	qcfg := cfg.VMConfig(id, size)
	qcfg.StateDir = dir
	qcfg.Debug = qcfg.Debug || *verbose
	qcfg.VsockCID = uint32(3 + os.Getpid())
	vm, err := qemu.New(ctx, qcfg)
	if err != nil {
		return err
	}
	accel := vm.Config().Accel // what New resolved "auto" to (the node's probe)
	root := qcfg.Initrd
	if qcfg.RootImage != "" {
		root = qcfg.RootImage
	}
	fmt.Fprintf(e.stdout, "booting %s + %s (%s, %d vCPU, %d MiB)\n", qcfg.Kernel, root, accel, size.VCPUs, size.MemoryMiB)
	start := time.Now()
	if err := vm.Start(ctx); err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		defer cancel()
		_ = vm.Stop(sctx)
		if *console {
			if b, err := logfile.ReadTail(vm.ConsolePath(), 256<<10); err == nil {
				fmt.Fprintf(e.stdout, "--- console log (its end) ---\n%s\n", logfile.LastLines(b, 0))
			}
		}
	}()
	actx, cancel := context.WithTimeout(ctx, cfg.Sandbox.AgentTimeout.Duration)
	defer cancel()
	c, err := agent.Connect(actx, vm.DialAgent, vm.Done())
	if err != nil {
		return fmt.Errorf("%w\nthe end of the console log:\n%s", err, logfile.TailLines(vm.ConsolePath(), 30))
	}
	defer func() { _ = c.Close() }() // the guest is shut down below, the VM stopped after
	fmt.Fprintf(e.stdout, "agent %s ready %s after QEMU start (guest kernel %s, %s from kernel start to agent)\n",
		c.Info.AgentVersion, time.Since(start).Round(time.Millisecond), c.Info.KernelRelease,
		time.Duration(c.Info.BootToReadyNs).Round(time.Millisecond))
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	_, _ = c.Shutdown(sctx, &api.Empty{})
	return nil
}
