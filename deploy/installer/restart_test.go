package installer

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestContainerdConfigOf(t *testing.T) {
	for _, tc := range []struct {
		argv   []string
		config string
		ok     bool
	}{
		{[]string{"/usr/bin/containerd"}, DefaultContainerdConfig, true},
		{[]string{"containerd", "--config", "/x/config.toml"}, "/x/config.toml", true},
		{[]string{"/opt/bin/containerd", "--log-level", "debug", "-c", "/y//c.toml"}, "/y/c.toml", true},
		{[]string{"containerd", "--config=/z/c.toml"}, "/z/c.toml", true},
		{[]string{"/usr/bin/containerd-shim-runc-v2", "-namespace", "k8s.io"}, "", false},
		{[]string{"ctr", "--config", "/x/config.toml"}, "", false},
		{nil, "", false},
	} {
		c, ok := containerdConfigOf(tc.argv)
		if c != tc.config || ok != tc.ok {
			t.Errorf("%q: %q %v, want %q %v", tc.argv, c, ok, tc.config, tc.ok)
		}
	}
}

// fakeContainerdEnv makes this test binary sleep, as a process whose argv[0] is containerd.
const fakeContainerdEnv = "PODVM_TEST_FAKE_CONTAINERD"

func TestMain(m *testing.M) {
	if os.Getenv(fakeContainerdEnv) == "1" {
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// fakeContainerd is a process whose cmdline is `containerd --config config`. Only its own
// goroutine waits for it, so the test and the cleanup never race on the exec.Cmd.
type fakeContainerd struct {
	proc   *os.Process
	exited chan struct{}    // closed once the process was reaped
	state  *os.ProcessState // set before exited is closed
}

// startFakeContainerd starts one; it may run on any goroutine, so it returns errors
// instead of failing the test.
func startFakeContainerd(t *testing.T, config string) (*fakeContainerd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := &exec.Cmd{Path: self, Args: []string{"containerd", "--config", config}, Env: append(os.Environ(), fakeContainerdEnv+"=1")}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	f := &fakeContainerd{proc: cmd.Process, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.state = cmd.ProcessState
		close(f.exited)
	}()
	t.Cleanup(func() { _ = f.proc.Kill(); <-f.exited })
	return f, nil
}

// TestSignalContainerd: the containerd reading the config gets SIGTERM, and the restart
// counts once its supervisor started a new one; without a supervisor, or without such a
// containerd, the error says what to do.
func TestSignalContainerd(t *testing.T) {
	config := t.TempDir() + "/etc/containerd/config.toml"
	other, err := startFakeContainerd(t, config+".other")
	if err != nil {
		t.Fatal(err)
	}
	first, err := startFakeContainerd(t, config)
	if err != nil {
		t.Fatal(err)
	}
	type started struct {
		f   *fakeContainerd
		err error
	}
	restarted := make(chan started, 1)
	go func() { // the supervisor: Restart=always
		<-first.exited
		f, err := startFakeContainerd(t, config)
		restarted <- started{f, err}
	}()
	if err := SignalContainerd(t.Context(), "/proc", config, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	second := <-restarted
	if second.err != nil {
		t.Fatal(second.err)
	}
	if st := first.state; st == nil || st.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Errorf("the first containerd did not die of SIGTERM: %v", st)
	}
	if err := other.proc.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the containerd of another config was signalled: %v", err)
	}

	// No supervisor now: the second one's own goroutine reaps it.
	err = SignalContainerd(t.Context(), "/proc", config, time.Second)
	if err == nil || !strings.Contains(err.Error(), "nothing restarts it when it exits") {
		t.Errorf("without a supervisor: %v", err)
	}
	err = SignalContainerd(t.Context(), "/proc", config, time.Second)
	if err == nil || !strings.Contains(err.Error(), "no containerd process reads "+config) {
		t.Errorf("without containerd: %v", err)
	}
}
