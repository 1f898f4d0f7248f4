package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// testDeployment: a Deployment of 3 replicas with a readiness probe becomes 3 Ready; its
// deletion takes every pod away.
func testDeployment(ctx context.Context, t *testing.T, k *kube) {
	tmpl := k.pod("web", httpdScript("web"))
	tmpl.Spec.Containers[0].ReadinessProbe = &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/index.html", Port: intstr(8080)}},
		PeriodSeconds: 1,
	}
	labels := map[string]string{"app": "web"}
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: k.ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr[int32](3),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: tmpl.Spec},
		},
	}
	deps := k.client.AppsV1().Deployments(k.ns)
	start := time.Now()
	if _, err := deps.Create(ctx, d, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.deleteDeployment(t, "web", labels) })
	wctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for {
		got, err := deps.Get(wctx, "web", metav1.GetOptions{})
		if err == nil && got.Status.ReadyReplicas == 3 {
			break
		}
		select {
		case <-wctx.Done():
			t.Fatalf("deployment web: %d of 3 ready after 5m (%v)", got.Status.ReadyReplicas, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	k.measure("Deployment 3 Ready", time.Since(start))
	start = time.Now()
	k.deleteDeployment(t, "web", labels)
	k.measure("Deployment 3 deleted", time.Since(start))
}

// deleteDeployment deletes a deployment in the foreground and waits until no pod of it is left.
func (k *kube) deleteDeployment(t *testing.T, name string, labels map[string]string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	fg := metav1.DeletePropagationForeground
	_ = k.client.AppsV1().Deployments(k.ns).Delete(ctx, name, metav1.DeleteOptions{PropagationPolicy: &fg})
	sel := metav1.FormatLabelSelector(&metav1.LabelSelector{MatchLabels: labels})
	for {
		pods, err := k.client.CoreV1().Pods(k.ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err == nil && len(pods.Items) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Errorf("deployment %s: pods left 3m after delete: %v", name, describe(pods))
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func describe(pods *corev1.PodList) string {
	if pods == nil {
		return "?"
	}
	s := ""
	for _, p := range pods.Items {
		s += fmt.Sprintf("%s(%s) ", p.Name, p.Status.Phase)
	}
	return s
}
