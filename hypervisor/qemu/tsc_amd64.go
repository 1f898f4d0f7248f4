package qemu

const haveTSC = true

// rdtsc returns the CPU's time stamp counter (tsc_amd64.s).
func rdtsc() uint64
