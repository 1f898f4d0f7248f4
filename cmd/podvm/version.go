package main

import (
	"context"
	"flag"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/podvm/podvm/version"
)

func runVersion(_ context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("podvm version", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: podvm version\n\nPrints podvm's version, VCS revision and Go version.\n")
	}
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	// The Makefile sets version.Version; a plain `go install` leaves "dev" and the module version.
	v, revision := version.Version, ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					revision += "-dirty"
				}
			}
		}
	}
	fmt.Fprintf(e.stdout, "podvm %s\n", v)
	if revision != "" {
		fmt.Fprintf(e.stdout, "revision %s\n", revision)
	}
	fmt.Fprintf(e.stdout, "%s %s/%s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return nil
}
