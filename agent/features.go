package agent

import (
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
)

// Containers run in the guest under runc's libcontainer, linked into the agent. These are
// what it knows (libcontainer/specconv's KnownMountOptions and KnownNamespaces of the runc
// version in go.mod; a guest test keeps them in step): the shim cannot link libcontainer.
var (
	guestMountOptions = []string{"async", "atime", "bind", "defaults", "dev", "diratime", "dirsync",
		"exec", "iversion", "lazytime", "loud", "mand", "noatime", "nodev", "nodiratime", "noexec",
		"noiversion", "nolazytime", "nomand", "norelatime", "nostrictatime", "nosuid", "nosymfollow",
		"private", "ratime", "rbind", "rdev", "rdiratime", "relatime", "remount", "rexec", "rnoatime",
		"rnodev", "rnodiratime", "rnoexec", "rnorelatime", "rnostrictatime", "rnosuid",
		"rnosymfollow", "ro", "rprivate", "rrelatime", "rro", "rrw", "rshared", "rslave",
		"rstrictatime", "rsuid", "rsymfollow", "runbindable", "rw", "shared", "silent", "slave",
		"strictatime", "suid", "symfollow", "sync", "tmpcopyup", "unbindable"}
	guestNamespaces = []string{"cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"}
)

// Features are the OCI runtime features of podvm's containers, as `runc features` reports
// them, for the shim's -info (containerd turns them into the CRI runtime handler's features).
//
// Recursive read-only mounts ("rro") work: libcontainer applies them in the guest's 6.1
// kernel (mount_setattr). ID-mapped mounts do not: the container's root filesystem and its
// volumes are virtio-fs (FUSE) mounts, and FUSE allows ID-mapped mounts only from Linux
// 6.12 on (FS_ALLOW_IDMAP); so containerd does not advertise CRI user namespaces
// (hostUsers: false) for podvm, though a container may make user namespaces of its own.
func Features() *features.Features {
	no, yes := false, true
	return &features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		MountOptions:  append([]string(nil), guestMountOptions...),
		Linux: &features.Linux{
			Namespaces: append([]string(nil), guestNamespaces...),
			// Containers run in the guest, which has cgroup v2 alone and no systemd.
			Cgroup:          &features.Cgroup{V1: &no, V2: &yes, Systemd: &no, SystemdUser: &no, Rdma: &no},
			Seccomp:         &features.Seccomp{Enabled: &yes},
			Apparmor:        &features.Apparmor{Enabled: &no},
			Selinux:         &features.Selinux{Enabled: &no},
			IntelRdt:        &features.IntelRdt{Enabled: &no},
			MountExtensions: &features.MountExtensions{IDMap: &features.IDMap{Enabled: &no}},
		},
	}
}
