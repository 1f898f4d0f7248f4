package installer

import (
	"archive/tar"
	"errors"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// TestImage: the image holds the dist tree under ImageDist, runs `podvm node run`, and the
// tarball reads back as the same image; the same tree and time give the same digest.
func TestImage(t *testing.T) {
	dist := distTree(t)
	created := time.Unix(1_700_000_000, 0).UTC()
	img, err := Image(dist, "v-test", created)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if ep := cf.Config.Entrypoint; len(ep) != 3 || ep[0] != ImageDist+"/usr/bin/podvm" || ep[1] != "node" || ep[2] != "run" {
		t.Errorf("entrypoint %v", ep)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %v %v", layers, err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		files[h.Name] = string(b)
	}
	for rel, body := range listing(t, dist) {
		if body == "/" {
			continue
		}
		if got := files["opt/podvm/dist/"+rel]; got != body {
			t.Errorf("image %s = %q, want %q", rel, got, body)
		}
	}

	out := filepath.Join(t.TempDir(), "installer.tar")
	if err := WriteImage(out, "podvm.test/podvm-installer:v-test", img); err != nil {
		t.Fatal(err)
	}
	back, err := tarball.ImageFromPath(out, nil)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := Image(dist, "v-test", created)
	d1, _ := img.Digest()
	d2, _ := back.Digest()
	d3, _ := again.Digest()
	if d1 != d2 || d1 != d3 {
		t.Errorf("digests %s (built), %s (read back), %s (rebuilt): want one", d1, d2, d3)
	}
	if err := WriteImage(out, "Not A Ref", img); err == nil {
		t.Error("a bad tag was accepted")
	}
}
