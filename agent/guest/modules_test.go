package guest

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// A kernel with everything built in comes with an empty module list, or none: init must go on.
func TestLoadModulesNothingToLoad(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.modules")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	comments := filepath.Join(dir, "comments.modules")
	if err := os.WriteFile(comments, []byte("# built in\n\n  \n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(dir, "missing.modules"), empty, comments} {
		n, err := LoadModules(context.Background(), p)
		if err != nil || n != 0 {
			t.Errorf("LoadModules(%s) = %d, %v; want 0, nil", filepath.Base(p), n, err)
		}
	}
}

func TestLoadModulesMissingModule(t *testing.T) {
	list := filepath.Join(t.TempDir(), "podvm.modules")
	if err := os.WriteFile(list, []byte("/nonexistent/virtio_blk.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if n, err := LoadModules(context.Background(), list); err == nil || n != 0 {
		t.Errorf("LoadModules with a missing module = %d, %v; want 0 and an error", n, err)
	}
}
