#!/usr/bin/env python3
"""Open N TCP connections, prove each one reaches the echo target, then hold them idle.

Usage: idle_client.py HOST PORT N [IN_FLIGHT] [TIMEOUT_S]

Each connection: non-blocking connect, send 1 byte, wait for the echo; only then is it
counted as open (so through Umbra every counted connection is a stream that went
agent -> broker -> connector -> target and back). At most IN_FLIGHT (default 64) are being
set up at once. A connection that fails or is closed during setup is retried (failures are
counted and reported) until N are open or TIMEOUT_S (default 300) passes.

Protocol with the caller, on stdout (one JSON line each):
  {"event": "ready", "open": N, "failed": F, "elapsed_s": T}   all N open (or timeout)
then for every line read on stdin it checks every held connection for EOF/reset and prints
  {"event": "check", "still_open": K}
and on EOF of stdin it closes everything and exits.
"""
import errno
import json
import selectors
import socket
import sys
import time


def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    in_flight = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 300.0
    sel = selectors.DefaultSelector()
    held, pending = [], {}  # pending: sock -> state ("connecting" | "sent")
    failed = 0
    t0 = time.time()
    deadline = t0 + timeout
    last_report = t0

    def start_one():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = s.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            return False
        pending[s] = "connecting"
        sel.register(s, selectors.EVENT_WRITE)
        return True

    def drop(s):
        nonlocal failed
        failed += 1
        try:
            sel.unregister(s)
        except (KeyError, ValueError):
            pass
        pending.pop(s, None)
        s.close()

    while len(held) < n and time.time() < deadline:
        while len(pending) < in_flight and len(held) + len(pending) < n:
            if not start_one():
                failed += 1
                time.sleep(0.01)
                break
        for key, ev in sel.select(timeout=1.0):
            s = key.fileobj
            state = pending.get(s)
            if state == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    drop(s)
                    continue
                try:
                    s.send(b"x")
                except OSError:
                    drop(s)
                    continue
                pending[s] = "sent"
                sel.modify(s, selectors.EVENT_READ)
            elif state == "sent":
                try:
                    data = s.recv(16)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    drop(s)
                    continue
                sel.unregister(s)
                del pending[s]
                held.append(s)
        now = time.time()
        if now - last_report > 5:
            print(f"idle_client: {len(held)} open, {len(pending)} in flight, {failed} failed",
                  file=sys.stderr, flush=True)
            last_report = now
    for s in list(pending):
        drop(s)
    print(json.dumps({"event": "ready", "open": len(held), "failed": failed,
                      "elapsed_s": round(time.time() - t0, 2)}), flush=True)

    for _ in sys.stdin:
        alive = 0
        for s in held:
            try:
                d = s.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                alive += 1 if d else 0  # b"" = EOF: the path closed it
            except (BlockingIOError, InterruptedError):
                alive += 1  # nothing to read: still open and idle
            except OSError:
                pass  # reset
        print(json.dumps({"event": "check", "still_open": alive}), flush=True)
    for s in held:
        s.close()


if __name__ == "__main__":
    main()
