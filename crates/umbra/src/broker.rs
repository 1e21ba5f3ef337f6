//! `umbra broker`: run a broker, or `umbra broker enroll` one.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use umbra_broker::{Broker, BrokerConfig};

use crate::load;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Redeem a broker enrollment token: generate this broker's key (it never leaves this
    /// host) and get its certificate from the controller.
    Enroll(crate::agent::EnrollArgs),
}

/// Run a broker. Settings come from `--config FILE` (TOML, keys as below with `_`), then
/// flags and environment variables.
#[derive(clap::Args)]
struct RunArgs {
    /// TOML file with broker settings (name, identity_dir, listen_quic, listen_tcp,
    /// advertise_host, max_staleness_secs, reverify_secs, open_timeout_ms, dial_timeout_ms,
    /// idle_timeout_secs, heartbeat_ms, max_pending_handshakes, handshake_timeout_ms,
    /// max_links_per_peer, max_streams_per_device, stream_opens_per_sec, stream_open_burst,
    /// stream_window_kib).
    #[arg(long, env = "UMBRA_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Name in this broker's log lines, audit records and stream reports (default: its
    /// identity's id, b-…, which `umbra admin broker list` shows beside its enrolled name).
    #[arg(long, env = "UMBRA_BROKER_NAME")]
    name: Option<String>,
    /// Identity directory written by `umbra broker enroll` (default: ./broker); also holds
    /// the snapshot cache and the audit spool (events not yet stored by the controller).
    #[arg(long, env = "UMBRA_BROKER_DIR")]
    dir: Option<PathBuf>,
    /// UDP address for QUIC, or `none`. Default 127.0.0.1:7401.
    #[arg(long, env = "UMBRA_BROKER_LISTEN_QUIC")]
    listen_quic: Option<String>,
    /// TCP address for TLS over TCP, or `none`. Default 127.0.0.1:7401.
    #[arg(long, env = "UMBRA_BROKER_LISTEN_TCP")]
    listen_tcp: Option<String>,
    /// Host agents and connectors dial (needed when listening on 0.0.0.0 or [::]).
    #[arg(long, env = "UMBRA_BROKER_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Keep authorizing from the last snapshot this long without the controller (default
    /// 24h); past it new streams are refused and live ones end. Certificates that expire
    /// meanwhile cannot renew, so links end at their expiry first.
    #[arg(long, env = "UMBRA_BROKER_MAX_STALENESS", value_parser = load::parse_duration)]
    max_staleness: Option<std::time::Duration>,
    /// Decide live streams again at least this often (default 10s; 1s to 1h), besides at
    /// every policy change: time-bound policies end streams by it.
    #[arg(long, env = "UMBRA_BROKER_REVERIFY", value_parser = load::parse_duration)]
    reverify: Option<std::time::Duration>,
    /// Close streams idle this long (default 1h). The agent and the connector each have a
    /// limit of their own (`idle_timeout_secs`, default 1h too): the shortest applies.
    #[arg(long, env = "UMBRA_BROKER_IDLE_TIMEOUT", value_parser = load::parse_duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Streams one device may have open at once here, over all its links (default 1024);
    /// more are reset. Each may hold up to one stream window of memory each way.
    #[arg(long, env = "UMBRA_BROKER_MAX_STREAMS_PER_DEVICE")]
    max_streams_per_device: Option<usize>,
    /// New streams one device may open per second here (default 50), after a burst of
    /// --stream-open-burst; more are answered "rate limited". Each stream opened is an audit
    /// record: this bounds how fast one device can grow the controller's store.
    #[arg(long, env = "UMBRA_BROKER_STREAM_OPENS_PER_SEC")]
    stream_opens_per_sec: Option<u32>,
    /// New streams one device may open at once here before --stream-opens-per-sec applies
    /// (default 500).
    #[arg(long, env = "UMBRA_BROKER_STREAM_OPEN_BURST")]
    stream_open_burst: Option<u32>,
    /// Receive window per stream, in KiB (16-16384, default 256): the most the broker holds
    /// for one stream each way. One stream moves at most a window per round trip; raise it
    /// for long paths.
    #[arg(long, env = "UMBRA_BROKER_STREAM_WINDOW_KIB")]
    stream_window_kib: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics, or `none`.
    #[arg(
        long,
        env = "UMBRA_BROKER_METRICS_LISTEN",
        default_value = "127.0.0.1:9401"
    )]
    metrics_listen: String,
}

pub(crate) fn parse_listen(flag: &str, v: &str) -> anyhow::Result<Option<SocketAddr>> {
    if v == "none" {
        return Ok(None);
    }
    v.parse().map(Some).map_err(|_| {
        anyhow::anyhow!("--{flag}: {v:?} is not an address like 127.0.0.1:7401 (or none)")
    })
}

fn config(a: &RunArgs) -> anyhow::Result<BrokerConfig> {
    let mut c: BrokerConfig = load::file_or_default(a.config.as_deref())?;
    if let Some(v) = &a.name {
        c.name = v.clone();
    }
    if let Some(v) = &a.dir {
        c.identity_dir = v.clone();
    }
    if let Some(v) = &a.listen_quic {
        c.listen_quic = parse_listen("listen-quic", v)?;
    }
    if let Some(v) = &a.listen_tcp {
        c.listen_tcp = parse_listen("listen-tcp", v)?;
    }
    if let Some(v) = &a.advertise_host {
        c.advertise_host = Some(v.clone());
    }
    if let Some(v) = a.max_staleness {
        c.max_staleness_secs = v.as_secs();
    }
    if let Some(v) = a.reverify {
        c.reverify_secs = v.as_secs();
    }
    if let Some(v) = a.idle_timeout {
        c.idle_timeout_secs = v.as_secs();
    }
    if let Some(v) = a.max_streams_per_device {
        c.max_streams_per_device = v;
    }
    if let Some(v) = a.stream_opens_per_sec {
        c.stream_opens_per_sec = v;
    }
    if let Some(v) = a.stream_open_burst {
        c.stream_open_burst = v;
    }
    if let Some(v) = a.stream_window_kib {
        c.stream_window_kib = v;
    }
    c.validate()?;
    Ok(c)
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    if let Some(Cmd::Enroll(e)) = a.cmd {
        let from_file = |file: Option<&std::path::Path>| {
            let c: umbra_broker::BrokerConfig = crate::load::file_or_default(file)?;
            Ok(c.identity_dir)
        };
        return crate::agent::enroll(
            e,
            "broker",
            "UMBRA_BROKER_DIR",
            "UMBRA_BROKER_CONFIG",
            from_file,
        )
        .await;
    }
    let cfg = config(&a.run)?;
    if let Some(addr) = parse_listen("metrics-listen", &a.run.metrics_listen)? {
        crate::telemetry::metrics_handle();
        crate::telemetry::serve_metrics(addr).await;
    }
    let broker = Broker::start(cfg).await.context("broker did not start")?;
    crate::telemetry::shutdown_signal().await;
    tracing::info!("shutting down");
    broker.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A broker waits longer for a connector's answer to a dial than a connector waits for a
    /// target to accept: a target that drops connection attempts is answered `Unreachable` by
    /// its connector before the broker gives up and takes the connector for a silent one.
    #[test]
    fn brokers_wait_longer_for_a_dial_than_connectors_for_a_target() {
        let broker = umbra_broker::BrokerConfig::default().dial_timeout_ms;
        let connector = umbra_connector::ConnectorConfig::default().dial_timeout_ms;
        assert!(
            broker >= connector + 1_000,
            "broker {broker} ms, connector {connector} ms"
        );
    }
}
