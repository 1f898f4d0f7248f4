// Package metrics is podvm's Prometheus metrics: what each pod VM costs the node and how its
// agent answers.
//
// The data path has two ends. Each shim (one per pod) keeps a Sandbox: a registry of its own
// series, every one labelled with the sandbox id, served in the Prometheus text format over
// HTTP on the unix socket <state_dir>/<sandbox id>/metrics.sock (SocketName; root only, like
// the state dir). It holds the VM's boot time, its size, its state, the agent RPC latencies
// (the shim's ttrpc client reports each call) and, read from /proc at each scrape, the RSS and
// PSS of QEMU, virtiofsd and the shim itself and the guest RAM QEMU has touched, and, asked
// of the guest agent (MemInfo) at each scrape, the guest's memory total and use. `podvm
// metrics --listen ADDR` serves the node's endpoint: at each scrape a Node reads every
// sandbox's socket under the state dir, merges the families, and adds the node's own series
// (pods by state, sandboxes whose shim did not answer).
//
// Nothing here is kept between scrapes on the node side, so the endpoint needs no state and
// a restarted `podvm metrics` loses nothing.
package metrics

// SocketName is the metrics socket in a sandbox's state dir.
const SocketName = "metrics.sock"

// Metric names and labels, shared by both ends and the docs.
const (
	namespace = "podvm"

	// LabelSandbox is on every per-sandbox series.
	LabelSandbox = "sandbox_id"
)

// Sandbox states (the state label of podvm_sandbox_state and podvm_pods).
const (
	StateBooting  = "booting"
	StateReady    = "ready"
	StateStopping = "stopping"
	// StateUnreachable is a sandbox dir whose shim did not answer the node's scrape.
	StateUnreachable = "unreachable"
)

// States are the sandbox states in the order they are reported.
var States = []string{StateBooting, StateReady, StateStopping}
