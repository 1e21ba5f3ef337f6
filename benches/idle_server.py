#!/usr/bin/env python3
"""Event-loop TCP echo server for many concurrent connections (loopback only).

Usage: idle_server.py PORT [HOST]

One thread, epoll via selectors: accepts without spawning anything per connection (so
connection setup costs the same for every path measured through it) and holds ten
thousand idle connections cheaply. Echoes whatever arrives; closes when the peer closes.
Needs a file-descriptor limit above the number of connections (run.sh raises it).
"""
import selectors
import socket
import sys


def main():
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                # Accept everything pending in one go.
                while True:
                    try:
                        c, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # EMFILE and the like: retry on the next event
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(c, selectors.EVENT_READ, True)
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(c)
                c.close()
                continue
            try:
                c.sendall(data)  # tiny echoes only: fits the socket buffer
            except OSError:
                sel.unregister(c)
                c.close()


if __name__ == "__main__":
    main()
