#!/usr/bin/env python3
"""Umbra data-path benchmark on loopback: Umbra (QUIC and TLS/TCP) against a direct
connection and socat with mutual TLS on two hops (the peers harness's "b2").

Called by run.sh (which builds `umbra`, installs iperf3/socat and raises the fd limit);
can be run alone:
  python3 benches/bench.py --umbra target/release/umbra [--quick] [--runs 5] ...

Method (as shared/peers): everything is started first; then each round measures every
scenario once, rotating the order, so drift on the shared machine hits every scenario alike;
tables show median [min-max] over rounds. Then broker memory with many idle streams, on a
freshly started broker per transport. Every child runs in its own process group and is killed
when this script exits; every one-shot command has a timeout.
"""
import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
USER = "bench@example.test"
BROKER = "bench-broker"
TRANSPORTS = ("quic", "tcp")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICES = ("iperf", "echo", "idle")

# ----------------------------------------------------------------------------- processes

PROCS = []  # (name, Popen)
PIDFILE = None


def log(msg):
    print(msg, flush=True)


def start(name, cmd, workdir, env=None, stdin=subprocess.DEVNULL, stdout=None):
    """Starts a long-running child in its own process group, output to WORKDIR/NAME.log."""
    logf = open(os.path.join(workdir, f"{name}.log"), "ab")
    p = subprocess.Popen(cmd, stdout=stdout if stdout is not None else logf, stderr=logf,
                         stdin=stdin, start_new_session=True, env=env)
    PROCS.append((name, p))
    if PIDFILE:
        # run.sh's trap kills these process groups even if this script dies hard.
        with open(PIDFILE, "a") as f:
            f.write(f"{p.pid}\n")
    return p


def stop(p, timeout=5):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


def stop_all():
    while PROCS:
        _, p = PROCS.pop()
        stop(p)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))


