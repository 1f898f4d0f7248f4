package guest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// initTimesEnv carries PID 1's boot-phase times (CLOCK_BOOTTIME, ns: "<initMain>,<initDone>") to
// the server it starts, so the server's "ready" log line tells where the guest's boot went.
// PID 1 is C (cmd/podvm-agent/pid1.go), which writes it.
const initTimesEnv = "PODVM_INIT_TIMES"

// processStart is when this process's Go code started running (after the runtime's and the
// imported packages' initialisation).
var processStart = sinceBoot()

// sinceBoot is CLOCK_BOOTTIME: the time since the kernel started (decompression excluded).
func sinceBoot() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return time.Duration(ts.Nano())
}

// bootPhases are the guest's boot milestones, each a CLOCK_BOOTTIME reading.
type bootPhases struct {
	// initMain: PID 1 started (the kernel's own boot and /init's exec; from an initramfs, also
	// guest.Init's Go start, modules and move onto its own root).
	// initDone: PID 1 mounted the kernel filesystems and starts the server.
	// serverMain: the server's main started. ready: it listens on every transport.
	initMain, initDone, serverMain, ready time.Duration
}

// bootPhasesFromEnv reads what PID 1 handed over; zero values when it is missing or garbled
// (the server started by hand, or by an older init).
func bootPhasesFromEnv() bootPhases {
	var b bootPhases
	v, ok := os.LookupEnv(initTimesEnv)
	if !ok {
		return b
	}
	_ = os.Unsetenv(initTimesEnv) // containers inherit nothing of it
	f := strings.Split(v, ",")
	if len(f) != 2 {
		return b
	}
	a, err1 := strconv.ParseInt(f[0], 10, 64)
	c, err2 := strconv.ParseInt(f[1], 10, 64)
	if err1 != nil || err2 != nil {
		return b
	}
	b.initMain, b.initDone = time.Duration(a), time.Duration(c)
	return b
}

// String is the log's view: each phase's length, in the order they happen.
func (b bootPhases) String() string {
	ms := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	if b.initMain == 0 {
		return fmt.Sprintf("kernel start to server %s, server start to serving %s", ms(b.serverMain), ms(b.ready-b.serverMain))
	}
	return fmt.Sprintf("kernel start to /init %s, /init setup %s, server exec %s, server start to serving %s",
		ms(b.initMain), ms(b.initDone-b.initMain), ms(b.serverMain-b.initDone), ms(b.ready-b.serverMain))
}
