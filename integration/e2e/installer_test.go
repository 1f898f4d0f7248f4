package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/podvm/podvm/deploy"
	"github.com/podvm/podvm/deploy/installer"
	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/integration/k8s"
)

// installerNS is the namespace deploy/installer.yaml creates.
const installerNS = "podvm-system"

// TestInstallerDaemonSet is the kata-deploy path end to end: the installer image (built with
// `podvm node image` from the dist tree, as make installer-image does) is pushed to a registry
// the test runs on 127.0.0.1 inside the node's network namespace, and deploy/installer.yaml
// is applied as shipped but for what a user patches: the image, the host root (a directory
// of the test instead of the node's /, so the machine's / is never written), the way to
// restart containerd (signal: this machine has no systemd, so the harness supervises
// containerd as systemd's Restart=always would) and the API server's address (no kube-proxy
// runs here, so the kubernetes Service's ClusterIP leads nowhere). The node starts without
// podvm: no podvm runtime in containerd, no shim on its PATH, no podvm.io/runtime label.
// The installer must install, make containerd load the drop-in and label the node; a pod
// with the shipped RuntimeClass then runs in a VM; deleting the DaemonSet must undo all of it.
func TestInstallerDaemonSet(t *testing.T) {
	ctx := suiteContext(t)
	opts := options(t)
	root := nodeRoot(t)
	opts.ShimDir, opts.PodvmConfigPath, opts.NoPodvmRuntime = "", "", true
	opts.ConfigFile = filepath.Join(root, installer.ContainerdConfig)
	// The installed default config keeps pod state in the node's /run/podvm.
	opts.LeakDirs = []string{"/run/podvm"}
	keepAccelCache(t)
	env := harness.Start(t, opts)
	stopSupervisor := env.Supervise(t)
	t.Cleanup(stopSupervisor)
	ref := serveInstallerImage(ctx, t, env)
	cl := k8s.StartWith(ctx, t, env, k8s.Options{NoPodvmLabel: true})
	before := harness.TreeState(t, nil, root)
	if rt := criRuntimes(ctx, t, env); rt["podvm"] != nil {
		t.Fatalf("containerd has a podvm runtime before the install: %+v", rt["podvm"])
	}

	start := time.Now()
	objs := installerObjects(t, ref, root, cl.NodeIP.String())
	applyObjects(ctx, t, cl, objs)
	waitNodeLabel(ctx, t, cl, true)
	t.Logf("DaemonSet applied → node labelled %s=true: %v", deploy.NodeLabel, time.Since(start).Round(time.Millisecond))
	rt := criRuntimes(ctx, t, env)["podvm"]
	if rt == nil || rt.RuntimePath != filepath.Join(root, installer.ShimPath) || rt.RuntimeType != "io.containerd.podvm.v2" {
		t.Fatalf("containerd's podvm runtime after the install: %+v", rt)
	}

	// A subtest: its pod's clean-up runs while the cluster is up.
	t.Run("podvm_pod", func(t *testing.T) { runPodvmPod(ctx, t, cl, env, root) })

	start = time.Now()
	deleteDaemonSet(ctx, t, cl)
	waitNodeLabel(ctx, t, cl, false)
	t.Logf("DaemonSet deleted → installer pod gone, label removed: %v", time.Since(start).Round(time.Millisecond))
	if after := harness.TreeState(t, nil, root); !harness.SameTree(t, "the install", before, after) {
		t.Error("the node's root differs from before the install")
	}
	if rt := criRuntimes(ctx, t, env); rt["podvm"] != nil {
		t.Errorf("containerd still has a podvm runtime after the uninstall: %+v", rt["podvm"])
	}
	deleteObjects(ctx, t, cl, objs)
	stopSupervisor()
	cl.AssertNoLeaks(t)
}

// nodeRoot makes the directory that stands for the node's / in this test: the directories
// every node has, and containerd's config directory.
func nodeRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"etc/containerd", "usr/bin", "usr/share", "var/lib"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// keepAccelCache removes, at the end, the accelerator probe's cache and the start slots that
// pods under the installed default config (accel "auto", state in /run/podvm) make, unless
// they were there before: the machine is left as it was.
func keepAccelCache(t *testing.T) {
	t.Helper()
	const dir = "/run/podvm"
	_, dirErr := os.Stat(dir)
	existed := map[string]bool{}
	for _, f := range []string{"accel.json", "accel.lock", "start-slots"} {
		_, err := os.Stat(filepath.Join(dir, f))
		existed[f] = err == nil
	}
	t.Cleanup(func() {
		for f, was := range existed {
			if !was {
				_ = os.RemoveAll(filepath.Join(dir, f))
			}
		}
		if errors.Is(dirErr, fs.ErrNotExist) {
			_ = os.Remove(dir) // only when empty
		}
	})
}

