package main

import (
	"context"
	"flag"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/podvm/podvm/metrics"
	"github.com/podvm/podvm/shim/config"
)

// runOverhead measures running pod VMs and prints the RuntimeClass overhead they need.
func runOverhead(ctx context.Context, e *env, args []string) error {
	const name = "podvm overhead"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	path := configFlag(fs)
	sandbox := fs.String("sandbox", "", "measure only the sandbox whose id starts with `PREFIX` (default: every ready one)")
	window := fs.Duration("window", 10*time.Second, "measure CPU use over `DURATION`")
	setUsage(fs, name+" [flags]",
		"Measures the pod VMs running on this node (run it with an idle pod: a pod whose containers\ndo nothing) and prints the RuntimeClass overhead.podFixed they need:\n  memory = sandbox.default_memory (the guest RAM every VM gets beside the containers'\n           limits) + the larger of sandbox.memory_overhead and the memory QEMU, virtiofsd\n           and the shim use besides guest RAM (their PSS minus the guest RAM QEMU has\n           touched), measured, rounded up to 16Mi;\n  cpu    = the CPU QEMU, virtiofsd and the shim use over --window, measured, rounded up to\n           10m.\nWith several pods it takes the largest. It reads the shims' metrics sockets, as 'podvm\nmetrics' does; needs root.")
	cfg, err := parseConfig(e, fs, path, args)
	if err != nil {
		return err
	}
	if *window < time.Second {
		return usagef(name, "--window %s: too short to measure CPU use; use e.g. 10s", *window)
	}
	node := &metrics.Node{StateDir: cfg.Sandbox.StateDir, NotSandboxes: []string{cfg.TemplateDir()}, Timeout: 5 * time.Second}
	before, err := node.Gather(ctx)
	if err != nil {
		return err
	}
	select {
	case <-time.After(*window):
	case <-ctx.Done():
		return ctx.Err()
	}
	after, err := node.Gather(ctx)
	if err != nil {
		return err
	}
	ms := measureOverhead(before, after, *window, *sandbox)
	if len(ms) == 0 {
		return fmt.Errorf("no ready pod VM to measure in %s%s: start an idle pod with runtimeClassName: podvm first", cfg.Sandbox.StateDir, map[bool]string{true: " matching --sandbox " + *sandbox}[*sandbox != ""])
	}
	printOverhead(e, cfg, ms, *window)
	return nil
}

// sandboxCost is what one pod VM costs the node besides its containers.
type sandboxCost struct {
	id string
	// pss is each process's PSS; touched is the guest RAM QEMU has touched.
	pss     map[string]float64
	touched float64
	// own is the processes' PSS minus the guest RAM; cpu is their CPU use in cores.
	own, cpu float64
}

// measureOverhead computes the cost of every ready sandbox (id starting with prefix) from two
// scrapes window apart.
func measureOverhead(before, after []*dto.MetricFamily, window time.Duration, prefix string) []sandboxCost {
	cpu0 := bySandbox(before, "podvm_process_cpu_seconds_total")
	pss := bySandbox(after, "podvm_process_proportional_memory_bytes")
	touched := bySandbox(after, "podvm_guest_memory_touched_bytes")
	state := bySandbox(after, "podvm_sandbox_state")
	cpu1 := bySandbox(after, "podvm_process_cpu_seconds_total")
	var out []sandboxCost
	for id, procs := range pss {
		if !strings.HasPrefix(id, prefix) || state[id]["ready"] != 1 {
			continue
		}
		c := sandboxCost{id: id, pss: procs, touched: touched[id][""]}
		for _, v := range procs {
			c.own += v
		}
		c.own -= c.touched
		for p, v := range cpu1[id] {
			c.cpu += (v - cpu0[id][p]) / window.Seconds()
		}
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// bySandbox returns a family's values by sandbox id and then by its process (or state)
// label ("" when it has neither).
func bySandbox(fams []*dto.MetricFamily, name string) map[string]map[string]float64 {
	out := map[string]map[string]float64{}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			var id, key string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case metrics.LabelSandbox:
					id = l.GetValue()
				case "process", "state":
					key = l.GetValue()
				}
			}
			if out[id] == nil {
				out[id] = map[string]float64{}
			}
			out[id][key] = m.GetGauge().GetValue() + m.GetCounter().GetValue() + m.GetUntyped().GetValue()
		}
	}
	return out
}

func printOverhead(e *env, cfg *config.Config, ms []sandboxCost, window time.Duration) {
	var own, cpu float64
	for _, c := range ms {
		fmt.Fprintf(e.stdout, "sandbox %s: PSS qemu %s, virtiofsd %s, shim %s; guest RAM touched %s; besides guest RAM %s; CPU %s over %s\n",
			short(c.id), mib(c.pss["qemu"]), mib(c.pss["virtiofsd"]), mib(c.pss["shim"]), mib(c.touched), mib(c.own), milli(c.cpu), window)
		own, cpu = math.Max(own, c.own), math.Max(cpu, c.cpu)
	}
	const step = 16 << 20
	host := math.Max(float64(cfg.Sandbox.MemoryOverhead), own)
	memory := math.Ceil((float64(cfg.Sandbox.DefaultMemory)+host)/step) * step
	fmt.Fprintf(e.stdout, "\nmemory = sandbox.default_memory %s (guest RAM beside the containers' limits) + the larger of "+
		"sandbox.memory_overhead %s and measured %s, rounded up to 16Mi; cpu = measured, rounded up to 10m.\n",
		cfg.Sandbox.DefaultMemory, cfg.Sandbox.MemoryOverhead, mib(own))
	if own > float64(cfg.Sandbox.MemoryOverhead) {
		fmt.Fprintf(e.stdout, "Raise sandbox.memory_overhead to at least %s: the pod's cgroup is sized from it, and these "+
			"VMs use more than it besides guest RAM.\n", mib(math.Ceil(own/step)*step))
	}
	fmt.Fprintf(e.stdout, "Measured with the pods above: measure with an idle pod, and allow for load (QEMU's TCG code cache and I/O buffers grow).\n\n")
	fmt.Fprintf(e.stdout, "overhead:\n  podFixed:\n    memory: \"%dMi\"\n    cpu: \"%dm\"\n", int64(memory)>>20, int64(math.Ceil(cpu*100))*10)
}

func mib(b float64) string { return fmt.Sprintf("%.0fMi", b/(1<<20)) }

func milli(cores float64) string { return fmt.Sprintf("%.0fm", cores*1000) }
