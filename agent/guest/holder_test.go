package guest

import (
	"errors"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

var holderCloneFlagsCases = []struct {
	name  string
	ns    []specs.LinuxNamespace
	flags uintptr
	ok    bool
}{
	{"a pod's own namespaces", []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace},
		{Type: specs.UTSNamespace}, {Type: specs.MountNamespace}}, unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS, true},
	{"hostPID: no PID namespace", []specs.LinuxNamespace{{Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}},
		unix.CLONE_NEWIPC | unix.CLONE_NEWUTS, true},
	{"a namespace to join goes to libcontainer", []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"}}, 0, false},
	{"a user namespace goes to libcontainer", []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.UserNamespace}}, 0, false},
}

func TestHolderCloneFlags(t *testing.T) {
	for _, tc := range holderCloneFlagsCases {
		t.Run(tc.name, func(t *testing.T) {
			flags, ok := holderCloneFlags(&specs.Spec{Linux: &specs.Linux{Namespaces: tc.ns}})
			if flags != tc.flags || ok != tc.ok {
				t.Errorf("holderCloneFlags = %#x, %v; want %#x, %v", flags, ok, tc.flags, tc.ok)
			}
		})
	}
}

func TestIsPodSandbox(t *testing.T) {
	for ann, want := range map[string]bool{"sandbox": true, "container": false, "": false} {
		spec := &specs.Spec{Annotations: map[string]string{annotationContainerType: ann}}
		if got := isPodSandbox(spec); got != want {
			t.Errorf("isPodSandbox(container-type %q) = %v, want %v", ann, got, want)
		}
	}
}

// A sysctl name becomes a path under /proc/sys: anything that could leave it is refused
// before the holder starts.
func TestHolderRefusesBadInput(t *testing.T) {
	for _, k := range []string{"", "../../etc/passwd", "kernel/shmmax", "kernel..x"} {
		if err := checkSysctlName(k); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("checkSysctlName(%q) = %v, want invalid argument", k, err)
		}
	}
	if err := checkSysctlName("kernel.shm_rmid_forced"); err != nil {
		t.Errorf("checkSysctlName(kernel.shm_rmid_forced) = %v", err)
	}
}
