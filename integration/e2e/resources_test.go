package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// memLimitScript prints the memory limit of the container's own cgroup (v2 or v1).
const memLimitScript = "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"

// testLimits: a container's memory limit is its cgroup's limit, and the machine it runs on (the
// node, or the pod's VM) has at least that much memory.
func testLimits(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("limits", sleeper)
	pod.Spec.Containers[0].Resources = corev1.ResourceRequirements{
		Limits:   corev1.ResourceList{corev1.ResourceMemory: mustQuantity("128Mi"), corev1.ResourceCPU: mustQuantity("500m")},
		Requests: corev1.ResourceList{corev1.ResourceMemory: mustQuantity("128Mi"), corev1.ResourceCPU: mustQuantity("500m")},
	}
	k.run(ctx, t, pod)
	if got := strings.TrimSpace(k.mustExec(ctx, t, "limits", "c", "sh", "-c", memLimitScript)); got != "134217728" {
		t.Errorf("container memory cgroup limit %q, want 134217728 (128Mi)", got)
	}
	memTotal := k.mustExec(ctx, t, "limits", "c", "sh", "-c", "awk '/MemTotal/ {print $2}' /proc/meminfo")
	if kb, err := strconv.Atoi(strings.TrimSpace(memTotal)); err != nil || kb < 128*1024 {
		t.Errorf("MemTotal %q kB, want at least the 128Mi limit", memTotal)
	}
}

// testResize: an in-place resize of the memory limit (pods/resize, 128Mi → 160Mi) reaches the
// container's cgroup without a restart.
func testResize(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("resize", sleeper)
	pod.Spec.Containers[0].Resources = corev1.ResourceRequirements{
		Limits:   corev1.ResourceList{corev1.ResourceMemory: mustQuantity("128Mi"), corev1.ResourceCPU: mustQuantity("500m")},
		Requests: corev1.ResourceList{corev1.ResourceMemory: mustQuantity("128Mi"), corev1.ResourceCPU: mustQuantity("500m")},
	}
	pod.Spec.Containers[0].ResizePolicy = []corev1.ContainerResizePolicy{
		{ResourceName: corev1.ResourceMemory, RestartPolicy: corev1.NotRequired},
		{ResourceName: corev1.ResourceCPU, RestartPolicy: corev1.NotRequired},
	}
	k.run(ctx, t, pod)
	patch, _ := json.Marshal(map[string]any{"spec": map[string]any{"containers": []any{map[string]any{
		"name": "c", "resources": map[string]any{
			"limits":   map[string]string{"memory": "160Mi", "cpu": "500m"},
			"requests": map[string]string{"memory": "160Mi", "cpu": "500m"},
		}}}}})
	if _, err := k.client.CoreV1().Pods(k.ns).Patch(ctx, "resize", types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "resize"); err != nil {
		t.Fatalf("resize: %v", err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	var got string
	for {
		got = strings.TrimSpace(k.mustExec(ctx, t, "resize", "c", "sh", "-c", memLimitScript))
		if got == "167772160" {
			break
		}
		if time.Now().After(deadline) {
			p, _ := k.client.CoreV1().Pods(k.ns).Get(ctx, "resize", metav1.GetOptions{})
			t.Fatalf("memory limit after resize to 160Mi: %s; pod conditions %s; events:\n%s", got, conditions(p), k.events("resize"))
		}
		time.Sleep(time.Second)
	}
	p := k.wait(ctx, t, "resize", time.Minute, running)
	if n := containerStatus(p, "c").RestartCount; n != 0 {
		t.Errorf("resize restarted the container %d times", n)
	}
}

func conditions(p *corev1.Pod) string {
	if p == nil {
		return "?"
	}
	var b strings.Builder
	for _, c := range p.Status.Conditions {
		fmt.Fprintf(&b, "%s=%s(%s: %s) ", c.Type, c.Status, c.Reason, c.Message)
	}
	return b.String()
}

// testDebug: kubectl debug adds an ephemeral container that targets the app container: it
// runs, sees the target's processes, and its log is there.
func testDebug(ctx context.Context, t *testing.T, k *kube) {
	p := k.run(ctx, t, k.pod("debug", "exec sleep 3601"))
	p.Spec.EphemeralContainers = append(p.Spec.EphemeralContainers, corev1.EphemeralContainer{
		EphemeralContainerCommon: corev1.EphemeralContainerCommon{
			Name: "debugger", Image: "docker.io/library/busybox:latest", ImagePullPolicy: corev1.PullIfNotPresent,
			Command: []string{"sh", "-c", "echo debugging; exec sleep 3600"},
		},
		TargetContainerName: "c",
	})
	if _, err := k.client.CoreV1().Pods(k.ns).UpdateEphemeralContainers(ctx, "debug", p, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("add an ephemeral container: %v", err)
	}
	k.wait(ctx, t, "debug", 2*time.Minute, func(p *corev1.Pod) error {
		for _, s := range p.Status.EphemeralContainerStatuses {
			if s.Name == "debugger" && s.State.Running != nil {
				return nil
			}
		}
		return fmt.Errorf("ephemeral container not running: %+v", p.Status.EphemeralContainerStatuses)
	})
	waitLog(ctx, t, k, "debug", "debugger", "debugging")
	if ps := k.mustExec(ctx, t, "debug", "debugger", "ps"); !strings.Contains(ps, "sleep 3601") {
		t.Errorf("the debug container does not see the target's process:\n%s", ps)
	}
}
