package guest

import (
	"os"
	"path/filepath"
	"testing"
)

func TestPageReportingOrder(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		want    uint64
		ok      bool
	}{
		{"console=ttyS0 quiet", 0, false},
		{"console=ttyS0 page_reporting.page_reporting_order=3 quiet", 3, true},
		{"page_reporting.page_reporting_order=0", 0, true},
		{"page_reporting.page_reporting_order=3 page_reporting.page_reporting_order=5", 5, true},
		{"page_reporting.page_reporting_order=", 0, false},
		{"page_reporting.page_reporting_order=-1", 0, false},
		{"page_reporting.page_reporting_order=x", 0, false},
		{"page_reporting.page_reporting_order=300", 0, false},
		{"xpage_reporting.page_reporting_order=3", 0, false},
	} {
		got, ok := pageReportingOrder(tc.cmdline)
		if got != tc.want || ok != tc.ok {
			t.Errorf("pageReportingOrder(%q) = %d, %v; want %d, %v", tc.cmdline, got, ok, tc.want, tc.ok)
		}
	}
}

// TestApplyPageReportingOrder: the value on the command line replaces what the balloon driver
// registered (Linux 6.1 overwrites the boot parameter at registration); no parameter or no
// free page reporting in the kernel leaves everything as it is.
func TestApplyPageReportingOrder(t *testing.T) {
	withFile := func(t *testing.T, val string) (root, file string) {
		root = t.TempDir()
		file = filepath.Join(root, pageReportingSysfs)
		if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, []byte(val), 0o644); err != nil {
			t.Fatal(err)
		}
		return root, file
	}
	read := func(t *testing.T, file string) string {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}

	t.Run("overrides the driver's order", func(t *testing.T) {
		root, file := withFile(t, "9\n")
		wrote, err := applyPageReportingOrder(root, "quiet page_reporting.page_reporting_order=3")
		if err != nil || !wrote {
			t.Fatalf("applyPageReportingOrder = %v, %v; want true, nil", wrote, err)
		}
		if got := read(t, file); got != "3" {
			t.Errorf("sysfs value %q, want 3", got)
		}
	})
	t.Run("already set", func(t *testing.T) {
		root, file := withFile(t, "3\n")
		if wrote, err := applyPageReportingOrder(root, "page_reporting.page_reporting_order=3"); err != nil || wrote {
			t.Fatalf("applyPageReportingOrder = %v, %v; want false, nil", wrote, err)
		}
		if got := read(t, file); got != "3\n" {
			t.Errorf("sysfs value %q changed", got)
		}
	})
	t.Run("not asked", func(t *testing.T) {
		root, file := withFile(t, "9\n")
		if wrote, err := applyPageReportingOrder(root, "console=ttyS0"); err != nil || wrote {
			t.Fatalf("applyPageReportingOrder = %v, %v; want false, nil", wrote, err)
		}
		if got := read(t, file); got != "9\n" {
			t.Errorf("sysfs value %q changed", got)
		}
	})
	t.Run("kernel without page reporting", func(t *testing.T) {
		if wrote, err := applyPageReportingOrder(t.TempDir(), "page_reporting.page_reporting_order=3"); err != nil || wrote {
			t.Fatalf("applyPageReportingOrder = %v, %v; want false, nil", wrote, err)
		}
	})
}
