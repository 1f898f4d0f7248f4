package k8s

import (
	"strings"
	"testing"
)

func TestKubeletVerbosity(t *testing.T) {
	for _, tc := range []struct{ env, want, err string }{
		{"", "2", ""},
		{"10", "10", ""},
		{"0", "0", ""},
		{"11", "", "use 0 to 10"},
		{"-1", "", "use 0 to 10"},
		{"debug", "", `PODVM_E2E_KUBELET_V="debug"`},
	} {
		t.Setenv(KubeletVerbosityEnv, tc.env)
		got, err := kubeletVerbosity()
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: got %q, %v; want an error with %q", tc.env, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q: got %q, %v; want %q", tc.env, got, err, tc.want)
		}
	}
}
