// Package k8s runs a single-node Kubernetes cluster on top of the integration harness's
// containerd, for podvm's end-to-end suite (integration/e2e).
//
// Start generates a fresh PKI and kubeconfigs, and runs etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler and kubelet as root processes inside the harness's
// network namespace (the node's address is a dummy interface there), the kubelet talking to the
// harness's containerd with the cgroupfs driver and its pods under the harness's cgroup parent.
// The binaries come from `make deps` ($PODVM_DEV/k8s/<Version>). The test reaches the API server
// through a proxy on the host's loopback. Everything is stopped, and everything the kubelet
// writes outside its dirs is removed, when the test ends; AssertNoLeaks checks it.
package k8s

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/podvm/podvm/integration/harness"
)

// Version is the Kubernetes release hack/deps.sh builds (KUBERNETES_VERSION there).
const Version = "v1.36.3"

// binaries are the programs Start runs, all in BinDir.
var binaries = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"}

// NodeName is the name the kubelet registers its node under.
const NodeName = "podvm-e2e"

// Cluster is one running single-node cluster.
type Cluster struct {
	// Client is a typed client with cluster-admin rights; Config is its rest config (for the
	// streaming APIs: exec, attach, port-forward).
	Client kubernetes.Interface
	Config *rest.Config
	// NodeIP is the node's InternalIP, inside the harness's network namespace.
	NodeIP net.IP
	// Dir holds the PKI, kubeconfigs, component logs and the kubelet's root dir.
	Dir string

	env     *harness.Env
	binDir  string
	pki     *pki
	procs   []*process
	kubelet *process
	proxy   *loopbackProxy
	host    *hostState
	opts    Options
	stopped bool
}

// Options change the cluster StartWith makes; the zero value is Start's.
type Options struct {
	// NoPodvmLabel registers the node without podvm.io/runtime=true: the test's installer
	// labels it.
	NoPodvmLabel bool
}

// BinDir is where `make deps` puts the binaries: $PODVM_DEV/k8s/<Version>.
func BinDir() string {
	dev := os.Getenv("PODVM_DEV")
	if dev == "" {
		dev = "/opt/podvm-dev"
	}
	return filepath.Join(dev, "k8s", Version)
}

// Missing lists the binaries that are not in BinDir.
func Missing() []string {
	var missing []string
	for _, b := range binaries {
		if st, err := os.Stat(filepath.Join(BinDir(), b)); err != nil || st.Mode()&0o111 == 0 {
			missing = append(missing, filepath.Join(BinDir(), b))
		}
	}
	return missing
}

// Start runs a cluster on env's containerd and returns once the node is Ready, the default
// service account exists and the runc and podvm RuntimeClasses are created. It is stopped
// when t ends (before env's own teardown), or earlier by AssertNoLeaks.
func Start(ctx context.Context, t testing.TB, env *harness.Env) *Cluster {
	t.Helper()
	return StartWith(ctx, t, env, Options{})
}

// StartWith is Start with options.
func StartWith(ctx context.Context, t testing.TB, env *harness.Env, opts Options) *Cluster {
	t.Helper()
	if m := Missing(); len(m) > 0 {
		msg := "Kubernetes binaries missing: " + strings.Join(m, ", ") + " (run `make deps`)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	c := &Cluster{env: env, binDir: BinDir(), Dir: filepath.Join(env.Dir, "k8s"), opts: opts}
	t.Cleanup(func() { c.stop(t) })
	start := time.Now()
	if err := c.start(ctx, t); err != nil {
		c.logTails(t)
		t.Fatalf("k8s: %v", err)
	}
	t.Logf("k8s: cluster %s up in %v: node %s at %s, dir %s", Version, time.Since(start).Round(time.Millisecond), NodeName, c.NodeIP, c.Dir)
	return c
}

func (c *Cluster) start(ctx context.Context, t testing.TB) error {
	host, err := saveHostState()
	if err != nil {
		return err
	}
	c.host = host
	if c.NodeIP, err = c.addNodeIP(ctx); err != nil {
		return err
	}
	if err := c.writePKI(); err != nil {
		return err
	}
	if err := c.startControlPlane(ctx); err != nil {
		return err
	}
	if err := c.connect(); err != nil {
		return err
	}
	if err := c.waitAPI(ctx); err != nil {
		return err
	}
	if err := c.startKubelet(); err != nil {
		return err
	}
	if err := c.createRuntimeClasses(ctx); err != nil {
		return err
	}
	return c.waitReady(ctx)
}

// addNodeIP gives the harness's network namespace the node's address. The kubelet refuses a
// loopback address (127/8) as node IP, not an address on the lo device, which needs no kernel
// module (dummy may be missing) and goes with the namespace.
func (c *Cluster) addNodeIP(ctx context.Context) (net.IP, error) {
	b := []byte(c.env.ID())
	ip := net.IPv4(10, 250, b[0], b[1]).To4()
	if _, err := c.env.RunInNetNS(ctx, "ip", "addr", "add", ip.String()+"/32", "dev", "lo"); err != nil {
		return nil, err
	}
	return ip, nil
}

func (c *Cluster) writePKI() error {
	p, err := newPKI(filepath.Join(c.Dir, "pki"))
	if err != nil {
		return err
	}
	c.pki = p
	loop := net.IPv4(127, 0, 0, 1)
	specs := []certSpec{
		{name: "apiserver", cn: "kube-apiserver", server: true,
			ips: []net.IP{c.NodeIP, loop, net.IPv4(10, 96, 0, 1)},
			dns: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}},
		{name: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}},
		{name: "admin", cn: "e2e-admin", orgs: []string{"system:masters"}},
		// Its controllers run with its own credentials (no --use-service-account-credentials), so
		// it needs more than the system:kube-controller-manager role grants.
		{name: "controller-manager", cn: "system:kube-controller-manager", orgs: []string{"system:masters"}},
		{name: "scheduler", cn: "system:kube-scheduler"},
		{name: "kubelet", cn: "system:node:" + NodeName, orgs: []string{"system:nodes"}},
		{name: "kubelet-serving", cn: NodeName, server: true, ips: []net.IP{c.NodeIP}, dns: []string{NodeName}},
	}
	for _, s := range specs {
		if err := p.sign(s); err != nil {
			return err
		}
	}
	if err := p.serviceAccountKey(); err != nil {
		return err
	}
	server := "https://" + net.JoinHostPort(c.NodeIP.String(), "6443")
	for _, n := range []string{"admin", "controller-manager", "scheduler", "kubelet"} {
		if _, err := p.kubeconfig(n, server); err != nil {
			return err
		}
	}
	return nil
}
