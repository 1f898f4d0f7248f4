package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// TestExecPastPlantedFiles: a container's own files must not decide whether the runtime can
// exec into it. runc init (which podvm's agent runs from its own binary, /init in the guest)
// starts its Go code after it has joined the container's mount namespace, so any path its
// package initialisers open is the container's: a FIFO the container made there would block
// them before runc init is set up, and every exec after it would hang (as it did while the
// agent hashed its own binary by path at start, as google.golang.org/protobuf does). runc
// execs past the same files.
func TestExecPastPlantedFiles(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			env := envFor(t, handler)
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
			defer cancel()
			pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "plant", Handler: criHandler(handler)})
			id := startSleeper(ctx, t, env, pod, "planter")
			// FIFOs where the agent binary's name would resolve in the container, and where
			// runc's sealed copy of it or a memfd copy would.
			sh(t, ctx, env, id, "mkfifo /init /podvm-agent && mkdir -p '/memfd:runc_cloned:/proc/self' && mkfifo '/memfd:runc_cloned:/proc/self/exe' && ls -l /init")
			for i := range 3 {
				start := time.Now()
				stdout, stderr, err := env.Runtime.ExecSync(ctx, id, []string{"echo", "in"}, 20*time.Second)
				if err != nil || strings.TrimSpace(string(stdout)) != "in" {
					t.Fatalf("exec %d after the container planted FIFOs: %v after %v (stdout %q, stderr %q); want it to run",
						i, err, time.Since(start).Round(time.Millisecond), stdout, stderr)
				}
			}
			removePod(ctx, t, env, pod)
		})
	}
}
