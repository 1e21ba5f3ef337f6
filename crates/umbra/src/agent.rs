//! `umbra agent`: enroll this device, show its status, list the services its user may reach,
//! forward one to a local port. Also the enrollment command shared by every role.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use umbra_agent::AgentConfig;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Identity directory (key, certificate, CA, controller reference).
    /// Default: $HOME/.config/umbra/agent.
    #[arg(long, global = true, env = "UMBRA_AGENT_DIR")]
    dir: Option<PathBuf>,
    /// Transport to brokers: auto (QUIC, falling back to TLS over TCP), quic or tcp.
    #[arg(long, global = true, env = "UMBRA_AGENT_TRANSPORT", value_parser = ["auto", "quic", "tcp"])]
    transport: Option<String>,
    /// Receive window per stream from brokers, in KiB (16-16384, default 256). A download
    /// moves at most a window per round trip; raise it for long paths to brokers.
    #[arg(long, global = true, env = "UMBRA_AGENT_STREAM_WINDOW_KIB")]
    stream_window_kib: Option<u32>,
    /// TOML file with agent settings (identity_dir, transport, open_timeout_ms,
    /// connect_timeout_ms, idle_timeout_secs, stream_window_kib, allow_remote_clients,
    /// broker_retry_max_secs, reprobe_secs).
    #[arg(long, global = true, env = "UMBRA_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Enroll this device with a one-time token: the key is generated here and never leaves
    /// this device; the controller signs a short-lived certificate, renewed automatically.
    /// The identity is written to the global --dir.
    Enroll(AgentEnrollArgs),
    /// Show identity, certificate expiry, and each broker with its measured round-trip time.
    Status,
    /// List the services this device's user may reach.
    Services,
    /// Carry local TCP connections to SERVICE through the nearest broker.
    Forward {
        /// Service to forward, as NAME (listening on --listen) or NAME=ADDR (listening on
        /// ADDR, e.g. wiki=127.0.0.1:8080). Several may be given: they share one link.
        #[arg(required = true, value_name = "SERVICE[=ADDR]")]
        services: Vec<String>,
        /// Local address for a SERVICE given without =ADDR (default: 127.0.0.1 and a free
        /// port). Loopback only, unless --allow-remote-clients. Every local account and
        /// process of this host can connect to it too, and reaches the service as this
        /// device's user: on a shared host (jump host, terminal server, CI runner), forward
        /// only while you use it.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Allow --listen on an address other hosts can reach (e.g. 0.0.0.0). Whoever
        /// connects there reaches the service as this device's user.
        #[arg(long)]
        allow_remote_clients: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics while forwarding.
        #[arg(long, env = "UMBRA_AGENT_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
}

/// Enrollment flags, the same for agents, connectors and brokers.
#[derive(clap::Args)]
pub(crate) struct EnrollArgs {
    /// Controller URL, e.g. https://controller.example.test:7400.
    #[arg(long, env = "UMBRA_CONTROLLER")]
    controller: String,
    /// The one-time enrollment token (umb1.<ca hash>.<secret>). On a shared host prefer
    /// --token-file or UMBRA_TOKEN: other users can read a command line.
    #[arg(long, env = "UMBRA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the enrollment token; used instead of --token (or UMBRA_TOKEN) when
    /// both are given.
    #[arg(long, env = "UMBRA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where to write the identity. Default: UMBRA_BROKER_DIR or UMBRA_CONNECTOR_DIR, else
    /// the identity_dir of the role's settings file (--config, or UMBRA_BROKER_CONFIG /
    /// UMBRA_CONNECTOR_CONFIG), else the role's default (`--dir` in `umbra broker --help`,
    /// `umbra connector --help`): where the role then looks.
    #[arg(long = "dir", id = "enroll_dir")]
    dir: Option<PathBuf>,
    /// The role's TOML settings file, for its identity_dir (the same file `umbra broker` or
    /// `umbra connector` runs with).
    #[arg(long = "config", id = "enroll_config")]
    config: Option<PathBuf>,
    /// Replace an identity in --dir that is still valid (refused otherwise). The replaced
    /// identity stays registered at the controller until an administrator revokes it.
    #[arg(long)]
    force: bool,
}

