package agent

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/internal/pipesize"
)

// stdioChunk is how much one ReadStdio or WriteStdin call moves at most: a round trip to
// the guest each, so the larger, the faster a busy stream (the agent caps a reply at this
// size too, and gives a process pipes that hold it).
const stdioChunk = 1 << 20

// CopyOut copies one output stream of a guest process into w until the process closed it.
// It asks for the next chunk only after w took the previous one, so a slow w slows the
// process down instead of losing output.
func CopyOut(ctx context.Context, c api.AgentService, containerID, execID string, stream api.StdioStream, w io.Writer) error {
	for {
		resp, err := c.ReadStdio(ctx, &api.ReadStdioRequest{
			ContainerId: containerID, ExecId: execID, Stream: stream, MaxBytes: stdioChunk,
		})
		if err != nil {
			return fmt.Errorf("read %v of %s/%s: %w", stream, containerID, execID, err)
		}
		if len(resp.Data) > 0 {
			if _, err := w.Write(resp.Data); err != nil {
				return fmt.Errorf("deliver %v of %s/%s: %w", stream, containerID, execID, err)
			}
		}
		if resp.Eof {
			return nil
		}
	}
}

// CopyIn copies r to the stdin of a guest process; at r's EOF it closes that stdin. While a
// pipe or fifo r is found full it holds a whole chunk (pipesize), so that each call carries
// what r's writer put in during the last one, not the 64 KiB a pipe holds by default.
func CopyIn(ctx context.Context, c api.AgentService, containerID, execID string, r io.Reader) error {
	size := pipesize.New(r, stdioChunk)
	buf := make([]byte, stdioChunk)
	for {
		n, rerr := r.Read(buf)
		size.Fill(n)
		if n > 0 {
			if _, err := c.WriteStdin(ctx, &api.WriteStdinRequest{ContainerId: containerID, ExecId: execID, Data: buf[:n]}); err != nil {
				return fmt.Errorf("write stdin of %s/%s: %w", containerID, execID, err)
			}
		}
		if errors.Is(rerr, io.EOF) {
			_, err := c.CloseStdin(ctx, &api.ProcessRequest{ContainerId: containerID, ExecId: execID})
			return err
		}
		if rerr != nil {
			return fmt.Errorf("read stdin for %s/%s: %w", containerID, execID, rerr)
		}
	}
}
