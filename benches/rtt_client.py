#!/usr/bin/env python3
"""1-byte round trips over one TCP connection.

Usage: rtt_client.py HOST PORT [COUNT] [WARMUP]

Connects once (TCP_NODELAY), sends WARMUP (default 500) 1-byte pings and waits for each echo,
then times COUNT (default 10000) more, each from send() to the return of recv() with
perf_counter_ns. Prints one JSON line: n, p50_us, p99_us, mean_us, min_us, max_us.
The client's own Python cost is inside every sample; the direct row shows how much it is.
"""
import json
import socket
import sys
import time


def pct(sorted_ns, p):
    i = min(len(sorted_ns) - 1, int(round(p / 100.0 * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1000.0


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 500
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ping = b"x"
    send, recv, clock = s.sendall, s.recv, time.perf_counter_ns
    for _ in range(warmup):
        send(ping)
        if not recv(16):
            raise SystemExit("connection closed during warm-up")
    lat = [0] * count
    for i in range(count):
        t0 = clock()
        send(ping)
        if not recv(16):
            raise SystemExit(f"connection closed after {i} round trips")
        lat[i] = clock() - t0
    s.close()
    lat.sort()
    print(json.dumps({
        "n": count,
        "p50_us": pct(lat, 50), "p99_us": pct(lat, 99),
        "mean_us": sum(lat) / len(lat) / 1000.0,
        "min_us": lat[0] / 1000.0, "max_us": lat[-1] / 1000.0,
    }))


if __name__ == "__main__":
    main()
