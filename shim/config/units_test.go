package config

import (
	"testing"
	"time"
)

func TestParseBytes(t *testing.T) {
	tests := []struct {
		in   string
		want Bytes
		err  string
	}{
		{"0", 0, ""},
		{"1", 1, ""},
		{"536870912", 512 * MiB, ""},
		{"512Mi", 512 * MiB, ""},
		{"1Gi", GiB, ""},
		{"1.5Gi", GiB + 512*MiB, ""},
		{"1G", 1_000_000_000, ""},
		{"100M", 100_000_000, ""},
		{"1k", 1000, ""},
		{"2Ki", 2048, ""},
		{"1Ti", TiB, ""},
		{"1Pi", PiB, ""},
		{"7Ei", 7 * EiB, ""},
		{"0.1", 1, ""},            // rounds up to a whole byte
		{"1.0000001Ki", 1025, ""}, // rounds up
		{"9223372036854775807", 1<<63 - 1, ""},
		{"9223372036854775808", 0, "too large"},
		{"8Ei", 0, "too large"},
		{"", 0, "not a size"},
		{"abc", 0, "not a size"},
		{"512MB", 0, "not a size"},
		{"512 Mi", 0, "not a size"},
		{" 512Mi", 0, "not a size"},
		{"512mi", 0, "not a size"},
		{"100m", 0, "not a size"}, // milli-bytes make no sense
		{"-1", 0, "not a size"},
		{"+1", 0, "not a size"},
		{"1e9", 0, "not a size"},
		{".5Gi", 0, "not a size"},
		{"1.Gi", 0, "not a size"},
		{"1.2.3", 0, "not a size"},
		{"Mi", 0, "not a size"},
		{"1K", 0, "not a size"},
		{"１Gi", 0, "not a size"},
		{"11111111111111111111111111111111111111111111111111111111111111111", 0, "not a size"},
	}
	for _, tt := range tests {
		got, err := ParseBytes(tt.in)
		switch {
		case tt.err == "" && err != nil:
			t.Errorf("ParseBytes(%q): %v", tt.in, err)
		case tt.err != "" && (err == nil || err.Error() != tt.err):
			t.Errorf("ParseBytes(%q) = %d, %v; want error %q", tt.in, got, err, tt.err)
		case tt.err == "" && got != tt.want:
			t.Errorf("ParseBytes(%q) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

func TestBytesString(t *testing.T) {
	for b, want := range map[Bytes]string{
		0: "0", 1000: "1000", 1024: "1Ki", 512 * MiB: "512Mi", GiB + 512*MiB: "1536Mi",
		16 * GiB: "16Gi", 3 * EiB: "3Ei", -MiB: "-1Mi",
	} {
		if got := b.String(); got != want {
			t.Errorf("Bytes(%d).String() = %q, want %q", int64(b), got, want)
		}
		if b >= 0 {
			if back, err := ParseBytes(want); err != nil || back != b {
				t.Errorf("ParseBytes(%q) = %d, %v; want %d", want, back, err, int64(b))
			}
		}
	}
	if got := (MiB + 1).MiB(); got != 2 {
		t.Errorf("MiB() of 1Mi+1 = %d, want 2 (rounded up)", got)
	}
}

func TestDurationString(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0s", 60 * time.Second: "1m", time.Hour: "1h", 90 * time.Second: "1m30s",
		2*time.Hour + time.Minute: "2h1m", 1500 * time.Millisecond: "1.5s",
	} {
		if got := (Duration{d}).String(); got != want {
			t.Errorf("Duration(%v).String() = %q, want %q", d, got, want)
		}
		var back Duration
		if err := back.UnmarshalText([]byte(want)); err != nil || back.Duration != d {
			t.Errorf("UnmarshalText(%q) = %v, %v; want %v", want, back, err, d)
		}
	}
}

func FuzzParseBytes(f *testing.F) {
	for _, s := range []string{"512Mi", "1.5Gi", "1G", "0.001", "9223372036854775807", "8Ei"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := ParseBytes(s)
		if err != nil {
			return
		}
		if b < 0 {
			t.Fatalf("ParseBytes(%q) = %d < 0", s, b)
		}
		if back, err := ParseBytes(b.String()); err != nil || back != b {
			t.Fatalf("ParseBytes(%q) = %d, but its String %q parses to %d, %v", s, b, b.String(), back, err)
		}
	})
}
