package network

import (
	"context"
	"errors"
	"fmt"
)

// Cleanup removes every podvm tap from the netns at netnsPath, podvm's redirect filters (and
// then empty ingress qdiscs) from every other interface there, and the port-forward rule
// (ForwardPorts; its listener went with the shim that made it). It needs no state, so a
// restarted shim's `delete` can call it; it is idempotent, and a netns that has already gone
// is not an error.
func Cleanup(ctx context.Context, netnsPath string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("clean up netns %s: %w", netnsPath, err)
	}
	if err := errors.Join(cleanup(netnsPath), removePortForwardRules(netnsPath)); err != nil {
		return fmt.Errorf("clean up netns %s: %w", netnsPath, err)
	}
	return nil
}

func cleanup(netnsPath string) error {
	h, err := openHandle(netnsPath)
	if err != nil {
		if netnsGone(err) {
			return nil
		}
		return err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	var errs []error
	for _, l := range links {
		if IsTap(l.Attrs().Name) {
			continue
		}
		if err := unwire(h, l); err != nil {
			errs = append(errs, err)
		}
	}
	for _, l := range links {
		if !IsTap(l.Attrs().Name) {
			continue
		}
		if err := h.LinkDel(l); err != nil && !linkNotFound(err) {
			errs = append(errs, fmt.Errorf("delete tap %s: %w", l.Attrs().Name, err))
		}
	}
	return errors.Join(errs...)
}
