package integration

import (
	"context"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// TestRuncPodLifecycle runs the pod lifecycle against containerd's own runc runtime. It proves the
// harness and pins the behaviour podvm has to reproduce.
func TestRuncPodLifecycle(t *testing.T) {
	env := harness.Start(t, harness.Options{})
	testPodLifecycle(t, env, "runc")
	env.AssertNoLeaks(t)
}

// TestRuncTeardownWithRunningPod leaves a pod with a running container behind, as a failing test
// would, and checks that the harness's teardown removes everything.
func TestRuncTeardownWithRunningPod(t *testing.T) {
	env := harness.Start(t, harness.Options{})
	ctx := t.Context()
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "left-behind", Handler: "runc"})
	id, _, err := env.CreateContainer(ctx, pod, harness.ContainerOptions{Command: []string{"sleep", "3600"}})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := env.Runtime.StartContainer(sctx, id); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	if _, err := env.WaitContainerState(sctx, id, runtimeapi.ContainerState_CONTAINER_RUNNING); err != nil {
		t.Fatal(err)
	}
	env.AssertNoLeaks(t)
}
