package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/podvm/podvm/shim/config"
)

func runConfig(_ context.Context, e *env, args []string) error {
	const name = "podvm config"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	path := configFlag(fs)
	setUsage(fs, name+" [flags]",
		"Prints the effective node config as TOML: the config file with every key it leaves out\nset to its default. Exits 1 if the file does not load.")
	c, err := parseConfig(e, fs, path, args)
	if err != nil {
		return err
	}
	b, err := c.TOML()
	if err != nil {
		return err
	}
	if c.Path == "" {
		fmt.Fprintf(e.stdout, "# podvm node config: built-in defaults (no %s)\n\n", config.DefaultPath)
	} else {
		fmt.Fprintf(e.stdout, "# podvm node config: %s, with defaults for the keys it leaves out\n\n", c.Path)
	}
	_, err = e.stdout.Write(b)
	return err
}

// configFlag adds --config to fs; its default follows the shim's choice without a runtime
// option: $PODVM_CONFIG, else /etc/podvm/config.toml.
func configFlag(fs *flag.FlagSet) *string {
	return fs.String("config", config.ResolvePath(""),
		"node config `FILE`; $"+config.EnvPath+" changes the default (the shim takes containerd's runtime option ConfigPath first)")
}
