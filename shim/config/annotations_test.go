package config

import (
	"reflect"
	"strings"
	"testing"
)

// testConfig is a node with 1 vCPU by default, 2 vCPUs and 4Gi at most, loaded from file,
// allowing allowed.
func testConfig(allowed ...string) *Config {
	c := Default()
	c.Path = file
	c.Sandbox.DefaultVCPUs = 1
	c.Sandbox.MaxVCPUs = 2
	c.Sandbox.MaxMemory = 4 * GiB
	c.Annotations.Allowed = append([]string{}, allowed...)
	return c
}

func TestAllowed(t *testing.T) {
	c := testConfig("memory", "disk.*", "net.?")
	for key, want := range map[string]bool{
		"podvm.io/memory":     true,
		"podvm.io/vcpus":      false,
		"podvm.io/disk.data":  true,
		"podvm.io/disk.":      true,
		"podvm.io/disk":       false,
		"podvm.io/net.a":      true,
		"podvm.io/net.ab":     false,
		"podvm.io/":           false,
		"memory":              false, // keys are full annotation keys
		"example.com/memory":  false,
		"podvm.io/memory/sub": false,
	} {
		if got := c.Allowed(key); got != want {
			t.Errorf("Allowed(%q) = %v, want %v", key, got, want)
		}
	}
	if testConfig().Allowed("podvm.io/memory") {
		t.Error("nothing is allowed by default")
	}
	if all := testConfig("*"); !all.Allowed("podvm.io/vcpus") || !all.Allowed("podvm.io/disk.x") {
		t.Error(`"*" allows every podvm.io key`)
	}

	anns := map[string]string{"podvm.io/disk.data": "raw", "podvm.io/vcpus": "2", "other": "x"}
	if v, ok := c.Annotation(anns, "podvm.io/disk.data"); !ok || v != "raw" {
		t.Errorf("Annotation(disk.data) = %q, %v", v, ok)
	}
	if v, ok := c.Annotation(anns, "podvm.io/vcpus"); ok {
		t.Errorf("Annotation(vcpus) = %q, not allowed but returned", v)
	}
	if _, ok := c.Annotation(anns, "podvm.io/disk.logs"); ok {
		t.Error("Annotation of an absent key returned ok")
	}
	want := []string{`annotation podvm.io/vcpus ignored: not allowed by annotations.allowed in /etc/podvm/config.toml (add "vcpus" to allow it)`}
	if got := c.Ignored(anns); !reflect.DeepEqual(got, want) {
		t.Errorf("Ignored = %q, want %q", got, want)
	}
}

// cpuLimit is the sandbox annotations containerd sets from a pod's CPU limits.
func cpuLimit(quota, period string) map[string]string {
	return map[string]string{CRISandboxCPUQuota: quota, CRISandboxCPUPeriod: period}
}

