// Command gen writes podvm's generated reference pages (go generate ./internal/refdoc).
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/podvm/podvm/internal/refdoc"
)

func main() {
	// go generate runs in internal/refdoc.
	root := filepath.Join("..", "..")
	pages, err := refdoc.Generate(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for p, b := range pages {
		if err := os.WriteFile(filepath.Join(root, p), b, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}
