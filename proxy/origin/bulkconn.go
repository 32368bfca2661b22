package origin

import (
	"context"
	"io"
	"net"
	"sync"
)

// bulkConn is a connection to an origin that sends request bodies in large writes.
//
// net/http copies a request body to a plain connection through the connection's
// ReadFrom, which for a body that is neither a file nor a socket copies 32 KiB at a
// time: a push of 192 MiB through cove-cache cost 6,144 writes to the origin's socket,
// and as many reads of the body, each a system call with the loopback receive path
// charged to the sender. Here the copy goes in writes of up to bulkWrite bytes. Bodies
// that are files still go out with sendfile(2) (TCPConn's own ReadFrom). A TLS
// connection wraps this one and writes its records itself: nothing changes there.
type bulkConn struct {
	net.Conn
}

// bulkWrite is the largest write of a request body: a pooled buffer per body being
// sent, so memory stays bounded by the uploads in flight.
const bulkWrite = 256 << 10

var bulkBuffers = sync.Pool{New: func() any { b := make([]byte, bulkWrite); return &b }}

// writerOnly hides the connection's ReadFrom from io.CopyBuffer.
type writerOnly struct{ io.Writer }

func (c bulkConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok && isFile(r) {
		return rf.ReadFrom(r)
	}
	bp := bulkBuffers.Get().(*[]byte)
	defer bulkBuffers.Put(bp)
	return io.CopyBuffer(writerOnly{c.Conn}, r, *bp)
}

// isFile reports whether r is a body the kernel can send itself (sendfile, splice).
func isFile(r io.Reader) bool {
	if lr, ok := r.(*io.LimitedReader); ok {
		r = lr.R
	}
	switch r.(type) {
	case interface{ Fd() uintptr }, net.Conn:
		return true
	}
	return false
}

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// bulkDial wraps dial's connections in bulkConn.
func bulkDial(dial dialFunc) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return bulkConn{c}, nil
	}
}