// withAnns returns a copy of m with the key-value pairs kv added.
func withAnns(m map[string]string, kv ...string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

func TestSize(t *testing.T) {
	both := testConfig("vcpus", "memory")
	none := testConfig()
	tests := []struct {
		name string
		cfg  *Config
		anns map[string]string
		want VMSize
	}{
		{"defaults", both, nil, VMSize{1, 512, "default", "default", "default", nil}},
		{"annotations", both, map[string]string{AnnotationVCPUs: "2", AnnotationMemory: "1Gi"},
			VMSize{2, 1024, "annotation", "annotation", "annotation", nil}},
		{"annotation memory rounds up to MiB", both, map[string]string{AnnotationMemory: "200000000"},
			VMSize{1, 191, "default+annotation", "default", "annotation", nil}},
		{"annotations beat sandbox resources", both,
			withAnns(cpuLimit("200000", "100000"), CRISandboxMemory, "1073741824", AnnotationVCPUs, "1", AnnotationMemory, "256Mi"),
			VMSize{1, 256, "annotation", "annotation", "annotation", nil}},
		// Kata's rule: default_memory (512Mi) + the sum of the containers' limits.
		{"sandbox resources", both, withAnns(cpuLimit("150000", "100000"), CRISandboxMemory, "536870912"),
			VMSize{2, 1024, "sandbox-resources", "sandbox-resources", "sandbox-resources", nil}},
		{"sandbox resources: small quota is 1 vCPU, memory rounds up to MiB", both,
			withAnns(cpuLimit("1000", "100000"), CRISandboxMemory, "1"),
			VMSize{1, 513, "sandbox-resources", "sandbox-resources", "sandbox-resources", nil}},
		{"sandbox resources unset (0, -1) fall back to defaults", both,
			withAnns(cpuLimit("-1", "100000"), CRISandboxMemory, "0"),
			VMSize{1, 512, "default", "default", "default", nil}},
		{"quota without period is ignored", both, map[string]string{CRISandboxCPUQuota: "200000"},
			VMSize{1, 512, "default", "default", "default", nil}},
		{"annotation vcpus, resources memory", both, withAnns(cpuLimit("200000", "100000"), CRISandboxMemory, "1073741824", AnnotationVCPUs, "1"),
			VMSize{1, 1536, "annotation+sandbox-resources", "annotation", "sandbox-resources", nil}},
		{"not allowed: ignored with warnings", none,
			withAnns(cpuLimit("200000", "100000"), AnnotationVCPUs, "64", AnnotationMemory, "abc"),
			VMSize{2, 512, "sandbox-resources+default", "sandbox-resources", "default", []string{
				`annotation podvm.io/vcpus ignored: not allowed by annotations.allowed in /etc/podvm/config.toml (add "vcpus" to allow it)`,
				`annotation podvm.io/memory ignored: not allowed by annotations.allowed in /etc/podvm/config.toml (add "memory" to allow it)`,
			}}},
		{"only memory allowed", testConfig("memory"), map[string]string{AnnotationVCPUs: "2", AnnotationMemory: "1Gi"},
			VMSize{1, 1024, "default+annotation", "default", "annotation", []string{
				`annotation podvm.io/vcpus ignored: not allowed by annotations.allowed in /etc/podvm/config.toml (add "vcpus" to allow it)`,
			}}},
		{"vcpus at max", both, map[string]string{AnnotationVCPUs: "2"}, VMSize{2, 512, "annotation+default", "annotation", "default", nil}},
		{"memory at bounds", both, map[string]string{AnnotationMemory: "4Gi"}, VMSize{1, 4096, "default+annotation", "default", "annotation", nil}},
		{"memory at minimum", both, map[string]string{AnnotationMemory: "128Mi"}, VMSize{1, 128, "default+annotation", "default", "annotation", nil}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Size(tt.cfg, tt.anns)
			if err != nil {
				t.Fatalf("Size: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Size =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

// TestSizeErrors: every refusal says what was wrong and what to write instead.
func TestSizeErrors(t *testing.T) {
	both := testConfig("vcpus", "memory")
	defaults := Default() // no file: messages point at the default path
	defaults.Sandbox.MaxVCPUs = 2
	defaults.Annotations.Allowed = []string{"*"}
	tests := []struct {
		name string
		cfg  *Config
		anns map[string]string
		err  string
	}{
		{"vcpus not a number", both, map[string]string{AnnotationVCPUs: "two"},
			`annotation podvm.io/vcpus="two": not a whole number; use e.g. 2`},
		{"vcpus fraction", both, map[string]string{AnnotationVCPUs: "1.5"},
			`annotation podvm.io/vcpus="1.5": not a whole number; use e.g. 2`},
		{"vcpus zero", both, map[string]string{AnnotationVCPUs: "0"},
			`annotation podvm.io/vcpus="0": less than 1; use e.g. 1`},
		{"vcpus negative", both, map[string]string{AnnotationVCPUs: "-3"},
			`annotation podvm.io/vcpus="-3": less than 1; use e.g. 1`},
		{"vcpus over max", both, map[string]string{AnnotationVCPUs: "64"},
			`annotation podvm.io/vcpus="64": more than the node allows (max_vcpus = 2 in /etc/podvm/config.toml)`},
		{"vcpus overflow", both, map[string]string{AnnotationVCPUs: "99999999999999999999"},
			`annotation podvm.io/vcpus="99999999999999999999": more than the node allows (max_vcpus = 2 in /etc/podvm/config.toml)`},
		{"vcpus over max, default config", defaults, map[string]string{AnnotationVCPUs: "3"},
			`annotation podvm.io/vcpus="3": more than the node allows (max_vcpus = 2 in /etc/podvm/config.toml)`},
		{"memory not a size", both, map[string]string{AnnotationMemory: "abc"},
			`annotation podvm.io/memory="abc": not a size; use e.g. 512Mi`},
		{"memory with unit typo", both, map[string]string{AnnotationMemory: "1GB"},
			`annotation podvm.io/memory="1GB": not a size; use e.g. 512Mi`},
		{"memory too small", both, map[string]string{AnnotationMemory: "64Mi"},
			`annotation podvm.io/memory="64Mi": less than the minimum 128Mi; use e.g. 512Mi`},
		{"memory over max", both, map[string]string{AnnotationMemory: "5Gi"},
			`annotation podvm.io/memory="5Gi": more than the node allows (max_memory = 4Gi in /etc/podvm/config.toml)`},
		{"memory overflow", both, map[string]string{AnnotationMemory: "9Ei"},
			`annotation podvm.io/memory="9Ei": more than the node allows (max_memory = 4Gi in /etc/podvm/config.toml)`},
		{"both bad", both, map[string]string{AnnotationVCPUs: "x", AnnotationMemory: "y"},
			"annotation podvm.io/vcpus=\"x\": not a whole number; use e.g. 2\nannotation podvm.io/memory=\"y\": not a size; use e.g. 512Mi"},
		{"cpu limit over max", both, cpuLimit("400000", "100000"),
			`pod CPU limit (io.kubernetes.cri.sandbox-cpu-quota/io.kubernetes.cri.sandbox-cpu-period = 400000/100000, 4 vCPUs): more than the node allows (max_vcpus = 2 in /etc/podvm/config.toml); lower the pod's CPU limits or raise max_vcpus`},
		{"bad quota", both, cpuLimit("lots", "100000"),
			`annotation io.kubernetes.cri.sandbox-cpu-quota="lots": not an integer (containerd sets it from the pod's CPU limits)`},
		{"bad period", both, cpuLimit("100000", ""),
			`annotation io.kubernetes.cri.sandbox-cpu-period="": not an integer (containerd sets it from the pod's CPU limits)`},
		{"memory limit over max", both, map[string]string{CRISandboxMemory: "4294967296"},
			`pod memory limits (io.kubernetes.cri.sandbox-memory = 4294967296) + default_memory 512Mi: more than the node allows (max_memory = 4Gi in /etc/podvm/config.toml); lower the pod's memory limits or raise max_memory`},
		{"memory limit overflow", both, map[string]string{CRISandboxMemory: "9223372036854775807"},
			`pod memory limits (io.kubernetes.cri.sandbox-memory = 9223372036854775807) + default_memory 512Mi: more than the node allows (max_memory = 4Gi in /etc/podvm/config.toml); lower the pod's memory limits or raise max_memory`},
		{"bad memory limit", both, map[string]string{CRISandboxMemory: "-5"},
			`annotation io.kubernetes.cri.sandbox-memory="-5": not a byte count (containerd sets it from the pod's memory limits)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := Size(tt.cfg, tt.anns); err == nil || err.Error() != tt.err {
				t.Errorf("Size = %+v, %v\nwant error %s", got, err, tt.err)
			}
		})
	}
}

func FuzzSize(f *testing.F) {
	f.Add("2", "1Gi", "200000", "100000", "536870912", "*")
	f.Add("-1", "abc", "-1", "0", "-5", "vcpus")
	f.Add("99999999999999999999", "9Ei", "9223372036854775807", "1", "9223372036854775807", "memory")
	f.Add("", "", "", "", "", "[")
	f.Fuzz(func(t *testing.T, vcpus, memory, quota, period, sandboxMem, allowed string) {
		c := testConfig(strings.Split(allowed, ",")...)
		anns := map[string]string{
			AnnotationVCPUs: vcpus, AnnotationMemory: memory,
			CRISandboxCPUQuota: quota, CRISandboxCPUPeriod: period, CRISandboxMemory: sandboxMem,
			AnnotationPrefix + vcpus: memory,
		}
		size, err := Size(c, anns)
		c.Ignored(anns)
		c.Annotation(anns, AnnotationPrefix+vcpus)
		if err != nil {
			if size.VCPUs != 0 || size.MemoryMiB != 0 {
				t.Fatalf("error %v with a size %+v", err, size)
			}
			return
		}
		if size.VCPUs < 1 || size.VCPUs > c.Sandbox.MaxVCPUs {
			t.Fatalf("vCPUs %d outside 1..%d", size.VCPUs, c.Sandbox.MaxVCPUs)
		}
		if size.MemoryMiB < int(MinMemory/MiB) || int64(size.MemoryMiB) > c.Sandbox.MaxMemory.MiB() {
			t.Fatalf("memory %d MiB outside %s..%s", size.MemoryMiB, MinMemory, c.Sandbox.MaxMemory)
		}
		if size.Source == "" || size.VCPUsSource == "" || size.MemorySource == "" {
			t.Fatalf("size %+v without a source", size)
		}
	})
}
