package config

import (
	"errors"
	"fmt"
	"math"
	"path"
	"sort"
	"strconv"
	"strings"
)

// Pod annotations podvm reads. Pods set podvm.io/<key>; containerd passes them to the shim when
// its runtime config lists them in pod_annotations (deploy/containerd-podvm.toml passes
// "podvm.io/*"), and the shim honours only the keys annotations.allowed lists.
const (
	AnnotationPrefix = "podvm.io/"
	// AnnotationVCPUs is the VM's vCPU count, a whole number ("2").
	AnnotationVCPUs = AnnotationPrefix + "vcpus"
	// AnnotationMemory is the VM's memory, a quantity ("1Gi"), used as is.
	AnnotationMemory = AnnotationPrefix + "memory"
)

// containerd's CRI sandbox annotations, from containerd v2.4's internal/cri/annotations (an
// internal package, hence copied). kubelet fills them from the sum of the pod's container
// limits; they are absent or 0 when the pod sets none.
const (
	CRISandboxCPUPeriod = "io.kubernetes.cri.sandbox-cpu-period" // CFS period, µs
	CRISandboxCPUQuota  = "io.kubernetes.cri.sandbox-cpu-quota"  // CFS quota, µs; <= 0 = unlimited
	CRISandboxMemory    = "io.kubernetes.cri.sandbox-memory"     // memory limit in bytes; 0 = unlimited
	CRISandboxCPUShares = "io.kubernetes.cri.sandbox-cpu-shares" // cpu.shares from the pod's CPU requests
)

// Where a VM's vCPUs or memory came from.
const (
	SourceAnnotation       = "annotation"
	SourceSandboxResources = "sandbox-resources"
	SourceDefault          = "default"
)

// VMSize is how big a pod's VM is.
type VMSize struct {
	VCPUs     int
	MemoryMiB int
	// Source is where the size came from: SourceAnnotation, SourceSandboxResources or
	// SourceDefault when both vCPUs and memory came from the same place, else
	// "<vcpus source>+<memory source>" (e.g. "annotation+default").
	Source       string
	VCPUsSource  string
	MemorySource string
	// Warnings are podvm.io sizing annotations the pod set but the node config does not
	// allow; they were ignored. Log them.
	Warnings []string
}

// Allowed reports whether annotations.allowed lets pods set the annotation key (a full key,
// "podvm.io/memory").
func (c *Config) Allowed(key string) bool {
	name, ok := strings.CutPrefix(key, AnnotationPrefix)
	if !ok || name == "" {
		return false
	}
	for _, p := range c.Annotations.Allowed {
		if m, err := path.Match(p, name); err == nil && m {
			return true
		}
	}
	return false
}

// Annotation returns the value of the podvm.io annotation key (a full key,
// "podvm.io/disk.data") when the pod set it and annotations.allowed allows it.
func (c *Config) Annotation(annotations map[string]string, key string) (string, bool) {
	v, ok := annotations[key]
	if !ok || !c.Allowed(key) {
		return "", false
	}
	return v, true
}

// Ignored returns a warning for every podvm.io annotation the pod set that the node config does
// not allow, sorted by key. Like Kata, podvm ignores them rather than failing the pod.
func (c *Config) Ignored(annotations map[string]string) []string {
	var ws []string
	for k := range annotations {
		if strings.HasPrefix(k, AnnotationPrefix) && !c.Allowed(k) {
			ws = append(ws, c.ignoredWarning(k))
		}
	}
	sort.Strings(ws)
	return ws
}

func (c *Config) ignoredWarning(key string) string {
	return fmt.Sprintf("annotation %s ignored: not allowed by annotations.allowed in %s (add %q to allow it)",
		key, c.source(), strings.TrimPrefix(key, AnnotationPrefix))
}

// Size decides the VM size of a pod from its sandbox annotations. vCPUs and memory are decided
// separately, each from the first of:
//   - podvm.io/vcpus, podvm.io/memory, when annotations.allowed allows them (a present but not
//     allowed one is ignored with a warning in VMSize.Warnings);
//   - containerd's sandbox resources: vCPUs = ceil(sandbox-cpu-quota / sandbox-cpu-period),
//     memory = sandbox.default_memory + sandbox-memory (Kata's rule: sandbox-memory is the sum
//     of the limits of the containers that have one, so default_memory is what the guest and
//     the containers without a limit have beside them);
//   - sandbox.default_vcpus, sandbox.default_memory.
//
// The result must lie within 1..max_vcpus and 128Mi..max_memory; a value outside, or one that
// does not parse, is an error naming the annotation and saying what to do. Annotations are
// untrusted: Size never panics on them.
func Size(cfg *Config, annotations map[string]string) (VMSize, error) {
	var size VMSize
	for _, k := range []string{AnnotationVCPUs, AnnotationMemory} {
		if _, ok := annotations[k]; ok && !cfg.Allowed(k) {
			size.Warnings = append(size.Warnings, cfg.ignoredWarning(k))
		}
	}
	var errs []error
	var err error
	if size.VCPUs, size.VCPUsSource, err = cfg.vcpus(annotations); err != nil {
		errs = append(errs, err)
	}
	if size.MemoryMiB, size.MemorySource, err = cfg.memory(annotations); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return VMSize{}, err
	}
	size.Source = size.VCPUsSource
	if size.MemorySource != size.VCPUsSource {
		size.Source += "+" + size.MemorySource
	}
	return size, nil
}