/// Agent enrollment flags: as [`EnrollArgs`] without its own `--dir` (the agent's global
/// `--dir` says where the identity goes; two `--dir` options on one command are ambiguous, and
/// clap refuses them).
#[derive(clap::Args)]
pub(crate) struct AgentEnrollArgs {
    /// Controller URL, e.g. https://controller.example.test:7400.
    #[arg(long, env = "UMBRA_CONTROLLER")]
    controller: String,
    /// The one-time enrollment token (umb1.<ca hash>.<secret>). On a shared host prefer
    /// --token-file or UMBRA_TOKEN: other users can read a command line.
    #[arg(long, env = "UMBRA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the enrollment token; used instead of --token (or UMBRA_TOKEN) when
    /// both are given.
    #[arg(long, env = "UMBRA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Replace an identity in --dir that is still valid (refused otherwise). The replaced
    /// identity stays registered at the controller until an administrator revokes it.
    #[arg(long)]
    force: bool,
}

/// Runs an enrollment and reports it.
/// `umbra broker enroll` / `umbra connector enroll`: the identity goes where that role's run
/// command looks for it unless `--dir` says otherwise (`default_dir`, under `env`).
/// Enrolls a broker or connector: into `--dir`, else the directory variable `env`, else the
/// identity_dir that `config_dir` reads from the role's settings file (`--config`, else the
/// file variable `config_env`; the role's default without one), as the role finds it when it
/// runs.
pub(crate) async fn enroll(
    a: EnrollArgs,
    role: &str,
    env: &str,
    config_env: &str,
    config_dir: impl FnOnce(Option<&std::path::Path>) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<()> {
    let dir = match a.dir.or_else(|| std::env::var_os(env).map(PathBuf::from)) {
        Some(d) => d,
        None => {
            let file = a
                .config
                .or_else(|| std::env::var_os(config_env).map(PathBuf::from));
            config_dir(file.as_deref())?
        }
    };
    let token = enroll_token(a.token, a.token_file)?;
    enroll_into(&a.controller, &token, &dir, role, a.force).await
}

/// The enrollment token: from the file `--token-file` names (trimmed), else `--token`. The
/// file wins: it is the deliberate choice, and a `UMBRA_TOKEN` left in the environment from
/// an earlier enrollment must not override it.
fn enroll_token(token: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    match (token, file) {
        (_, Some(p)) => crate::load::secret_file(&p, "--token-file"),
        (Some(t), None) => Ok(t),
        (None, None) => anyhow::bail!(
            "no enrollment token: pass --token-file FILE (or UMBRA_TOKEN, or --token)"
        ),
    }
}

/// Refuses to overwrite an identity that still works, before the token is spent: a wrong
/// `--dir` would otherwise silently replace another role's identity. An expired or damaged
/// identity may be replaced (enrolling again is how an expired one is recovered).
fn check_replace(
    dir: &std::path::Path,
    force: bool,
    now: std::time::SystemTime,
) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    match umbra_pki::TlsIdentity::load_dir(dir) {
        Ok(id) if id.peer.not_after > now => {
            let old = &id.peer.id;
            let revoke = match old.role {
                umbra_proto::Role::Agent => format!(
                    "; then revoke the old device: umbra admin device revoke {}",
                    old.id
                ),
                umbra_proto::Role::Connector => format!(
                    "; then revoke the old connector: umbra admin connector revoke {}",
                    old.id
                ),
                _ => String::new(),
            };
            anyhow::bail!(
                "{} already holds an unexpired identity, {} (until {}); pass --force to replace it{revoke}",
                dir.display(),
                old.to_uri(),
                umbra_pki::rfc3339(id.peer.not_after)
            )
        }
        _ => Ok(()),
    }
}

async fn enroll_into(
    controller: &str,
    token: &str,
    dir: &std::path::Path,
    role: &str,
    force: bool,
) -> anyhow::Result<()> {
    check_replace(dir, force, std::time::SystemTime::now())?;
    let issued = umbra_link::enroll::enroll(controller, token, dir, role.parse()?)
        .await
        .with_context(|| format!("{role} enrollment failed"))?;
    // Checked against the certificate by `enroll`, so it is a time a certificate can hold.
    let expires = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(issued.not_after))
        .unwrap_or(std::time::UNIX_EPOCH);
    outln!(
        "enrolled {} (certificate valid until {}) into {}",
        issued.identity,
        umbra_pki::rfc3339(expires),
        dir.display()
    );
    if let Some(u) = issued.user {
        outln!("this device belongs to {u}");
    }
    outln!("identity written to {}", dir.display());
    Ok(())
}

