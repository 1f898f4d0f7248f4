package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/podvm/podvm/deploy/installer"
	"github.com/podvm/podvm/version"
)

// runNode dispatches `podvm node install|uninstall|run|image`: the DaemonSet installer.
func runNode(ctx context.Context, e *env, args []string) error {
	return dispatch(ctx, e, "podvm node", []command{
		{name: "install", summary: "install the dist tree onto the node mounted at --host-root", run: runNodeInstall},
		{name: "uninstall", summary: "undo what 'podvm node install' did", run: runNodeUninstall},
		{name: "run", summary: "install, wait for SIGTERM, uninstall (the DaemonSet's command)", run: runNodeRun},
		{name: "image", summary: "build the installer's OCI image from a dist tree", run: runNodeImage},
	}, args)
}

// nodeFlags are the flags of install, uninstall and run.
type nodeFlags struct {
	hostRoot, hostRootPath, dist, nodeName, restart string
}

// Ways to make containerd load the drop-in (--restart-containerd).
const (
	restartSystemctl = "systemctl"
	restartSignal    = "signal"
	restartNone      = "none"
)

func (f *nodeFlags) register(fs *flag.FlagSet, e *env) {
	fs.StringVar(&f.hostRoot, "host-root", "/host", "the node's / is mounted at `DIR`")
	fs.StringVar(&f.hostRootPath, "host-root-path", "/", "what --host-root is on the node (`PATH`): / on a real node; another directory installs\npodvm under it, and the installed files name their paths there (containerd's config is\nPATH/etc/containerd/config.toml)")
	fs.StringVar(&f.dist, "dist", defaultDist(e), "the dist tree to install (`DIR`; default: the tree this podvm binary is in, DIR/usr/bin/podvm)")
	fs.StringVar(&f.nodeName, "node-name", os.Getenv("NODE_NAME"), "label the Kubernetes node `NAME` podvm.io/runtime=true through the in-cluster API (default $NODE_NAME; empty: no label)")
	fs.StringVar(&f.restart, "restart-containerd", restartSystemctl, "how containerd loads the drop-in (`HOW`): systemctl (systemctl restart containerd,\nchrooted into --host-root), signal (SIGTERM to the containerd that reads the config, for a\nsupervisor that restarts it on exit such as systemd's Restart=always; needs hostPID), none")
}

// defaultDist is the dist tree podvm runs from: <dist>/usr/bin/podvm.
func defaultDist(e *env) string {
	self, err := e.executable()
	if err != nil {
		return ""
	}
	return filepath.Dir(filepath.Dir(filepath.Dir(self)))
}

func (f *nodeFlags) installer() *installer.Installer {
	in := &installer.Installer{HostRoot: f.hostRoot, DistRoot: f.dist, NodeRoot: f.hostRootPath}
	switch f.restart {
	case restartSystemctl:
		in.RestartContainerd = func(ctx context.Context) error { return restartContainerd(ctx, f.hostRoot) }
	case restartSignal:
		config := in.NodePath(installer.ContainerdConfig)
		in.RestartContainerd = func(ctx context.Context) error {
			return installer.SignalContainerd(ctx, "/proc", config, time.Minute)
		}
	}
	if f.nodeName != "" {
		in.Label = func(ctx context.Context, on bool) error { return labelNode(ctx, f.nodeName, on) }
	}
	return in
}

const nodeDescription = "Installs podvm from a dist tree (make dist) onto a node whose / is mounted at --host-root:\nits files (the node config only if the node has none), an imports line in containerd's\nconfig when needed, a manifest in /var/lib/podvm/installed.json; then makes containerd load\nthe drop-in (--restart-containerd) and labels the node podvm.io/runtime=true. Uninstall\nundoes exactly that (keeping a node config the admin changed)."

