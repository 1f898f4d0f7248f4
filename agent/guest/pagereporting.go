package guest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// PageReportingParam is the kernel's own parameter for the smallest free block (as a buddy
// order: 2^order pages) that free page reporting hands back to the host through the
// virtio-balloon. The shim puts it on the kernel command line.
const PageReportingParam = "page_reporting.page_reporting_order"

// pageReportingSysfs is where the running kernel keeps that parameter (built in or module).
const pageReportingSysfs = "sys/module/page_reporting/parameters/page_reporting_order"

// pageReportingOrder returns the value of PageReportingParam on the kernel command line
// cmdline, if it is there and a number.
func pageReportingOrder(cmdline string) (uint64, bool) {
	var val string
	found := false
	for _, f := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(f, PageReportingParam+"="); ok {
			val, found = v, true // the last one wins, as in the kernel
		}
	}
	if !found {
		return 0, false
	}
	n, err := strconv.ParseUint(val, 10, 8)
	if err != nil {
		return 0, false
	}
	return n, true
}

// applyPageReportingOrder sets the free page reporting order the kernel command line asks for
// (PageReportingParam) under root (the guest's "/"). Linux 6.1's page_reporting_register
// overwrites the boot-time value with the balloon driver's (pageblock order: 2 MiB blocks on
// x86) when the driver probes, so the parameter only takes effect once written again at run
// time; a kernel without free page reporting has no such file, which is not an error.
// It reports whether it wrote the value.
func applyPageReportingOrder(root, cmdline string) (bool, error) {
	order, ok := pageReportingOrder(cmdline)
	if !ok {
		return false, nil
	}
	p := filepath.Join(root, pageReportingSysfs)
	cur, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("page reporting order: %w", err)
	}
	want := strconv.FormatUint(order, 10)
	if strings.TrimSpace(string(cur)) == want {
		return false, nil
	}
	if err := os.WriteFile(p, []byte(want), 0); err != nil {
		return false, fmt.Errorf("page reporting order %s: %w", want, err)
	}
	return true, nil
}