def run(cmd, timeout, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def listening(port):
    """Some socket listens on 127.0.0.1:PORT (read from /proc: no probe connection)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            return any(l.split()[1] == want and l.split()[3] == "0A" for l in list(f)[1:])
    except OSError:
        return False


def wait_until(what, cond, timeout, procs=(), every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process exited early (rc={p.returncode}): "
                                   f"{' '.join(map(str, p.args))}")
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise RuntimeError(f"{what}: not after {timeout}s")


def wait_port(port, timeout=20.0, procs=()):
    wait_until(f"port {port} listening", lambda: listening(port), timeout, procs)


class Ports:
    """Free loopback ports (TCP and UDP both free, for the broker's shared port)."""

    def __init__(self, base):
        self.n = base

    @staticmethod
    def free(port):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((HOST, port))
                except OSError:
                    return False
        return True

    def take(self):
        self.n += 1
        while not self.free(self.n):
            self.n += 1
        return self.n


def cpu_s(pid):
    """CPU seconds used by PID so far, user + system, including reaped children (socat forks
    one child per connection)."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in f[11:15]) / CLK_TCK
    except OSError:
        return None


def cpu_snapshot(pids):
    return {n: cpu_s(p) for n, p in pids.items()}


def cpu_delta(before, after):
    return {n: (after[n] - before[n]) if after.get(n) is not None and before.get(n) is not None
            else None for n in before}


def cpu_times():
    """(busy, idle) jiffies of all CPUs together, from /proc/stat (iowait counts as idle)."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, idle


def idle_share(before, after):
    busy, idle = after[0] - before[0], after[1] - before[1]
    return idle / (busy + idle) if busy + idle > 0 else None


def rss_kib(pid):
    """VmRSS of PID in KiB (from /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def metrics(port):
    """Prometheus text of http://127.0.0.1:PORT/metrics as [(name, labels dict, value)]."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(4))))
        except ValueError:
            pass
    return out


def metric(port, name, **labels):
    """Sum of metric NAME whose labels include LABELS (0 if absent; None if unreachable)."""
    try:
        ms = metrics(port)
    except Exception:  # noqa: BLE001
        return None
    return sum(v for n, l, v in ms if n == name and all(l.get(k) == x for k, x in labels.items()))


# ----------------------------------------------------------------------------- CPU contention

class Contention:
    """Watches for other people's work on this shared machine, once a second: whether a
    `rustc` or a test binary runs, and how much CPU every process outside this benchmark uses
    ("foreign" CPU: any process whose process group is not one this script started; kernel
    threads are left out). Rounds record both."""

    PATTERNS = (["pgrep", "-x", "rustc"], ["pgrep", "-f", r"target/(debug|release)/deps/"])
    BUSY_CORES = 0.10  # average foreign CPU above this flags a round

    def __init__(self):
        self.lock = threading.Lock()
        self.stopped = False
        self.build_seen = False
        self.foreign_ticks = 0
        self.since = time.time()
        self.recent = []  # (time, foreign cores over the last second)
        threading.Thread(target=self.loop, daemon=True).start()

    @classmethod
    def build_running(cls):
        for cmd in cls.PATTERNS:
            try:
                if run(cmd, 5).stdout.strip():
                    return True
            except Exception:  # noqa: BLE001
                pass
        return False

    @staticmethod
    def scan():
        out = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid, ppid, pgrp = int(name), int(rest[1]), int(rest[2])
            if pid == 2 or ppid == 2:
                continue
            out[pid] = (pgrp, int(rest[11]) + int(rest[12]))
        return out

    def loop(self):
        prev = self.scan()
        while not self.stopped:
            time.sleep(1.0)
            mine = {p.pid for _, p in PROCS} | {os.getpgid(0)}
            now = self.scan()
            ticks = 0
            for pid, (pgrp, t) in now.items():
                if pgrp in mine:
                    continue
                before = prev.get(pid)
                ticks += t - before[1] if before else t
            prev = now
            build = self.build_running()
            with self.lock:
                self.foreign_ticks += max(ticks, 0)
                self.build_seen |= build
                self.recent = (self.recent + [(time.time(), ticks / CLK_TCK)])[-10:]

    def mark(self):
        """Since the previous mark: (whether it was busy, average foreign CPU in cores,
        whether a build ran). Resets."""
        with self.lock:
            el = max(time.time() - self.since, 1e-3)
            cores = self.foreign_ticks / CLK_TCK / el
            build = self.build_seen
            self.foreign_ticks, self.build_seen, self.since = 0, False, time.time()
        return build or cores > self.BUSY_CORES, round(cores, 3), build

    def quiet_now(self):
        with self.lock:
            last = [c for t, c in self.recent if time.time() - t < 4]
        return not self.build_running() and (not last or max(last) < 0.2)

    def wait_quiet(self, max_wait):
        """Waits (up to MAX_WAIT s) until no build runs and other processes use < 0.2 cores;
        returns seconds waited, and whether it is quiet now."""
        t0 = time.time()
        time.sleep(2)  # let the sampler see a couple of seconds
        announced = False
        while not self.quiet_now():
            if time.time() - t0 > max_wait:
                return time.time() - t0, False
            if not announced:
                log(f"    other work is running on this machine; waiting up to {max_wait}s")
                announced = True
            time.sleep(3)
        return time.time() - t0, True


def loadavg():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return None


# ----------------------------------------------------------------------------- measurements

def iperf(port, secs):
    """One iperf3 run through PORT: received Gbit/s, or None."""
    try:
        r = run(["iperf3", "-c", HOST, "-p", str(port), "-t", str(secs), "-J",
                 "--connect-timeout", "5000"], secs + 30)
        j = json.loads(r.stdout)
        if "error" in j:
            log(f"    iperf3 error on port {port}: {j['error']}")
            return None
        return {"gbps": j["end"]["sum_received"]["bits_per_second"] / 1e9,
                "bytes": j["end"]["sum_received"]["bytes"]}
    except Exception as e:  # noqa: BLE001
        log(f"    iperf3 failed on port {port}: {e}")
        return None


def pyjson(script, args, timeout):
    try:
        r = run([sys.executable, os.path.join(HERE, script), *map(str, args)], timeout)
        if r.returncode != 0:
            log(f"    {script} {args} failed: {r.stderr.strip()[-300:]}")
            return None
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        log(f"    {script} {args} failed: {e}")
        return None


def rtt(port, count, warmup=500):
    return pyjson("rtt_client.py", [HOST, port, count, warmup], 180)


def setup_time(port, count):
    r = pyjson("setup_client.py", [HOST, port, count, 20], 300)
    if r is not None and r.get("n", 0) == 0:
        log(f"    setup_client on port {port}: every connection failed")
        return None
    return r


# ----------------------------------------------------------------------------- socat b2 chain

def make_pki(d):
    """ECDSA P-256 CA and leaf certificates (serverAuth+clientAuth) for the socat chain, made
    with the openssl CLI like the peers harness."""
    def o(*a):
        r = run(["openssl", *a], 60, cwd=d)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)

    o("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
      "-keyout", "ca.key", "-out", "ca.crt", "-days", "3", "-subj", "/CN=umbra-bench-ca")
    for n in ("agent", "broker", "connector"):
        o("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
          "-keyout", f"{n}.key", "-out", f"{n}.csr", "-subj", f"/CN={n}.umbra.test")
        with open(os.path.join(d, f"{n}.ext"), "w") as f:
            f.write(f"subjectAltName=DNS:{n}.umbra.test\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
        o("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
          "-CAcreateserial", "-days", "3", "-out", f"{n}.crt", "-extfile", f"{n}.ext")
        with open(os.path.join(d, f"{n}.pem"), "w") as f:
            f.write(open(os.path.join(d, f"{n}.crt")).read())
            f.write(open(os.path.join(d, f"{n}.key")).read())


def socat_tls_chain(d, ports, target, tag):
    """b2: client -> socat (agent) -[mTLS]-> socat (broker) -[mTLS]-> socat (connector) ->
    target; exact commands of shared/peers/README.md."""
    h1, h2, h3 = ports.take(), ports.take(), ports.take()
    ca = f"cafile={d}/ca.crt"
    specs = [
        ("agent", f"TCP-LISTEN:{h1},bind={HOST},reuseaddr,fork,nodelay",
         f"OPENSSL:{HOST}:{h2},cert={d}/agent.pem,{ca},commonname=broker.umbra.test,nodelay"),
        ("broker", f"OPENSSL-LISTEN:{h2},bind={HOST},reuseaddr,fork,cert={d}/broker.pem,{ca},"
                   f"verify=1,nodelay",
         f"OPENSSL:{HOST}:{h3},cert={d}/broker.pem,{ca},commonname=connector.umbra.test,nodelay"),
        ("connector", f"OPENSSL-LISTEN:{h3},bind={HOST},reuseaddr,fork,cert={d}/connector.pem,"
                      f"{ca},verify=1,nodelay",
         f"TCP:{HOST}:{target},nodelay"),
    ]
    procs = [start(f"socat-{r}-{tag}", ["socat", "-b16384", a, b], d) for r, a, b in specs]
    for p in (h1, h2, h3):
        wait_port(p, procs=procs)
    return h1, {r: p.pid for (r, _, _), p in zip(specs, procs)}


def floor_chains(exe, d, ports, target):
    """The libraries' floor: relay_floor's TLS and QUIC chains (3 relays, 2 mutual-TLS hops,
    one connection per client connection, no multiplexing) to TARGET. [(sid, label, port)]."""
    fd = os.path.join(d, "floor")
    os.makedirs(fd, exist_ok=True)
    r = run([exe, "setup", fd], 60)
    if r.returncode != 0:
        raise SystemExit(f"relay_floor setup failed: {r.stderr.strip()}")
    out = []
    for kind, prefix, label in (
            ("tls", "", "floor: tokio-rustls relays, no mux (one TLS connection per client)"),
            ("quic", "q", "floor: quinn relays, no mux (one QUIC connection per client)"),
            ("quicp", "p", "floor: quinn-proto, one task per relay, no mux (one QUIC connection "
                           "per client)")):
        p = [ports.take() for _ in range(3)]
        procs = []
        for role, listen, nxt in ((f"{prefix}exit", p[2], target), (f"{prefix}mid", p[1], p[2]),
                                  (f"{prefix}entry", p[0], p[1])):
            procs.append(start(f"floor-{role}", [exe, role, fd, f"{HOST}:{listen}",
                                                 f"{HOST}:{nxt}"], fd))
        wait_port(p[0], procs=procs)
        out.append((f"floor-{kind}", label, p[0]))
    return out


# ----------------------------------------------------------------------------- Umbra deployment

class Umbra:
    """A controller, one broker, one connector per transport and agents, each a separate
    `umbra` process, set up the way an operator does it (see crates/umbra/src/quickstart.rs
    for the order)."""

    def __init__(self, exe, d, ports, targets):
        self.exe, self.d, self.ports, self.targets = exe, d, ports, targets
        self.env = dict(os.environ, UMBRA_LOG_FORMAT="json")
        self.env.pop("UMBRA_LOG", None)
        self.broker = None
        self.agents = {}      # (transport, service) -> (Popen, port)
        self.connectors = {}  # transport -> Popen

    def cmd(self, *args, timeout=60, check=True):
        r = run([self.exe, *args], timeout, env=self.admin_env if hasattr(self, "admin_env")
                else self.env)
        if check and r.returncode != 0:
            raise RuntimeError(f"umbra {' '.join(args[:4])} failed (rc={r.returncode}): "
                               f"{r.stderr.strip()[-500:]}")
        return r

    def admin(self, *args, timeout=60):
        r = self.cmd("admin", "-o", "json", *args, timeout=timeout)
        out = r.stdout.strip()
        return json.loads(out) if out else None

    def start_controller(self):
        d = self.d
        self.ctl_port = self.ports.take()
        self.url = f"https://{HOST}:{self.ctl_port}"
        kek = os.urandom(32).hex()
        env = dict(self.env, UMBRA_CA_KEY=kek)
        out = os.path.join(d, "controller.stdout")
        self.controller = start("controller", [
            self.exe, "controller", "--data-dir", os.path.join(d, "controller"),
            "--listen", f"{HOST}:{self.ctl_port}", "--public-url", self.url,
            "--server-name", HOST, "--metrics-listen", f"{HOST}:{self.ports.take()}"], d,
            env=env, stdout=open(out, "wb"))

        def token():
            m = re.search(r"admin token \(shown once, store it now\): (\S+)",
                          open(out).read())
            return m.group(1) if m else None
        self.admin_token = wait_until("controller admin token", token, 60, [self.controller])
        wait_port(self.ctl_port, procs=[self.controller])
        # The CA is public (GET /v1/ca.pem); this is our own controller on loopback.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(f"{self.url}/v1/ca.pem", timeout=10, context=ctx) as r:
            ca = r.read().decode()
        self.ca_file = os.path.join(d, "umbra-ca.pem")
        open(self.ca_file, "w").write(ca)
        self.admin_env = dict(self.env, UMBRA_CONTROLLER=self.url,
                              UMBRA_ADMIN_TOKEN=self.admin_token, UMBRA_CA_FILE=self.ca_file)

    def token(self, role, **kw):
        args = ["token", "create", "--role", role]
        for k, v in kw.items():
            args += [f"--{k}", v]
        return self.admin(*args)["token"]

    def enroll_all(self):
        d = self.d
        self.admin("user", "add", USER)
        self.broker_dir = os.path.join(d, "broker")
        self.cmd("broker", "enroll", "--dir", self.broker_dir, "--controller", self.url,
                 "--token", self.token("broker", name=BROKER))
        self.conn_dirs, self.agent_dirs = {}, {}
        for t in TRANSPORTS:
            cd = os.path.join(d, f"connector-{t}")
            self.cmd("connector", "enroll", "--dir", cd, "--controller", self.url,
                     "--token", self.token("connector", name=f"bench-conn-{t}"))
            self.conn_dirs[t] = cd
        for t in TRANSPORTS:
            for s in SERVICES:
                self.admin("service", "add", f"bench-{s}-{t}", "--target",
                           f"{HOST}:{self.targets[s]}", "--connector", f"bench-conn-{t}")
                self.admin("policy", "add", f"bench-allow-{s}-{t}", "--allow-user", USER,
                           "--service", f"bench-{s}-{t}")
        for t in TRANSPORTS:
            ad = os.path.join(d, f"agent-{t}")
            self.cmd("agent", "--dir", ad, "enroll", "--controller", self.url,
                     "--token", self.token("agent", user=USER))
            self.agent_dirs[t] = ad
        self.broker_port = self.ports.take()
        self.broker_metrics = self.ports.take()
        self.conn_metrics = {t: self.ports.take() for t in TRANSPORTS}

    def start_broker(self, tag="", extra=()):
        self.broker = start(f"broker{tag}", [
            self.exe, "broker", "--dir", self.broker_dir, "--name", BROKER,
            "--listen-quic", f"{HOST}:{self.broker_port}",
            "--listen-tcp", f"{HOST}:{self.broker_port}",
            "--metrics-listen", f"{HOST}:{self.broker_metrics}",
            # The setup runs open hundreds of streams a second from one device, and the
            # memory test 10,000: above the default rate of opens per device (a bound on
            # what one device can add to the audit store), which is not what is measured.
            "--stream-opens-per-sec", "1000000", "--stream-open-burst", "1000000",
            *extra], self.d, env=self.env)
        self.broker_log = os.path.join(self.d, f"broker{tag}.log")
        wait_port(self.broker_port, procs=[self.broker])
        wait_port(self.broker_metrics, procs=[self.broker])

        def advertised():
            bs = self.admin("broker", "list")
            return any(b["name"] == BROKER and b.get("quic_addr") and b.get("last_seen")
                       for b in bs)
        wait_until("broker registered at the controller", advertised, 60, [self.broker],
                   every=0.5)

    def stop_broker(self):
        if self.broker is not None:
            stop(self.broker, timeout=15)
            self.broker = None

    def start_connectors(self):
        # The memory test's idle streams all ride one broker link per connector: lift the
        # per-link cap (4096 by default, a bound on what one broker can make a connector
        # dial) above them. Nothing else depends on it.
        cfg = os.path.join(self.d, "connector.toml")
        with open(cfg, "w") as f:
            f.write("max_streams_per_link = 65536\n")
        for t in TRANSPORTS:
            self.connectors[t] = start(f"connector-{t}", [
                self.exe, "connector", "--dir", self.conn_dirs[t], "--transport", t,
                "--config", cfg,
                "--metrics-listen", f"{HOST}:{self.conn_metrics[t]}"], self.d, env=self.env)
        self.wait_connector_links()

    def wait_connector_links(self):
        def up():
            return all(metric(self.broker_metrics, "umbra_broker_links", role="connector",
                              transport=t) == 1 for t in TRANSPORTS)
        wait_until("connector links at the broker (one QUIC, one TLS/TCP)", up, 60,
                   [self.broker, *self.connectors.values()], every=0.25)

    def start_agent(self, t, s, tag=""):
        port = self.agents[(t, s)][1] if (t, s) in self.agents else self.ports.take()
        p = start(f"agent-{t}-{s}{tag}", [
            self.exe, "agent", "--dir", self.agent_dirs[t], "--transport", t,
            "forward", f"bench-{s}-{t}", "--listen", f"{HOST}:{port}"], self.d, env=self.env)
        self.agents[(t, s)] = (p, port)
        wait_port(port, procs=[p], timeout=30)
        return port

    def stop_agent(self, t, s):
        if (t, s) in self.agents:
            stop(self.agents[(t, s)][0], timeout=15)

    def port(self, t, s):
        return self.agents[(t, s)][1]

    def handshakes(self):
        """Links the broker has completed a handshake for so far (umbra_link's "link up" log
        line, one per accepted link)."""
        try:
            with open(self.broker_log, errors="replace") as f:
                return sum(1 for line in f if '"message":"link up"' in line)
        except OSError:
            return None

    def versions(self):
        try:
            return run([self.exe, "--version"], 10).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"


# ----------------------------------------------------------------------------- statistics

def summary(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return {"values": [], "n": 0, "failed": len(values)}
    return {"values": vals, "n": len(vals), "failed": len(values) - len(vals),
            "median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def fmt(s, digits=3, scale=1.0):
    if not s or s.get("n", 0) == 0:
        return "failed"
    def f(v):
        v = v * scale
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return f"{f(s['median'])} [{f(s['min'])}–{f(s['max'])}]"


def ratio_summary(num, den):
    """Per-round ratios num/den (paired by round) and the ratio of medians."""
    pairs = [a / b for a, b in zip(num, den) if a is not None and b]
    s = summary(pairs)
    nm, dm = summary(num), summary(den)
    s["of_medians"] = nm["median"] / dm["median"] if nm.get("n") and dm.get("n") else None
    return s


def fmt_ratio(s):
    if s.get("of_medians") is None:
        return "—"
    if s.get("n"):
        return (f"{s['of_medians']:.2f}x (per round {s['median']:.2f} "
                f"[{s['min']:.2f}–{s['max']:.2f}])")
    return f"{s['of_medians']:.2f}x"


# ----------------------------------------------------------------------------- main

def main():
    global PIDFILE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--umbra", default=os.path.join(os.path.dirname(HERE), "target", "release",
                                                     "umbra"))
    ap.add_argument("--floor", default=os.path.join(os.path.dirname(HERE), "target", "release",
                                                     "examples", "relay_floor"),
                    help="relay_floor binary (run.sh builds it); its chains add RTT rows")
    ap.add_argument("--no-floor", action="store_true", help="measure no floor rows")
    ap.add_argument("--runs", type=int, default=5, help="rounds; every scenario once per round")
    ap.add_argument("--secs", type=int, default=5, help="iperf3 seconds per run")
    ap.add_argument("--rtt-count", type=int, default=10000, help="timed ping-pongs per RTT run")
    ap.add_argument("--setup-count", type=int, default=500, help="new connections per setup run")
    ap.add_argument("--idle-streams", type=int, default=10000, help="idle streams, memory test")
    ap.add_argument("--idle-in-flight", type=int, default=64,
                    help="connections being set up at once in the memory test")
    ap.add_argument("--wait-build", type=int, default=600,
                    help="before each round, wait up to this long for others' builds to end")
    ap.add_argument("--base-port", type=int, default=27300)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--hold", type=int, default=0,
                    help="profiling aid: start everything, print ports and pids, keep it "
                         "running this many seconds, measure nothing")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, iperf3 3 s, 5000 ping-pongs, 200 setups (memory test unchanged)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.secs, args.rtt_count, args.setup_count = 3, 3, 5000, 200
        args.wait_build = min(args.wait_build, 300)

    for tool in ("iperf3", "socat", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (run.sh installs it)")
    if not os.access(args.umbra, os.X_OK):
        raise SystemExit(f"umbra binary not found at {args.umbra} (run.sh builds it)")
    if not args.no_floor and not os.access(args.floor, os.X_OK):
        raise SystemExit(f"relay_floor not found at {args.floor} (run.sh builds it; "
                         f"or pass --no-floor)")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.idle_streams + 1000 and not args.skip_memory:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
        if soft < args.idle_streams + 1000:
            raise SystemExit(f"open-file limit {soft} is too low for {args.idle_streams} idle "
                             f"streams (need ~{args.idle_streams + 1000}; raise ulimit -n)")

    d = args.workdir or tempfile.mkdtemp(prefix="umbra-bench.")
    os.makedirs(d, exist_ok=True)
    PIDFILE = os.path.join(d, "pids")
    meta = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), "?"),
        "args": vars(args), "workdir": d, "nofile": soft,
        "env_settings": env_settings(),
    }
    log(f"workdir {d}\n{meta['cpu']} x{meta['cpus']}, kernel {meta['kernel']}")
    log(f"rounds={args.runs} iperf={args.secs}s rtt={args.rtt_count} setup={args.setup_count} "
        f"idle streams={args.idle_streams} (fd limit {soft})")
    t_start = time.time()
    contention = Contention()
    ports = Ports(args.base_port)

    # --- targets
    targets = {"iperf": ports.take(), "echo": ports.take(), "idle": ports.take()}
    srv = [start("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(targets["iperf"])], d),
           start("echo-server", [sys.executable, os.path.join(HERE, "echo_server.py"),
                                 str(targets["echo"])], d),
           start("idle-server", [sys.executable, os.path.join(HERE, "idle_server.py"),
                                 str(targets["idle"])], d)]
    for s in targets.values():
        wait_port(s, procs=srv)

    # --- socat b2
    log("starting socat b2 chains (3 relays, 2 mTLS hops) ...")
    make_pki(d)
    socat, socat_pids = {}, {}
    for s in SERVICES:
        socat[s], socat_pids[s] = socat_tls_chain(d, ports, targets[s], s)

    # --- the libraries' floor: RTT rows only
    floors = []
    if not args.no_floor:
        log("starting the floor chains (tokio-rustls and quinn relays, no multiplexing) ...")
        floors = floor_chains(args.floor, d, ports, targets["echo"])

    # --- Umbra
    log(f"starting Umbra ({args.umbra}) ...")
    u = Umbra(args.umbra, d, ports, targets)
    u.start_controller()
    u.enroll_all()
    u.start_broker()
    u.start_connectors()
    for t in TRANSPORTS:
        for s in SERVICES:
            u.start_agent(t, s)
    meta["versions"] = {
        "umbra": u.versions(),
        "iperf3": run(["iperf3", "--version"], 10).stdout.splitlines()[0],
        "socat": next((l for l in run(["socat", "-V"], 10).stdout.splitlines()
                       if "socat version" in l), "?").strip(),
        "openssl": run(["openssl", "version"], 10).stdout.strip(),
        "python": platform.python_version(),
    }

    scen = [
        ("direct", "direct, no relay",
         targets["iperf"], targets["echo"], targets["idle"]),
        ("umbra-quic", "Umbra over QUIC (agent → broker → connector)",
         u.port("quic", "iperf"), u.port("quic", "echo"), u.port("quic", "idle")),
        ("umbra-tcp", "Umbra over TLS 1.3/TCP (agent → broker → connector)",
         u.port("tcp", "iperf"), u.port("tcp", "echo"), u.port("tcp", "idle")),
        ("socat-b2", "socat, mutual TLS on 2 hops, 3 relays (peers b2)",
         socat["iperf"], socat["echo"], socat["idle"]),
    ]

    # --- sanity: every path answers before anything is measured
    log("checking every path ...")
    for sid, label, ti, te, tsu in scen:
        r = rtt(te, 200, 50)
        st = setup_time(tsu, 5)
        if r is None or st is None:
            raise SystemExit(f"path {sid} does not work; logs in {d}")
        log(f"    {sid:<11} ok (rtt p50 {r['p50_us']:.0f} µs, setup p50 {st['p50_us']:.0f} µs)")
    for sid, _, te in floors:
        r = rtt(te, 200, 50)
        if r is None:
            raise SystemExit(f"path {sid} does not work; logs in {d}")
        log(f"    {sid:<11} ok (rtt p50 {r['p50_us']:.0f} µs)")

    if args.hold:
        # For profiling: everything up, nothing measured.
        info = {"scenarios": {sid: {"iperf": ti, "echo": te, "idle": tsu}
                              for sid, _, ti, te, tsu in scen},
                "floors": {sid: {"echo": te} for sid, _, te in floors},
                "pids": {name: p.pid for name, p in PROCS if p.poll() is None},
                "broker_metrics": u.broker_metrics, "workdir": d}
        open(os.path.join(d, "hold.json"), "w").write(json.dumps(info, indent=1))
        log(json.dumps(info, indent=1))
        log(f"holding for {args.hold} s (ports and pids above, also in {d}/hold.json)")
        time.sleep(args.hold)
        return

    # Processes of each path, for CPU accounting (the broker serves both Umbra paths, but only
    # one path carries traffic at a time).
    def chain(sid, svc):
        if sid.startswith("umbra"):
            t = sid.split("-")[1]
            return {"agent": u.agents[(t, svc)][0].pid, "broker": u.broker.pid,
                    "connector": u.connectors[t].pid}
        if sid == "socat-b2":
            return dict(socat_pids[svc])
        return {}

    # --- rounds
    tput = {s[0]: [] for s in scen}
    tput_cpu = {s[0]: [] for s in scen}   # per run: {component: ns per byte}
    tput_idle = {s[0]: [] for s in scen}  # per run: idle share of all CPUs during iperf3
    lat = {s[0]: [] for s in scen}
    lat.update({f[0]: [] for f in floors})
    setup = {s[0]: [] for s in scen}
    setup_cpu = {s[0]: [] for s in scen}  # per run: {component: µs per new connection}
    hs = {s[0]: [] for s in scen}
    rounds = []
    log(f"\n[1-3] throughput, round trip, stream setup: {args.runs} interleaved rounds")
    for r in range(args.runs):
        waited, quiet = contention.wait_quiet(args.wait_build)
        contention.mark()
        load0 = loadavg()
        order = scen[r % len(scen):] + scen[:r % len(scen)]
        for sid, _, ti, _, _ in order:
            pids = chain(sid, "iperf")
            c0 = cpu_snapshot(pids)
            t0 = cpu_times()
            res_i = iperf(ti, args.secs)
            tput_idle[sid].append(idle_share(t0, cpu_times()) if res_i else None)
            time.sleep(0.3)  # let socat's per-connection children be reaped
            dc = cpu_delta(c0, cpu_snapshot(pids))
            tput[sid].append(res_i["gbps"] if res_i else None)
            tput_cpu[sid].append({n: v / res_i["bytes"] * 1e9 for n, v in dc.items()
                                  if v is not None} if res_i and res_i["bytes"] else None)
        rtt_rows = [(s[0], s[3]) for s in scen] + [(f[0], f[2]) for f in floors]
        k = r % len(rtt_rows)
        for sid, te in rtt_rows[k:] + rtt_rows[:k]:
            lat[sid].append(rtt(te, args.rtt_count))
        for sid, _, _, _, tsu in order:
            pids = chain(sid, "idle")
            h0 = u.handshakes() if sid.startswith("umbra") else None
            c0 = cpu_snapshot(pids)
            st = setup_time(tsu, args.setup_count)
            time.sleep(0.3)
            dc = cpu_delta(c0, cpu_snapshot(pids))
            h1 = u.handshakes() if sid.startswith("umbra") else None
            setup[sid].append(st)
            conns = (st["n"] + st["failed"] + 20) if st else 0  # 20 warm-up connections
            setup_cpu[sid].append({n: v / conns * 1e6 for n, v in dc.items() if v is not None}
                                  if conns else None)
            hs[sid].append(h1 - h0 if h0 is not None and h1 is not None else None)
        busy, foreign, build = contention.mark()
        busy = busy or not quiet
        rounds.append({"round": r + 1, "order": [s[0] for s in order], "waited_s": round(waited),
                       "other_work_running": busy, "foreign_cpu_cores": foreign,
                       "build_seen": build, "load1_start": load0, "load1_end": loadavg()})
        line = "  ".join(f"{sid} {tput[sid][-1] or 0:.2f}G/"
                         f"{(lat[sid][-1] or {}).get('p50_us', 0):.0f}µs/"
                         f"{(setup[sid][-1] or {}).get('p50_us', 0):.0f}µs"
                         for sid, *_ in scen)
        log(f"    round {r + 1}/{args.runs}"
            f"{f' (other work running: {foreign:.2f} cores, build {build})' if busy else ''}: "
            f"Gbit/s / RTT p50 / setup p50: {line}")

    def per_component(runs):
        names = sorted({n for x in runs if x for n in x})
        out = {n: summary([x.get(n) if x else None for x in runs]) for n in names}
        out["total"] = summary([sum(x.values()) if x else None for x in runs])
        return out

    res = {"meta": meta, "rounds": rounds, "scenarios": {}}
    for sid, label, *_ in scen:
        res["scenarios"][sid] = {
            "label": label,
            "gbps": summary(tput[sid]),
            "rtt_p50_us": summary([x["p50_us"] if x else None for x in lat[sid]]),
            "rtt_p99_us": summary([x["p99_us"] if x else None for x in lat[sid]]),
            "setup_p50_us": summary([x["p50_us"] if x else None for x in setup[sid]]),
            "setup_p99_us": summary([x["p99_us"] if x else None for x in setup[sid]]),
            "setup_failed_connections": sum((x or {}).get("failed", 0) for x in setup[sid]),
            "setup_link_handshakes": hs[sid] if sid.startswith("umbra") else None,
            "cpu_ns_per_byte": per_component(tput_cpu[sid]) if sid != "direct" else None,
            "iperf_idle_cpu": summary(tput_idle[sid]),
            "cpu_us_per_new_stream": per_component(setup_cpu[sid]) if sid != "direct" else None,
            "raw": {"gbps": tput[sid], "rtt": lat[sid], "setup": setup[sid],
                    "cpu_ns_per_byte": tput_cpu[sid], "cpu_us_per_new_stream": setup_cpu[sid]},
        }
        if sid != "socat-b2":
            res["scenarios"][sid]["vs_socat"] = {
                "gbps": ratio_summary(tput[sid], tput["socat-b2"]),
                "rtt_p50": ratio_summary([x["p50_us"] if x else None for x in lat[sid]],
                                         [x["p50_us"] if x else None for x in lat["socat-b2"]]),
            }

    res["floors"] = {}
    for sid, label, _ in floors:
        p50 = [x["p50_us"] if x else None for x in lat[sid]]
        res["floors"][sid] = {
            "label": label,
            "rtt_p50_us": summary(p50),
            "rtt_p99_us": summary([x["p99_us"] if x else None for x in lat[sid]]),
            "vs_socat_rtt_p50": ratio_summary(
                p50, [x["p50_us"] if x else None for x in lat["socat-b2"]]),
            "raw": {"rtt": lat[sid]},
        }

    # --- memory with many idle streams
    res["memory"] = {}
    if not args.skip_memory:
        log(f"\n[4] broker memory with {args.idle_streams} idle streams (fresh broker per "
            "transport)")
        # The socat chains are not needed any more; the other agents neither.
        for t in TRANSPORTS:
            for s in ("iperf", "echo"):
                u.stop_agent(t, s)
        for t in ("tcp", "quic"):
            waited, quiet = contention.wait_quiet(args.wait_build)
            contention.mark()
            try:
                res["memory"][t] = memory_test(u, t, args, d)
            except Exception as e:  # noqa: BLE001
                log(f"    memory test over {t} failed: {e}")
                res["memory"][t] = {"error": str(e)}
            busy, foreign, build = contention.mark()
            res["memory"][t].update(other_work_running=busy or not quiet,
                                    foreign_cpu_cores=foreign, build_seen=build)

    contention.stopped = True
    meta["elapsed_s"] = round(time.time() - t_start, 1)
    stop_all()
    write_results(res, args)


def memory_test(u, t, args, d):
    n = args.idle_streams
    # A fresh broker: its baseline holds no allocator leftovers of the throughput runs.
    u.stop_broker()
    u.stop_agent(t, "idle")
    # One agent holds all the streams: lift the per-device cap (1024 by default) above them.
    u.start_broker(tag=f"-mem-{t}", extra=["--max-streams-per-device", str(n + 100)])
    u.wait_connector_links()
    port = u.start_agent(t, "idle", tag=f"-mem-{t}")
    # The agent links up at start (it measures the broker); a first stream proves the path.
    if setup_time(port, 3) is None:
        raise RuntimeError("no stream through the fresh broker")
    wait_until("streams from the probe closed", lambda: metric(
        u.broker_metrics, "umbra_broker_streams_active") == 0, 30, every=0.25)
    time.sleep(2)
    pid = u.broker.pid
    agent_pid, conn_pid = u.agents[(t, "idle")][0].pid, u.connectors[t].pid
    before = {"broker": rss_kib(pid), "agent": rss_kib(agent_pid), "connector": rss_kib(conn_pid)}
    log(f"    {t}: broker RSS before {before['broker'] / 1024:.1f} MiB; opening {n} streams ...")
    client = start(f"idle-client-{t}", [sys.executable, os.path.join(HERE, "idle_client.py"),
                                        HOST, str(port), str(n), str(args.idle_in_flight), "600"],
                   d, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready = json.loads(wait_line(client, 700))
    log(f"    {t}: client holds {ready['open']} connections after {ready['elapsed_s']} s "
        f"({ready['failed']} failed attempts)")
    active = wait_until_value(lambda: metric(u.broker_metrics, "umbra_broker_streams_active"),
                              lambda v: v is not None and v >= ready["open"], 30)
    # The admin view (brokers report live streams in their heartbeats, every second).
    listed = None
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            v = u.admin("stream", "list", timeout=60)
            listed = sum(1 for s in v if s.get("service") == f"bench-idle-{t}")
            if listed >= ready["open"]:
                break
        except Exception as e:  # noqa: BLE001
            log(f"    admin stream list failed: {e}")
        time.sleep(1)
    time.sleep(3)  # let heartbeats and allocations settle
    after = {"broker": rss_kib(pid), "agent": rss_kib(agent_pid), "connector": rss_kib(conn_pid)}
    active2 = metric(u.broker_metrics, "umbra_broker_streams_active")
    client.stdin.write(b"check\n")
    client.stdin.flush()
    still = json.loads(wait_line(client, 120))["still_open"]
    streams = active2 if active2 else ready["open"]
    per = {k: (after[k] - before[k]) / streams if streams else None for k in before}
    log(f"    {t}: broker RSS after {after['broker'] / 1024:.1f} MiB with {active2:.0f} streams "
        f"active (admin list {listed}, client still open {still}): "
        f"{per['broker']:.2f} KiB per idle stream")
    client.stdin.close()
    t0 = time.time()
    try:
        client.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop(client)
    try:
        wait_until("streams closed at the broker", lambda: metric(
            u.broker_metrics, "umbra_broker_streams_active") == 0, 120, every=0.5)
        drained = round(time.time() - t0, 1)
    except RuntimeError:
        drained = None
    return {"streams_requested": n, "client_open": ready["open"],
            "client_failed_attempts": ready["failed"], "open_elapsed_s": ready["elapsed_s"],
            "broker_streams_active": active2, "broker_streams_active_first": active,
            "admin_stream_list": listed, "client_still_open_at_measure": still,
            "rss_before_kib": before, "rss_after_kib": after, "kib_per_stream": per,
            "all_closed_after_s": drained}


def wait_line(p, timeout):
    """Next stdout line of P (a child started with stdout=PIPE), within TIMEOUT seconds."""
    box = []
    th = threading.Thread(target=lambda: box.append(p.stdout.readline()), daemon=True)
    th.start()
    th.join(timeout)
    if not box or not box[0]:
        raise RuntimeError(f"no answer from {p.args[1]} within {timeout}s (rc={p.poll()})")
    return box[0].decode()


def wait_until_value(get, ok, timeout):
    deadline = time.time() + timeout
    v = None
    while time.time() < deadline:
        v = get()
        if ok(v):
            return v
        time.sleep(0.25)
    return v


# ----------------------------------------------------------------------------- report

def ref(sid, vs, key):
    if sid == "socat-b2":
        return "1 (reference)"
    if sid == "direct":
        return "—"
    return fmt_ratio(vs[key])


def met(ok):
    return "**met**" if ok else "**not met**"


def env_settings():
    """Environment variables that change how the measured processes behave (role settings
    such as UMBRA_BROKER_STREAM_WINDOW_KIB, tokio and glibc knobs), so that a report says what
    it was run with. Names holding secrets are left out."""
    return {k: v for k, v in sorted(os.environ.items())
            if (k.startswith("UMBRA_") or k in ("TOKIO_WORKER_THREADS", "GLIBC_TUNABLES"))
            and k not in ("UMBRA_LOG", "UMBRA_LOG_FORMAT")
            and not any(w in k for w in ("TOKEN", "KEY", "SECRET", "PASSWORD"))}


def write_results(res, args):
    meta, sc = res["meta"], res["scenarios"]
    L = []
    L.append(f"# Umbra data-path benchmark, {meta['date_utc']}\n")
    L.append(f"{meta['cpu']} x{meta['cpus']}, kernel {meta['kernel']}; {meta['versions']['umbra']}, "
             f"{meta['versions']['iperf3']}, {meta['versions']['socat']}, "
             f"{meta['versions']['openssl']}, Python {meta['versions']['python']}. "
             f"Loopback only. {args.runs} interleaved rounds, iperf3 {args.secs} s, "
             f"{args.rtt_count} ping-pongs, {args.setup_count} new connections per setup run; "
             f"took {meta['elapsed_s']:.0f} s.\n")
    if meta.get("env_settings"):
        L.append("**Run with settings from the environment:** "
                 + ", ".join(f"`{k}={v}`" for k, v in meta["env_settings"].items()) + ".\n")
    busy = [r["round"] for r in res["rounds"] if r["other_work_running"]]
    mem_busy = [t for t, m in res.get("memory", {}).items() if m.get("other_work_running")]
    fc = ", ".join(f"{r['foreign_cpu_cores']:.2f}" for r in res["rounds"])
    if busy or mem_busy:
        L.append(f"**CPU contention:** other work ran on this machine during round(s) "
                 f"{busy or '-'} and memory test(s) {mem_busy or '-'} (CPU used by processes "
                 f"outside this benchmark, per round, in cores: {fc}). Read those numbers "
                 f"with care: the interleaving spreads the effect over every scenario.\n")
    else:
        L.append(f"No other build, test or busy process was seen during the measurements "
                 f"(CPU used outside this benchmark, per round, in cores: {fc}).\n")

    L.append(f"## One TCP stream: throughput and 1-byte round trip (median [min–max] of "
             f"{args.runs} rounds)\n")
    L.append("| scenario | iperf3 1 stream, Gbit/s | RTT p50, µs | RTT p99, µs | "
             "throughput vs socat | RTT p50 vs socat |")
    L.append("|---|---|---|---|---|---|")
    for sid, s in sc.items():
        vs = s.get("vs_socat")
        L.append(f"| {s['label']} | {fmt(s['gbps'])} | {fmt(s['rtt_p50_us'])} | "
                 f"{fmt(s['rtt_p99_us'])} | {ref(sid, vs, 'gbps')} | {ref(sid, vs, 'rtt_p50')} |")
    L.append("\nRatios are of the medians; \"per round\" is the median [min–max] of the same "
             "ratio taken within each round (paired, so drift between rounds cancels). RTT p50 "
             "ratio < 1 is better. The targets are judged on the ratio of the medians.\n")
    if res.get("floors"):
        L.append("### The libraries' floor (RTT only, interleaved with the rows above)\n")
        L.append("The same 3-relay, 2-hop mutual TLS 1.3 chain built from the libraries Umbra "
                 "uses and nothing of Umbra's: one TLS (tokio-rustls) or QUIC (quinn) "
                 "connection per client connection, no multiplexing, no framing, no policy "
                 "(`crates/umbra-link/examples/relay_floor/`). Umbra's gap above its floor is "
                 "what Umbra adds; the floor's gap to socat is the libraries'. The quinn-proto "
                 "row drives QUIC's state machines from one task per relay, with three syscalls "
                 "per relayed packet (wait, receive, send): QUIC without quinn's task "
                 "hand-offs.\n")
        L.append("| chain | RTT p50, µs | RTT p99, µs | RTT p50 vs socat |")
        L.append("|---|---|---|---|")
        for sid, s in res["floors"].items():
            L.append(f"| {s['label']} | {fmt(s['rtt_p50_us'])} | {fmt(s['rtt_p99_us'])} | "
                     f"{fmt_ratio(s['vs_socat_rtt_p50'])} |")
        L.append("")

    L.append(f"## Stream setup: TCP connect → first 1-byte echo back ({args.setup_count} new "
             f"connections per round; median [min–max] of the per-round p50 and p99)\n")
    L.append("| path | setup p50, µs | setup p99, µs | p50 added over direct, µs | "
             "link handshakes at the broker during the test | failed connections |")
    L.append("|---|---|---|---|---|---|")
    d50 = sc["direct"]["setup_p50_us"].get("median")
    for sid, s in sc.items():
        p50 = s["setup_p50_us"].get("median")
        add = f"{p50 - d50:.0f}" if p50 is not None and d50 is not None and sid != "direct" else "—"
        if sid.startswith("umbra"):
            h = s["setup_link_handshakes"]
            hs_txt = f"{sum(x for x in h if x is not None)} (per round {h})"
        elif sid == "socat-b2":
            hs_txt = "2 full mTLS handshakes per connection (by design)"
        else:
            hs_txt = "—"
        L.append(f"| {s['label']} | {fmt(s['setup_p50_us'])} | {fmt(s['setup_p99_us'])} | "
                 f"{add} | {hs_txt} | {s['setup_failed_connections']} |")
    L.append("")

    L.append("## CPU cost by component (median [min–max] over rounds)\n")
    L.append("CPU time (user + system, from /proc/PID/stat) of each relay process while it "
             "carried the iperf3 run, per byte received; and during the setup runs, per new "
             "connection. socat counts its per-connection children (TLS handshakes included).\n")
    L.append("| path | agent | broker | connector | total |")
    L.append("|---|---|---|---|---|")
    for sid, s in sc.items():
        c = s.get("cpu_ns_per_byte")
        if not c:
            continue
        L.append(f"| {s['label']}: ns per byte | " + " | ".join(
            fmt(c.get(n), 3) if c.get(n) else "—" for n in ("agent", "broker", "connector",
                                                            "total")) + " |")
    for sid, s in sc.items():
        c = s.get("cpu_us_per_new_stream")
        if not c:
            continue
        L.append(f"| {s['label']}: µs per new connection | " + " | ".join(
            fmt(c.get(n), 3) if c.get(n) else "—" for n in ("agent", "broker", "connector",
                                                            "total")) + " |")
    L.append("")
    idle = [(s["label"], s.get("iperf_idle_cpu")) for s in sc.values()]
    if any(i and i.get("median") is not None for _, i in idle):
        L.append("Idle share of both vCPUs while iperf3 ran (median [min–max]): a relay "
                 "that leaves CPU idle at full speed is waiting on something, not CPU-bound.\n")
        L.append("| path | idle CPU during iperf3 |")
        L.append("|---|---|")
        for label, i in idle:
            if i and i.get("median") is not None:
                L.append(f"| {label} | {i['median'] * 100:.1f}% "
                         f"[{i['min'] * 100:.1f}–{i['max'] * 100:.1f}] |")
        L.append("")

    mem = res.get("memory", {})
    if mem:
        L.append(f"## Broker memory with {args.idle_streams} concurrent idle streams "
                 "(VmRSS, fresh broker per transport)\n")
        L.append("| transport | streams open: client / broker gauge / admin list | "
                 "broker RSS before → after, MiB | **broker KiB per idle stream** | "
                 "agent KiB/stream | connector KiB/stream | all closed after |")
        L.append("|---|---|---|---|---|---|---|")
        for t, m in mem.items():
            if "error" in m:
                L.append(f"| {t} | failed: {m['error']} | | | | | |")
                continue
            b, a, p = m["rss_before_kib"], m["rss_after_kib"], m["kib_per_stream"]
            L.append(f"| {'QUIC' if t == 'quic' else 'TLS/TCP'} | {m['client_open']} / "
                     f"{m['broker_streams_active']:.0f} / {m['admin_stream_list']} | "
                     f"{b['broker'] / 1024:.1f} → {a['broker'] / 1024:.1f} | "
                     f"**{p['broker']:.2f}** | {p['agent']:.2f} | {p['connector']:.2f} | "
                     f"{m['all_closed_after_s']} s |")
        L.append("\nKiB per stream = (RSS after − RSS before) / streams active at the broker. "
                 "Each user stream is two mux streams at the broker (agent side and connector "
                 "side).\n")

    # --- targets
    L.append("## Targets\n")
    if meta.get("env_settings"):
        L.append("The targets are for Umbra's defaults. This run changed settings through the "
                 "environment (see the top), so the verdicts below describe those settings, "
                 "not the defaults.\n")
    L.append("| target | measured | result |")
    L.append("|---|---|---|")
    targets = {}

    def tput_target(sid, name, want):
        r = sc[sid]["vs_socat"]["gbps"].get("of_medians")
        ok = r is not None and r >= want
        targets[f"{sid}-throughput"] = ok
        L.append(f"| {name} throughput ≥ {want}x socat | "
                 f"{r:.2f}x ({sc[sid]['gbps'].get('median', 0):.2f} vs "
                 f"{sc['socat-b2']['gbps'].get('median', 0):.2f} Gbit/s) | {met(ok)} |"
                 if r is not None else f"| {name} throughput ≥ {want}x socat | failed | {met(False)} |")

    tput_target("umbra-tcp", "TLS/TCP", 1.3)
    tput_target("umbra-quic", "QUIC", 1.0)
    for sid, name in (("umbra-quic", "QUIC"), ("umbra-tcp", "TLS/TCP")):
        a = sc[sid]["rtt_p50_us"].get("median")
        b = sc["socat-b2"]["rtt_p50_us"].get("median")
        ok = a is not None and b is not None and a <= b
        targets[f"{sid}-rtt"] = ok
        L.append(f"| {name} RTT p50 no worse than socat | {a:.0f} vs {b:.0f} µs | {met(ok)} |"
                 if a is not None and b is not None else
                 f"| {name} RTT p50 no worse than socat | failed | {met(False)} |")
    for sid, name in (("umbra-quic", "QUIC"), ("umbra-tcp", "TLS/TCP")):
        h = [x for x in sc[sid]["setup_link_handshakes"] if x is not None]
        a = sc[sid]["setup_p50_us"].get("median")
        s2 = sc["socat-b2"]["setup_p50_us"].get("median")
        d0 = sc["direct"]["setup_p50_us"].get("median")
        r50 = sc[sid]["rtt_p50_us"].get("median")
        ok = bool(h) and sum(h) == 0 and sc[sid]["setup_failed_connections"] == 0
        targets[f"{sid}-setup"] = ok
        extra = (f"; setup p50 {a:.0f} µs = direct {d0:.0f} + {a - d0:.0f} µs "
                 f"(≈ {(a - d0) / r50:.1f}× its 1-byte RTT p50), socat with 2 handshakes "
                 f"{s2:.0f} µs" if None not in (a, s2, d0, r50) else "")
        L.append(f"| {name}: a new stream adds no handshake | {sum(h)} link handshakes at the "
                 f"broker during {len(h) * args.setup_count} new connections{extra} | {met(ok)} |")
    for t, name in (("quic", "QUIC"), ("tcp", "TLS/TCP")):
        m = mem.get(t)
        if not m:
            continue
        if "error" in m:
            targets[f"memory-{t}"] = False
            L.append(f"| {name}: broker ≤ 32 KiB per idle stream | failed | {met(False)} |")
            continue
        v = m["kib_per_stream"]["broker"]
        complete = m["broker_streams_active"] >= args.idle_streams
        ok = v <= 32 and complete
        targets[f"memory-{t}"] = ok
        L.append(f"| {name}: broker ≤ 32 KiB per idle stream | {v:.2f} KiB "
                 f"({m['broker_streams_active']:.0f} streams active"
                 f"{'' if complete else ', fewer than asked'}) | {met(ok)} |")
    res["targets_met"] = targets
    L.append("")
    L.append(f"Workdir with every process's log: `{meta['workdir']}`.")
    md = "\n".join(L) + "\n"

    os.makedirs(args.results, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    tag = "-quick" if args.quick else ""
    mpath = os.path.join(args.results, f"results-{stamp}{tag}.md")
    jpath = os.path.join(args.results, f"results-{stamp}{tag}.json")
    open(mpath, "w").write(md)
    json.dump(res, open(jpath, "w"), indent=1, default=str)
    print("\n" + md)
    print(f"results: {mpath}\n         {jpath}")


if __name__ == "__main__":
    main()
