package shim

import (
	"errors"
	"testing"

	"github.com/containerd/errdefs"
)

// cancels counts the calls of a create's cancel and keeps the last cause.
type cancels struct {
	n     int
	cause error
}

func (c *cancels) cancel(cause error) { c.n++; c.cause = cause }

func noCancel(error) {}

// An id is taken from its reservation until its create is undone, and a create in flight is
// counted but not found.
func TestPodReservation(t *testing.T) {
	p := newPod()
	if sb, err := p.reserve("pod1", true, noCancel); err != nil || sb != nil {
		t.Fatalf("reserve of the sandbox: %v, %v", sb, err)
	}
	if _, err := p.reserve("pod1", false, noCancel); !errdefs.IsAlreadyExists(err) {
		t.Errorf("reserve of an id being created: %v, want already exists", err)
	}
	if _, err := p.reserve("solo", true, noCancel); !errdefs.IsAlreadyExists(err) {
		t.Errorf("reserve of a second VM owner while one boots: %v, want already exists", err)
	}
	if n := p.size(); n != 1 {
		t.Errorf("size %d with one create in flight, want 1", n)
	}
	if _, err := p.container("pod1"); !errdefs.IsNotFound(err) {
		t.Errorf("container being created: %v, want not found", err)
	}
	if c, _ := p.lookup(nil, "pod1"); c != nil {
		t.Errorf("lookup of a container being created: %v, want nil", c)
	}
	sb := &sandbox{id: "pod1"}
	owner := &container{id: "pod1", role: roleSandbox, sandbox: sb}
	if err := p.add(owner); err != nil {
		t.Fatal(err)
	}
	if n := p.size(); n != 1 {
		t.Errorf("size %d with one container, want 1", n)
	}
	if c, err := p.container("pod1"); err != nil || c != owner {
		t.Errorf("created container: %v, %v", c, err)
	}
	if c, current := p.lookup(sb, "pod1"); c != owner || !current {
		t.Errorf("lookup of the created sandbox: %v, %v", c, current)
	}
	if _, err := p.reserve("pod1", false, noCancel); !errdefs.IsAlreadyExists(err) {
		t.Errorf("reserve of a created id: %v, want already exists", err)
	}
	if got, err := p.reserve("c1", false, noCancel); err != nil || got != sb {
		t.Fatalf("reserve of a workload: %v, %v, want the pod's VM", got, err)
	}
	if n := p.size(); n != 2 {
		t.Errorf("size %d with a container and a create in flight, want 2", n)
	}
	if p.unreserve("c1", false) {
		t.Error("unreserve reports a create containerd did not give up on as abandoned")
	}
	if n := p.size(); n != 1 {
		t.Errorf("size %d after a create was undone, want 1", n)
	}
	if _, err := p.reserve("c1", false, noCancel); err != nil {
		t.Errorf("reserve of an id given up: %v", err)
	}
}

// A failed VM owner's create lets another VM owner boot.
func TestPodUnreserveOfAVMOwner(t *testing.T) {
	p := newPod()
	if _, err := p.reserve("solo1", true, noCancel); err != nil {
		t.Fatal(err)
	}
	p.unreserve("solo1", true)
	if _, err := p.reserve("solo2", true, noCancel); err != nil {
		t.Errorf("VM owner after the first one's create failed: %v", err)
	}
}

// abandon cancels a create in flight once; that create is then refused, and its id freed only
// when it is undone, which reports it abandoned.
func TestPodAbandon(t *testing.T) {
	p := newPod()
	sb := &sandbox{id: "pod1"}
	if _, err := p.reserve("pod1", true, noCancel); err != nil {
		t.Fatal(err)
	}
	if err := p.add(&container{id: "pod1", role: roleSandbox, sandbox: sb}); err != nil {
		t.Fatal(err)
	}
	var cs cancels
	if _, err := p.reserve("c1", false, cs.cancel); err != nil {
		t.Fatal(err)
	}
	if p.abandon("pod1") {
		t.Error("abandon of a created container reports a create in flight")
	}
	if p.abandon("nope") {
		t.Error("abandon of an unknown id reports a create in flight")
	}
	for range 2 {
		if !p.abandon("c1") {
			t.Error("abandon of a create in flight reports none")
		}
	}
	if cs.n != 1 || !errors.Is(cs.cause, errAbandoned) {
		t.Errorf("create cancelled %d times (%v), want once with errAbandoned", cs.n, cs.cause)
	}
	if err := p.add(&container{id: "c1", role: roleWorkload, sandbox: sb}); !errors.Is(err, errAbandoned) {
		t.Errorf("add of an abandoned create: %v, want errAbandoned", err)
	}
	if _, err := p.container("c1"); !errdefs.IsNotFound(err) {
		t.Errorf("abandoned create: %v, want not found", err)
	}
	if _, err := p.reserve("c1", false, noCancel); !errdefs.IsAlreadyExists(err) {
		t.Errorf("reserve of an abandoned create not yet undone: %v, want already exists", err)
	}
	if n := p.size(); n != 2 {
		t.Errorf("size %d with an abandoned create not yet undone, want 2", n)
	}
	if !p.unreserve("c1", false) {
		t.Error("unreserve of an abandoned create does not report it")
	}
	if n := p.size(); n != 1 {
		t.Errorf("size %d after the abandoned create was undone, want 1", n)
	}
	if p.abandon("c1") {
		t.Error("abandon of an undone create reports a create in flight")
	}
}

// Removing the VM owner takes the VM and lists the created containers left, not those still
// being created.
func TestPodRemoveOfTheVMOwner(t *testing.T) {
	p := newPod()
	sb := &sandbox{id: "pod1"}
	owner := &container{id: "pod1", role: roleSandbox, sandbox: sb}
	c1 := &container{id: "c1", role: roleWorkload, sandbox: sb}
	for _, c := range []*container{owner, c1} {
		if _, err := p.reserve(c.id, c.ownsVM(), noCancel); err != nil {
			t.Fatal(err)
		}
		if err := p.add(c); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.reserve("c2", false, noCancel); err != nil {
		t.Fatal(err)
	}
	if vm, left := p.remove(c1); vm != nil || left != nil {
		t.Errorf("remove of a workload: %v, %v, want nothing", vm, left)
	}
	if _, err := p.reserve("c3", false, noCancel); err != nil {
		t.Fatal(err)
	}
	c3 := &container{id: "c3", role: roleWorkload, sandbox: sb}
	if err := p.add(c3); err != nil {
		t.Fatal(err)
	}
	vm, left := p.remove(owner)
	if vm != sb || len(left) != 1 || left[0] != c3 {
		t.Errorf("remove of the sandbox: %v, %v, want its VM and [c3]", vm, left)
	}
	if n := p.size(); n != 2 {
		t.Errorf("size %d with c3 and c2 in flight, want 2", n)
	}
	if _, current := p.lookup(sb, "c3"); current {
		t.Error("the removed sandbox's VM is still the pod's")
	}
}
