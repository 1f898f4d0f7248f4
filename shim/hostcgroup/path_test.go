package hostcgroup

import "testing"

func TestPath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"/pit-1/poduid/abc", "/pit-1/poduid/abc"},
		{"/kubepods/burstable/pod1/../pod1/abc/", "/kubepods/burstable/pod1/abc"},
		{"kubepods-burstable-pod1.slice:cri-containerd:abc",
			"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"},
		{"system.slice:docker:abc", "/system.slice/docker-abc.scope"},
		{":cri:abc", "/cri-abc.scope"},
		{"-.slice::abc", "/abc.scope"},
	} {
		got, err := Path(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("Path(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "/", "relative/path", "a:b", "a.slice:b:c:d", "nope:cri:abc",
		"a--b.slice:cri:abc", "-a.slice:cri:abc", "a.slice:cri:", "a.slice:cri:x/y", "a/b.slice:cri:abc"} {
		if got, err := Path(bad); err == nil {
			t.Errorf("Path(%q) = %q, want an error", bad, got)
		}
	}
}
