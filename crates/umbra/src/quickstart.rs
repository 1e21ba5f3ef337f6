//! `umbra quickstart`: a complete local deployment in one process, on the embedded defaults.
//!
//! Controller (SQLite in DATA_DIR), two brokers, one connector, a demo web app bound to
//! loopback and published as service `demo`, an enrolled agent identity for
//! `demo@example.test` and a policy that lets that user reach `demo`. Every step is
//! idempotent: a second run finds what the first one made and reuses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use umbra_broker::{Broker, BrokerConfig};
use umbra_connector::{Connector, ConnectorConfig};
use umbra_controller::{Controller, ControllerConfig};
use umbra_proto::api;

const USER: &str = "demo@example.test";
const SERVICE: &str = "demo";
const CONNECTOR: &str = "demo-connector";
const BROKERS: [&str; 2] = ["broker-1", "broker-2"];

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Where the deployment keeps its state (default: $HOME/.local/share/umbra/quickstart).
    #[arg(long, env = "UMBRA_QUICKSTART_DIR")]
    data_dir: Option<PathBuf>,
    /// First of the loopback ports used: controller = P, brokers = P+1 and P+2 (UDP and
    /// TCP), demo app = P+80, metrics of every role = P+90. Default: 7400, or the one the
    /// data directory was set up with (its identities and service point at those ports).
    #[arg(long)]
    base_port: Option<u16>,
}

const DEFAULT_BASE_PORT: u16 = 7400;