fn config(a: &Args) -> anyhow::Result<AgentConfig> {
    let mut c: AgentConfig = crate::load::file_or_default(a.config.as_deref())?;
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
    let cfg = config(&a)?;
    match a.cmd {
        Cmd::Enroll(e) => {
            let token = enroll_token(e.token, e.token_file)?;
            enroll_into(&e.controller, &token, &cfg.identity_dir, "agent", e.force).await
        }
        Cmd::Status => {
            let s = umbra_agent::status(&cfg).await?;
            outln!("identity:     {}", s.identity);
            outln!("user:         {}", s.user.as_deref().unwrap_or("-"));
            outln!(
                "certificate:  valid until {}",
                umbra_pki::rfc3339(s.cert_not_after)
            );
            match &s.renewal {
                umbra_agent::Renewal::NotDue(at) => {
                    outln!("renewal:      due {}", umbra_pki::rfc3339(*at))
                }
                umbra_agent::Renewal::Renewed => outln!("renewal:      renewed now"),
                umbra_agent::Renewal::Failed { due, error } => outln!(
                    "renewal:      due since {} and failed: {error}. It is retried by every agent command and while a forward runs (after expiry, for as long as the controller's renew grace allows; then the device must enroll again)",
                    umbra_pki::rfc3339(*due)
                ),
            }
            outln!("brokers:");
            let answered = s.brokers.iter().any(|b| b.rtt.is_ok());
            for b in s.brokers {
                match b.rtt {
                    Ok(rtt) => outln!(
                        "  {:<20} {:<8} rtt {:>8.2} ms  {}",
                        b.info.name,
                        b.transport,
                        rtt.as_secs_f64() * 1e3,
                        // The address the measurement went to.
                        match b.transport {
                            umbra_link::Transport::Quic => b.info.quic_addr.as_deref(),
                            umbra_link::Transport::Tls => b.info.tcp_addr.as_deref(),
                        }
                        .unwrap_or("-")
                    ),
                    Err(_) if b.refused => outln!(
                        "  {:<20} refused this device (revoked, or not enrolled): ask an administrator",
                        b.info.name
                    ),
                    Err(e) => outln!("  {:<20} unreachable: {e}", b.info.name),
                }
            }
            // A health check (`agent status && ...`) fails when this device can use no broker.
            anyhow::ensure!(
                answered,
                "no broker answered this device: nothing can be forwarded now"
            );
            Ok(())
        }
        Cmd::Services => {
            for s in umbra_agent::services(&cfg).await? {
                outln!("{s}");
            }
            Ok(())
        }
        Cmd::Forward {
            services,
            listen,
            allow_remote_clients,
            metrics_listen,
        } => {
            let mut cfg = cfg;
            cfg.allow_remote_clients |= allow_remote_clients;
            let forwards = forward_pairs(&services, listen)?;
            if let Some(addr) = metrics_listen {
                crate::telemetry::serve_metrics(addr).await;
            }
            let mut f = umbra_agent::Forwarder::start_many(cfg, &forwards).await?;
            for (service, addr) in f.forwards() {
                outln!("forwarding {addr} to {service}");
            }
            let failed = tokio::select! {
                () = crate::telemetry::shutdown_signal() => None,
                e = f.failed() => Some(e),
            };
            f.shutdown().await;
            match failed {
                Some(e) => Err(e.into()),
                None => Ok(()),
            }
        }
    }
}

