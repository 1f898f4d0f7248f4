package qemu_test

import (
	"fmt"
	"strings"

	"github.com/podvm/podvm/hypervisor/qemu"
)

// A typical test-machine VM: TCG, agent over virtio-serial, a virtio-fs share.
func ExampleConfig_Args() {
	cfg := qemu.Config{
		ID:             "4f2a",
		StateDir:       "/run/podvm/4f2a",
		Binary:         "/usr/bin/qemu-system-x86_64",
		Accel:          qemu.AccelTCG,
		AgentTransport: qemu.TransportSerial,
		Kernel:         "/usr/share/podvm/vmlinuz",
		Initrd:         "/usr/share/podvm/initrd",
		Firmware:       "/usr/share/qemu/qboot.rom",
		SharedDir:      "/run/podvm/4f2a/shared",
		VirtiofsdPath:  "/usr/lib/qemu/virtiofsd",
		HotplugSlots:   2,
	}
	args, err := cfg.Args()
	if err != nil {
		panic(err)
	}
	// One option a line, with its value when it takes one.
	var lines []string
	for i := 0; i < len(args); i++ {
		line := args[i]
		if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			i++
			line += " " + args[i]
		}
		lines = append(lines, line)
	}
	fmt.Println(strings.Join(lines, " \\\n  "))
	// Output:
	// -name podvm-4f2a,debug-threads=on \
	//   -nodefaults \
	//   -no-user-config \
	//   -nographic \
	//   -no-reboot \
	//   -machine q35,sata=off,smbus=off,vmport=off,smm=off,i8042=off,acpi=off \
	//   -global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off \
	//   -accel tcg,tb-size=96 \
	//   -smp 1 \
	//   -m 512M \
	//   -object memory-backend-memfd,id=mem,size=512M,share=on \
	//   -numa node,memdev=mem \
	//   -bios /usr/share/qemu/qboot.rom \
	//   -kernel /usr/share/podvm/vmlinuz \
	//   -initrd /usr/share/podvm/initrd \
	//   -append console=ttyS0 panic=-1 reboot=k cryptomgr.notests page_reporting.page_reporting_order=3 dummy.numdummies=0 swiotlb=noforce acpi=off podvm.agent=serial quiet lapic_timer_khz=1000000 keep_initmem noreplace-smp no_timer_check mitigations=off keep_thunks \
	//   -add-fd fd=3,set=1000,opaque=console \
	//   -chardev file,id=console,path=/dev/fdset/1000,append=on \
	//   -serial chardev:console \
	//   -chardev socket,id=qmp,path=/run/podvm/4f2a/qmp.sock,server=on,wait=off \
	//   -mon chardev=qmp,mode=control \
	//   -pidfile /run/podvm/4f2a/qemu.pid \
	//   -msg timestamp=on \
	//   -device virtio-rng-pci,id=rng \
	//   -device virtio-balloon-pci,id=balloon,free-page-reporting=on \
	//   -device virtio-serial-pci,id=vser \
	//   -chardev socket,id=agent,path=/run/podvm/4f2a/agent.sock,server=on,wait=off \
	//   -device virtserialport,bus=vser.0,chardev=agent,name=podvm.agent \
	//   -chardev socket,id=fs,path=/run/podvm/4f2a/virtiofsd.sock \
	//   -device vhost-user-fs-pci,id=fs,chardev=fs,tag=podvm \
	//   -device pcie-root-port,id=hp0,bus=pcie.0,chassis=1 \
	//   -device pcie-root-port,id=hp1,bus=pcie.0,chassis=2 \
	//   -runas 2000933314:2000933314 \
	//   -chroot /run/podvm/4f2a/root \
	//   -sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny
}
