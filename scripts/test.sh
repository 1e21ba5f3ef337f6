#!/usr/bin/env bash
# Runs every Umbra test. On a fresh Debian machine, as root, it first installs what the tests
# need: a C compiler and Rust (rustup) if missing, and the peers the tests start for real
# (socat, curl, OpenSSH, iproute2 for network namespaces).
# A missing peer is an install failure here, never a silently skipped test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# Building: a C compiler for the -sys crates (SQLite, aws-lc) and curl to fetch Rust if absent.
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v curl >/dev/null || need+=(curl)
# Certificates for the rustup and crates.io downloads (an image may have curl without them).
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
command -v socat >/dev/null || need+=(socat)
command -v ip >/dev/null || need+=(iproute2)
command -v ssh >/dev/null || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: need root to install: ${need[*]}" >&2
    exit 1
  fi
  echo "installing test peers: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 900 apt-get update -q
  timeout 900 apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# Rust: the toolchain the workspace asks for (rust-version), through rustup, if cargo is absent.
RUST_VERSION=1.95.0
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v cargo >/dev/null; then
  echo "installing Rust $RUST_VERSION with rustup"
  # rustup-init must keep its name: rustup picks its mode from it.
  tmp=$(mktemp -d)
  timeout 300 curl --proto '=https' --tlsv1.2 -sSf -o "$tmp/rustup-init" \
    "https://static.rust-lang.org/rustup/dist/$(uname -m)-unknown-linux-gnu/rustup-init"
  chmod +x "$tmp/rustup-init"
  timeout 1200 "$tmp/rustup-init" -y -q --profile minimal --default-toolchain "$RUST_VERSION" \
    --no-modify-path
  rm -rf "$tmp"
  . "$HOME/.cargo/env"
fi

export CARGO_TERM_COLOR=never
[ -n "${CI:-}" ] && export CARGO_INCREMENTAL=0
# The end-to-end tests start real `umbra` processes in network namespaces: they need root and
# fail (not skip) without it.
export UMBRA_E2E_REQUIRED=1

if ! command -v cargo-nextest >/dev/null && ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  # A known version: a later one may ask for a newer Rust than the one above.
  cargo install --locked cargo-nextest@0.9.143
fi
cargo build --locked --workspace --all-targets
# Hung tests are ended by the limits in .config/nextest.toml.
cargo nextest run --locked --workspace --no-fail-fast --final-status-level fail
# nextest does not run documentation examples: they are compiled and run here.
cargo test --locked --workspace --doc
