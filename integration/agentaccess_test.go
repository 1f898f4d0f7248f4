package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// TestPodvmContainerCannotReachAgent: a process in a pod's container, unprivileged and under
// no seccomp profile (Kubernetes' default), dials the guest agent's vsock port through the
// guest's vsock loopback, as any process in the guest can. The agent, which runs the pod's
// containers as root, must not serve it: only the host may drive the agent. The probe first
// checks that vsock loopback works in its container at all, so a refusal is the agent's.
// (Where the host has no vhost-vsock, as on the test machines, the agent is told to use
// virtio-serial and has no vsock listener; with one, it refuses every connection but the
// host's: TestHostOnlyServesOnlyTheHost.)
func TestPodvmContainerCannotReachAgent(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	opts := podvmOptions(t)
	img, err := harness.BuildProbeImage(ctx, "/bin/busybox", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	opts.ExtraImages = map[string]v1.Image{harness.ProbeImage: img}
	env := harness.Start(t, opts)
	podCfg := env.PodSandboxConfig(harness.PodOptions{Name: "agentprobe", Namespace: "it", Handler: "podvm"})
	pod := runPodConfig(t, ctx, env, podCfg, "podvm")
	if _, err := env.PullImage(ctx, harness.ProbeImage, podCfg); err != nil {
		t.Fatal(err)
	}
	cfg := env.ContainerConfig(harness.ContainerOptions{Name: "probe", Image: harness.ProbeImage, Command: []string{"sleep", "3600"}})
	cfg.Linux.SecurityContext.RunAsUser = &runtimeapi.Int64Value{Value: 65534}
	id := startContainer(t, ctx, env, pod, cfg)

	code, out, errOut := volSh(ctx, t, env, id, "id -u; /agentprobe")
	t.Logf("probe (exit %d):\n%s\n%s", code, out, errOut)
	if code != 0 || !strings.Contains(out, "control: vsock loopback works") {
		t.Fatalf("the probe could not test vsock from the container: exit %d, %q %q", code, out, errOut)
	}
	if !strings.HasPrefix(out, "65534\n") {
		t.Errorf("the probe ran as %q, want uid 65534", strings.SplitN(out, "\n", 2)[0])
	}
	if strings.Contains(out, "answered") || !strings.Contains(out, "refused cid 1:") {
		t.Errorf("a container's process reached the guest agent over vsock:\n%s", out)
	}
	stopAndRemovePod(t, ctx, env, pod.ID)
	env.AssertNoLeaks(t)
}
