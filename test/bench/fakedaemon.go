package main

import (
	"bufio"
	"net"
	"os"
)

// fakeDaemon answers every request on a unix socket with {"ok":true} at once,
// so exec'ing the hotplug entry against it measures the entry alone.
func fakeDaemon(path string) (string, func(), error) {
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return "", nil, err
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
					c.Write([]byte("{\"ok\":true}\n"))
				}
			}()
		}
	}()
	return path, func() { l.Close() }, nil
}
