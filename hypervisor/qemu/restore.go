package qemu

// Saving a VM template and restoring pod VMs from it (Config.Templated). The template's guest
// RAM stays in its memory file (x-ignore-shared leaves shared RAM out of the saved state);
// the saved state is the devices' and CPUs' only. A clone runs on a private copy of that
// memory and gets what QEMU 7.2 cannot migrate, or what is the pod's own, hot-plugged before
// its guest runs again: the virtio-fs device (vhost-user-fs blocks migration) and the NICs.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qmp"
)

// migrationPoll is how often query-migrate is asked while a save or restore runs.
const migrationPoll = 2 * time.Millisecond

var ignoreShared = map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}

// SaveState stops the guest and writes the VM's device state to f (RAM excluded: it is in
// the memory file). The VM stays paused; stop it afterwards.
func (v *VM) SaveState(ctx context.Context, f *os.File) error {
	mon, err := v.monitor()
	if err != nil {
		return err
	}
	if !v.cfg.Templated {
		return fmt.Errorf("saving VM %s: not a templated VM (its RAM is not in a memory file)", v.cfg.ID)
	}
	for _, step := range []struct {
		cmd  string
		args any
	}{{"migrate-set-capabilities", ignoreShared}, {"stop", nil}} {
		if err := mon.Execute(ctx, step.cmd, step.args, nil); err != nil {
			return fmt.Errorf("saving VM %s: %s: %w", v.cfg.ID, step.cmd, err)
		}
	}
	if err := mon.ExecuteWithFiles(ctx, "getfd", map[string]any{"fdname": "template"}, nil, f); err != nil {
		return fmt.Errorf("saving VM %s: passing the state file: %w", v.cfg.ID, err)
	}
	if err := mon.Execute(ctx, "migrate", map[string]any{"uri": "fd:template"}, nil); err != nil {
		return fmt.Errorf("saving VM %s: migrate: %w", v.cfg.ID, err)
	}
	if err := v.waitMigration(ctx, mon); err != nil {
		return fmt.Errorf("saving VM %s: %w", v.cfg.ID, err)
	}
	return nil
}

// restore loads Incoming into a VM started with it, hot-plugs the share and the NICs, and
// lets the guest run.
func (v *VM) restore(ctx context.Context, mon qmp.Monitor) error {
	cfg := &v.cfg
	if err := mon.Execute(ctx, "migrate-set-capabilities", ignoreShared, nil); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	if err := mon.ExecuteWithFiles(ctx, "getfd", map[string]any{"fdname": "incoming"}, nil, cfg.Incoming); err != nil {
		return fmt.Errorf("restore: passing the template's state: %w", err)
	}
	if err := mon.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:incoming"}, nil); err != nil {
		return fmt.Errorf("restore: migrate-incoming: %w", err)
	}
	if err := v.waitMigration(ctx, mon); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("restore from the template: %w", err)
		}
		return fmt.Errorf("%w: %w", hypervisor.ErrRestore, err)
	}
	if cfg.SharedDir != "" {
		if err := v.plugSharedDir(ctx, mon); err != nil {
			return err
		}
	}
	// The first NIC is the template's, on the command line (templateNICArgs).
	for i, nd := range cfg.NetDevices {
		if i == 0 {
			continue
		}
		if err := plugNIC(ctx, mon, nd, templatePort(1+i)); err != nil {
			return fmt.Errorf("hot-plugging NIC %s: %w", nd.ID, err)
		}
	}
	if err := mon.Execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("restore: cont: %w", err)
	}
	return nil
}

// waitMigration polls query-migrate until the save or restore completed, failed, or QEMU
// exited (a restore that fails ends QEMU).
func (v *VM) waitMigration(ctx context.Context, mon qmp.Monitor) error {
	t := time.NewTicker(migrationPoll)
	defer t.Stop()
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := mon.Execute(ctx, "query-migrate", nil, &st); err != nil {
			if errors.Is(err, qmp.ErrClosed) {
				return fmt.Errorf("qemu exited: %s", logTail(v.cfg.path(QEMULog)))
			}
			return fmt.Errorf("query-migrate: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s (%s)", st.Status, st.ErrorDesc, logTail(v.cfg.path(QEMULog)))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-v.done:
			return fmt.Errorf("qemu exited (%v): %s", v.ExitError(), logTail(v.cfg.path(QEMULog)))
		case <-t.C:
		}
	}
}

