package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	intstrpkg "k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

func parseURL(s string) (*url.URL, error) { return url.Parse(s) }

// cpTo copies data into the container as file path, as `kubectl cp` does: a tar stream on the
// stdin of `tar xf -` in the container.
func (k *kube) cpTo(ctx context.Context, name, c, dir, file string, data []byte) error {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: file, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := tw.Write(data); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	r, err := k.exec(ctx, name, c, []string{"tar", "xmf", "-", "-C", dir}, &buf, false)
	if err != nil {
		return err
	}
	if r.code != 0 {
		return fmt.Errorf("tar xf in the container: exit %d: %s", r.code, r.stderr)
	}
	return nil
}

// cpFrom reads file dir/file out of the container, as `kubectl cp` does: `tar cf -` in the
// container, its stdout untarred here.
func (k *kube) cpFrom(ctx context.Context, name, c, dir, file string) ([]byte, error) {
	r, err := k.exec(ctx, name, c, []string{"tar", "cf", "-", "-C", dir, file}, nil, false)
	if err != nil {
		return nil, err
	}
	if r.code != 0 {
		return nil, fmt.Errorf("tar cf in the container: exit %d: %s", r.code, r.stderr)
	}
	tr := tar.NewReader(strings.NewReader(r.stdout))
	for {
		h, err := tr.Next()
		if err != nil {
			return nil, fmt.Errorf("tar from the container: %w", err)
		}
		if h.Name == file {
			return io.ReadAll(tr)
		}
	}
}

// portForward forwards a free port on the host's loopback to port in the pod, as
// `kubectl port-forward` does (SPDY, portforward.k8s.io), and returns the local address. It
// stops when the test ends.
func (k *kube) portForward(t *testing.T, name string, port int) string {
	t.Helper()
	rt, upgrader, err := spdy.RoundTripperFor(k.config)
	if err != nil {
		t.Fatal(err)
	}
	u := k.client.CoreV1().RESTClient().Post().Resource("pods").Namespace(k.ns).Name(name).SubResource("portforward").URL()
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	stop, readyc := make(chan struct{}), make(chan struct{})
	var out, errOut syncBuffer
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", port)}, stop, readyc, &out, &errOut)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	t.Cleanup(func() {
		close(stop)
		if err := <-done; err != nil {
			t.Logf("port-forward %s:%d ended: %v", name, port, err)
		}
	})
	select {
	case <-readyc:
	case err := <-done:
		t.Fatalf("port-forward %s:%d: %v (%s)", name, port, err, errOut.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("port-forward %s:%d not ready after 30s", name, port)
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) != 1 {
		t.Fatalf("port-forward ports: %v %v", ports, err)
	}
	return net.JoinHostPort("127.0.0.1", fmt.Sprint(ports[0].Local))
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// timings collects durations per runtime class and measure, for the table the suite logs.
type timings struct {
	mu sync.Mutex
	d  map[string]map[string][]time.Duration // measure -> runtime class -> samples
}

func newTimings() *timings { return &timings{d: map[string]map[string][]time.Duration{}} }

func (tm *timings) add(rc, measure string, d time.Duration) {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	if tm.d[measure] == nil {
		tm.d[measure] = map[string][]time.Duration{}
	}
	tm.d[measure][rc] = append(tm.d[measure][rc], d)
}

// table renders the median (and sample count) of every measure for each runtime class.
func (tm *timings) table() string {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	var measures []string
	for m := range tm.d {
		measures = append(measures, m)
	}
	sort.Strings(measures)
	var b strings.Builder
	fmt.Fprintf(&b, "%-42s %18s %18s\n", "measure (median, n)", "runc", "podvm")
	for _, m := range measures {
		fmt.Fprintf(&b, "%-42s", m)
		for _, rc := range runtimeClasses {
			s := append([]time.Duration(nil), tm.d[m][rc]...)
			if len(s) == 0 {
				fmt.Fprintf(&b, " %18s", "-")
				continue
			}
			sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
			fmt.Fprintf(&b, " %18s", fmt.Sprintf("%v (%d)", s[len(s)/2].Round(time.Millisecond), len(s)))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func intstr(port int) intstrpkg.IntOrString { return intstrpkg.FromInt32(int32(port)) }

func mustQuantity(s string) resource.Quantity { return resource.MustParse(s) }
