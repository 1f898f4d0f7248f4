package installer

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// ImageDist is where the installer image holds the dist tree; its podvm binary,
// ImageDist/usr/bin/podvm, is the entrypoint.
const ImageDist = "/opt/podvm/dist"

// Image builds the installer image: one layer with the dist tree under ImageDist, and
// `podvm node run` as its command. No base image: podvm is static and needs no shell.
// created stamps the layer and config (the dist's commit time makes it reproducible).
func Image(dist, version string, created time.Time) (v1.Image, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(dist, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dist, p)
		if err != nil {
			return err
		}
		return addToLayer(tw, p, path.Join(ImageDist[1:], filepath.ToSlash(rel)), d, created)
	})
	if err != nil {
		return nil, fmt.Errorf("installer image: %w", err)
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Created = "amd64", "linux", v1.Time{Time: created}
	cf.Config.Entrypoint = []string{ImageDist + "/usr/bin/podvm", "node", "run"}
	cf.Config.Labels = map[string]string{"org.opencontainers.image.title": "podvm installer", "org.opencontainers.image.version": version}
	return mutate.ConfigFile(img, cf)
}

// addToLayer writes one file or directory of the dist tree into the layer as name.
func addToLayer(tw *tar.Writer, src, name string, d fs.DirEntry, mtime time.Time) error {
	info, err := d.Info()
	if err != nil {
		return err
	}
	h := &tar.Header{Name: name, Mode: int64(info.Mode().Perm()), ModTime: mtime, Format: tar.FormatPAX}
	switch {
	case d.IsDir():
		h.Typeflag, h.Name = tar.TypeDir, name+"/"
		return tw.WriteHeader(h)
	case !info.Mode().IsRegular():
		return fmt.Errorf("%s is not a regular file", src)
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	h.Typeflag, h.Size = tar.TypeReg, int64(len(data))
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	_, err = tw.Write(data)
	return err
}

// WriteImage writes img as a tarball (docker save / containerd ctr import format) tagged ref.
func WriteImage(path, ref string, img v1.Image) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return fmt.Errorf("image tag %q: %w", ref, err)
	}
	return tarball.WriteToFile(path, tag, img)
}
