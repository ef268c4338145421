// Command seedbackend is a backend wired as the Go proof of concept
// (kevin-cantwell/ptth) is: it dials the router's tunnel port and serves
// HTTP/2 on that connection with http2.Server.ServeConn.
package main

import (
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"time"

	"golang.org/x/net/http2"
)

func main() {
	connect := flag.String("connect", "127.0.0.1:8887", "the router's tunnel address")
	flag.Parse()

	mux := http.NewServeMux()
	mux.HandleFunc("/foo", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "bar")
	})
	// POST /echo streams the request body back as it arrives.
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		io.Copy(w, r.Body)
	})
	// GET /slow?ms=N answers "slow" after N milliseconds.
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > 60000 {
			http.Error(w, "ms must be 0 to 60000", http.StatusBadRequest)
			return
		}
		time.Sleep(time.Duration(ms) * time.Millisecond)
		io.WriteString(w, "slow")
	})

	conn, err := net.Dial("tcp", *connect)
	if err != nil {
		log.Fatalln(err)
	}
	defer conn.Close()
	log.Printf("Tunnel to %s established", *connect)
	(&http2.Server{}).ServeConn(conn, &http2.ServeConnOpts{Handler: mux})
	log.Printf("Tunnel to %s lost", *connect)
}
