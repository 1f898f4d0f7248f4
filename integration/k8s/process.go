package k8s

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/podvm/podvm/internal/logfile"
)

// process is one cluster component running in the harness's network namespace.
type process struct {
	name   string
	path   string
	args   []string
	log    string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

// startProcess runs binDir/name with args in the network namespace, its output appended to
// <dir>/logs/<name>.log.
func (c *Cluster) startProcess(name string, args ...string) (*process, error) {
	p := &process{name: name, path: filepath.Join(c.binDir, name), args: args,
		log: filepath.Join(c.Dir, "logs", name+".log")}
	if err := c.run(p); err != nil {
		return nil, err
	}
	c.procs = append(c.procs, p)
	return p, nil
}

// run starts p (again).
func (c *Cluster) run(p *process) error {
	if err := os.MkdirAll(filepath.Dir(p.log), 0o755); err != nil {
		return err
	}
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer func() { _ = logf.Close() }()
	cmd := exec.Command(p.path, p.args...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.Dir
	// If the test binary dies, the component goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := c.env.StartInNetNS(cmd); err != nil {
		return err
	}
	p.cmd, p.exited, p.err = cmd, make(chan struct{}), nil
	go func(done chan struct{}) {
		p.err = cmd.Wait()
		close(done)
	}(p.exited)
	return nil
}

func (p *process) running() bool {
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM, and SIGKILL after grace; it reports whether SIGKILL was needed.
func (p *process) stop(grace time.Duration) (killed bool) {
	if !p.running() {
		return false
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return false
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.exited
	return true
}

// kill sends SIGKILL and waits for the exit.
func (p *process) kill() {
	if p.running() {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

func (p *process) tail(n int) string {
	return fmt.Sprintf("--- %s (%s) ---\n%s", p.name, p.log, logfile.TailLines(p.log, n))
}