func (c *Config) vcpus(annotations map[string]string) (int, string, error) {
	maxV := int64(c.Sandbox.MaxVCPUs)
	tooMany := fmt.Sprintf("more than the node allows (max_vcpus = %d in %s)", maxV, c.source())
	if v, ok := c.Annotation(annotations, AnnotationVCPUs); ok {
		n, err := strconv.ParseInt(v, 10, 64)
		switch {
		case errors.Is(err, strconv.ErrRange) && !strings.HasPrefix(v, "-"):
			return 0, "", annotationError(AnnotationVCPUs, v, tooMany)
		case err != nil:
			return 0, "", annotationError(AnnotationVCPUs, v, "not a whole number; use e.g. 2")
		case n < 1:
			return 0, "", annotationError(AnnotationVCPUs, v, "less than 1; use e.g. 1")
		case n > maxV:
			return 0, "", annotationError(AnnotationVCPUs, v, tooMany)
		}
		return int(n), SourceAnnotation, nil
	}
	quotaS, okQ := annotations[CRISandboxCPUQuota]
	periodS, okP := annotations[CRISandboxCPUPeriod]
	if okQ && okP {
		quota, err := strconv.ParseInt(quotaS, 10, 64)
		if err != nil {
			return 0, "", annotationError(CRISandboxCPUQuota, quotaS, "not an integer (containerd sets it from the pod's CPU limits)")
		}
		period, err := strconv.ParseInt(periodS, 10, 64)
		if err != nil {
			return 0, "", annotationError(CRISandboxCPUPeriod, periodS, "not an integer (containerd sets it from the pod's CPU limits)")
		}
		if quota > 0 && period > 0 {
			n := quota / period
			if quota%period != 0 {
				n++
			}
			if n > maxV {
				return 0, "", fmt.Errorf("pod CPU limit (%s/%s = %d/%d, %d vCPUs): %s; lower the pod's CPU limits or raise max_vcpus",
					CRISandboxCPUQuota, CRISandboxCPUPeriod, quota, period, n, tooMany)
			}
			return int(max(n, 1)), SourceSandboxResources, nil
		}
	}
	return c.Sandbox.DefaultVCPUs, SourceDefault, nil
}

func (c *Config) memory(annotations map[string]string) (int, string, error) {
	maxMem := c.Sandbox.MaxMemory
	tooMuch := fmt.Sprintf("more than the node allows (max_memory = %s in %s)", maxMem, c.source())
	if v, ok := c.Annotation(annotations, AnnotationMemory); ok {
		b, err := ParseBytes(v)
		switch {
		case errors.Is(err, errTooLarge):
			return 0, "", annotationError(AnnotationMemory, v, tooMuch)
		case err != nil:
			return 0, "", annotationError(AnnotationMemory, v, "not a size; use e.g. 512Mi")
		case b < MinMemory:
			return 0, "", annotationError(AnnotationMemory, v, "less than the minimum "+MinMemory.String()+"; use e.g. 512Mi")
		case b > maxMem:
			return 0, "", annotationError(AnnotationMemory, v, tooMuch)
		}
		return int(b.MiB()), SourceAnnotation, nil
	}
	if v, ok := annotations[CRISandboxMemory]; ok {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, "", annotationError(CRISandboxMemory, v, "not a byte count (containerd sets it from the pod's memory limits)")
		}
		if n > 0 {
			base := c.Sandbox.DefaultMemory
			if n > math.MaxInt64-int64(base) || Bytes(n)+base > maxMem {
				return 0, "", fmt.Errorf("pod memory limits (%s = %d) + default_memory %s: %s; lower the pod's memory limits or raise max_memory",
					CRISandboxMemory, n, base, tooMuch)
			}
			b := max(Bytes(n)+base, MinMemory)
			return int(b.MiB()), SourceSandboxResources, nil
		}
	}
	return int(c.Sandbox.DefaultMemory.MiB()), SourceDefault, nil
}

func annotationError(key, value, problem string) error {
	return fmt.Errorf("annotation %s=%q: %s", key, value, problem)
}
