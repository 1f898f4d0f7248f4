package guest

import (
	"encoding/json"
	"os"
	"os/exec"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/podvm/podvm/agent/api"
)

// warmUp does ahead of the pod's first calls the one-time work their decoding does: encoding/json
// builds its decoder for each runtime-spec type the first time it meets one, and protobuf builds
// each message type's coder on first use. That is data, not code: a VM restored from a template
// finds it in the template's memory, where the agent did it before the template was saved
// (under TCG a clone's first spec decode took 62-259 ms without it, 8-46 ms with it). In a
// booted VM it runs beside the host's first calls.
func warmUp() {
	b, err := json.Marshal(warmSpec())
	if err == nil {
		_ = json.Unmarshal(b, new(specs.Spec))
	}
	msgs := api.File_agent_proto.Messages()
	for i := 0; i < msgs.Len(); i++ {
		mt, err := protoregistry.GlobalTypes.FindMessageByName(msgs.Get(i).FullName())
		if err != nil {
			continue
		}
		warmMessage(mt)
	}
}

func warmMessage(mt protoreflect.MessageType) {
	b, err := proto.Marshal(mt.New().Interface())
	if err == nil {
		_ = proto.Unmarshal(b, mt.New().Interface())
	}
}

// warmSpec is a spec with a value in each part containerd's CRI fills for a pod's sandbox and
// containers, so that decoding it meets each of their types.
func warmSpec() *specs.Spec {
	var n int64
	var u uint64
	var adj int
	mode := os.FileMode(0o600)
	return &specs.Spec{
		Version:     specs.Version,
		Hostname:    "warm",
		Annotations: map[string]string{"a": "b"},
		Root:        &specs.Root{Path: "/rootfs", Readonly: true},
		Mounts:      []specs.Mount{{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid"}}},
		Process: &specs.Process{
			User: specs.User{UID: 1, GID: 1, AdditionalGids: []uint32{1}}, Args: []string{"a"}, Env: []string{"A=b"}, Cwd: "/",
			Capabilities:    &specs.LinuxCapabilities{Bounding: []string{"CAP_KILL"}, Effective: []string{"CAP_KILL"}, Permitted: []string{"CAP_KILL"}},
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1, Soft: 1}},
			NoNewPrivileges: true, OOMScoreAdj: &adj, ConsoleSize: &specs.Box{Height: 1, Width: 1},
		},
		Linux: &specs.Linux{
			CgroupsPath: "/warm",
			Sysctl:      map[string]string{"a": "b"},
			Namespaces:  []specs.LinuxNamespace{{Type: specs.IPCNamespace}},
			Devices:     []specs.LinuxDevice{{Path: "/dev/x", Type: "c", FileMode: &mode, UID: new(uint32), GID: new(uint32)}},
			Resources: &specs.LinuxResources{
				Devices:        []specs.LinuxDeviceCgroup{{Access: "rwm", Major: &n, Minor: &n}},
				Memory:         &specs.LinuxMemory{Limit: &n, Swap: &n},
				CPU:            &specs.LinuxCPU{Shares: &u, Quota: &n, Period: &u, Cpus: "0"},
				Pids:           &specs.LinuxPids{Limit: &n},
				HugepageLimits: []specs.LinuxHugepageLimit{{Pagesize: "2MB"}},
				Unified:        map[string]string{"a": "b"},
			},
			MaskedPaths:   []string{"/a"},
			ReadonlyPaths: []string{"/b"},
			Seccomp: &specs.LinuxSeccomp{DefaultAction: specs.ActErrno, Architectures: []specs.Arch{specs.ArchX86_64},
				Syscalls: []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActAllow,
					Args: []specs.LinuxSeccompArg{{Index: 1, Value: 2, Op: specs.OpEqualTo}}}}},
		},
	}
}

// WarmArg is the argument podvm-agent exits on as soon as it has started.
const WarmArg = "warm"

// warmStart runs this binary once with WarmArg, at the lowest priority, and waits for it.
//
// Every container start and exec runs this binary anew (libcontainer's `runc init`), and
// the first thing each does is the Go runtime's start and the package initialisers. Under
// TCG the first run of that code in a VM also translates it, which a booted guest did when
// its agent started; a guest restored from a VM template starts with an empty translation
// cache and its agent long started, so its first container paid for it: 367-404 ms against
// 341 ms in a booted guest. Run once ahead, it is translated before a container needs it
// (docs/templating.md). Unlike warmUp's decoders, translated code is not in the guest's
// memory, so a template cannot keep it: each clone does this.
func warmStart() {
	cmd := exec.Command("/proc/self/exe", WarmArg)
	if err := cmd.Start(); err != nil {
		return
	}
	_ = unix.Setpriority(unix.PRIO_PROCESS, cmd.Process.Pid, 19)
	_ = cmd.Wait()
}
