//! Logs and metrics for every subcommand: a tracing subscriber (JSON or text) and the
//! Prometheus recorder served at `/metrics`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. With `file`, logs go there instead of stderr.
pub(crate) fn init_logs(filter: &str, format: &str, file: Option<&Path>) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid --log filter {filter:?}"))?;
    // A log line that cannot be written (a full disk, a closed pipe) is dropped: by default
    // the subscriber reports it on stderr, and when stderr is what failed, that report panics
    // whichever task was logging (a broker's snapshot loop among them, for good).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    let writer: tracing_subscriber::fmt::writer::BoxMakeWriter = match file {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            // It holds the audit lines: owner only, and never through a symlink planted in
            // its place.
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .with_context(|| format!("cannot open log file {}", p.display()))?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(f))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let r = if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(writer)
            .try_init()
    } else {
        // Colour codes only for a terminal, never into a file.
        builder
            .with_ansi(file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(writer)
            .try_init()
    };
    r.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub(crate) fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, which this binary never does.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves `GET /metrics` on `addr` in the background. A bind failure is reported, not fatal:
/// metrics must never stop a role from serving traffic.
pub(crate) async fn serve_metrics(addr: SocketAddr) -> Option<SocketAddr> {
    let handle = metrics_handle();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = handle.clone();
            async move { h.render() }
        }),
    );
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            let local = l.local_addr().ok();
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::warn!(error = %e, "metrics server stopped");
                }
            });
            local
        }
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve metrics");
            None
        }
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
