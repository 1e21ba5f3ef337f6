#!/usr/bin/env bash
# Umbra data-path benchmark, loopback only. One command:
#
#   bash benches/run.sh            # full: 5 interleaved rounds (~10 min after the build)
#   bash benches/run.sh --quick    # 3 shorter rounds (~6 min after the build)
#   bash benches/run.sh --no-build [bench.py options...]   # e.g. --runs 7 --skip-memory
#
# Builds `umbra` in release (cargo's lock serialises with other builds), installs iperf3 and
# socat if missing (apt-get, needs root), raises the open-file limit for the 10,000 idle
# streams, then runs benches/bench.py, which starts everything in a temp dir, measures, prints
# a markdown table and writes benches/results/results-<UTC>.{md,json}. Every child process is
# killed on exit (bench.py's own cleanup, and this script's trap as a backstop).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

build=1
args=()
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    *) args+=("$a") ;;
  esac
done

# --- tools -----------------------------------------------------------------------------------
need=()
for cmd_pkg in iperf3:iperf3 socat:socat openssl:openssl python3:python3; do
  command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg##*:}")
done
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "need root to install: ${need[*]}" >&2; exit 1; fi
  echo "installing: ${need[*]}"
  if ! DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q "${need[@]}"; then
    timeout 600 apt-get update -q
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q "${need[@]}"
  fi
fi

# --- build -----------------------------------------------------------------------------------
UMBRA_BIN="${UMBRA_BIN:-$ROOT/target/release/umbra}"
if ((build)); then
  echo "building umbra (release; waits for cargo's lock if others are building) ..."
  (cd "$ROOT" && timeout "${BUILD_TIMEOUT:-3600}" cargo build --release -p umbra --locked)
  # The libraries' own floor, measured beside Umbra (crates/umbra-link/examples/relay_floor/).
  (cd "$ROOT" && timeout "${BUILD_TIMEOUT:-3600}" cargo build --release -p umbra-link \
    --example relay_floor --locked)
fi
[ -x "$UMBRA_BIN" ] || { echo "no umbra binary at $UMBRA_BIN" >&2; exit 1; }

# --- limits ----------------------------------------------------------------------------------
# 10,000 idle streams: the client, the agent, the connector and the target each hold 10,000
# sockets. Ask for 65536; containers often cap the hard limit lower (20000 here), which is
# still enough.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open-file limit: $(ulimit -n)"

# --- run -------------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/umbra-bench.XXXXXX)"
cleanup() {
  # Backstop: bench.py kills its children itself; this catches a hard crash of bench.py.
  if [ -n "${PY:-}" ] && kill -0 "$PY" 2>/dev/null; then kill -TERM "$PY" 2>/dev/null || true; wait "$PY" 2>/dev/null || true; fi
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null || true; done < "$WORK/pids"
    sleep 1
    while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done < "$WORK/pids"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

timeout "${BENCH_TIMEOUT:-3600}" python3 "$HERE/bench.py" --umbra "$UMBRA_BIN" --workdir "$WORK" \
  ${args[@]+"${args[@]}"} &
PY=$!
wait "$PY"
