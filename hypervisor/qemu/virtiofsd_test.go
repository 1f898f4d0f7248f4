package qemu

import (
	"reflect"
	"strconv"
	"strings"
	"testing"
)

func TestVirtiofsdArgs(t *testing.T) {
	tests := []struct {
		name   string
		flavor virtiofsdFlavor
		cache  string
		debug  bool
		want   []string
	}{
		{"C auto", virtiofsdC, "auto", false, []string{
			"--fd=3", "-o", "source=/shared", "-o", "cache=auto",
			"-o", "announce_submounts", "-o", "sandbox=namespace", "-o", "modcaps=-mknod:-setfcap", "--thread-pool-size=1"}},
		{"C keep is always with auto's timeout", virtiofsdC, "keep", false, []string{
			"--fd=3", "-o", "source=/shared", "-o", "cache=always", "-o", "timeout=1",
			"-o", "announce_submounts", "-o", "sandbox=namespace", "-o", "modcaps=-mknod:-setfcap", "--thread-pool-size=1"}},
		{"Rust keep is auto", virtiofsdRust, "keep", false, []string{
			"--fd=3", "--shared-dir", "/shared", "--cache", "auto",
			"--announce-submounts", "--sandbox", "namespace", "--modcaps=-mknod:-setfcap", "--thread-pool-size", "1"}},
		{"C never is none", virtiofsdC, "never", true, []string{
			"--fd=3", "-o", "source=/shared", "-o", "cache=none",
			"-o", "announce_submounts", "-o", "sandbox=namespace", "-o", "modcaps=-mknod:-setfcap", "--thread-pool-size=1", "-o", "log_level=debug"}},
		{"Rust never", virtiofsdRust, "never", false, []string{
			"--fd=3", "--shared-dir", "/shared", "--cache", "never",
			"--announce-submounts", "--sandbox", "namespace", "--modcaps=-mknod:-setfcap", "--thread-pool-size", "1"}},
		{"Rust always debug", virtiofsdRust, "always", true, []string{
			"--fd=3", "--shared-dir", "/shared", "--cache", "always",
			"--announce-submounts", "--sandbox", "namespace", "--modcaps=-mknod:-setfcap", "--thread-pool-size", "1", "--log-level", "debug"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := virtiofsdArgs(tt.flavor, "/shared", tt.cache, tt.debug)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got  %q\nwant %q", got, tt.want)
			}
		})
	}
	if _, err := virtiofsdArgs(0, "/d", "auto", false); err == nil {
		t.Fatal("unknown flavor accepted")
	}
}

func TestFlavorFromHelp(t *testing.T) {
	tests := []struct {
		help string
		want virtiofsdFlavor
	}{
		{"usage: virtiofsd [options]\n    -o source=PATH             shared directory tree\n", virtiofsdC},
		{"Usage: virtiofsd [OPTIONS] --socket-path <SOCKET_PATH>\n      --shared-dir <SHARED_DIR>\n", virtiofsdRust},
		{"something else", 0},
	}
	for _, tt := range tests {
		if got := flavorFromHelp([]byte(tt.help)); got != tt.want {
			t.Errorf("flavorFromHelp(%q) = %v, want %v", tt.help, got, tt.want)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/a\040b`: "/a b",
		`/plain`:  "/plain",
		`/x\134y`: `/x\y`,
		`/end\04`: `/end\04`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

// unescapeMountinfo decodes the \NNN octal escapes mountinfo uses for space, tab, \n and \.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
