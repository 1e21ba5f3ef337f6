#!/usr/bin/env python3
"""Stream setup time: COUNT new TCP connections, one after the other.

Usage: setup_client.py HOST PORT [COUNT] [WARMUP]

Per connection: t0 just before connect(), then TCP_NODELAY, send 1 byte, wait for its echo;
the sample is t0 -> echo received (perf_counter_ns). Through an Umbra agent this is
"connect to the forward port -> the agent opens a stream on its established link -> the broker
authorizes and asks the connector -> the connector dials the target -> first byte back".
WARMUP (default 20) connections are made first and not counted. Connections are closed
before the next starts. Prints one JSON line: n, failed, p50_us, p99_us, mean_us, min_us,
max_us.
"""
import json
import socket
import sys
import time


def pct(sorted_ns, p):
    i = min(len(sorted_ns) - 1, int(round(p / 100.0 * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1000.0


def one(host, port, clock):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        t0 = clock()
        s.connect((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if not s.recv(16):
            return None
        return clock() - t0
    except OSError:
        return None
    finally:
        s.close()


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    clock = time.perf_counter_ns
    for _ in range(warmup):
        one(host, port, clock)
    lat, failed = [], 0
    for _ in range(count):
        v = one(host, port, clock)
        if v is None:
            failed += 1
        else:
            lat.append(v)
    if not lat:
        print(json.dumps({"n": 0, "failed": failed}))
        return
    lat.sort()
    print(json.dumps({
        "n": len(lat), "failed": failed,
        "p50_us": pct(lat, 50), "p99_us": pct(lat, 99),
        "mean_us": sum(lat) / len(lat) / 1000.0,
        "min_us": lat[0] / 1000.0, "max_us": lat[-1] / 1000.0,
    }))


if __name__ == "__main__":
    main()
