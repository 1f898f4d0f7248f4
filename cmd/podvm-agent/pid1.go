package main

// PID 1 of the guest runs in C, from a constructor that runs before the Go runtime starts. It
// mounts the kernel filesystems, starts the agent server ("/init serve", the one Go process of
// the guest's own) and reaps every orphan; when the server exits it powers the guest off. A Go
// PID 1 cost every boot a second start of Go's runtime and of the package initialisers of this
// 10 MB binary (docs/kernel.md has the figures) and kept a Go heap for the VM's life.
//
// It takes over only where the guest's root is already a root of its own: podvm's root image
// on virtio-pmem, or, when the guest boots from an initramfs (Debian's kernel and its
// modules), after guest.Init has loaded the modules, moved onto a root of its own and exec'd
// this binary again with guest.RootReadyEnv set. Never in a process libcontainer starts (runc
// init can be PID 1 of its container's PID namespace), nor as the holder or the server.

/*
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

// Keep in step with agent/guest: RootReadyEnv, initTimesEnv, HoldArg.
#define PODVM_ROOT_READY "PODVM_ROOT_READY"
#define PODVM_INIT_TIMES "PODVM_INIT_TIMES"

static long long podvm_boottime(void) {
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

// Keep in step with agent/guest: resetControlPort, resetControlHard.
#define PODVM_RESET_PORT 0xcf9
#define PODVM_RESET_HARD 0x06

static void podvm_poweroff(void) {
	sync();
	// A reset through q35's reset control register: QEMU runs with -no-reboot, so a reset
	// ends it. Not the kernel's power-off or restart: without ACPI (the default) a power-off
	// only halts the CPUs, and both first shut the devices down, where virtio-pmem's flush
	// waits for an interrupt a guest without ACPI cannot route (its device has no MSI-X).
	int port = open("/dev/port", O_WRONLY | O_CLOEXEC);
	if (port >= 0) {
		unsigned char v = PODVM_RESET_HARD;
		pwrite(port, &v, 1, PODVM_RESET_PORT);
		close(port);
	}
	reboot(RB_POWER_OFF);
	// Should neither come, the host quits QEMU itself.
	for (;;)
		pause();
}

static void podvm_fatal(const char *what, const char *arg) {
	fprintf(stderr, "podvm-agent: fatal, powering off: %s %s: %s\n", what, arg, strerror(errno));
	podvm_poweroff();
}

struct podvm_mount {
	const char *source, *target, *fstype;
	unsigned long flags;
	const char *data;
};

// The kernel filesystems, in order. EBUSY means mounted already (devtmpfs by the kernel, or
// /dev, /proc and /sys by guest.Init before it moved onto its own root).
static const struct podvm_mount podvm_mounts[] = {
	{"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"},
	{"proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL},
	{"sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL},
	{"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
	{"shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"},
	{"tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
	// favordynmods (Linux 6.0+): a process moved into a cgroup (runc init into each new
	// container's) does not wait for an RCU grace period, ~17 ms under TCG.
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "favordynmods"},
};

static const char *const podvm_links[][2] = {
	{"/dev/fd", "/proc/self/fd"},
	{"/dev/stdin", "/proc/self/fd/0"},
	{"/dev/stdout", "/proc/self/fd/1"},
	{"/dev/stderr", "/proc/self/fd/2"},
	{"/dev/ptmx", "pts/ptmx"},
};

// podvm_server_env is PID 1's environment for the server: without the re-exec marker, with a
// PATH, and with PID 1's boot phases (initMain, initDone) for the server's "ready" line.
static char **podvm_server_env(long long start) {
	static char times[64];
	size_t n = 0, k = 0;
	char **env;
	for (char **e = environ; *e != NULL; e++)
		n++;
	env = calloc(n + 3, sizeof(char *));
	if (env == NULL)
		podvm_fatal("allocate", "the server's environment");
	for (char **e = environ; *e != NULL; e++)
		if (strncmp(*e, PODVM_ROOT_READY "=", sizeof(PODVM_ROOT_READY)) != 0 &&
		    strncmp(*e, PODVM_INIT_TIMES "=", sizeof(PODVM_INIT_TIMES)) != 0 &&
		    strncmp(*e, "PATH=", 5) != 0)
			env[k++] = *e;
	env[k++] = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
	snprintf(times, sizeof(times), PODVM_INIT_TIMES "=%lld,%lld", start, podvm_boottime());
	env[k++] = times;
	env[k] = NULL;
	return env;
}

static void podvm_pid1(void) {
	long long start = podvm_boottime();
	char **env;
	pid_t server;

	for (size_t i = 0; i < sizeof(podvm_mounts) / sizeof(podvm_mounts[0]); i++) {
		const struct podvm_mount *m = &podvm_mounts[i];
		if (mkdir(m->target, 0755) != 0 && errno != EEXIST)
			podvm_fatal("mkdir", m->target);
		if (mount(m->source, m->target, m->fstype, m->flags, m->data) != 0 && errno != EBUSY)
			podvm_fatal("mount on", m->target);
	}
	for (size_t i = 0; i < sizeof(podvm_links) / sizeof(podvm_links[0]); i++) {
		unlink(podvm_links[i][0]);
		if (symlink(podvm_links[i][1], podvm_links[i][0]) != 0)
			podvm_fatal("symlink", podvm_links[i][0]);
	}

	env = podvm_server_env(start);
	server = fork();
	if (server < 0)
		podvm_fatal("fork", "the agent server");
	if (server == 0) {
		char *argv[] = {"/init", "serve", NULL};
		execve("/init", argv, env);
		fprintf(stderr, "podvm-agent: exec /init serve: %s\n", strerror(errno));
		_exit(127);
	}
	for (;;) {
		int status;
		pid_t pid = wait(&status);
		if (pid < 0) {
			if (errno != EINTR)
				sleep(1); // no child at all: cannot be while the server runs
			continue;
		}
		if (pid != server)
			continue;
		if (WIFEXITED(status))
			fprintf(stderr, "podvm-agent: server exited (exit status %d), powering off\n", WEXITSTATUS(status));
		else if (WIFSIGNALED(status))
			fprintf(stderr, "podvm-agent: server exited (signal: %s), powering off\n", strsignal(WTERMSIG(status)));
		podvm_poweroff();
	}
}

__attribute__((constructor)) static void podvm_pid1_init(int argc, char **argv) {
	struct statfs st;
	if (getpid() != 1 || getenv("_LIBCONTAINER_INITPIPE") != NULL)
		return;
	if (argc >= 2 && argv != NULL &&
	    (strcmp(argv[1], "init") == 0 || strcmp(argv[1], "serve") == 0 || strcmp(argv[1], "hold") == 0))
		return;
	if (getenv(PODVM_ROOT_READY) == NULL &&
	    (statfs("/", &st) != 0 || st.f_type == RAMFS_MAGIC || st.f_type == TMPFS_MAGIC))
		return; // an initramfs: guest.Init moves off it first
	podvm_pid1();
}
*/
import "C"
