package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/shim/config"
)

// podvmTemplateOptions are podvmShimOptions with templated start on, in a state dir of the
// test's own (its templates go with it).
func podvmTemplateOptions(t testing.TB, prefix string) harness.Options {
	t.Helper()
	return shimOptions(t, ownStateDir(t, prefix), "", true)
}

// templatedPod is a pod of TestPodvmTemplate: its busybox container serves HTTP on 8080 and
// has a hostPath volume.
type templatedPod struct {
	pod *harness.Pod
	ctr string
	vol string // the volume's host dir
}

// TestPodvmTemplate runs pods with templated start on, through the CRI: each pod is ready
// from the template (the shim says so), its IP answers, its NIC has the pod's sysctl, its
// rootfs and a volume work both ways, exec works, the guest kernel's thunk sites were
// rewritten in the template, two pods get different random numbers, the clock is the host's,
// and removing the pods leaves nothing, the template's build VM included.
func TestPodvmTemplate(t *testing.T) {
	env := harness.Start(t, func() harness.Options {
		o := podvmTemplateOptions(t, "pvt-")
		o.LeakProcessNames = []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"}
		return o
	}())
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()

	first := runTemplatedPod(ctx, t, env, "tmpl-a")
	// A restored guest's clock stopped when the template was saved: a pod started seconds
	// later would show it.
	time.Sleep(4 * time.Second)
	second := runTemplatedPod(ctx, t, env, "tmpl-b")

	keys := map[string]bool{}
	for _, p := range []*templatedPod{first, second} {
		keys[templateKeyOf(t, env, p.pod.ID)] = true
		checkTemplatedPod(ctx, t, env, p)
	}
	if len(keys) != 1 {
		t.Errorf("the pods came from %d templates, want 1: %v", len(keys), keys)
	}
	checkThunksRewritten(ctx, t, env, first.ctr)
	a, b := randomness(ctx, t, env, first.ctr), randomness(ctx, t, env, second.ctr)
	if a == b {
		t.Errorf("two pods from one template read the same random numbers: %s", a)
	}
	for _, p := range []*templatedPod{first, second} {
		removePod(ctx, t, env, p.pod)
	}
	env.AssertNoLeaks(t)
}

func runTemplatedPod(ctx context.Context, t *testing.T, env *harness.Env, name string) *templatedPod {
	t.Helper()
	// A per-interface sysctl: a restored guest's eth0 is hot-plugged, so it exists only once
	// the guest's setup has waited for it.
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: name, Namespace: "it", Handler: "podvm",
		Sysctls: map[string]string{"net.ipv4.conf.eth0.arp_ignore": "1"}})
	vol := t.TempDir()
	cfg := env.ContainerConfig(harness.ContainerOptions{Name: "web", Command: []string{"sh", "-c", webScript}})
	cfg.Mounts = []*runtimeapi.Mount{{ContainerPath: "/data", HostPath: vol}}
	return &templatedPod{pod: pod, ctr: startContainer(t, ctx, env, pod, cfg), vol: vol}
}

// templateKeyOf is the template the shim says pod's VM was restored from ("" if none).
func templateKeyOf(t *testing.T, env *harness.Env, podID string) string {
	t.Helper()
	b, err := os.ReadFile(env.ContainerdLog)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`msg="pod VM ready".*`)
	for _, line := range re.FindAllString(string(b), -1) {
		if !strings.Contains(line, "sandbox="+podID) {
			continue
		}
		m := regexp.MustCompile(`from_template=([0-9a-f]+)`).FindStringSubmatch(line)
		if m == nil {
			t.Errorf("pod %s booted instead of being restored from a template: %s", podID[:12], line)
			return ""
		}
		t.Logf("pod %s: %s", podID[:12], line)
		return m[1]
	}
	t.Errorf("no \"pod VM ready\" line for pod %s in containerd's log", podID[:12])
	return ""
}

// checkTemplatedPod checks a restored pod's network, rootfs, volume, exec and clock.
func checkTemplatedPod(ctx context.Context, t *testing.T, env *harness.Env, p *templatedPod) {
	t.Helper()
	st, err := env.Runtime.PodSandboxStatus(ctx, p.pod.ID, false)
	if err != nil {
		t.Fatal(err)
	}
	ip := st.GetStatus().GetNetwork().GetIp()
	if got := waitHTTP(ctx, t, env, ip+":8080", "/index.html"); !strings.Contains(got, "hello from") {
		t.Errorf("GET %s:8080: %q", ip, got)
	}
	// The pod's own hostname and NIC: the guest's eth0 has the MAC of the pod netns's eth0.
	if got := sh(t, ctx, env, p.ctr, "hostname"); got != p.pod.Config.GetHostname() {
		t.Errorf("hostname %q, want the pod's %q", got, p.pod.Config.GetHostname())
	}
	if guest, host := sh(t, ctx, env, p.ctr, "cat /sys/class/net/eth0/address"), podMAC(ctx, t, env, p.pod.ID); guest != host {
		t.Errorf("the guest's eth0 has MAC %q, the pod's interface %q", guest, host)
	}
	if got := sh(t, ctx, env, p.ctr, "cat /proc/sys/net/ipv4/conf/eth0/arp_ignore"); got != "1" {
		t.Errorf("the pod's sysctl net.ipv4.conf.eth0.arp_ignore is %q in the container, want 1", got)
	}
	// The rootfs: the image's files, and the container's own writes.
	if got := sh(t, ctx, env, p.ctr, "echo written > /etc/podvm-test && cat /etc/podvm-test /etc/hostname"); !strings.HasPrefix(got, "written\n") {
		t.Errorf("rootfs: %q", got)
	}
	// The volume, both ways.
	writeFile(t, filepath.Join(p.vol, "in"), "from-host")
	if got := sh(t, ctx, env, p.ctr, "cat /data/in && echo from-guest > /data/out && sync"); got != "from-host" {
		t.Errorf("volume: the container read %q, want from-host", got)
	}
	if got := strings.TrimSpace(readHostFile(t, filepath.Join(p.vol, "out"))); got != "from-guest" {
		t.Errorf("volume: the host read %q, want from-guest", got)
	}
	// The wall clock is the host's, not the template's.
	checkClock(ctx, t, env, p.pod)
}

