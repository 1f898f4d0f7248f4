package integration

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// TestDemo is what `make demo` shows: containerd with the podvm runtime runs a busybox pod in
// its own VM, driven through the CRI as kubelet drives it. It narrates on stdout and is an
// ordinary test of the suite too.
func TestDemo(t *testing.T) {
	say := func(format string, args ...any) { fmt.Printf("demo: "+format+"\n", args...) }
	env, ctx := podvmTest(t, 5*time.Minute)
	say("containerd is running in network namespace %s with runtime handler \"podvm\" (RuntimeClass podvm)", env.NetNS)

	start := time.Now()
	pod, err := env.RunPod(ctx, harness.PodOptions{Name: "hello-vm", Namespace: "demo", Handler: "podvm"})
	if err != nil {
		t.Fatal(err)
	}
	st, err := env.Runtime.PodSandboxStatus(ctx, pod.ID, false)
	if err != nil {
		t.Fatal(err)
	}
	say("RunPodSandbox: pod %s is ready in %s, pod IP %s", pod.ID[:12], time.Since(start).Round(time.Millisecond), st.GetStatus().GetNetwork().GetIp())
	if out, err := exec.Command("pgrep", "-af", "qemu-system-x86_64 -name podvm-"+pod.ID).Output(); err == nil {
		fields := strings.Fields(string(out))
		say("its VM: QEMU pid %s (%s), console log %s/%s/console.log", fields[0], guestSize(string(out)), podvmStateDir, pod.ID)
	}

	if _, err := env.PullImage(ctx, env.BusyboxImage, pod.Config); err != nil {
		t.Fatal(err)
	}
	id, logPath, err := env.CreateContainer(ctx, pod, harness.ContainerOptions{Name: "hello",
		Command: []string{"sh", "-c", "echo hello from $(hostname), kernel $(uname -r); sleep 3600"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Runtime.StartContainer(ctx, id); err != nil {
		t.Fatal(err)
	}
	lines, err := harness.WaitLog(ctx, logPath, "stdout", "hello")
	if err != nil {
		t.Fatal(err)
	}
	say("container %s started; its log says: %s", id[:12], strings.TrimSpace(harness.StreamText(lines, "stdout")))

	guest := sh(t, ctx, env, id, "uname -r")
	host := hostKernel(t)
	say("ExecSync `uname -r` in the container: %s (the host runs %s)", guest, host)
	if guest == host {
		t.Fatalf("the container runs on the host's kernel")
	}
	say("ExecSync `cat /proc/meminfo | head -1` in the container: %s", sh(t, ctx, env, id, "head -1 /proc/meminfo | tr -s ' '"))

	if err := env.Runtime.StopPodSandbox(ctx, pod.ID); err != nil {
		t.Fatal(err)
	}
	if err := env.Runtime.RemovePodSandbox(ctx, pod.ID); err != nil {
		t.Fatal(err)
	}
	env.AssertNoLeaks(t)
	if !t.Failed() {
		say("pod stopped and removed: no QEMU, virtiofsd, tap, mount or state left. Done.")
	}
	_ = os.Stdout.Sync()
}

// guestSize picks the -smp and -m values out of a QEMU command line.
func guestSize(cmdline string) string {
	f := strings.Fields(cmdline)
	var smp, mem string
	for i := 0; i+1 < len(f); i++ {
		switch f[i] {
		case "-smp":
			smp = f[i+1]
		case "-m":
			mem = f[i+1]
		}
	}
	return fmt.Sprintf("%s vCPU, %s memory", smp, mem)
}
