package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// PodOptions describes a pod sandbox the way kubelet would fill PodSandboxConfig.
type PodOptions struct {
	Name      string // default "pod"
	Namespace string // default "default"
	UID       string // default: random
	// Handler is the RuntimeClass handler ("runc", "podvm"); empty means containerd's default.
	Handler  string
	Hostname string // default: Name
	// LogDir is the pod log directory; default <Env.Dir>/pods/<namespace>_<name>_<uid>.
	LogDir       string
	DNS          *runtimeapi.DNSConfig
	PortMappings []*runtimeapi.PortMapping
	Labels       map[string]string
	Annotations  map[string]string
	Sysctls      map[string]string // the pod's namespaced sysctls (pod.spec.securityContext.sysctls)
}

// Pod is a running pod sandbox.
type Pod struct {
	ID      string
	Handler string
	Config  *runtimeapi.PodSandboxConfig
}

// PodSandboxConfig builds the CRI config kubelet would send for o.
func (e *Env) PodSandboxConfig(o PodOptions) *runtimeapi.PodSandboxConfig {
	if o.Name == "" {
		o.Name = "pod"
	}
	if o.Namespace == "" {
		o.Namespace = "default"
	}
	if o.UID == "" {
		o.UID = "uid-" + randomID() + randomID()
	}
	if o.Hostname == "" {
		o.Hostname = o.Name
	}
	if o.LogDir == "" {
		o.LogDir = filepath.Join(e.Dir, "pods", o.Namespace+"_"+o.Name+"_"+o.UID)
	}
	labels := map[string]string{
		"io.kubernetes.pod.name":      o.Name,
		"io.kubernetes.pod.namespace": o.Namespace,
		"io.kubernetes.pod.uid":       o.UID,
	}
	for k, v := range o.Labels {
		labels[k] = v
	}
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: o.Name, Namespace: o.Namespace, Uid: o.UID},
		Hostname:     o.Hostname,
		LogDirectory: o.LogDir,
		DnsConfig:    o.DNS,
		PortMappings: o.PortMappings,
		Labels:       labels,
		Annotations:  o.Annotations,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: e.CgroupParent + "/pod" + o.UID,
			Sysctls:      o.Sysctls,
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{
					Network: runtimeapi.NamespaceMode_POD,
					Pid:     runtimeapi.NamespaceMode_CONTAINER,
					Ipc:     runtimeapi.NamespaceMode_POD,
				},
			},
		},
	}
}

// RunPod creates the pod's log directory and runs the sandbox.
func (e *Env) RunPod(ctx context.Context, o PodOptions) (*Pod, error) {
	cfg := e.PodSandboxConfig(o)
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	id, err := e.Runtime.RunPodSandbox(ctx, cfg, o.Handler)
	if err != nil {
		return nil, fmt.Errorf("RunPodSandbox %s/%s (handler %q): %w", cfg.Metadata.Namespace, cfg.Metadata.Name, o.Handler, err)
	}
	return &Pod{ID: id, Handler: o.Handler, Config: cfg}, nil
}

// ContainerOptions describes a container the way kubelet would fill ContainerConfig.
type ContainerOptions struct {
	Name    string // default "c"
	Image   string // default: the busybox image
	Command []string
	Args    []string
	Env     map[string]string
	// LogPath is relative to the pod's log directory; default <name>/0.log.
	LogPath    string
	WorkingDir string
	TTY        bool
	Stdin      bool
	StdinOnce  bool
	Mounts     []*runtimeapi.Mount
	// SharePodPID puts the container in the pod's PID namespace (shareProcessNamespace: true);
	// by default it gets its own, as kubelet does, and the command is the container's PID 1.
	SharePodPID bool
	Labels      map[string]string
	// Annotations are container annotations.
	Annotations map[string]string
}

// Kubelet's masked and read-only paths for the default procMount (k8s.io/kubernetes
// pkg/securitycontext).
var (
	defaultMaskedPaths = []string{"/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
		"/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
		"/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"}
	defaultReadonlyPaths = []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
)

// ContainerConfig builds the CRI config kubelet would send for o.
func (e *Env) ContainerConfig(o ContainerOptions) *runtimeapi.ContainerConfig {
	if o.Name == "" {
		o.Name = "c"
	}
	if o.Image == "" {
		o.Image = e.BusyboxImage
	}
	if o.LogPath == "" {
		o.LogPath = filepath.Join(o.Name, "0.log")
	}
	pidMode := runtimeapi.NamespaceMode_CONTAINER
	if o.SharePodPID {
		pidMode = runtimeapi.NamespaceMode_POD
	}
	var envs []*runtimeapi.KeyValue
	for k, v := range o.Env {
		envs = append(envs, &runtimeapi.KeyValue{Key: k, Value: []byte(v)})
	}
	labels := map[string]string{"io.kubernetes.container.name": o.Name}
	for k, v := range o.Labels {
		labels[k] = v
	}
	return &runtimeapi.ContainerConfig{
		Metadata:    &runtimeapi.ContainerMetadata{Name: o.Name},
		Image:       &runtimeapi.ImageSpec{Image: o.Image},
		Command:     o.Command,
		Args:        o.Args,
		Envs:        envs,
		WorkingDir:  o.WorkingDir,
		LogPath:     o.LogPath,
		Tty:         o.TTY,
		Stdin:       o.Stdin,
		StdinOnce:   o.StdinOnce,
		Mounts:      o.Mounts,
		Labels:      labels,
		Annotations: o.Annotations,
		Linux: &runtimeapi.LinuxContainerConfig{
			SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
				// kubelet sends the default procMount's lists; containerd adds none itself.
				MaskedPaths:   append([]string(nil), defaultMaskedPaths...),
				ReadonlyPaths: append([]string(nil), defaultReadonlyPaths...),
				NamespaceOptions: &runtimeapi.NamespaceOption{
					Network: runtimeapi.NamespaceMode_POD,
					Pid:     pidMode,
					Ipc:     runtimeapi.NamespaceMode_POD,
				},
			},
		},
	}
}