/// The base port of this data directory: the one it was set up with (`base-port`, written
/// once its controller has started there), which `asked` must match, or `asked` (default
/// 7400) for a new one.
fn base_port(dir: &Path, asked: Option<u16>) -> anyhow::Result<u16> {
    let file = dir.join("base-port");
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let stored: u16 = text
                .trim()
                .parse()
                .with_context(|| format!("{} does not hold a port", file.display()))?;
            match asked {
                Some(p) if p != stored => anyhow::bail!(
                    "{} was set up with --base-port {stored}, and its identities, brokers and \
                     service point at those ports: run it with --base-port {stored}, or give \
                     another --data-dir",
                    dir.display()
                ),
                _ => Ok(stored),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Set up before this file existed: its identities name the controller's port.
            let Some(stored) = enrolled_base_port(dir) else {
                return Ok(asked.unwrap_or(DEFAULT_BASE_PORT));
            };
            match asked {
                Some(p) if p != stored => anyhow::bail!(
                    "{} was set up with --base-port {stored} (its identities name that \
                     controller port): run it with --base-port {stored}, or give another \
                     --data-dir",
                    dir.display()
                ),
                _ => Ok(stored),
            }
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".local/share/umbra/quickstart")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The controller port an identity of this data directory was enrolled with (the base port
/// of a directory set up before `base-port` was written).
fn enrolled_base_port(dir: &Path) -> Option<u16> {
    ["connector", "agent", BROKERS[0], BROKERS[1]]
        .iter()
        .find_map(|d| umbra_link::enroll::load_controller_ref(&dir.join(d)).ok())
        .and_then(|r| r.url.rsplit(':').next()?.trim_end_matches('/').parse().ok())
}

/// What a role's identity directory holds for this run.
enum Held {
    /// An identity that loads, with its controller reference, valid for a while yet (its role
    /// renews it from here).
    Usable,
    /// Nothing usable (never enrolled, or an enrollment cut short between its files).
    Nothing,
    /// The identity `id` (`umbra://…`), whose certificate has expired or is about to: the
    /// deployment was stopped for longer than a certificate lives, and nothing renewed it.
    Expired(umbra_proto::PeerId),
}

fn held_identity(dir: &Path, now: std::time::SystemTime) -> Held {
    if !dir.join("controller.json").exists() {
        return Held::Nothing;
    }
    match umbra_pki::TlsIdentity::load_dir(dir) {
        Ok(id) if id.peer.not_after > now + Duration::from_secs(60) => Held::Usable,
        Ok(id) => Held::Expired(id.peer.id),
        Err(_) => Held::Nothing,
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    umbra_pki::write_private_file(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) async fn run(a: Args, log_filter: &str, log_format: &str) -> anyhow::Result<()> {
    // The command that resumes this state (the base port is kept in the directory).
    let again = match &a.data_dir {
        Some(d) => format!(
            "umbra quickstart --data-dir {}",
            std::path::absolute(d)
                .unwrap_or_else(|_| d.clone())
                .display()
        ),
        None => "umbra quickstart".to_owned(),
    };
    let dir = a.data_dir.unwrap_or_else(default_dir);
    // Absolute: the paths it prints and stores (admin.toml) work from any directory.
    let dir = std::path::absolute(&dir)
        .with_context(|| format!("cannot use {} as the data directory", dir.display()))?;
    umbra_pki::private_dir_tight(&dir)
        .with_context(|| format!("cannot use {} as the data directory", dir.display()))?;
    let log = dir.join("umbra.log");
    // The terminal is for the person; the structured log (audit lines included) goes to a file,
    // JSON unless `--log-format text`.
    crate::telemetry::init_logs(log_filter, log_format, Some(&log))?;

    let p = base_port(&dir, a.base_port)?;
    let app_addr = loopback(p.checked_add(80).context("--base-port too high")?);

    // 1. Controller.
    let ccfg = ControllerConfig {
        data_dir: dir.join("controller"),
        listen: loopback(p),
        public_url: Some(format!("https://127.0.0.1:{p}")),
        ..ControllerConfig::default()
    };
    ccfg.validate()?;
    // One process, one registry: every role's metrics on one loopback endpoint.
    let metrics_addr = loopback(p.checked_add(90).context("--base-port too high")?);
    let metrics = crate::telemetry::serve_metrics(metrics_addr).await;
    let controller = Controller::start(ccfg.clone())
        .await
        .context("controller did not start")?;
    let url = controller.url();
    // From now on the state points at these ports (see `base_port`).
    write_private(&dir.join("base-port"), &format!("{p}\n"))?;
    let token_file = dir.join("admin.token");
    let token = match controller.first_admin_token() {
        Some(t) => {
            write_private(&token_file, &t)?;
            t
        }
        // Missing: a first run killed between storing the token's hash and writing this file.
        None => match std::fs::read_to_string(&token_file) {
            Ok(t) => t.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", token_file.display()));
            }
        },
    };
    // Rotated by `umbra admin admin-token rotate` with a token given some other way than
    // this file, or the file is missing: this deployment is ours, so it takes a new one
    // rather than failing below.
    let token = if !token.is_empty() && controller.admin_token_works(&token).await? {
        token
    } else {
        let t = umbra_controller::reset_admin_token(&ccfg, std::time::SystemTime::now())
            .await
            .context("cannot reset the admin token")?;
        write_private(&token_file, &t.token)?;
        println!(
            "The admin token in {} was missing or no longer worked (rotated elsewhere?): a new one is there now.",
            token_file.display()
        );
        t.token
    };
    let ca_pem = controller.ca_pem();
    let ca_file = dir.join("ca.pem");
    umbra_pki::write_public_file(&ca_file, ca_pem.as_bytes())
        .with_context(|| format!("cannot write {}", ca_file.display()))?;
    write_private(
        &dir.join("admin.toml"),
        &format!(
            "controller = {:?}\ntoken_file = {:?}\nca_file = {:?}\n",
            url,
            token_file.display().to_string(),
            ca_file.display().to_string()
        ),
    )?;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("CA: {e}"))?;
    let admin = crate::admin::Client::connect(&url, token, &ca)?;

    // 2. Objects and identities (each step skipped when already done).
    admin
        .ensure(
            "/v1/users",
            "id",
            USER,
            &api::CreateUser {
                id: USER.into(),
                groups: vec![],
            },
        )
        .await?;
    let enroll = |role: &'static str,
                  user: Option<&'static str>,
                  name: Option<&'static str>,
                  into: PathBuf| {
        let admin = &admin;
        let url = url.clone();
        async move {
            let old = match held_identity(&into, std::time::SystemTime::now()) {
                Held::Usable => return anyhow::Ok(()),
                Held::Nothing => None,
                Held::Expired(id) => {
                    println!(
                        "The {role} certificate in {} has expired (stopped for longer than a \
                         certificate lives): enrolling it again.",
                        into.display()
                    );
                    Some(id)
                }
            };
            let t: api::EnrollTokenCreated = admin
                .post(
                    "/v1/enrollment-tokens",
                    &api::CreateEnrollToken {
                        role: role.into(),
                        user: user.map(Into::into),
                        name: name.map(Into::into),
                        ttl_secs: Some(600),
                    },
                )
                .await?;
            umbra_link::enroll::enroll(&url, &t.token, &into, role.parse()?)
                .await
                .with_context(|| format!("{role} enrollment"))?;
            // The old identity is of no use to anyone now; it leaves the lists as revoked.
            if let Some(old) = old {
                let kind = match old.role {
                    umbra_proto::Role::Agent => "devices",
                    umbra_proto::Role::Connector => "connectors",
                    _ => "brokers",
                };
                admin.revoke(kind, &old.id).await?;
            }
            Ok(())
        }
    };
    enroll("connector", None, Some(CONNECTOR), dir.join("connector")).await?;
    for b in BROKERS {
        enroll("broker", None, Some(b), dir.join(b)).await?;
    }
    admin
        .ensure(
            "/v1/services",
            "name",
            SERVICE,
            &api::CreateService {
                name: SERVICE.into(),
                target: app_addr.to_string(),
                connectors: vec![CONNECTOR.into()],
            },
        )
        .await?;
    admin
        .ensure(
            "/v1/policies",
            "name",
            "demo-allow",
            &api::CreatePolicy {
                name: "demo-allow".into(),
                text: umbra_policy::allow_policy(
                    &umbra_policy::PolicySubject::User(USER.into()),
                    SERVICE,
                ),
            },
        )
        .await?;
    enroll("agent", Some(USER), None, dir.join("agent")).await?;

    // 3. The demo app, on loopback only: reachable from here, and through Umbra.
    let app = demo_app(app_addr).await?;

    // 4. Brokers and the connector.
    let mut brokers = Vec::new();
    for (i, b) in BROKERS.iter().enumerate() {
        let port = p + 1 + i as u16;
        let cfg = BrokerConfig {
            name: (*b).into(),
            identity_dir: dir.join(b),
            listen_quic: Some(loopback(port)),
            listen_tcp: Some(loopback(port)),
            ..BrokerConfig::default()
        };
        brokers.push(
            Broker::start(cfg)
                .await
                .with_context(|| format!("{b} did not start"))?,
        );
    }
    // Agents learn where brokers are from the controller, which learns it from their first
    // heartbeat: the printed commands must find them.
    let registered = async {
        loop {
            let list: Vec<api::Broker> = admin.get("/v1/brokers/all").await?;
            let ready = BROKERS.iter().all(|b| {
                list.iter()
                    .any(|r| r.name == *b && r.quic_addr.is_some() && r.tcp_addr.is_some())
            });
            if ready {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), registered)
        .await
        .context("the brokers did not register with the controller within 15 s")??;
    let connector = Connector::start(ConnectorConfig {
        identity_dir: dir.join("connector"),
        ..ConnectorConfig::default()
    })
    .await
    .context("connector did not start")?;

    // The full path, so the printed commands work as they are (e.g. after `cargo run`).
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "umbra".into());
    let agent_dir = dir.join("agent");
    println!("Umbra quickstart is running. State: {}", dir.display());
    println!("  controller  {url}");
    for (i, b) in BROKERS.iter().enumerate() {
        println!(
            "  {b}    127.0.0.1:{} (QUIC and TLS over TCP)",
            p + 1 + i as u16
        );
    }
    println!(
        "  connector   {CONNECTOR}, publishing service '{SERVICE}' -> demo app on {app_addr} (loopback only)"
    );
    println!(
        "  agent       identity for {USER} in {}",
        agent_dir.display()
    );
    println!(
        "  logs        {} (JSON, audit events included)",
        log.display()
    );
    match metrics {
        // One process, one registry: counters of the roles in it add up (bytes count at
        // the broker and at the connector), where separate processes each serve their own.
        Some(addr) => {
            println!("  metrics     http://{addr}/metrics (every role of this process, summed)")
        }
        None => println!("  metrics     not served: {metrics_addr} is in use"),
    }
    println!();
    // 8080 on the default ports; with another --base-port (one moved away from a clash),
    // a port of that range, which quickstart itself does not take.
    let forward_port = match p {
        DEFAULT_BASE_PORT => 8080,
        _ => p.checked_add(95).unwrap_or(8080),
    };
    println!("Next, in another terminal:");
    println!(
        "  {exe} agent --dir {} forward {SERVICE} --listen 127.0.0.1:{forward_port}",
        agent_dir.display()
    );
    println!("  curl http://127.0.0.1:{forward_port}/");
    println!("Administer it:");
    println!(
        "  {exe} admin --config {} stream list",
        dir.join("admin.toml").display()
    );
    println!();
    println!("Ctrl-C stops everything.");

    crate::telemetry::shutdown_signal().await;
    println!("stopping...");
    connector.shutdown().await;
    for b in brokers {
        b.shutdown().await;
    }
    app.abort();
    controller.shutdown().await;
    println!("stopped; run `{again}` again to resume with the same state.");
    Ok(())
}

/// A tiny web app standing for a private application.
async fn demo_app(addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { "hello from the demo app, reached through Umbra\n" }),
    );
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("demo app cannot listen on {addr} (use --base-port)"))?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            tracing::warn!(error = %e, "demo app stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use umbra_proto::{PeerId, Role};

    /// A second run long after the first finds certificates nothing renewed: it enrolls
    /// those roles again instead of failing to start them. The twins: a valid identity is
    /// reused, and a directory without its controller reference (an enrollment cut short)
    /// counts as nothing.
    #[test]
    fn expired_identities_are_enrolled_again() {
        let now = SystemTime::now();
        let ca = umbra_pki::Ca::generate("default", now).unwrap();
        let id = PeerId::new("default", Role::Connector, "c-1").unwrap();
        let lifetime = Duration::from_secs(24 * 3600);
        let pems =
            umbra_pki::test_util::issue_pems(&ca, id.clone(), vec![], now, lifetime).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("connector");
        umbra_pki::write_identity_dir(&dir, &pems.key_pem, &pems.cert_pem, ca.cert_pem()).unwrap();
        assert!(matches!(held_identity(&dir, now), Held::Nothing));
        std::fs::write(dir.join("controller.json"), "{}").unwrap();
        assert!(matches!(held_identity(&dir, now), Held::Usable));
        let later = now + lifetime + Duration::from_secs(3600);
        assert!(matches!(held_identity(&dir, later), Held::Expired(ref e) if *e == id));
        // A minute before the end is too late to start a role on it.
        let almost = now + lifetime - Duration::from_secs(30);
        assert!(matches!(held_identity(&dir, almost), Held::Expired(_)));
    }

    /// A data directory keeps the ports it was set up with: another --base-port is refused,
    /// naming the stored one, instead of a deployment whose identities and service point at
    /// the old ports. The twins: the same port, or none, runs on the stored one.
    #[test]
    fn a_data_directory_keeps_its_base_port() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(base_port(tmp.path(), None).unwrap(), DEFAULT_BASE_PORT);
        assert_eq!(base_port(tmp.path(), Some(27_400)).unwrap(), 27_400);
        std::fs::write(tmp.path().join("base-port"), "27400\n").unwrap();
        assert_eq!(base_port(tmp.path(), None).unwrap(), 27_400);
        assert_eq!(base_port(tmp.path(), Some(27_400)).unwrap(), 27_400);
        let e = base_port(tmp.path(), Some(27_600)).unwrap_err().to_string();
        assert!(e.contains("--base-port 27400"), "{e}");

        // A directory set up before `base-port` existed: its identities name the port.
        let old = tempfile::tempdir().unwrap();
        let dir = old.path().join("connector");
        std::fs::create_dir_all(&dir).unwrap();
        let r = umbra_link::enroll::ControllerRef {
            url: "https://127.0.0.1:27500".into(),
            identity: "umbra://default/connector/c-1".into(),
            user: None,
            brokers: vec![],
        };
        umbra_link::enroll::save_controller_ref(&dir, &r).unwrap();
        assert_eq!(base_port(old.path(), None).unwrap(), 27_500);
        let e = base_port(old.path(), Some(7400)).unwrap_err().to_string();
        assert!(e.contains("--base-port 27500"), "{e}");
    }
}
