// Package detrand stands in for google.golang.org/protobuf/internal/detrand in the agent's
// binary: `make agent` builds podvm-agent against a copy of that module in which this file is
// the package's source (hack/agent-modfile.sh). It keeps the package's API and purpose (a
// seed that is the same for the life of a build and differs between builds, so that nothing
// comes to depend on the exact text protobuf prints) but reads no file: the seed hashes the
// build information linked into the binary, on first use.
//
// The original hashes the running binary, opened by the path /proc/self/exe names, while
// its package initialises. The agent binary is also runc init, whose Go code starts after it
// has joined a container's mount namespace: that path (/init) was then the container's, so
// every exec opened and read a file of the container's, through virtio-fs, and a FIFO the
// container made there blocked runc init before it was set up (docs/security.md,
// integration TestExecPastPlantedFiles).
package detrand

import (
	"hash/fnv"
	"runtime/debug"
	"sync"
)

var (
	disabled bool
	seedOnce sync.Once
	seed     uint64
)

// Disable makes every function return the zero value; call it only while the program
// initialises.
func Disable() {
	disabled = true
}

// Bool returns a boolean fixed for the build.
func Bool() bool {
	return randSeed()%2 == 1
}

// Intn returns an integer in [0, n) fixed for the build.
func Intn(n int) int {
	if n <= 0 {
		panic("must be positive")
	}
	return int(randSeed() % uint64(n))
}

// randSeed is computed on first use, not while the package initialises: most processes
// never ask (runc init does not), and the start of every runc init is what an exec waits for.
func randSeed() uint64 {
	if disabled {
		return 0
	}
	seedOnce.Do(func() { seed = buildHash() })
	return seed
}

// buildHash hashes the build information the linker put in the binary (module versions and
// sums, build settings): no file is read.
func buildHash() uint64 {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return 0
	}
	h := fnv.New64()
	_, _ = h.Write([]byte(bi.String()))
	return h.Sum64()
}