// CreateContainer creates a container in pod. It returns the container ID and the host path of
// its CRI log file.
func (e *Env) CreateContainer(ctx context.Context, pod *Pod, o ContainerOptions) (id, logPath string, err error) {
	cfg := e.ContainerConfig(o)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	id, err = e.Runtime.CreateContainer(ctx, pod.ID, cfg, pod.Config)
	if err != nil {
		return "", "", fmt.Errorf("CreateContainer %s in pod %s: %w", cfg.Metadata.Name, pod.ID, err)
	}
	return id, filepath.Join(pod.Config.LogDirectory, cfg.LogPath), nil
}

// PullImage pulls ref through the CRI and returns the image reference containerd reports.
func (e *Env) PullImage(ctx context.Context, ref string, pod *runtimeapi.PodSandboxConfig) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	imageRef, err := e.Images.PullImage(ctx, &runtimeapi.ImageSpec{Image: ref}, nil, pod)
	if err != nil {
		return "", fmt.Errorf("PullImage %s: %w", ref, err)
	}
	return imageRef, nil
}

// WaitContainerState polls ContainerStatus until the container is in state, and returns that
// status. It gives up when ctx ends (callers pass a deadline).
func (e *Env) WaitContainerState(ctx context.Context, id string, state runtimeapi.ContainerState) (*runtimeapi.ContainerStatus, error) {
	var last *runtimeapi.ContainerStatus
	var lastErr error
	for {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := e.Runtime.ContainerStatus(sctx, id, false)
		cancel()
		if err == nil {
			last, lastErr = resp.GetStatus(), nil
			if last.GetState() == state {
				return last, nil
			}
		} else {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return last, fmt.Errorf("container %s did not reach %s (last state %s, last error %v): %w",
				id, state, last.GetState(), lastErr, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// LogLine is one line of a CRI container log: "<RFC3339Nano> <stream> <F|P> <text>".
type LogLine struct {
	Time    time.Time
	Stream  string // "stdout" or "stderr"
	Partial bool   // P: the line continues in the next entry
	Text    string
}

// ReadContainerLog parses a CRI-format container log file.
func ReadContainerLog(path string) ([]LogLine, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseCRILog(b)
}

// ParseCRILog parses CRI-format log content.
func ParseCRILog(b []byte) ([]LogLine, error) {
	var lines []LogLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for n := 1; sc.Scan(); n++ {
		parts := strings.SplitN(sc.Text(), " ", 4)
		if len(parts) < 3 {
			return lines, fmt.Errorf("log line %d %q: want \"<time> <stream> <tag> <text>\"", n, sc.Text())
		}
		ts, err := time.Parse(time.RFC3339Nano, parts[0])
		if err != nil {
			return lines, fmt.Errorf("log line %d: time %q: %w", n, parts[0], err)
		}
		if parts[1] != "stdout" && parts[1] != "stderr" {
			return lines, fmt.Errorf("log line %d: stream %q is neither stdout nor stderr", n, parts[1])
		}
		tag := strings.Split(parts[2], ":")[0] // tags may carry more after ':'
		if tag != "F" && tag != "P" {
			return lines, fmt.Errorf("log line %d: tag %q is neither F nor P", n, parts[2])
		}
		l := LogLine{Time: ts, Stream: parts[1], Partial: tag == "P"}
		if len(parts) == 4 {
			l.Text = parts[3]
		}
		lines = append(lines, l)
	}
	return lines, sc.Err()
}

// StreamText reassembles one stream of a parsed log: partial entries are joined, full entries
// end with "\n".
func StreamText(lines []LogLine, stream string) string {
	var b strings.Builder
	for _, l := range lines {
		if l.Stream != stream {
			continue
		}
		b.WriteString(l.Text)
		if !l.Partial {
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// WaitLog waits until the container log at path holds want on stream.
func WaitLog(ctx context.Context, path, stream, want string) ([]LogLine, error) {
	var lines []LogLine
	var err error
	for {
		lines, err = ReadContainerLog(path)
		if err == nil && strings.Contains(StreamText(lines, stream), want) {
			return lines, nil
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = errors.New("text not found")
			}
			return lines, fmt.Errorf("log %s: waiting for %q on %s: %v (have stdout %q, stderr %q): %w",
				path, want, stream, err, StreamText(lines, "stdout"), StreamText(lines, "stderr"), ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