// checkThunksRewritten: a template's guest rewrote its kernel's retpoline and return thunk
// sites as it booted (under TCG with mitigations=off, but without keep_thunks), so its clone
// runs without the extra jump a booted guest keeps under TCG (TestGuestRunsContainers checks
// that that kernel says it kept them).
func checkThunksRewritten(ctx context.Context, t *testing.T, env *harness.Env, ctr string) {
	t.Helper()
	out := sh(t, ctx, env, ctr, "cat /proc/cmdline; dmesg | grep keep_thunks || true")
	if strings.Contains(out, "keep_thunks") || (testAccel() == "tcg" && !strings.Contains(out, " mitigations=off")) {
		t.Errorf("a clone's kernel (accel %s): want its thunk sites rewritten at the template's boot (mitigations=off under TCG, no keep_thunks), got:\n%s", testAccel(), out)
	}
}

// randomness is what a container reads from the kernel's RNG: a fresh UUID and 32 bytes of
// /dev/urandom.
func randomness(ctx context.Context, t *testing.T, env *harness.Env, ctr string) string {
	t.Helper()
	return sh(t, ctx, env, ctr, "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
}

// waitHTTP is httpGet, retried until the server in the container listens.
func waitHTTP(ctx context.Context, t *testing.T, env *harness.Env, addr, path string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := env.DialContext(ctx, "tcp", addr)
		if err == nil {
			_ = conn.Close()
			return httpGet(ctx, t, env, addr, path)
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing answers on %s: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestPodvmTemplateBroken: a template whose files were damaged never yields a broken pod. A
// truncated memory file is seen before use and the template is built anew; a state file QEMU
// cannot load fails that one pod with an error that says so, the template is removed, and the
// next pod builds a fresh one. Nothing is left behind.
func TestPodvmTemplateBroken(t *testing.T) {
	opts := podvmTemplateOptions(t, "pvt-")
	opts.LeakProcessNames = []string{"qemu-system", "virtiofsd", "containerd-shim-podvm-v2"}
	env := harness.Start(t, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	dir := filepath.Join(opts.LeakDirs[0], config.TemplateDirName)

	removePod(ctx, t, env, runPod(ctx, t, env, "podvm", "builds"))
	tmpl := onlyTemplate(t, dir)

	// Same size, garbage inside: only QEMU can tell.
	state := filepath.Join(tmpl, "state")
	st, err := os.Stat(state)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, state, strings.Repeat("x", int(st.Size())))
	_, err = env.RunPod(ctx, harness.PodOptions{Name: "garbage", Namespace: "it", Handler: "podvm"})
	if err == nil || !strings.Contains(err.Error(), "restore the pod VM from template") || !strings.Contains(err.Error(), "builds it anew") {
		t.Fatalf("RunPodSandbox from a garbled template: %v, want an error saying the template was removed", err)
	}
	if _, err := os.Stat(tmpl); !os.IsNotExist(err) {
		t.Errorf("the garbled template is still there: %v", err)
	}
	pod := runPod(ctx, t, env, "podvm", "rebuilt")
	if templateKeyOf(t, env, pod.ID) == "" {
		t.Error("the pod after the garbled template was not restored from a new one")
	}
	removePod(ctx, t, env, pod)

	// Truncated memory: seen before use, rebuilt, the pod starts.
	if err := os.Truncate(filepath.Join(onlyTemplate(t, dir), "memory"), 4096); err != nil {
		t.Fatal(err)
	}
	pod = runPod(ctx, t, env, "podvm", "truncated")
	if templateKeyOf(t, env, pod.ID) == "" {
		t.Error("the pod after the truncated template was not restored from a rebuilt one")
	}
	removePod(ctx, t, env, pod)
	env.AssertNoLeaks(t)
}

// onlyTemplate is the one template directory in dir.
func onlyTemplate(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, e := range entries {
		if e.IsDir() && !strings.Contains(e.Name(), ".") && !strings.HasPrefix(e.Name(), "b-") {
			found = append(found, e.Name())
		}
	}
	if len(found) != 1 {
		t.Fatalf("templates in %s: %v, want one", dir, found)
	}
	return filepath.Join(dir, found[0])
}

// podMAC is the MAC of eth0 in pod's network namespace on the host.
func podMAC(ctx context.Context, t *testing.T, env *harness.Env, podID string) string {
	t.Helper()
	ns, err := env.PodNetNSPath(ctx, podID)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+ns, "ip", "-o", "link", "show", "eth0").Output()
	if err != nil {
		t.Fatalf("ip link in the pod netns: %v", err)
	}
	f := strings.Fields(string(out))
	for i := range f {
		if f[i] == "link/ether" && i+1 < len(f) {
			return f[i+1]
		}
	}
	t.Fatalf("no MAC in %q", out)
	return ""
}
