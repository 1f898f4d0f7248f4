package shim

import (
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
)

// pod is what one shim runs: its containers by id and the VM they run in. It owns the
// sandbox: the VM is set when the sandbox (or standalone) container was created and taken
// when that container is deleted or the shim exits.
type pod struct {
	mu sync.Mutex
	// containers maps an id to its container; a nil value reserves an id being created.
	containers map[string]*container
	// sandbox is the pod VM; nil until the sandbox (or standalone) container was created
	// and after it was deleted.
	sandbox *sandbox
	// booting is set while a sandbox (or standalone) container's VM boots: a second one is
	// refused rather than left to replace it.
	booting bool
}

func newPod() *pod { return &pod{containers: map[string]*container{}} }

// reserve claims id for a container being created and returns the current VM (nil if
// none). A container that boots its own VM (ownsVM) is refused while the pod has one.
func (p *pod) reserve(id string, ownsVM bool) (*sandbox, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.containers[id]; ok {
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
	p.containers[id] = nil
	return p.sandbox, nil
}

// unreserve gives up an id whose create failed.
func (p *pod) unreserve(id string, ownsVM bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ownsVM {
		p.booting = false
	}
	if p.containers[id] == nil {
		delete(p.containers, id)
	}
}

// add makes a created container known; a container that owns its VM brings it along.
func (p *pod) add(c *container) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.containers[c.id] = c
	if c.ownsVM() {
		p.sandbox, p.booting = c.sandbox, false
	}
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
		if o != nil {
			left = append(left, o)
		}
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
	c := p.containers[id]
	if c == nil {
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
	return len(p.containers)
}

// lookup returns the created container id (nil if none) and whether sb is the pod's VM.
func (p *pod) lookup(sb *sandbox, id string) (c *container, current bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.containers[id], p.sandbox == sb
}
