package guest

import (
	"os/exec"

	"golang.org/x/sys/unix"
)

// WarmArg is the argument podvm-agent exits on as soon as it has started.
const WarmArg = "warm"

// warmStart runs this binary once with WarmArg, at the lowest priority, and waits for it.
//
// Every container start and exec runs this binary anew (libcontainer's `runc init`), and
// the first thing each does is the Go runtime's start and the package initialisers. Under
// TCG the first run of that code in a VM also translates it, which a booted guest did when
// its agent started; a guest restored from a VM template starts with an empty translation
// cache and its agent long started, so its first container paid for it: 367-404 ms against
// 341 ms in a booted guest. Run once ahead, it is translated before a container needs it
// (docs/templating.md).
func warmStart() {
	cmd := exec.Command("/proc/self/exe", WarmArg)
	if err := cmd.Start(); err != nil {
		return
	}
	_ = unix.Setpriority(unix.PRIO_PROCESS, cmd.Process.Pid, 19)
	_ = cmd.Wait()
}
