#!/usr/bin/env python3
"""Threaded TCP echo server for the 1-byte round-trip test (loopback only).

Usage: echo_server.py PORT [HOST]

One thread per connection, TCP_NODELAY on every accepted socket, echoes whatever it reads.
Same method as the peers harness, so the Umbra rows compare with its socat/stunnel rows.
"""
import socket
import socketserver
import sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            data = s.recv(65536)
            if not data:
                return
            s.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def main():
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    with Server((host, port), Handler) as srv:
        srv.serve_forever()


if __name__ == "__main__":
    main()
