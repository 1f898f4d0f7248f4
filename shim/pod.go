package shim

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
)

// pod is what one shim runs: its containers by id and the VM they run in. It owns the
// sandbox: the VM is set when the sandbox (or standalone) container was created and taken
// when that container is deleted or the shim exits.
type pod struct {
	mu sync.Mutex
	// containers are the created containers by id.
	containers map[string]*container
	// creating are the creates in flight by id: each reserves its id until it is added to
	// containers or undone. An id is in one of the two maps at most.
	creating map[string]*creation
	// sandbox is the pod VM; nil until the sandbox (or standalone) container was created
	// and after it was deleted.
	sandbox *sandbox
	// booting is set while a sandbox (or standalone) container's VM boots: a second one is
	// refused rather than left to replace it.
	booting bool
}

// creation is a Create in flight.
type creation struct {
	// cancel ends the create's context.
	cancel context.CancelCauseFunc
	// abandoned is set once containerd gave up on the create (abandon).
	abandoned bool
}

// errAbandoned is why a create containerd gave up on is cancelled, and its error.
var errAbandoned = errors.New("containerd gave up on this create (its call timed out or was cancelled) and deleted the task; " +
	"the shim undid it")

func newPod() *pod {
	return &pod{containers: map[string]*container{}, creating: map[string]*creation{}}
}

// reserve claims id for a container being created, whose context cancel ends, and returns
// the current VM (nil if none). A container that boots its own VM (ownsVM) is refused while
// the pod has one.
func (p *pod) reserve(id string, ownsVM bool, cancel context.CancelCauseFunc) (*sandbox, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, created := p.containers[id]
	if _, creating := p.creating[id]; created || creating {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrAlreadyExists)
	}
	if ownsVM {
		if p.sandbox != nil {
			return nil, fmt.Errorf("this shim already runs pod %s; container %s needs its own: %w", p.sandbox.id, id, errdefs.ErrAlreadyExists)
		}
		if p.booting {
			return nil, fmt.Errorf("this shim is already booting a pod VM; container %s needs its own: %w", id, errdefs.ErrAlreadyExists)
		}
		p.booting = true
	}
	p.creating[id] = &creation{cancel: cancel}
	return p.sandbox, nil
}

// unreserve gives up an id whose create failed; it reports whether containerd had given up
// on that create (abandon).
func (p *pod) unreserve(id string, ownsVM bool) (abandoned bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ownsVM {
		p.booting = false
	}
	if cr := p.creating[id]; cr != nil {
		abandoned = cr.abandoned
		delete(p.creating, id)
	}
	return abandoned
}

// add makes a created container known; a container that owns its VM brings it along. A
// create containerd gave up on meanwhile is refused (errAbandoned): containerd would never
// delete the container.
func (p *pod) add(c *container) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if cr := p.creating[c.id]; cr != nil && cr.abandoned {
		return errAbandoned
	}
	delete(p.creating, c.id)
	p.containers[c.id] = c
	if c.ownsVM() {
		p.sandbox, p.booting = c.sandbox, false
	}
	return nil
}

// abandon cancels the create in flight of id, if there is one, and reports whether there
// was. containerd asks to delete (and shut down) a task whose create it still awaits only
// when it gave up on that create: its call's deadline passed, so it will never learn of the
// container, and it cleans up after the shim (`shim delete`) next.
func (p *pod) abandon(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	cr := p.creating[id]
	if cr == nil {
		return false
	}
	if !cr.abandoned {
		cr.abandoned = true
		cr.cancel(errAbandoned)
	}
	return true
}

// remove forgets a deleted container. When it owned the VM, the VM is taken out of the pod
// and returned, with the containers still left in it.
func (p *pod) remove(c *container) (vm *sandbox, left []*container) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.containers, c.id)
	if !c.ownsVM() || p.sandbox != c.sandbox {
		return nil, nil
	}
	vm, p.sandbox = p.sandbox, nil
	for _, o := range p.containers {
		left = append(left, o)
	}
	return vm, left
}

// takeSandbox removes the VM from the pod (the shim is exiting) and returns it, nil if none.
func (p *pod) takeSandbox() *sandbox {
	p.mu.Lock()
	defer p.mu.Unlock()
	sb := p.sandbox
	p.sandbox = nil
	return sb
}

// container returns a created container; one still being created is not found.
func (p *pod) container(id string) (*container, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.containers[id]
	if !ok {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

// process returns a container and its init (execID "") or one of its execs.
func (p *pod) process(id, execID string) (*container, *process, error) {
	c, err := p.container(id)
	if err != nil {
		return nil, nil, err
	}
	proc, err := c.process(execID)
	if err != nil {
		return nil, nil, err
	}
	return c, proc, nil
}

// size is the number of containers, including those being created.
func (p *pod) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.containers) + len(p.creating)
}

// lookup returns the created container id (nil if none) and whether sb is the pod's VM.
func (p *pod) lookup(sb *sandbox, id string) (c *container, current bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.containers[id], p.sandbox == sb
}
