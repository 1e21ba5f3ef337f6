//! `umbra connector`: run a connector next to private apps (it only dials out), or
//! `umbra connector enroll` one.

use std::path::PathBuf;

use anyhow::Context;
use umbra_connector::{Connector, ConnectorConfig};

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
    /// Redeem a connector enrollment token: generate this connector's key (it never leaves
    /// this host) and get its certificate from the controller.
    Enroll(crate::agent::EnrollArgs),
}

/// Run a connector. Settings come from `--config FILE` (TOML), then flags and environment.
#[derive(clap::Args)]
struct RunArgs {
    /// TOML file with connector settings (identity_dir, transport, dial_timeout_ms,
    /// idle_timeout_secs, reconnect_base_ms, reconnect_cap_ms, stream_window_kib,
    /// max_streams_per_link: default 4096 streams, each a target connection, per broker link).
    #[arg(long, env = "UMBRA_CONNECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Identity directory written by `umbra connector enroll` (default
    /// /var/lib/umbra/connector).
    #[arg(long, env = "UMBRA_CONNECTOR_DIR")]
    dir: Option<PathBuf>,
    /// Transport to brokers: auto (QUIC, falling back to TLS over TCP), quic or tcp.
    #[arg(long, env = "UMBRA_CONNECTOR_TRANSPORT", value_parser = ["auto", "quic", "tcp"])]
    transport: Option<String>,
    /// Receive window per stream from brokers, in KiB (16-16384, default 256). One stream
    /// moves at most a window per round trip; raise it for long paths to brokers.
    #[arg(long, env = "UMBRA_CONNECTOR_STREAM_WINDOW_KIB")]
    stream_window_kib: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics, or `none`.
    #[arg(
        long,
        env = "UMBRA_CONNECTOR_METRICS_LISTEN",
        default_value = "127.0.0.1:9402"
    )]
    metrics_listen: String,
}

fn config(a: &RunArgs) -> anyhow::Result<ConnectorConfig> {
    let mut c: ConnectorConfig = crate::load::file_or_default(a.config.as_deref())?;
    if let Some(d) = &a.dir {
        c.identity_dir = d.clone();
    }
    if let Some(t) = &a.transport {
        c.transport = t.parse().map_err(|e| anyhow::anyhow!("--transport: {e}"))?;
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
            let c: ConnectorConfig = crate::load::file_or_default(file)?;
            Ok(c.identity_dir)
        };
        return crate::agent::enroll(
            e,
            "connector",
            "UMBRA_CONNECTOR_DIR",
            "UMBRA_CONNECTOR_CONFIG",
            from_file,
        )
        .await;
    }
    let cfg = config(&a.run)?;
    if let Some(addr) = crate::broker::parse_listen("metrics-listen", &a.run.metrics_listen)? {
        crate::telemetry::serve_metrics(addr).await;
    }
    let c = Connector::start(cfg)
        .await
        .context("connector did not start")?;
    tokio::select! {
        () = crate::telemetry::shutdown_signal() => {}
        e = c.failed() => {
            c.shutdown().await;
            return Err(e).context("connector stopped");
        }
    }
    tracing::info!("shutting down");
    c.shutdown().await;
    Ok(())
}
