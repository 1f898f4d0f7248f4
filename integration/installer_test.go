package integration

import (
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/deploy/installer"
	"github.com/podvm/podvm/integration/harness"
)

// installerRef is where the test registry serves the installer image.
const installerRef = "podvm.test/podvm-installer:it"

// TestInstallerImage runs the DaemonSet installer's image as kubelet would run the
// DaemonSet's pod (through containerd's CRI, pulled from the test registry), with a
// directory of the test as the node's / instead of the real one, no containerd restart and
// no node label: the image's `podvm node run` installs the dist tree there and, stopped with
// SIGTERM, leaves the directory as it found it. (The real-node path, a kubelet deploying the
// DaemonSet, needs the Kubernetes harness.)
func TestInstallerImage(t *testing.T) {
	require(t, needRoot())
	dist := stageDist(t)
	img, err := installer.Image(dist, "it", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	env := harness.Start(t, harness.Options{ExtraImages: map[string]v1.Image{installerRef: img}})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	host := t.TempDir()
	for _, d := range []string{"etc", "usr/bin", "var/lib"} {
		if err := os.MkdirAll(filepath.Join(host, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	before := treeListing(t, host)
	pod := runPod(ctx, t, env, "", "installer")
	if _, err := env.PullImage(ctx, installerRef, pod.Config); err != nil {
		t.Fatal(err)
	}
	id, logPath, err := env.CreateContainer(ctx, pod, harness.ContainerOptions{Name: "installer", Image: installerRef,
		Args:   []string{"--host-root", "/host", "--restart-containerd=none"},
		Mounts: []*runtimeapi.Mount{{ContainerPath: "/host", HostPath: host}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Runtime.StartContainer(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := harness.WaitLog(ctx, logPath, "stdout", "uninstalling on SIGTERM"); err != nil {
		t.Fatalf("installer did not report its install: %v", err)
	}
	installed := treeListing(t, host)
	for rel := range treeListing(t, dist) {
		if _, ok := installed[rel]; !ok {
			t.Errorf("%s not installed", rel)
		}
	}
	if err := env.Runtime.StopContainer(ctx, id, 30); err != nil {
		t.Fatal(err)
	}
	st, err := env.WaitContainerState(ctx, id, runtimeapi.ContainerState_CONTAINER_EXITED)
	if err != nil {
		t.Fatal(err)
	}
	if st.GetExitCode() != 0 {
		lines, _ := harness.ReadContainerLog(logPath)
		t.Fatalf("installer exited %d:\n%s", st.GetExitCode(), harness.StreamText(lines, "stderr"))
	}
	after := treeListing(t, host)
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("left on the node after the installer stopped: %s", p)
		}
	}
	removePod(ctx, t, env, pod)
	env.AssertNoLeaks(t)
}

// stageDist writes the dist tree (as make dist does) with the test's podvm binaries and guest
// image.
func stageDist(t *testing.T) string {
	t.Helper()
	bin, img := os.Getenv("PODVM_BIN"), os.Getenv("PODVM_IMAGE_DIR")
	require(t, needFile(filepath.Join(bin, "podvm")), needFile(filepath.Join(bin, "containerd-shim-podvm-v2")), needFile(img))
	dist := t.TempDir()
	out, err := exec.Command(filepath.Join(bin, "podvm"), "install", "--root", dist, "--prefix", "/usr", "--image", img).CombinedOutput()
	if err != nil {
		t.Fatalf("podvm install --root: %v\n%s", err, out)
	}
	return dist
}

// treeListing is the set of paths under root.
func treeListing(t *testing.T, root string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	err := filepath.WalkDir(root, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		out[rel] = true
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
