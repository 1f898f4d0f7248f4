package k8s

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"github.com/podvm/podvm/deploy"
)

// serviceCIDR is the cluster's service range (no kube-proxy runs: Services have no data path).
const serviceCIDR = "10.96.0.0/24"

func (c *Cluster) startControlPlane(ctx context.Context) error {
	p := c.pki.path
	d := c.Dir
	if _, err := c.startProcess("etcd", "--name=e2e", "--data-dir="+filepath.Join(d, "etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=e2e=http://127.0.0.1:2380", "--listen-metrics-urls=http://127.0.0.1:2381",
		"--log-level=warn"); err != nil {
		return err
	}
	if _, err := c.startProcess("kube-apiserver",
		"--etcd-servers=http://127.0.0.1:2379", "--bind-address=0.0.0.0", "--secure-port=6443",
		"--advertise-address="+c.NodeIP.String(), "--cert-dir="+filepath.Join(d, "apiserver"),
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--service-cluster-ip-range="+serviceCIDR, "--authorization-mode=Node,RBAC",
		"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+p("ca.crt"),
		"--kubelet-preferred-address-types=InternalIP", "--allow-privileged=true",
		"--enable-priority-and-fairness=false", "--profiling=false", "--v=1"); err != nil {
		return err
	}
	if _, err := c.startProcess("kube-controller-manager",
		"--kubeconfig="+p("controller-manager.kubeconfig"), "--leader-elect=false",
		"--service-account-private-key-file="+p("sa.key"), "--root-ca-file="+p("ca.crt"),
		"--cert-dir="+filepath.Join(d, "controller-manager"), "--bind-address=127.0.0.1",
		"--secure-port=10257", "--profiling=false", "--v=1"); err != nil {
		return err
	}
	_, err := c.startProcess("kube-scheduler", "--kubeconfig="+p("scheduler.kubeconfig"),
		"--leader-elect=false", "--cert-dir="+filepath.Join(d, "scheduler"),
		"--bind-address=127.0.0.1", "--secure-port=10259", "--profiling=false", "--v=1")
	return err
}

// connect opens the loopback proxy to the API server and makes the admin client.
func (c *Cluster) connect() error {
	proxy, err := newLoopbackProxy(c.env, fmt.Sprintf("%s:6443", c.NodeIP))
	if err != nil {
		return err
	}
	c.proxy = proxy
	cfg, err := clientcmd.BuildConfigFromFlags("https://"+proxy.addr(), c.pki.path("admin.kubeconfig"))
	if err != nil {
		return fmt.Errorf("admin kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	c.Config = cfg
	c.Client, err = kubernetes.NewForConfig(cfg)
	return err
}

// waitAPI waits until the API server answers /readyz.
func (c *Cluster) waitAPI(ctx context.Context) error {
	return c.poll(ctx, 2*time.Minute, "kube-apiserver /readyz", func(ctx context.Context) error {
		_, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	})
}

// createRuntimeClasses creates RuntimeClass runc (handler runc) and podvm, the latter from the
// manifest podvm ships (deploy/runtimeclass.yaml), overhead included.
func (c *Cluster) createRuntimeClasses(ctx context.Context) error {
	var podvm nodev1.RuntimeClass
	if err := yaml.UnmarshalStrict(deploy.RuntimeClass, &podvm); err != nil {
		return fmt.Errorf("deploy/runtimeclass.yaml: %w", err)
	}
	runc := nodev1.RuntimeClass{ObjectMeta: metav1.ObjectMeta{Name: "runc"}, Handler: "runc"}
	for _, rc := range []*nodev1.RuntimeClass{&runc, &podvm} {
		if _, err := c.Client.NodeV1().RuntimeClasses().Create(ctx, rc, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create RuntimeClass %s: %w", rc.Name, err)
		}
	}
	return nil
}

// waitReady waits for the node to be Ready and the default namespace's service account.
func (c *Cluster) waitReady(ctx context.Context) error {
	err := c.poll(ctx, 3*time.Minute, "node "+NodeName+" Ready", func(ctx context.Context) error {
		n, err := c.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("NodeReady %s: %s", cond.Status, cond.Message)
			}
		}
		return fmt.Errorf("no NodeReady condition yet")
	})
	if err != nil {
		return err
	}
	return c.poll(ctx, time.Minute, "service account default/default", func(ctx context.Context) error {
		_, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// poll calls f every 250ms until it returns nil, a component exits, or timeout passes.
func (c *Cluster) poll(ctx context.Context, timeout time.Duration, what string, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		last = f(cctx)
		ccancel()
		if last == nil {
			return nil
		}
		for _, p := range c.procs {
			if !p.running() {
				return fmt.Errorf("waiting for %s: %s exited (%v)", what, p.name, p.err)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last: %v)", what, ctx.Err(), last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}
