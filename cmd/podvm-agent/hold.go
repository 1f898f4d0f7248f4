package main

// The pod's namespace holder runs in C, from a constructor that runs before the Go runtime
// starts: execing this binary as "/init hold" then costs the kernel's exec and a few pages of
// C, not Go's runtime start and the package initialisers of a 10 MB binary (120–200 ms of a
// pod's start under TCG). The agent sets the holder's hostname and sysctls from outside, by
// entering its namespaces (agent/guest/holder.go). The argument must stay guest.HoldArg; the
// test in hold_test.go checks that.

/*
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void podvm_hold_nop(int sig) { (void)sig; }

// podvm_hold is a pod's pause: PID 1 of the pod's PID namespace, it reaps what is reparented
// to it and exits 0 on SIGTERM or SIGINT. It never returns.
static void podvm_hold(void) {
	sigset_t set;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = podvm_hold_nop;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGCHLD);
	// Blocked signals with a handler are delivered to a PID namespace's init from outside
	// it; sigwaitinfo collects them.
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGCHLD, &sa, NULL);
	sigprocmask(SIG_BLOCK, &set, NULL);
	for (;;) {
		int sig = sigwaitinfo(&set, NULL);
		if (sig == SIGTERM || sig == SIGINT)
			_exit(0);
		if (sig == SIGCHLD)
			while (waitpid(-1, NULL, WNOHANG) > 0)
				;
	}
}

__attribute__((constructor)) static void podvm_hold_init(int argc, char **argv) {
	if (argc == 2 && argv != NULL && strcmp(argv[1], "hold") == 0)
		podvm_hold();
}
*/
import "C"