/// `NAME` or `NAME=ADDR` arguments as (service, address) pairs; `NAME` alone listens on
/// `listen`, which only one of them may do unless it is a port-0 address (each then gets its
/// own free port).
fn forward_pairs(args: &[String], listen: SocketAddr) -> anyhow::Result<Vec<(String, SocketAddr)>> {
    let mut out = Vec::with_capacity(args.len());
    for a in args {
        match a.split_once('=') {
            Some((name, addr)) => {
                let addr = addr.parse().map_err(|_| {
                    anyhow::anyhow!("{a:?}: {addr:?} is not an address like 127.0.0.1:8080")
                })?;
                out.push((name.to_owned(), addr));
            }
            None => out.push((a.clone(), listen)),
        }
    }
    for (i, (_, a)) in out.iter().enumerate() {
        if a.port() != 0 && *a != listen && out[..i].iter().any(|(_, b)| b == a) {
            anyhow::bail!("two services would listen on {a}: give each its own address");
        }
    }
    let on_listen = out.iter().filter(|(_, a)| *a == listen).count();
    if on_listen > 1 && listen.port() != 0 {
        anyhow::bail!(
            "{on_listen} services would listen on {listen}: give each its own address as NAME=ADDR"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use umbra_pki::Ca;
    use umbra_proto::{PeerId, Role};

    use super::{check_replace, forward_pairs};

    #[test]
    fn forward_arguments() {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let fixed: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            forward_pairs(&args(&["wiki"]), fixed).unwrap(),
            vec![("wiki".to_owned(), fixed)]
        );
        assert_eq!(
            forward_pairs(&args(&["wiki", "ssh=127.0.0.1:2222", "db"]), any).unwrap(),
            vec![
                ("wiki".to_owned(), any),
                ("ssh".to_owned(), "127.0.0.1:2222".parse().unwrap()),
                ("db".to_owned(), any),
            ]
        );
        // Two on one fixed address, and an address that is none.
        let e = forward_pairs(&args(&["wiki", "db"]), fixed).unwrap_err();
        assert!(e.to_string().contains("NAME=ADDR"), "{e}");
        let e = forward_pairs(&args(&["wiki=localhost"]), any).unwrap_err();
        assert!(e.to_string().contains("not an address"), "{e}");
        let e = forward_pairs(&args(&["a=127.0.0.1:81", "b=127.0.0.1:81"]), any).unwrap_err();
        assert!(e.to_string().contains("127.0.0.1:81"), "{e}");
        // IPv6: the name ends at the first '='.
        assert_eq!(
            forward_pairs(&args(&["ssh=[::1]:2222"]), any).unwrap(),
            vec![("ssh".to_owned(), "[::1]:2222".parse().unwrap())]
        );
    }

    fn write_identity(dir: &std::path::Path, ca: &Ca, role: Role, id: &str, now: SystemTime) {
        let p = umbra_pki::test_util::issue_pems(
            ca,
            PeerId::new(ca.org(), role, id).unwrap(),
            vec![],
            now,
            Duration::from_secs(3600),
        )
        .unwrap();
        umbra_pki::write_identity_dir(dir, &p.key_pem, &p.cert_pem, ca.cert_pem()).unwrap();
    }

    #[test]
    fn enrolling_over_a_valid_identity_needs_force() {
        umbra_pki::install_crypto_provider();
        let now = SystemTime::now();
        let ca = Ca::generate("default", now).unwrap();
        let tmp = tempfile::tempdir().unwrap();

        // Nothing there yet: enroll.
        let empty = tmp.path().join("empty");
        check_replace(&empty, false, now).unwrap();

        let agent = tmp.path().join("agent");
        write_identity(&agent, &ca, Role::Agent, "d-1", now);
        let e = check_replace(&agent, false, now).unwrap_err().to_string();
        for part in [
            "already holds an unexpired identity",
            "umbra://default/agent/d-1",
            "--force",
            "umbra admin device revoke d-1",
        ] {
            assert!(e.contains(part), "{e}");
        }
        // The twins: forced, or once the identity has expired (enrolling again is how an
        // expired one is recovered).
        check_replace(&agent, true, now).unwrap();
        check_replace(&agent, false, now + Duration::from_secs(7200)).unwrap();

        let connector = tmp.path().join("connector");
        write_identity(&connector, &ca, Role::Connector, "c-1", now);
        let e = check_replace(&connector, false, now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("umbra admin connector revoke c-1"), "{e}");

        // A damaged identity does not work: it may be replaced.
        std::fs::write(agent.join("cert.pem"), "garbage").unwrap();
        check_replace(&agent, false, now).unwrap();
    }
}