// serveInstallerImage builds the installer image from a dist tree of the test's binaries
// (as make dist and make installer-image do), runs a registry on 127.0.0.1 in the node's
// network namespace and pushes the image there. containerd pulls from a loopback registry
// with a port over plain HTTP without any hosts.toml (its default for localhost), so the
// reference needs no registry configuration on the node.
func serveInstallerImage(ctx context.Context, t *testing.T, env *harness.Env) string {
	t.Helper()
	bin, img := os.Getenv("PODVM_BIN"), os.Getenv("PODVM_IMAGE_DIR")
	dist, tar := t.TempDir(), filepath.Join(t.TempDir(), "installer.tar")
	podvm := filepath.Join(bin, "podvm")
	for _, args := range [][]string{
		{"install", "--root", dist, "--prefix", "/usr", "--image", img},
		{"node", "image", "--dist", dist, "--output", tar, "--tag", "podvm-installer:e2e"},
	} {
		if out, err := exec.CommandContext(ctx, podvm, args...).CombinedOutput(); err != nil {
			t.Fatalf("podvm %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	image, err := tarball.ImageFromPath(tar, nil)
	if err != nil {
		t.Fatal(err)
	}
	l, err := env.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	regLog, err := os.Create(filepath.Join(env.Dir, "installer-registry.log"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(regLog, "registry: ", log.LstdFlags))), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); _ = regLog.Close() })
	ref := l.Addr().String() + "/podvm/installer:e2e"
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{DialContext: env.DialContext}
	defer tr.CloseIdleConnections()
	if err := remote.Write(r, image, remote.WithContext(ctx), remote.WithTransport(tr)); err != nil {
		t.Fatalf("push the installer image: %v", err)
	}
	return ref
}

// installerObjects decodes deploy/installer.yaml and patches what a user of this node would:
// the image; the host root, which is root here (hostPath and --host-root-path); containerd
// restarted by signal, its supervisor bringing it back; and the API server's address, since
// without kube-proxy the kubernetes Service's ClusterIP is not routed.
func installerObjects(t *testing.T, ref, root, apiHost string) []runtime.Object {
	t.Helper()
	var objs []runtime.Object
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(deploy.InstallerManifest), 4096)
	for {
		var raw runtime.RawExtension
		if err := dec.Decode(&raw); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("deploy/installer.yaml: %v", err)
		}
		if len(bytes.TrimSpace(raw.Raw)) == 0 {
			continue
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(raw.Raw, nil, nil)
		if err != nil {
			t.Fatalf("deploy/installer.yaml: %v", err)
		}
		if ds, ok := obj.(*appsv1.DaemonSet); ok {
			patchDaemonSet(t, ds, ref, root, apiHost)
		}
		objs = append(objs, obj)
	}
	return objs
}

func patchDaemonSet(t *testing.T, ds *appsv1.DaemonSet, ref, root, apiHost string) {
	t.Helper()
	spec := &ds.Spec.Template.Spec
	if len(spec.Containers) != 1 || len(spec.Volumes) != 1 || spec.Volumes[0].HostPath == nil || spec.Volumes[0].HostPath.Path != "/" {
		t.Fatalf("deploy/installer.yaml: the DaemonSet is not one container with the node's / as its one volume: %+v", spec)
	}
	spec.Volumes[0].HostPath.Path = root
	c := &spec.Containers[0]
	c.Image = ref
	c.Args = append(c.Args, "--host-root-path="+root, "--restart-containerd=signal")
	c.Env = append(c.Env, corev1.EnvVar{Name: "KUBERNETES_SERVICE_HOST", Value: apiHost},
		corev1.EnvVar{Name: "KUBERNETES_SERVICE_PORT", Value: "6443"})
}

func applyObjects(ctx context.Context, t *testing.T, cl *k8s.Cluster, objs []runtime.Object) {
	t.Helper()
	c := cl.Client
	for _, obj := range objs {
		var err error
		switch o := obj.(type) {
		case *corev1.Namespace:
			_, err = c.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
		case *corev1.ServiceAccount:
			_, err = c.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRole:
			_, err = c.RbacV1().ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRoleBinding:
			_, err = c.RbacV1().ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
		case *appsv1.DaemonSet:
			_, err = c.AppsV1().DaemonSets(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		default:
			t.Fatalf("deploy/installer.yaml: unexpected %T", obj)
		}
		if err != nil {
			t.Fatalf("apply %T: %v", obj, err)
		}
	}
}

// deleteObjects deletes what applyObjects created but the DaemonSet (deleteDaemonSet did).
func deleteObjects(ctx context.Context, t *testing.T, cl *k8s.Cluster, objs []runtime.Object) {
	t.Helper()
	c := cl.Client
	for _, obj := range objs {
		var err error
		switch o := obj.(type) {
		case *rbacv1.ClusterRole:
			err = c.RbacV1().ClusterRoles().Delete(ctx, o.Name, metav1.DeleteOptions{})
		case *rbacv1.ClusterRoleBinding:
			err = c.RbacV1().ClusterRoleBindings().Delete(ctx, o.Name, metav1.DeleteOptions{})
		case *corev1.Namespace:
			err = c.CoreV1().Namespaces().Delete(ctx, o.Name, metav1.DeleteOptions{})
		}
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete %T: %v", obj, err)
		}
	}
}

