package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/podvm/podvm/rootfs/guestimage"
)

const defaultKernelDir = guestimage.DefaultKernelDir

// agentName is the agent binary's name; `make` puts it next to podvm.
const agentName = "podvm-agent"

func runImage(ctx context.Context, e *env, args []string) error {
	return dispatch(ctx, e, "podvm image", []command{
		{name: "build", summary: "build vmlinuz, initrd.img, root.img and image.json", run: runImageBuild},
	}, args)
}

func runImageBuild(ctx context.Context, e *env, args []string) error {
	const name = "podvm image build"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	kernel := fs.String("kernel", "", "Debian kernel package (.deb) or extracted `FILE_OR_DIR` with boot/vmlinuz-<version> and lib/modules/<version>/\n(default: the kernel 'make kernel' built, "+filepath.Join(e.kernelDir, guestimage.BuiltKernelLink)+", else the newest "+filepath.Join(e.kernelDir, "linux-image-*.deb")+", which 'make deps' downloads)")
	kernelVersion := fs.String("kernel-version", "", "kernel `VERSION` to use when the tree holds several")
	agent := fs.String("agent", "", "static podvm-agent binary (`PATH`) to run as /init (default: "+agentName+" next to the podvm binary)")
	output := fs.String("output", guestimage.DefaultOutputDir, "`DIR` to write vmlinuz, initrd.img, root.img (for a kernel that can boot from it) and image.json into")
	modules := fs.String("modules", strings.Join(guestimage.DefaultModules(), ","), "comma-separated kernel `MODULES` for the guest; their dependencies are added,\nbuilt-in ones skipped, '-' and '_' are the same; \"\" for none")
	compress := fs.String("compress", string(guestimage.CompressNone), "initrd compression: `none|gzip`")
	quiet := fs.Bool("quiet", false, "do not report each step on stderr")
	setUsage(fs, name+" [flags]",
		"Builds the guest kernel and initrd: the initrd holds the agent as /init and the kernel\nmodules it loads, in dependency order. For a kernel with virtio-pmem, its pmem driver and\next4 built in and CONFIG_FS_DAX=y, it also builds root.img, the same files as a read-only\next4 image the guest mounts with DAX. Files are replaced atomically.")
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	comp, err := guestimage.ParseCompression(*compress)
	if err != nil {
		return usagef(name, "--compress: %w", err)
	}
	mods := []string{}
	for _, m := range strings.Split(*modules, ",") {
		if m = strings.TrimSpace(m); m != "" {
			mods = append(mods, m)
		}
	}
	if *kernel == "" {
		if *kernel, err = guestimage.FindKernel(e.kernelDir); err != nil {
			return fmt.Errorf("no --kernel given: %w", err)
		}
	}
	if *agent == "" {
		if *agent, err = defaultAgent(e); err != nil {
			return err
		}
	}
	opts := guestimage.Options{
		Kernel:        *kernel,
		KernelVersion: *kernelVersion,
		Agent:         *agent,
		OutputDir:     *output,
		Modules:       mods,
		Compress:      comp,
	}
	if !*quiet {
		opts.Progress = func(s guestimage.Step) { fmt.Fprintf(e.stderr, "%s: %s\n", name, s) }
	}
	m, err := guestimage.Build(ctx, opts)
	if err != nil {
		return err
	}
	names := make([]string, len(m.Modules))
	for i, mod := range m.Modules {
		names[i] = mod.Name
	}
	fmt.Fprintf(e.stdout, "guest image for kernel %s in %s\n", m.KernelVersion, *output)
	fmt.Fprintf(e.stdout, "  initrd: %d bytes (%s), sha256 %s\n", m.InitrdSize, m.Compression, m.InitrdSHA256)
	if m.RootImageSize > 0 {
		fmt.Fprintf(e.stdout, "  root image: %d bytes, sha256 %s\n", m.RootImageSize, m.RootImageSHA256)
	} else {
		fmt.Fprintf(e.stdout, "  root image: none (the kernel cannot mount one from virtio-pmem with DAX); the initrd is the root\n")
	}
	fmt.Fprintf(e.stdout, "  agent:  %s, sha256 %s\n", *agent, m.AgentSHA256)
	fmt.Fprintf(e.stdout, "  modules (%d, in load order): %s\n", len(names), strings.Join(names, " "))
	if len(m.Builtin) > 0 {
		fmt.Fprintf(e.stdout, "  built into the kernel: %s\n", strings.Join(m.Builtin, " "))
	}
	return nil
}

// defaultAgent returns podvm-agent next to the running podvm binary.
func defaultAgent(e *env) (string, error) {
	exe, err := e.executable()
	if err != nil {
		return "", fmt.Errorf("no --agent given and the podvm binary's location is unknown (%w): pass --agent PATH", err)
	}
	if resolved, err := filepath.EvalSymlinks(exe); err == nil {
		exe = resolved
	}
	p := filepath.Join(filepath.Dir(exe), agentName)
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("no --agent given and no %s next to podvm (%s): build it with `make`, or pass --agent PATH", agentName, p)
		}
		return "", fmt.Errorf("agent %s: %w", p, err)
	}
	return p, nil
}
