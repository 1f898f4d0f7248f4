package guest

import "testing"

func TestParseMemInfo(t *testing.T) {
	r, err := parseMemInfo([]byte("MemTotal:         497012 kB\nMemFree:          400000 kB\nMemAvailable:     450000 kB\nHugePages_Total:       0\n"))
	if err != nil || r.TotalBytes != 497012<<10 || r.AvailableBytes != 450000<<10 {
		t.Fatalf("parseMemInfo = %+v, %v", r, err)
	}
	if _, err := parseMemInfo([]byte("MemTotal: 1 kB\n")); err == nil {
		t.Fatal("no MemAvailable: want an error")
	}
}
