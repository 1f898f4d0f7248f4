// Command podvm is podvm's admin CLI: it builds the guest image and (later) checks, installs,
// configures and debugs a node.
//
// Each subcommand lives in a file of its own (image.go, version.go, ...) and is one line in the
// table that commands returns. Exit codes: 0 success, 1 failure, 2 usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/podvm/podvm/shim/config"
)

// command is one subcommand. run gets the arguments after the command's name.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env *env, args []string) error
}

// commands is podvm's subcommand table: add a subcommand with a file and a line here.
func commands() []command {
	return []command{
		{name: "check", summary: "check that this node can run podvm pods", run: runCheck},
		{name: "config", summary: "print the effective node config", run: runConfig},
		{name: "debug", summary: "look into pod VMs: list, console, boot", run: runDebug},
		{name: "image", summary: "build the guest kernel and initrd", run: runImage},
		{name: "install", summary: "install podvm onto this node (or into a staging root)", run: runInstall},
		{name: "uninstall", summary: "remove what podvm install recorded", run: runUninstall},
		{name: "metrics", summary: "serve this node's pod VM metrics for Prometheus", run: runMetrics},
		{name: "node", summary: "the DaemonSet installer: install/uninstall onto a mounted node, build its image", run: runNode},
		{name: "overhead", summary: "measure running pod VMs and print the RuntimeClass overhead", run: runOverhead},
		{name: "version", summary: "print podvm's version", run: runVersion},
	}
}

// env is what commands get from the outside world, replaceable in tests.
type env struct {
	stdout, stderr io.Writer
	// executable returns the path of the running podvm binary (os.Executable).
	executable func() (string, error)
	// kernelDir is where `make deps` puts the guest kernel package.
	kernelDir string
}

// usageError is a mistake in the command line: podvm prints it with a pointer to the usage and
// exits with status 2.
type usageError struct {
	cmd string // e.g. "podvm image build", for "run 'podvm image build -h'"
	err error
}

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usagef(cmd, format string, args ...any) error {
	return &usageError{cmd: cmd, err: fmt.Errorf(format, args...)}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, &env{
		stdout:     os.Stdout,
		stderr:     os.Stderr,
		executable: os.Executable,
		kernelDir:  defaultKernelDir,
	}, os.Args[1:])
	stop()
	os.Exit(code)
}

// run runs the command line args and returns the exit code.
func run(ctx context.Context, e *env, args []string) int {
	err := dispatch(ctx, e, "podvm", commands(), args)
	var ue *usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(e.stderr, "%s: %v\nRun '%s -h' for usage.\n", ue.cmd, ue.err, ue.cmd)
		return 2
	default:
		fmt.Fprintf(e.stderr, "podvm: %v\n", err)
		return 1
	}
}

// dispatch runs the command of table named by args[0]; prefix is the command line so far
// ("podvm", "podvm image"). Commands with subcommands call it again with their own table.
func dispatch(ctx context.Context, e *env, prefix string, table []command, args []string) error {
	if len(args) == 0 {
		printCommands(e.stderr, prefix, table)
		return usagef(prefix, "missing command")
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		printCommands(e.stdout, prefix, table)
		return flag.ErrHelp
	}
	for _, c := range table {
		if c.name == args[0] {
			return c.run(ctx, e, args[1:])
		}
	}
	if strings.HasPrefix(args[0], "-") {
		return usagef(prefix, "unknown flag %s: flags go after the command", args[0])
	}
	var names []string
	for _, c := range table {
		names = append(names, c.name)
	}
	return usagef(prefix, "unknown command %q; commands: %s", args[0], strings.Join(names, ", "))
}

func printCommands(w io.Writer, prefix string, table []command) {
	fmt.Fprintf(w, "Usage: %s COMMAND [ARGS]\n\nCommands:\n", prefix)
	for _, c := range table {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun '%s COMMAND -h' for a command's flags.\n", prefix)
}

// parseFlags parses args with fs and turns its errors into usage errors; -h prints the usage to
// stdout and returns flag.ErrHelp. Positional arguments are refused.
// setUsage gives fs its help text: the synopsis, what the command does, then the flags.
func setUsage(fs *flag.FlagSet, synopsis, description string) {
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: %s\n\n%s\n\nFlags:\n", synopsis, description)
		fs.PrintDefaults()
	}
}

// parseConfig parses a command's flags and loads the node config its --config names.
func parseConfig(e *env, fs *flag.FlagSet, path *string, args []string) (*config.Config, error) {
	if err := parseFlags(e, fs, args); err != nil {
		return nil, err
	}
	return config.Load(*path)
}

func parseFlags(e *env, fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard) // errors are printed once, by run
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(e.stdout)
		fs.Usage()
		return err
	}
	if err != nil {
		return &usageError{cmd: fs.Name(), err: err}
	}
	if fs.NArg() > 0 {
		return usagef(fs.Name(), "unexpected argument %q", fs.Arg(0))
	}
	return nil
}
