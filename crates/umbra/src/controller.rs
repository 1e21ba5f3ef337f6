//! `umbra controller`: run the controller (policy engine, internal CA, enrollment, admin API,
//! snapshot distribution to brokers).

use std::path::PathBuf;

use anyhow::Context;
use umbra_controller::{Controller, ControllerConfig};

/// Run the controller. Settings come from `--config FILE` (TOML), then flags and environment.
/// The CA key is sealed with the key from `ca_key` / UMBRA_CA_KEY (64 hex digits or base64 of
/// 32 bytes); without one, a key is generated once into DATA_DIR/ca.kek (0600).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// TOML file with controller settings (data_dir, listen, public_url, server_names,
    /// database_url, ca_key, org, cert_lifetime_secs, renew_grace_secs, token_ttl_secs,
    /// max_pending_handshakes, max_anonymous_connections, anonymous_connection_secs,
    /// max_connections_per_peer, audit_retention_days). The CA
    /// key is sealed with `ca_key` or UMBRA_CA_KEY (64 hex digits, or base64 of 32 bytes;
    /// from a secret store, never a flag); without either, a key is generated once into
    /// DATA_DIR/ca.kek (0600).
    #[arg(long, env = "UMBRA_CONTROLLER_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the embedded database and CA key file (default /var/lib/umbra/controller).
    #[arg(long, env = "UMBRA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTPS listen address of the API, e.g. 0.0.0.0:7400 (default 127.0.0.1:7443).
    #[arg(long, env = "UMBRA_CONTROLLER_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// URL that agents, connectors and brokers use to reach this controller.
    #[arg(long, env = "UMBRA_PUBLIC_URL")]
    public_url: Option<String>,
    /// DNS names or IPs for the controller's certificate (repeatable).
    #[arg(
        long = "server-name",
        env = "UMBRA_SERVER_NAMES",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
    /// Database URL (default: sqlite://DATA_DIR/umbra.db).
    #[arg(long, env = "UMBRA_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Lifetime of issued certificates (default 24h, at most 7d).
    #[arg(long, env = "UMBRA_CERT_LIFETIME", value_parser = crate::load::parse_duration)]
    cert_lifetime: Option<std::time::Duration>,
    /// How long after expiry a certificate may still renew (default 7d, at most 30d; 0 turns
    /// it off): a laptop asleep past its certificate's end renews instead of enrolling again.
    /// Never a revoked device or connector, a disabled user's device, or a certificate once
    /// the one a renewal replaced it with has been used.
    #[arg(long, env = "UMBRA_RENEW_GRACE", value_parser = crate::load::parse_duration)]
    renew_grace: Option<std::time::Duration>,
    /// Days audit records are kept, then deleted (default 365; 0 keeps them for ever).
    #[arg(long, env = "UMBRA_AUDIT_RETENTION_DAYS")]
    audit_retention_days: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics, or `none`. Never on the API port,
    /// which is public.
    #[arg(
        long,
        env = "UMBRA_CONTROLLER_METRICS_LISTEN",
        default_value = "127.0.0.1:9400"
    )]
    metrics_listen: String,
    /// Replace every admin token with a new one, print it once, then run. For a lost or leaked
    /// token; give it for one start only. (With a valid token, `umbra admin admin-token rotate`
    /// does the same without a restart.)
    #[arg(long)]
    reset_admin_token: bool,
    /// Write a new admin token (the first one, or a --reset-admin-token one) to this file,
    /// mode 0600, instead of printing it: under a service manager, standard output goes to a
    /// journal that others may read. Then `umbra admin --token-file PATH` uses it.
    #[arg(long, value_name = "PATH")]
    write_admin_token: Option<PathBuf>,
}

pub(crate) fn config(a: &Args) -> anyhow::Result<ControllerConfig> {
    let mut c: ControllerConfig = crate::load::file_or_default(a.config.as_deref())?;
    if let Some(v) = &a.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if let Some(v) = &a.public_url {
        c.public_url = Some(v.clone());
    }
    if !a.server_names.is_empty() {
        c.server_names = a.server_names.clone();
    }
    if let Some(v) = &a.database_url {
        c.database_url = Some(v.clone());
    }
    if let Some(v) = a.cert_lifetime {
        c.cert_lifetime_secs = v.as_secs();
    }
    if let Some(v) = a.renew_grace {
        c.renew_grace_secs = v.as_secs();
    }
    if let Some(v) = a.audit_retention_days {
        c.audit_retention_days = v;
    }
    // UMBRA_CA_KEY is read by the controller itself, so that what it says about a bad or
    // wrong key names the variable, not a `ca_key` setting the operator never wrote.
    c.validate()?;
    Ok(c)
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let cfg = config(&a)?;
    let metrics = crate::broker::parse_listen("metrics-listen", &a.metrics_listen)?;
    if let Some(addr) = metrics {
        crate::telemetry::serve_metrics(addr).await;
    }
    let ca_file = cfg.data_dir.join("ca.pem");
    if let Some(path) = &a.write_admin_token {
        // Checked before a token exists: one made and then not written would be lost.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        anyhow::ensure!(
            parent.is_dir(),
            "--write-admin-token {}: no directory {}",
            path.display(),
            parent.display()
        );
    }
    if a.reset_admin_token {
        let t = umbra_controller::reset_admin_token(&cfg, std::time::SystemTime::now())
            .await
            .context("cannot reset the admin token")?;
        let what = format!(
            "admin token reset (the {} old token(s) no longer work)",
            t.replaced
        );
        show_admin_token(&what, &t.token, a.write_admin_token.as_deref());
    }
    let c = Controller::start(cfg)
        .await
        .context("controller did not start")?;
    if let Some(token) = c.first_admin_token() {
        show_admin_token("admin token", &token, a.write_admin_token.as_deref());
    }
    println!("controller listening on {}", c.url());
    if c.public_url() != c.url() {
        // What to give agents, connectors and brokers (`enroll --controller`).
        println!("peers reach it at {}", c.public_url());
    }
    println!("organisation CA certificate: {}", ca_file.display());
    crate::telemetry::shutdown_signal().await;
    tracing::info!("shutting down");
    c.shutdown().await;
    Ok(())
}

/// Shows a new admin token once (only its hash is stored): written to `file` (0600) when
/// given, else printed. A file that cannot be written falls back to printing, with why: a
/// token shown nowhere would lock the operator out.
fn show_admin_token(what: &str, token: &str, file: Option<&std::path::Path>) {
    if let Some(path) = file {
        match umbra_pki::write_private_file(path, format!("{token}\n").as_bytes()) {
            Ok(()) => {
                println!(
                    "{what}: written to {} (0600), shown nowhere else",
                    path.display()
                );
                return;
            }
            Err(e) => eprintln!(
                "cannot write {}: {e}; printing the token instead",
                path.display()
            ),
        }
    }
    println!("{what} (shown once, store it now): {token}");
}
