package integration

import (
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/internal/logfile"
)

// TestGuestInit checks the guest's PID 1 (the agent binary's C init, cmd/podvm-agent/pid1.go)
// from inside a real guest: a process orphaned in the guest's PID namespace is reaped when it
// exits, and when the agent server dies PID 1 powers the guest off, so QEMU exits by itself
// and the console says why.
func TestGuestInit(t *testing.T) {
	ctx, stateDir := vmTest(t, 4*time.Minute)
	g := bootVM(t, ctx, stateDir)

	// The container's shell leaves a child behind: in the guest's PID namespace the orphan
	// goes to PID 1.
	root := busyboxRootfs(t, g, "orphan")
	spec := defaultSpec(t, "orphan", root, oci.WithHostNamespace(specs.PIDNamespace),
		oci.WithProcessArgs("sh", "-c", "sleep 5 </dev/null >/dev/null 2>&1 & echo $!"))
	stdout, stderr, code := runGuestContainer(t, ctx, g.agent, "orphan", spec)
	pid := strings.TrimSpace(stdout)
	if code != 0 || pid == "" {
		t.Fatalf("orphan maker: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	// Its parent must be PID 1, and once it exits it must be gone, not a zombie.
	check := `ppid=$(cut -d' ' -f4 /proc/` + pid + `/stat) || exit 2; echo ppid=$ppid
for i in $(seq 100); do [ -e /proc/` + pid + ` ] || { echo reaped; exit 0; }; sleep 0.1; done
cat /proc/` + pid + `/status; exit 1`
	root = busyboxRootfs(t, g, "check")
	spec = defaultSpec(t, "check", root, oci.WithHostNamespace(specs.PIDNamespace),
		oci.WithProcessArgs("sh", "-c", check))
	stdout, stderr, code = runGuestContainer(t, ctx, g.agent, "check", spec)
	if code != 0 || !strings.Contains(stdout, "ppid=1\n") || !strings.Contains(stdout, "reaped") {
		t.Errorf("the orphan (guest pid %s) was not reparented to PID 1 and reaped: exit %d, stdout %q, stderr %q",
			pid, code, stdout, stderr)
	}
	removeGuestContainer(t, ctx, g.agent, "check")
	removeGuestContainer(t, ctx, g.agent, "orphan")

	// Kill the agent server from a container in the guest's PID namespace; nothing asks the
	// guest to stop.
	kill := `for p in /proc/[0-9]*; do
  [ "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" = "/init serve " ] && kill -9 ${p#/proc/} && echo killed ${p#/proc/}
done; sleep 60`
	root = busyboxRootfs(t, g, "killer")
	spec = defaultSpec(t, "killer", root, oci.WithHostNamespace(specs.PIDNamespace),
		oci.WithProcessArgs("sh", "-c", kill))
	if _, err := g.agent.CreateContainer(ctx, &api.CreateContainerRequest{ContainerId: "killer", Spec: spec,
		Stdio: &api.Stdio{}}); err != nil {
		t.Fatalf("create the killer: %v", err)
	}
	if _, err := g.agent.StartProcess(ctx, &api.ProcessRequest{ContainerId: "killer"}); err != nil {
		t.Fatalf("start the killer: %v", err)
	}
	select {
	case <-g.vm.Done():
	case <-time.After(60 * time.Second):
		t.Fatalf("the agent server was killed, but the VM still runs 60 s later; console:\n%s",
			logfile.TailLines(g.vm.ConsolePath(), 30))
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	console := logfile.TailLines(g.vm.ConsolePath(), 30)
	if !strings.Contains(console, "podvm-agent: server exited") || !strings.Contains(console, "powering off") {
		t.Errorf("the VM stopped, but the console does not say that the server was killed:\n%s", console)
	}
}