// waitNodeLabel waits until the node has (on) or lacks the label podvm.io/runtime=true; on
// timeout it fails with the installer pods' logs and events.
func waitNodeLabel(ctx context.Context, t *testing.T, cl *k8s.Cluster, on bool) {
	t.Helper()
	deadline := time.Now().Add(4 * time.Minute)
	for {
		n, err := cl.Client.CoreV1().Nodes().Get(ctx, k8s.NodeName, metav1.GetOptions{})
		if err == nil && (n.Labels[deploy.NodeLabel] == "true") == on {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node label %s=true present=%v, want %v (err %v)\n%s", deploy.NodeLabel, !on, on, err, installerDiagnostics(cl))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// installerDiagnostics are the installer pods' states, logs and events.
func installerDiagnostics(cl *k8s.Cluster) string {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var b strings.Builder
	pods, err := cl.Client.CoreV1().Pods(installerNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	for _, p := range pods.Items {
		fmt.Fprintf(&b, "pod %s: phase %s %+v\n", p.Name, p.Status.Phase, p.Status.ContainerStatuses)
		logs, err := cl.Client.CoreV1().Pods(installerNS).GetLogs(p.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
		fmt.Fprintf(&b, "logs (%v):\n%s\n", err, logs)
	}
	evs, err := cl.Client.CoreV1().Events(installerNS).List(ctx, metav1.ListOptions{})
	if err == nil {
		for _, e := range evs.Items {
			fmt.Fprintf(&b, "  %s %s %s (x%d): %s\n", e.InvolvedObject.Name, e.Type, e.Reason, e.Count, e.Message)
		}
	}
	return b.String()
}

// runPodvmPod runs a busybox pod of RuntimeClass podvm (the shipped one, its nodeSelector
// satisfied only by the installer's label) and checks that the installed shim runs it.
func runPodvmPod(ctx context.Context, t *testing.T, cl *k8s.Cluster, env *harness.Env, root string) {
	t.Helper()
	k := &kube{rc: "podvm", ns: "e2e-installer", client: cl.Client, config: cl.Config, timing: newTimings(), env: env, nodeIP: cl.NodeIP.String()}
	if _, err := cl.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: k.ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	k.waitServiceAccount(ctx, t)
	start := time.Now()
	k.run(ctx, t, k.pod("vm", "echo hello from the installed podvm; exec sleep 3600"))
	t.Logf("podvm pod apply → Running: %v", time.Since(start).Round(time.Millisecond))
	if out := k.mustExec(ctx, t, "vm", "c", "cat", "/proc/cpuinfo"); !strings.Contains(out, "QEMU") && !strings.Contains(out, "hypervisor") {
		t.Errorf("the pod's /proc/cpuinfo shows no VM:\n%s", out)
	}
	shim := filepath.Join(root, installer.ShimPath)
	if n := processesOf(shim); n != 1 {
		t.Errorf("%d processes of the installed shim %s, want 1", n, shim)
	}
	if _, err := k.delete(ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	if err := cl.Client.CoreV1().Namespaces().Delete(ctx, k.ns, metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
}

// processesOf counts the processes running the binary exe.
func processesOf(exe string) int {
	entries, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe")); err == nil && target == exe {
			n++
		}
	}
	return n
}

// deleteDaemonSet deletes the installer's DaemonSet and waits until its pods are gone: they
// uninstall when stopped.
func deleteDaemonSet(ctx context.Context, t *testing.T, cl *k8s.Cluster) {
	t.Helper()
	fg := metav1.DeletePropagationForeground
	if err := cl.Client.AppsV1().DaemonSets(installerNS).Delete(ctx, "podvm-installer", metav1.DeleteOptions{PropagationPolicy: &fg}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		pods, err := cl.Client.CoreV1().Pods(installerNS).List(ctx, metav1.ListOptions{})
		if err == nil && len(pods.Items) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("installer pods still there 3m after the DaemonSet was deleted (%v)\n%s", err, installerDiagnostics(cl))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// criRuntimes are the runtimes of containerd's CRI config (from the verbose Status), by name.
func criRuntimes(ctx context.Context, t *testing.T, env *harness.Env) map[string]*criRuntime {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := env.Runtime.Status(cctx, true)
		cancel()
		if err == nil {
			var cfg struct {
				Containerd struct {
					Runtimes map[string]*criRuntime `json:"runtimes"`
				} `json:"containerd"`
			}
			if err := json.Unmarshal([]byte(st.GetInfo()["config"]), &cfg); err != nil {
				t.Fatalf("CRI status config: %v", err)
			}
			return cfg.Containerd.Runtimes
		}
		if time.Now().After(deadline) { // containerd restarting: its supervisor brings it back
			t.Fatalf("CRI Status: %v", err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

type criRuntime struct {
	RuntimeType string `json:"runtimeType"`
	RuntimePath string `json:"runtimePath"`
}
