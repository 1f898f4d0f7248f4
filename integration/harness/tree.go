package harness

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// TreeState is every path under the roots with its mode and, for a regular file, its content
// digest; a root that does not exist is left out, and so is every path skip says to (a
// skipped directory's contents are still walked). Tests take it before and after an install
// and uninstall to prove they leave a tree as it was.
func TreeState(t testing.TB, skip func(path string, d fs.DirEntry) bool, roots ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, top := range roots {
		err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
			if errors.Is(err, fs.ErrNotExist) && p == top {
				return nil
			}
			if err != nil {
				return err
			}
			if skip != nil && skip(p, d) {
				return nil
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			v := info.Mode().String()
			if d.Type().IsRegular() {
				b, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				sum := sha256.Sum256(b)
				v += " " + hex.EncodeToString(sum[:])
			}
			out[p] = v
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// SameTree reports (as test errors) every path whose TreeState differs between before and
// after (what stands for the change between them, e.g. "the install"), and whether none did.
func SameTree(t testing.TB, what string, before, after map[string]string) bool {
	t.Helper()
	same := true
	for p, v := range after {
		if before[p] != v {
			t.Errorf("%s: %q, before %s %q", p, v, what, before[p])
			same = false
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			t.Errorf("%s: gone, it was there before %s", p, what)
			same = false
		}
	}
	return same
}