// plugSharedDir connects virtiofsd's socket, hands QEMU the connection (it cannot open paths
// in its chroot) and adds the virtio-fs device on it.
func (v *VM) plugSharedDir(ctx context.Context, mon qmp.Monitor) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", v.cfg.path(VirtiofsdSocket))
	if err != nil {
		return fmt.Errorf("connecting to virtiofsd: %w", err)
	}
	f, err := c.(*net.UnixConn).File()
	_ = c.Close() // f is a dup; QEMU gets its own copy of it
	if err != nil {
		return fmt.Errorf("virtiofsd connection: %w", err)
	}
	defer func() { _ = f.Close() }()
	if err := mon.ExecuteWithFiles(ctx, "getfd", map[string]any{"fdname": "fs-sock"}, nil, f); err != nil {
		return fmt.Errorf("passing the virtiofsd connection: %w", err)
	}
	for _, step := range []struct {
		cmd  string
		args any
	}{
		{"chardev-add", sharedDirChardev("fs", "fs-sock")},
		{"device_add", map[string]any{"driver": "vhost-user-fs-pci", "id": "fs", "chardev": "fs",
			"tag": hypervisor.SharedFSTag, "bus": templatePort(0)}},
	} {
		if err := mon.Execute(ctx, step.cmd, step.args, nil); err != nil {
			return fmt.Errorf("hot-plugging the virtio-fs device: %s: %w", step.cmd, err)
		}
	}
	return nil
}

// sharedDirChardev is chardev-add's argument for a socket chardev on the connection QEMU
// knows as fdname.
func sharedDirChardev(id, fdname string) map[string]any {
	return map[string]any{"id": id, "backend": map[string]any{"type": "socket", "data": map[string]any{
		"addr":   map[string]any{"type": "fd", "data": map[string]any{"str": fdname}},
		"server": false,
	}}}
}

// plugNIC passes nd's tap descriptors and adds its netdev and virtio-net device on port.
func plugNIC(ctx context.Context, mon qmp.Monitor, nd *hypervisor.NetDevice, port string) error {
	names := make([]string, len(nd.TapFiles))
	for i, f := range nd.TapFiles {
		names[i] = "tap-" + nd.ID + "-" + strconv.Itoa(i)
		if err := mon.ExecuteWithFiles(ctx, "getfd", map[string]any{"fdname": names[i]}, nil, f); err != nil {
			return fmt.Errorf("passing tap %d: %w", i, err)
		}
	}
	netdev := map[string]any{"type": "tap", "id": "net-" + nd.ID, "vhost": nd.VhostNet}
	// No option ROM: QEMU, chrooted, could not load it, and a running guest does not use it.
	dev := map[string]any{"driver": "virtio-net-pci", "id": "nic-" + nd.ID, "netdev": "net-" + nd.ID, "bus": port, "romfile": ""}
	if len(names) == 1 {
		netdev["fd"] = names[0]
	} else {
		netdev["fds"] = strings.Join(names, ":")
		dev["mq"] = true
		dev["vectors"] = 2*len(names) + 2
	}
	if nd.MAC != nil {
		dev["mac"] = nd.MAC.String()
	}
	if nd.MTU != 0 {
		dev["host_mtu"] = nd.MTU
	}
	if err := mon.Execute(ctx, "netdev_add", netdev, nil); err != nil {
		return fmt.Errorf("netdev_add: %w", err)
	}
	if err := mon.Execute(ctx, "device_add", dev, nil); err != nil {
		return fmt.Errorf("device_add: %w", err)
	}
	return nil
}