func parseNode(e *env, name, synopsis string, args []string) (*nodeFlags, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var f nodeFlags
	f.register(fs, e)
	setUsage(fs, synopsis, nodeDescription)
	if err := parseFlags(e, fs, args); err != nil {
		return nil, err
	}
	if f.dist == "" {
		return nil, usagef(name, "--dist: give the dist tree (make dist writes _output/dist/root)")
	}
	switch f.restart {
	case restartSystemctl, restartSignal, restartNone:
	default:
		return nil, usagef(name, "--restart-containerd=%q: use systemctl, signal or none", f.restart)
	}
	if !filepath.IsAbs(f.hostRootPath) {
		return nil, usagef(name, "--host-root-path=%q: give an absolute path on the node, / for the node's root", f.hostRootPath)
	}
	return &f, nil
}

func runNodeInstall(ctx context.Context, e *env, args []string) error {
	f, err := parseNode(e, "podvm node install", "podvm node install [flags]", args)
	if err != nil {
		return err
	}
	if err := f.installer().Install(ctx); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "podvm node: installed %s onto %s\n", f.dist, f.hostRoot)
	return nil
}

func runNodeUninstall(ctx context.Context, e *env, args []string) error {
	f, err := parseNode(e, "podvm node uninstall", "podvm node uninstall [flags]", args)
	if err != nil {
		return err
	}
	if err := f.installer().Uninstall(ctx); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "podvm node: uninstalled from %s\n", f.hostRoot)
	return nil
}

// runNodeRun is the DaemonSet pod's life: install, then uninstall when the pod is stopped
// (the DaemonSet deleted, or the node drained of it).
func runNodeRun(ctx context.Context, e *env, args []string) error {
	f, err := parseNode(e, "podvm node run", "podvm node run [flags]", args)
	if err != nil {
		return err
	}
	in := f.installer()
	if err := in.Install(ctx); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "podvm node: installed %s onto %s; uninstalling on SIGTERM\n", f.dist, f.hostRoot)
	<-ctx.Done()
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 50*time.Second)
	defer cancel()
	if err := in.Uninstall(uctx); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "podvm node: uninstalled from %s\n", f.hostRoot)
	return nil
}

// restartContainerd runs the node's systemctl, chrooted into its root.
func restartContainerd(ctx context.Context, hostRoot string) error {
	cmd := exec.CommandContext(ctx, "/usr/bin/systemctl", "restart", "containerd")
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: hostRoot}
	cmd.Dir = "/"
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("systemctl restart containerd (in %s): %w: %s", hostRoot, err, out)
	}
	return nil
}

// runNodeImage builds the installer's OCI image from a dist tree, without Docker.
func runNodeImage(_ context.Context, e *env, args []string) error {
	const name = "podvm node image"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	dist := fs.String("dist", "", "the dist tree (`DIR`; make dist writes _output/dist/root)")
	out := fs.String("output", "", "write the image tarball to `FILE` (ctr images import, crane push, or a registry's push)")
	tag := fs.String("tag", "podvm-installer:"+version.Version, "the image's `REF`")
	epoch := fs.Int64("created", 0, "image timestamp, Unix `SECONDS` (default: now; make passes the commit time)")
	setUsage(fs, name+" [flags]",
		"Builds the DaemonSet installer image: the dist tree under "+installer.ImageDist+" and\n'podvm node run' as its entrypoint, in one layer on no base image (podvm is static).")
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	if *dist == "" || *out == "" {
		return usagef(name, "--dist and --output are required")
	}
	if _, err := os.Stat(filepath.Join(*dist, "usr/bin/podvm")); err != nil {
		return fmt.Errorf("--dist %s: %w (it must hold usr/bin/podvm: run 'make dist')", *dist, err)
	}
	created := time.Now().UTC()
	if *epoch > 0 {
		created = time.Unix(*epoch, 0).UTC()
	}
	img, err := installer.Image(*dist, version.Version, created)
	if err != nil {
		return err
	}
	if err := installer.WriteImage(*out, *tag, img); err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "podvm node image: %s (%s) in %s\n", *tag, d, *out)
	return nil
}
