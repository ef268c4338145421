// Command seedrouter is a router wired as the Go proof of concept
// (kevin-cantwell/ptth) is: each tunnel connection a backend dials in gets its
// own httputil.ReverseProxy whose http2.Transport "dials" by returning that
// same connection, and public HTTP/1.1 requests go to a tunnel chosen at random.
package main

import (
	"crypto/tls"
	"flag"
	"log"
	"math/rand"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"

	"golang.org/x/net/http2"
)

// tunnel proxies requests over one reverse-dialled connection.
type tunnel struct {
	addr  string
	proxy *httputil.ReverseProxy
	done  chan struct{} // closed once a read or write on the connection failed
}

// trackedConn closes done on the first read or write error.
type trackedConn struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func (c *trackedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil {
		c.once.Do(func() { close(c.done) })
	}
	return n, err
}

func (c *trackedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if err != nil {
		c.once.Do(func() { close(c.done) })
	}
	return n, err
}

func newTunnel(conn net.Conn) *tunnel {
	tc := &trackedConn{Conn: conn, done: make(chan struct{})}
	// The URL only fills in the requests' scheme and host: nothing is dialled.
	target := &url.URL{Scheme: "http", Host: conn.RemoteAddr().String()}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = &http2.Transport{
		// Prior knowledge over the accepted connection: every dial returns it.
		AllowHTTP: true,
		DialTLS: func(network, addr string, _ *tls.Config) (net.Conn, error) {
			return tc, nil
		},
	}
	return &tunnel{addr: conn.RemoteAddr().String(), proxy: proxy, done: tc.done}
}

func (t *tunnel) broken() bool {
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}

type router struct {
	mu   sync.Mutex
	pool []*tunnel
}

func (rt *router) accept(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			log.Fatalln("accepting tunnels:", err)
		}
		rt.mu.Lock()
		rt.pool = append(rt.pool, newTunnel(conn))
		rt.mu.Unlock()
		log.Println("Tunnel added:", conn.RemoteAddr())
	}
}

// pick returns a random healthy tunnel, dropping broken ones, or nil.
func (rt *router) pick() *tunnel {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	for len(rt.pool) > 0 {
		i := rand.Intn(len(rt.pool))
		t := rt.pool[i]
		if !t.broken() {
			return t
		}
		rt.pool = append(rt.pool[:i], rt.pool[i+1:]...)
		log.Println("Tunnel removed:", t.addr)
	}
	return nil
}

func (rt *router) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t := rt.pick()
	if t == nil {
		http.Error(w, "no tunnel", http.StatusServiceUnavailable)
		return
	}
	t.proxy.ServeHTTP(w, r)
}

func main() {
	tunnels := flag.String("tunnels", "127.0.0.1:8887", "address to accept reverse tunnels on")
	public := flag.String("http", "127.0.0.1:8888", "address to serve HTTP traffic on")
	flag.Parse()

	tln, err := net.Listen("tcp", *tunnels)
	if err != nil {
		log.Fatalln(err)
	}
	hln, err := net.Listen("tcp", *public)
	if err != nil {
		log.Fatalln(err)
	}
	rt := &router{}
	go rt.accept(tln)
	log.Printf("Listening for reverse tunnels on tcp://%s", tln.Addr())
	log.Printf("Listening for HTTP traffic on http://%s", hln.Addr())
	log.Fatalln(http.Serve(hln, rt))
}
