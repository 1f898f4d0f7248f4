package guest

import (
	"encoding/json"
	"os"

	specs "github.com/opencontainers/runtime-spec/specs-go"
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
