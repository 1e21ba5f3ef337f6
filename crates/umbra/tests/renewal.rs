//! Certificate renewal end to end: a controller that signs 20-second certificates, a broker, a
//! connector per transport and agents' forwards, all in one process on loopback with real TLS,
//! real enrollments and a real TCP echo target (see `stack_util`).
//!
//! The running roles renew on their own. The case checks what renewal must achieve, not that a
//! timer fired: a really new certificate in the identity directory (new serial, later end of
//! validity, same identity, a key generated on the holder that the controller never saw, files
//! replaced atomically with mode 0600), a `renew` audit event, and service that goes on past the
//! original certificate's expiry over new handshakes, which an expired certificate cannot
//! complete. Next to it, in the same deployment, the twins: a device revoked before it could
//! renew, and one that cannot reach the controller, are refused (promptly) once their
//! certificates have expired.
//!
//! `RUST_LOG=info cargo nextest run -p umbra --test renewal --no-capture` shows the logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod stack_util;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use stack_util::*;
use umbra_agent::{Forwarder, TransportPref};
use umbra_connector::{Connector, ConnectorConfig};
use umbra_controller::ControllerConfig;
use umbra_link::Transport;
use umbra_pki::TlsIdentity;

/// Renews, and must keep working.
const ALICE: &str = "alice@example.test";
/// Her device is revoked before it can renew.
const BOB: &str = "bob@example.test";
/// Her devices cannot reach the controller, so they cannot renew.
const CAROL: &str = "carol@example.test";
/// The echo target again, published for the connector that links over TLS/TCP only.
const ECHO_TCP: &str = "echo-tcp";
const CONNECTOR_TCP: &str = "conn-tcp";
/// Certificate lifetime the controller signs for.
const LIFETIME_SECS: u64 = 20;
/// Certificate times are whole seconds: past `not_after`, wait this much more before counting
/// on a handshake with it failing.
const MARGIN: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Identity directories

/// An identity directory as enrolled, before any renewal.
struct Holder {
    name: &'static str,
    dir: PathBuf,
    orig: TlsIdentity,
    orig_key: String,
    orig_ca: String,
}

impl Holder {
    fn capture(name: &'static str, dir: &Path) -> Holder {
        Holder {
            name,
            dir: dir.to_owned(),
            orig: TlsIdentity::load_dir(dir).unwrap(),
            orig_key: pem(dir, "key.pem"),
            orig_ca: pem(dir, "ca.pem"),
        }
    }

    fn uri(&self) -> String {
        self.orig.peer.id.to_uri()
    }

    /// The identity in the directory now, and its key. Fails while a renewal has replaced
    /// one of the two files and not yet the other.
    fn current(&self) -> Result<(TlsIdentity, String), String> {
        let read = |f: &str| {
            fs::read_to_string(self.dir.join(f)).map_err(|e| format!("{}: {f}: {e}", self.name))
        };
        let key = read("key.pem")?;
        let id = TlsIdentity::from_pem(&read("cert.pem")?, &key, &read("ca.pem")?)
            .map_err(|e| format!("{}: {e}", self.name))?;
        Ok((id, key))
    }

    /// [`Holder::current`], waiting out a renewal in progress.
    async fn settled(&self) -> TlsIdentity {
        poll(&format!("{}'s identity", self.name), SOON, || async {
            self.current()
        })
        .await
        .0
    }

    /// The identity (and key) in the directory once a renewal has replaced the enrolled one
    /// with a certificate that ends later, which must happen before the enrolled one expires.
    /// (Certificate times are whole seconds: a renewal in the second of the enrollment gives
    /// the same end; with this lifetime the renewal point is already past at enrollment, so the
    /// first renewal of a role started at once may be such a one.)
    async fn renewed(&self) -> (TlsIdentity, String) {
        let left = self
            .orig
            .peer
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        poll(
            &format!("{} renews before expiry", self.name),
            left,
            || async {
                let (now, key) = self.current()?;
                if now.peer.serial_hex == self.orig.peer.serial_hex {
                    Err("still the enrolled certificate".into())
                } else if now.peer.not_after <= self.orig.peer.not_after {
                    Err(format!(
                        "renewed to {} in the second of the enrollment",
                        now.peer.serial_hex
                    ))
                } else {
                    Ok((now, key))
                }
            },
        )
        .await
    }
}

/// Enrolls `dir` with a fresh token and captures it.
async fn enroll(
    s: &Stack,
    name: &'static str,
    role: &str,
    user: Option<&str>,
    peer_name: Option<&str>,
    dir: &Path,
) -> Holder {
    let token = s.admin.token(role, user, peer_name).await;
    umbra_link::enroll::enroll(&s.url, &token, dir, role.parse().unwrap())
        .await
        .unwrap();
    Holder::capture(name, dir)
}

/// Like `Stack::add_broker`, but the identity is captured between enrollment and start: a
/// broker renews from its start, and with this lifetime the renewal point is already past.
async fn add_broker(s: &mut Stack, name: &'static str) -> Holder {
    let dir = s.dir.path().join(name);
    let held = enroll(s, name, "broker", None, Some(name), &dir).await;
    s.start_broker(name, dir, |c| c.max_staleness_secs = 86_400)
        .await;
    poll("broker registered", SOON, || async {
        let v = s.admin.get("/v1/brokers/all").await;
        let seen = v
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["last_seen"].as_u64().unwrap_or(0) > 0 && !b["quic_addr"].is_null());
        if seen { Ok(()) } else { Err(v.to_string()) }
    })
    .await;
    held
}

async fn start_connector(dir: &Path, transport: TransportPref) -> Connector {
    Connector::start(ConnectorConfig {
        identity_dir: dir.to_owned(),
        transport,
        reconnect_base_ms: 100,
        reconnect_cap_ms: 1_000,
        ..ConnectorConfig::default()
    })
    .await
    .unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether the public half of `key_pem` is the one `cert` certifies (the SubjectPublicKeyInfo
/// is embedded verbatim in the certificate).
fn certifies(cert: &CertificateDer<'_>, key_pem: &str) -> bool {
    let spki = KeyPair::from_pem(key_pem)
        .unwrap()
        .subject_public_key_info();
    contains(cert.as_ref(), &spki)
}

/// Every `renew` audit entry about `uri` (the holder acts on itself).
fn renewals<'a>(audit: &'a [Value], uri: &str, result: &str) -> Vec<&'a Value> {
    audit
        .iter()
        .filter(|e| {
            e["action"] == "renew"
                && e["actor"] == uri
                && e["target"] == uri
                && e["result"] == result
        })
        .collect()
}

/// The serials the controller issued to `uri` by renewal.
fn renewed_serials(audit: &[Value], uri: &str) -> BTreeSet<String> {
    renewals(audit, uri, "ok")
        .iter()
        .filter_map(|e| e["detail"]["serial"].as_str().map(str::to_owned))
        .collect()
}

/// What renewal must have done to `h`'s directory, found holding `now` and `key`.
fn assert_renewed(h: &Holder, (now, key): &(TlsIdentity, String), audit: &[Value]) {
    let what = h.name;
    let (old, new) = (&h.orig.peer, &now.peer);
    assert_eq!(new.id, old.id, "{what}: the identity stays the same");
    assert_ne!(new.serial_hex, old.serial_hex, "{what}: a new serial");
    assert!(
        new.not_after > old.not_after,
        "{what}: the new certificate ends later ({:?} vs {:?})",
        new.not_after,
        old.not_after
    );
    assert_eq!(pem(&h.dir, "ca.pem"), h.orig_ca, "{what}: same CA");

    // The key: generated on the holder at renewal (the documented behaviour of
    // `umbra_link::enroll::renew`: a new key and CSR each time), certified by the new
    // certificate, which no longer certifies the enrolled key. `TlsIdentity::from_pem` has
    // already checked that the key and the certificate belong together.
    let leaf = &now.cert_chain[0];
    assert!(
        certifies(leaf, key),
        "{what}: key.pem is the key the new certificate certifies"
    );
    assert_ne!(*key, h.orig_key, "{what}: the key was rotated at renewal");
    assert!(
        !certifies(leaf, &h.orig_key),
        "{what}: the new certificate is not for the enrolled key"
    );

    // Files: owner-only, and nothing left over from the atomic replacement.
    assert_eq!(mode(&h.dir), 0o700, "{what}: directory mode");
    for f in ["key.pem", "cert.pem", "ca.pem", "controller.json"] {
        assert_eq!(mode(&h.dir.join(f)), 0o600, "{what}: {f} mode");
    }
    let stray: Vec<String> = fs::read_dir(&h.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{what}: temporary files left: {stray:?}");

    // The controller's audit: the holder renewed, starting from the enrolled certificate, and
    // the certificate on disk is one it issued by renewal.
    let uri = h.uri();
    let first = renewals(audit, &uri, "ok");
    assert!(
        first
            .iter()
            .any(|e| e["detail"]["old_serial"] == old.serial_hex.as_str()),
        "{what}: no `renew` ok event from the enrolled serial {}: {first:?}",
        old.serial_hex
    );
    assert!(
        renewed_serials(audit, &uri).contains(&new.serial_hex),
        "{what}: serial {} not issued by a renewal",
        new.serial_hex
    );
}

/// Reads the identity files of `dirs` over and over while renewals replace them: every read
/// must find a whole file (never missing, never cut short).
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<WatchReport>,
}

#[derive(Debug, Default)]
struct WatchReport {
    reads: u64,
    torn: Vec<String>,
    /// Moments when the `key.pem` and `cert.pem` on disk did not belong together: each file
    /// is replaced atomically, but not the two together (`umbra_pki::write_identity_dir`
    /// renames the new key, then the new certificate). Reported, not asserted.
    unpaired: u64,
}

impl Watcher {
    fn start(dirs: Vec<PathBuf>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut r = WatchReport::default();
            while !flag.load(Ordering::Relaxed) {
                for d in &dirs {
                    let read = |f: &str| fs::read_to_string(d.join(f));
                    // The key is read before and after the certificate: when both reads agree,
                    // the certificate read lies in a moment when that key was on disk.
                    let (key, cert, key_again, ca) = match (
                        read("key.pem"),
                        read("cert.pem"),
                        read("key.pem"),
                        read("ca.pem"),
                    ) {
                        (Ok(k), Ok(c), Ok(k2), Ok(a)) => (k, c, k2, a),
                        (k, c, _, a) => {
                            r.torn.push(format!(
                                "{}: unreadable: {:?} {:?} {:?}",
                                d.display(),
                                k.err(),
                                c.err(),
                                a.err()
                            ));
                            continue;
                        }
                    };
                    r.reads += 1;
                    let leaf_ok = CertificateDer::from_pem_slice(cert.as_bytes())
                        .ok()
                        .is_some_and(|c| umbra_pki::peer_cert(&c).is_ok());
                    let key_ok = PrivateKeyDer::from_pem_slice(key.as_bytes()).is_ok();
                    if !leaf_ok || !key_ok {
                        r.torn.push(format!(
                            "{}: partial file (cert ok {leaf_ok}, key ok {key_ok})",
                            d.display()
                        ));
                    } else if key == key_again && TlsIdentity::from_pem(&cert, &key, &ca).is_err() {
                        r.unpaired += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            r
        });
        Watcher { stop, thread }
    }

    fn finish(self) -> WatchReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Whether the private key of `key_pem` (DER, or a line of its PEM) appears in any file under
/// `dir`.
fn key_stored_under(dir: &Path, key_pem: &str) -> Option<PathBuf> {
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let der = der.secret_der().to_vec();
    let line = key_pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() >= 32)
        .unwrap()
        .as_bytes()
        .to_vec();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = fs::read(&p)
                && (contains(&bytes, &der) || contains(&bytes, &line))
            {
                return Some(p);
            }
        }
    }
    None
}

/// A forward's local connection gets nothing and is closed, not left hanging (`refused`
/// gives it 3 s; the agent's open and connect timeouts are 1 s each).
async fn assert_forward_refused(f: &Forwarder, what: &str) {
    if let Err(e) = refused(f.local_addr()).await {
        panic!("{what}: not refused: {e}");
    }
}

async fn sleep_until(t: SystemTime) {
    if let Ok(d) = t.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The case

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_keep_roles_working_past_expiry() {
    init();
    let started = Instant::now();
    let mut s = Stack::controller_only(&[ALICE, BOB, CAROL]).await;
    let short = ControllerConfig {
        cert_lifetime_secs: LIFETIME_SECS,
        ..s.ctl_cfg.clone()
    };
    s.restart_controller(short).await;

    // --- The deployment, every certificate 20 s long.
    let broker = add_broker(&mut s, "broker-0").await;
    let (echo, _echo_task) = echo_server().await;
    s.echo = echo;
    let conn_dir = s.connector_dir.clone();
    let conn_q = enroll(
        &s,
        "connector (quic)",
        "connector",
        None,
        Some(CONNECTOR),
        &conn_dir,
    )
    .await;
    let conn_t_dir = s.dir.path().join("connector-tcp");
    let conn_t = enroll(
        &s,
        "connector (tcp)",
        "connector",
        None,
        Some(CONNECTOR_TCP),
        &conn_t_dir,
    )
    .await;
    for (svc, conn) in [(ECHO, CONNECTOR), (ECHO_TCP, CONNECTOR_TCP)] {
        s.admin
            .post(
                "/v1/services",
                json!({ "name": svc, "target": echo.to_string(), "connectors": [conn] }),
            )
            .await;
    }
    for u in [ALICE, BOB, CAROL] {
        for svc in [ECHO, ECHO_TCP] {
            s.admin.allow(&format!("{}-{svc}", local(u)), u, svc).await;
        }
    }
    let mut agents = Vec::new();
    for (user, key) in [
        (ALICE, "alice-quic"),
        (ALICE, "alice-tcp"),
        (BOB, "bob"),
        (CAROL, "carol-quic"),
        (CAROL, "carol-tcp"),
    ] {
        let dir = s.enroll_agent(user, key).await.dir.clone();
        agents.push(Holder::capture(key, &dir));
    }
    let [alice_q, alice_t, bob, carol_q, carol_t] = <[Holder; 5]>::try_from(agents).ok().unwrap();

    // Bob's device is revoked before anything of his runs: his renewal will be refused.
    s.revoke_device(&s.agent("bob").device).await;
    // Carol's devices point at a controller address where nothing listens: they cannot renew,
    // but the broker still admits them while their certificates are valid.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for h in [&carol_q, &carol_t] {
        let mut cref = umbra_link::enroll::load_controller_ref(&h.dir).unwrap();
        cref.url = format!("https://{dead}");
        umbra_link::enroll::save_controller_ref(&h.dir, &cref).unwrap();
    }

    let _conns = [
        start_connector(&conn_dir, TransportPref::Quic).await,
        start_connector(&conn_t_dir, TransportPref::Tcp).await,
    ];
    s.converge().await;
    let watcher = Watcher::start(
        [&broker, &conn_q, &conn_t, &alice_q, &alice_t]
            .iter()
            .map(|h| h.dir.clone())
            .collect(),
    );
    let mut fwd_alice_q = s.forward("alice-quic", TransportPref::Quic, ECHO).await;
    let fwd_alice_t = s.forward("alice-tcp", TransportPref::Tcp, ECHO_TCP).await;
    let mut fwd_carol_q = s.forward("carol-quic", TransportPref::Quic, ECHO).await;
    let mut fwd_carol_t = s.forward("carol-tcp", TransportPref::Tcp, ECHO_TCP).await;
    let mut fwd_bob_q = s.forward("bob", TransportPref::Quic, ECHO).await;
    let mut fwd_bob_t = s.forward("bob", TransportPref::Tcp, ECHO_TCP).await;

    // While the enrolled certificates are valid: Alice and Carol are served, Bob is refused.
    for (f, what) in [
        (&fwd_alice_q, "alice over QUIC"),
        (&fwd_alice_t, "alice over TLS/TCP"),
        (&fwd_carol_q, "carol over QUIC (before expiry)"),
        (&fwd_carol_t, "carol over TLS/TCP (before expiry)"),
    ] {
        poll(what, SOON, || echo_ok(f.local_addr())).await;
    }
    assert_forward_refused(&fwd_bob_q, "bob (revoked) over QUIC").await;
    assert_forward_refused(&fwd_bob_t, "bob (revoked) over TLS/TCP").await;
    let expiry = [
        &broker, &conn_q, &conn_t, &alice_q, &alice_t, &carol_q, &carol_t,
    ]
    .iter()
    .map(|h| h.orig.peer.not_after)
    .max()
    .unwrap();
    assert!(
        expiry > SystemTime::now(),
        "setup took longer than the certificates live"
    );

    // --- Every running role renews, well before its certificate expires.
    let renewing = [&broker, &conn_q, &conn_t, &alice_q, &alice_t];
    let mut renewed = Vec::new();
    for h in renewing {
        let id = h.renewed().await;
        assert!(
            SystemTime::now() < h.orig.peer.not_after,
            "{}: renewed only after its certificate expired",
            h.name
        );
        renewed.push(id);
    }
    let audit = s.admin.audit().await;
    for (h, id) in renewing.iter().zip(&renewed) {
        assert_renewed(h, id, &audit);
    }
    // The controller never held a private key: neither the enrolled ones nor the renewed.
    let ctl_dir = &s.ctl_cfg.data_dir;
    for h in renewing {
        for key in [h.orig_key.clone(), pem(&h.dir, "key.pem")] {
            if let Some(p) = key_stored_under(ctl_dir, &key) {
                panic!("{}: a private key is in {}", h.name, p.display());
            }
        }
    }
    let watched = watcher.finish();
    eprintln!(
        "identity files read {} times during renewals; a key.pem not matching cert.pem seen {} \
         times (the two files are replaced one after the other)",
        watched.reads, watched.unpaired
    );
    assert!(watched.reads > 0);
    assert!(
        watched.torn.is_empty(),
        "identity files seen incomplete: {:?}",
        watched.torn
    );

    // Bob's renewal was refused and audited; his directory still holds the enrolled identity.
    let refused_renewals = renewals(&audit, &bob.uri(), "error");
    assert!(!refused_renewals.is_empty(), "no refused `renew` for bob");
    assert!(renewals(&audit, &bob.uri(), "ok").is_empty());
    // Carol could not even ask.
    for h in [&bob, &carol_q, &carol_t] {
        assert_eq!(
            h.settled().await.peer.serial_hex,
            h.orig.peer.serial_hex,
            "{}: nothing renewed",
            h.name
        );
        assert!(renewals(&audit, &h.uri(), "ok").is_empty(), "{}", h.name);
    }

    // --- Past every enrolled certificate's end.
    sleep_until(expiry + MARGIN).await;
    // The forwards whose certificates expired without a renewal stop, saying what to do; the
    // twin: Alice's, renewed, goes on.
    for (f, what) in [
        (&mut fwd_carol_q, "carol over QUIC"),
        (&mut fwd_carol_t, "carol over TLS/TCP"),
        (&mut fwd_bob_q, "bob over QUIC"),
        (&mut fwd_bob_t, "bob over TLS/TCP"),
    ] {
        // Renewal goes on 30 s after expiry (a network coming back after a resume).
        let e = tokio::time::timeout(Duration::from_secs(60), f.failed())
            .await
            .unwrap_or_else(|_| panic!("{what}: still forwarding on an expired certificate"));
        assert!(
            e.to_string().contains("Enroll this device again"),
            "{what}: {e}"
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), fwd_alice_q.failed())
            .await
            .is_err(),
        "alice's forward stopped though it renewed"
    );
    let b0 = &s.brokers[0];
    // The enrolled certificates can no longer complete a handshake, so whatever completes one
    // from here on presents a renewed certificate.
    for t in [Transport::Quic, Transport::Tls] {
        let r = assert_refused(b0, t, &alice_q.orig, "alice's enrolled certificate").await;
        eprintln!("[{t:?}] enrolled agent certificate: {r:?}");
        let r = assert_refused(b0, t, &conn_q.orig, "the connector's enrolled certificate").await;
        eprintln!("[{t:?}] enrolled connector certificate: {r:?}");
    }
    // The running broker presents a renewed certificate on new handshakes.
    let audit = s.admin.audit().await;
    let broker_serials = renewed_serials(&audit, &broker.uri());
    for t in [Transport::Quic, Transport::Tls] {
        let link = dial(b0, t, &alice_q.settled().await).await.unwrap();
        let presented = link.peer().clone();
        link.close();
        assert_eq!(presented.id, broker.orig.peer.id);
        assert!(
            broker_serials.contains(&presented.serial_hex),
            "[{t:?}] the broker presents {}, not a renewed certificate ({broker_serials:?})",
            presented.serial_hex
        );
    }
    // Alice is still served on both transports, through both connectors.
    for (f, what) in [
        (&fwd_alice_q, "alice over QUIC past expiry"),
        (&fwd_alice_t, "alice over TLS/TCP past expiry"),
    ] {
        poll(what, SOON, || echo_ok(f.local_addr())).await;
    }
    // The twins: without a renewed certificate, no new stream.
    assert_forward_refused(&fwd_bob_q, "bob over QUIC past expiry").await;
    assert_forward_refused(&fwd_bob_t, "bob over TLS/TCP past expiry").await;
    assert_forward_refused(&fwd_carol_q, "carol over QUIC past expiry").await;
    assert_forward_refused(&fwd_carol_t, "carol over TLS/TCP past expiry").await;

    // --- Every link handshakes again: the broker restarts on the same ports. The running
    // connectors and agents dial with what they hold now.
    s.brokers[0].stop().await;
    s.brokers[0].start_again().await;
    for (f, what) in [
        (&fwd_alice_q, "alice over QUIC after the broker restarted"),
        (
            &fwd_alice_t,
            "alice over TLS/TCP after the broker restarted",
        ),
    ] {
        poll(what, SOON, || echo_ok(f.local_addr())).await;
    }
    assert_forward_refused(&fwd_carol_q, "carol over QUIC after the restart").await;
    assert_forward_refused(&fwd_carol_t, "carol over TLS/TCP after the restart").await;
    assert_forward_refused(&fwd_bob_q, "bob over QUIC after the restart").await;

    eprintln!("renewal case took {:?}", started.elapsed());
}

/// A deployment whose controller signs `lifetime_secs` certificates: one broker, one
/// connector over QUIC publishing `ECHO` (a local echo server), and Alice allowed to reach it.
struct OneBroker {
    s: Stack,
    broker: Holder,
    _echo: tokio::task::JoinHandle<()>,
    _conn: Connector,
}

async fn one_broker(lifetime_secs: u64) -> OneBroker {
    let mut s = Stack::controller_only(&[ALICE]).await;
    let short = ControllerConfig {
        cert_lifetime_secs: lifetime_secs,
        ..s.ctl_cfg.clone()
    };
    s.restart_controller(short).await;
    let broker = add_broker(&mut s, "broker-0").await;
    let (echo, echo_task) = echo_server().await;
    s.echo = echo;
    let conn_dir = s.connector_dir.clone();
    enroll(
        &s,
        "connector",
        "connector",
        None,
        Some(CONNECTOR),
        &conn_dir,
    )
    .await;
    s.admin
        .post(
            "/v1/services",
            json!({ "name": ECHO, "target": echo.to_string(), "connectors": [CONNECTOR] }),
        )
        .await;
    s.admin.allow("alice-echo", ALICE, ECHO).await;
    let conn = start_connector(&conn_dir, TransportPref::Quic).await;
    s.converge().await;
    OneBroker {
        s,
        broker,
        _echo: echo_task,
        _conn: conn,
    }
}

/// Waits until the certificate in `dir` is due for renewal (two thirds of its lifetime).
async fn until_due(dir: &std::path::Path) {
    let id = TlsIdentity::load_dir(dir).unwrap();
    let (not_before, not_after) = umbra_link::enroll::cert_validity(&id.cert_chain[0]).unwrap();
    let due = umbra_link::enroll::renew_at(not_before, not_after);
    if let Ok(wait) = due.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
    }
}

/// `umbra agent status` and `services` renew a certificate whose renewal time has passed (a
/// device that only runs a forward now and then, or slept through it, would otherwise let it
/// lapse and have to enroll again), and say so; a certificate not yet due is left alone.
/// 9 s certificates are due 6 s after their issue, with 3 s left to renew them in; with the
/// default lifetime a fresh one is not due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_commands_renew_a_due_certificate() {
    init();
    let mut ob = one_broker(9).await;
    let dir = ob.s.enroll_agent(ALICE, "alice").await.dir.clone();
    let held = Holder::capture("alice", &dir);
    let cfg = ob.s.agent("alice").config(TransportPref::Quic);
    until_due(&dir).await;
    let st = umbra_agent::status(&cfg).await.unwrap();
    assert_eq!(st.renewal, umbra_agent::Renewal::Renewed);
    let now = TlsIdentity::load_dir(&dir).unwrap();
    assert_eq!(now.peer.id, held.orig.peer.id);
    assert_ne!(now.peer.serial_hex, held.orig.peer.serial_hex);
    assert_eq!(st.cert_not_after, now.peer.not_after);
    let audit = ob.s.admin.audit().await;
    assert!(
        !renewals(&audit, &held.uri(), "ok").is_empty(),
        "no renew audited"
    );
    // `services` renews too.
    let before = TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex;
    until_due(&dir).await;
    let list = umbra_agent::services(&cfg).await.unwrap();
    assert_eq!(list, [ECHO]);
    assert_ne!(TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex, before);

    // Commands started together (after a suspend, say) renew once between them, not once
    // each: the others wait their turn and take the certificate it brought.
    let before = TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex;
    let count = |audit: &[Value]| renewals(audit, &held.uri(), "ok").len();
    let renewed_before = count(&ob.s.admin.audit().await);
    until_due(&dir).await;
    let (a, b, c, d) = tokio::join!(
        umbra_agent::status(&cfg),
        umbra_agent::status(&cfg),
        umbra_agent::services(&cfg),
        umbra_agent::status(&cfg),
    );
    for st in [a.unwrap(), b.unwrap(), d.unwrap()] {
        assert_eq!(st.renewal, umbra_agent::Renewal::Renewed);
    }
    assert_eq!(c.unwrap(), [ECHO]);
    let after = TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex;
    assert_ne!(after, before);
    let audit = ob.s.admin.audit().await;
    assert_eq!(
        count(&audit),
        renewed_before + 1,
        "one renewal for four commands"
    );

    // Due, and the controller cannot be reached: the held certificate is kept, and status
    // says renewal failed (and the broker still answers).
    let held = TlsIdentity::load_dir(&dir).unwrap();
    let mut cref = umbra_link::enroll::load_controller_ref(&dir).unwrap();
    let real = cref.url.clone();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cref.url = format!("https://{dead}");
    umbra_link::enroll::save_controller_ref(&dir, &cref).unwrap();
    until_due(&dir).await;
    let st = umbra_agent::status(&cfg).await.unwrap();
    assert!(
        matches!(&st.renewal, umbra_agent::Renewal::Failed { due, .. } if *due <= SystemTime::now()),
        "{:?}",
        st.renewal
    );
    assert_eq!(
        TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex,
        held.peer.serial_hex
    );
    assert!(st.brokers.iter().any(|b| b.rtt.is_ok()), "{:?}", st.brokers);
    cref.url = real;
    umbra_link::enroll::save_controller_ref(&dir, &cref).unwrap();

    // The twin: a day-long certificate is not due; nothing is renewed.
    let long = ControllerConfig {
        cert_lifetime_secs: 86_400,
        ..ob.s.ctl_cfg.clone()
    };
    ob.s.restart_controller(long).await;
    let dir2 = ob.s.enroll_agent(ALICE, "alice-2").await.dir.clone();
    let held2 = TlsIdentity::load_dir(&dir2).unwrap();
    let cfg2 = ob.s.agent("alice-2").config(TransportPref::Quic);
    let st = umbra_agent::status(&cfg2).await.unwrap();
    assert!(
        matches!(st.renewal, umbra_agent::Renewal::NotDue(at) if at > SystemTime::now()),
        "{:?}",
        st.renewal
    );
    assert_eq!(
        TlsIdentity::load_dir(&dir2).unwrap().peer.serial_hex,
        held2.peer.serial_hex
    );
}

/// A laptop asleep past its certificate's end, and a connector host powered off as long,
/// renew when they come back, within the controller's grace, instead of enrolling again:
/// `services`, a forward's start and a connector's start renew the expired certificate and
/// then work; the renewal is audited with how long it had lapsed. Refused: a revoked device
/// (the reason and the way out are said), and any expired certificate with the grace off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_expired_while_away_renew_within_the_grace() {
    init();
    let mut ob = one_broker(86_400).await;
    let day = ob.s.ctl_cfg.clone();
    let short = ControllerConfig {
        cert_lifetime_secs: 2,
        ..day.clone()
    };
    ob.s.restart_controller(short).await;
    let mut held = Vec::new();
    for key in ["asleep", "forwarding", "revoked", "unrenewed"] {
        let dir = ob.s.enroll_agent(ALICE, key).await.dir.clone();
        held.push(Holder::capture(key, &dir));
    }
    let conn_dir = ob.s.dir.path().join("connector-2");
    let conn = enroll(
        &ob.s,
        "connector-2",
        "connector",
        None,
        Some("connector-2"),
        &conn_dir,
    )
    .await;
    let revoked = ob.s.agent("revoked").device.clone();
    ob.s.revoke_device(&revoked).await;
    let last = held
        .iter()
        .chain([&conn])
        .map(|h| h.orig.peer.not_after)
        .max()
        .unwrap();
    sleep_until(last + MARGIN).await;
    // Back after the expiry, to a controller signing day-long certificates again.
    ob.s.restart_controller(day.clone()).await;
    let renewed_now = |h: &Holder| {
        let now = TlsIdentity::load_dir(&h.dir).unwrap();
        assert_eq!(now.peer.id, h.orig.peer.id, "{}", h.name);
        assert_ne!(now.peer.serial_hex, h.orig.peer.serial_hex, "{}", h.name);
        assert!(
            now.peer.not_after > SystemTime::now() + Duration::from_secs(3_600),
            "{}",
            h.name
        );
    };

    // `services` renews and lists.
    let cfg = ob.s.agent("asleep").config(TransportPref::Quic);
    assert_eq!(umbra_agent::services(&cfg).await.unwrap(), [ECHO]);
    renewed_now(&held[0]);
    // A forward renews before it starts, and carries a connection.
    let f = ob.s.forward("forwarding", TransportPref::Tcp, ECHO).await;
    renewed_now(&held[1]);
    echo_ok(f.local_addr()).await.unwrap();
    f.shutdown().await;
    // A connector renews at its start.
    let c2 = start_connector(&conn_dir, TransportPref::Quic).await;
    renewed_now(&conn);
    c2.shutdown().await;
    // Each renewal says how long its certificate had lapsed.
    let audit = ob.s.admin.audit().await;
    for h in [&held[0], &held[1], &conn] {
        let r = renewals(&audit, &h.uri(), "ok");
        let lapsed = r
            .iter()
            .filter_map(|e| e["detail"]["expired_secs"].as_u64())
            .collect::<Vec<_>>();
        assert!(
            lapsed.len() == 1 && lapsed[0] >= MARGIN.as_secs(),
            "{}: {r:?}",
            h.name
        );
    }

    // A revoked device does not renew: refused, with why and what to do.
    let cfg = ob.s.agent("revoked").config(TransportPref::Quic);
    let e = umbra_agent::services(&cfg).await.unwrap_err().to_string();
    // The controller's own reason, not only the agent's advice around it.
    assert!(
        e.contains("answered 403: certificate revoked") && e.contains("umbra agent enroll"),
        "{e}"
    );
    // With the grace turned off, nothing expired renews: services and a forward refuse.
    let strict = ControllerConfig {
        renew_grace_secs: 0,
        ..day
    };
    ob.s.restart_controller(strict).await;
    let cfg = ob.s.agent("unrenewed").config(TransportPref::Quic);
    let e = umbra_agent::services(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("umbra agent enroll"), "{e}");
    let e = Forwarder::start(cfg, ECHO, std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .err()
        .expect("a forward started on an expired certificate")
        .to_string();
    assert!(e.contains("umbra agent enroll"), "{e}");
    assert_eq!(
        TlsIdentity::load_dir(&held[3].dir).unwrap().peer.serial_hex,
        held[3].orig.peer.serial_hex
    );
}

/// A broker whose certificate expired while the controller was away (its listeners stay up)
/// keeps trying to renew, and renews within the grace once the controller is back; agents
/// reach it again. Without that it would run on, refusing every handshake, until restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_renews_after_expiry_once_the_controller_is_back() {
    init();
    let mut ob = one_broker(20).await;
    let dir = ob.s.enroll_agent(ALICE, "alice").await.dir.clone();
    let day = ControllerConfig {
        cert_lifetime_secs: 86_400,
        ..ob.s.ctl_cfg.clone()
    };
    ob.s.stop_controller().await;
    // What the broker holds once the controller is gone (a renewal may have been under way).
    let held = ob.broker.settled().await;
    sleep_until(held.peer.not_after + MARGIN).await;
    assert_eq!(
        ob.broker.settled().await.peer.serial_hex,
        held.peer.serial_hex,
        "renewed without a controller"
    );
    ob.s.restart_controller(day).await;
    let renewed = poll(
        "the broker renews after expiry",
        Duration::from_secs(90),
        || async {
            let now = ob.broker.current()?.0;
            if now.peer.not_after > SystemTime::now() + Duration::from_secs(3_600) {
                Ok(now)
            } else {
                Err(format!("still {}", now.peer.serial_hex))
            }
        },
    )
    .await;
    assert_ne!(renewed.peer.serial_hex, held.peer.serial_hex);
    let audit = ob.s.admin.audit().await;
    assert!(
        renewals(&audit, &ob.broker.uri(), "ok")
            .iter()
            .any(|e| e["detail"]["expired_secs"].as_u64().is_some()),
        "no renewal after expiry audited"
    );
    // It presents the renewed certificate: an agent (renewing its own, expired too) is
    // served through it again.
    let cfg = ob.s.agent("alice").config(TransportPref::Quic);
    let list = poll("the agent is served again", SOON, || async {
        umbra_agent::services(&cfg).await.map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(list, [ECHO]);
    assert!(TlsIdentity::load_dir(&dir).unwrap().peer.not_after > SystemTime::now());
}

/// The broker ends a live link when the certificate it was made with expires (TLS checks
/// validity only at the handshake), on both transports, streams and all; not before. Holders
/// that renew are not cut off: on each renewal the connector and the agent link again with
/// the new certificate and the broker gives new streams to the newest link, so a stream
/// opened shortly before an old certificate's expiry outlives it. Without that hand-over it
/// would ride the old link and end with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_links_end_when_their_certificate_expires() {
    init();
    // Renewal comes every 2/3 of a lifetime: 8 s here, so each holder has renewed again
    // by the time the first certificates expire.
    // Every part is held to the end (`..` would drop the connector here).
    let OneBroker {
        mut s,
        broker: _broker,
        _echo,
        _conn,
    } = one_broker(12).await;

    // A device's links, one per transport, made by hand: nothing renews them.
    let id = s.enroll_agent(ALICE, "alice").await.identity();
    // And a running agent, which renews.
    s.enroll_agent(ALICE, "alice-fwd").await;
    let fwd = s.forward("alice-fwd", TransportPref::Quic, ECHO).await;
    poll("the forward", SOON, || echo_ok(fwd.local_addr())).await;
    let mut hand = Vec::new();
    for t in [Transport::Quic, Transport::Tls] {
        let (link, st) = poll("a link and a stream", SOON, || async {
            let link = dial(&s.brokers[0], t, &id).await?;
            let (code, mut st) = open(&link, ECHO).await?;
            if code != umbra_proto::OpenCode::Ok {
                return Err(format!("{code:?}"));
            }
            echo_open(&mut st, b"before expiry").await?;
            Ok((link, st))
        })
        .await;
        hand.push((t, link, st));
    }
    let not_after = id.peer.not_after;

    // Shortly before that expiry: a stream through the running agent, and one on a link of a
    // device enrolled now; both cross the connector's links.
    sleep_until(not_after - Duration::from_millis(1500)).await;
    // Still up before the expiry (checked now: the work below may take past it).
    for (t, link, _) in &hand {
        assert!(
            !link.is_closed(),
            "{t:?}: closed before its certificate expired"
        );
    }
    let mut late = LiveConn::open(fwd.local_addr()).await.unwrap();
    late.echo(b"opened late").await.unwrap();
    let id2 = s.enroll_agent(ALICE, "alice-2").await.identity();
    // The broker admits the new device once its snapshot has it.
    s.converge().await;
    let link2 = dial(&s.brokers[0], Transport::Tls, &id2).await.unwrap();
    let (code, mut late2) = open(&link2, ECHO).await.unwrap();
    assert_eq!(code, umbra_proto::OpenCode::Ok);
    echo_open(&mut late2, b"opened late").await.unwrap();

    // The expired links end, with their streams.
    for (t, link, mut st) in hand {
        tokio::time::timeout(MARGIN + Duration::from_secs(2), link.closed())
            .await
            .unwrap_or_else(|_| panic!("{t:?}: the link outlived its certificate"));
        assert!(
            echo_open(&mut st, b"after expiry").await.is_err(),
            "{t:?}: a stream of the expired link still echoes"
        );
    }
    // The late streams go on: the agent and the connector had linked again with renewed
    // certificates before they were opened.
    late.echo(b"past the first expiry")
        .await
        .unwrap_or_else(|e| panic!("the agent's late stream was cut: {e}"));
    echo_open(&mut late2, b"past the first expiry")
        .await
        .unwrap_or_else(|e| panic!("the late stream through the connector was cut: {e}"));
    // Each stream the expiry ended is in the audit log, with why.
    let device = id.peer.id.id.clone();
    // The connector's link they ride may expire in the same second as the device's
    // certificate (its renewals come as often as its short lifetime makes them): whichever
    // the broker ends them for first is the reason recorded.
    s.admin
        .wait_audited("the expired streams audited", 2, |e| {
            e["action"] == "stream.revoke"
                && e["detail"]["device"] == device.as_str()
                && (e["detail"]["reason"] == "certificate_expired"
                    || e["detail"]["reason"] == "connector_certificate_expired")
        })
        .await;
}

/// A connector's link ends when the certificate it was made with expires, and the streams it
/// carries are ended first, each audited naming the connector's certificate (closed with the
/// link alone, they would end as link errors with no record). The twin: a stream of the same
/// agent link through a connector whose certificate is still valid goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_an_expiring_connector_link_are_audited() {
    init();
    let OneBroker {
        mut s,
        broker: _broker,
        _echo,
        _conn,
    } = one_broker(12).await;
    // Connector links made by hand, each serving one service: nothing renews them.
    let hand_connector = |name: &'static str| {
        let s = &s;
        async move {
            let dir = s.dir.path().join(name);
            enroll(s, name, "connector", None, Some(name), &dir).await;
            let service = format!("{name}-echo");
            s.admin
                .post(
                    "/v1/services",
                    json!({ "name": service, "target": s.echo.to_string(), "connectors": [name] }),
                )
                .await;
            s.admin
                .allow(&format!("alice-{name}"), ALICE, &service)
                .await;
            TlsIdentity::load_dir(&dir).unwrap()
        }
    };
    let first = hand_connector("first").await;
    // The second connector's and the agent's certificates expire about 6 s after the first's:
    // room for the checks below once the first has expired, even on a loaded machine.
    sleep_until(first.peer.not_after - Duration::from_secs(6)).await;
    let second = hand_connector("second").await;
    let id = s.enroll_agent(ALICE, "alice").await.identity();
    assert!(second.peer.not_after > first.peer.not_after);
    assert!(id.peer.not_after > first.peer.not_after);
    s.converge().await;
    let mut links = Vec::new();
    for c in [&first, &second] {
        let l = dial(&s.brokers[0], Transport::Quic, c).await.unwrap();
        tokio::spawn(stand_in_connector(l.clone(), None, Arc::default()));
        links.push(l);
    }
    let link = dial(&s.brokers[0], Transport::Tls, &id).await.unwrap();
    let stream_to = |service: &'static str| {
        let link = &link;
        async move {
            poll("a stream", SOON, || async {
                let (code, mut st) = open(link, service).await?;
                if code != umbra_proto::OpenCode::Ok {
                    return Err(format!("{code:?}"));
                }
                echo_open(&mut st, b"before expiry").await?;
                Ok(st)
            })
            .await
        }
    };
    let mut by_first = stream_to("first-echo").await;
    let mut by_second = stream_to("second-echo").await;

    tokio::time::timeout(Duration::from_secs(12) + MARGIN, links[0].closed())
        .await
        .expect("the connector's link outlived its certificate");
    assert!(
        echo_open(&mut by_first, b"after expiry").await.is_err(),
        "a stream of the expired connector link still echoes"
    );
    assert!(
        !link.is_closed() && !links[1].is_closed(),
        "other links ended with the expired one"
    );
    echo_open(&mut by_second, b"through the other connector")
        .await
        .unwrap_or_else(|e| panic!("the stream through the other connector was cut: {e}"));
    let device = id.peer.id.id.clone();
    poll("the ended stream audited", SOON, || async {
        let audit = s.admin.audit().await;
        let reasons: Vec<&Value> = audit
            .iter()
            .filter(|e| e["action"] == "stream.revoke" && e["detail"]["device"] == device.as_str())
            .map(|e| &e["detail"]["reason"])
            .collect();
        if reasons == [&json!("connector_certificate_expired")] {
            Ok(())
        } else {
            Err(format!("{reasons:?}"))
        }
    })
    .await;
}

/// A broker revoked while an agent holds a link to it that a renewal retired (kept for the
/// streams it carries, the new streams going over a link made with the new certificate): the
/// agent closes the retired link too, at once, long before the old certificate's expiry would
/// have ended it at the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_broker_ends_retired_links_too() {
    init();
    let OneBroker {
        mut s,
        broker,
        _echo,
        _conn,
    } = one_broker(LIFETIME_SECS).await;
    let dir = s.enroll_agent(ALICE, "alice").await.dir.clone();
    let alice = Holder::capture("alice", &dir);
    let fwd = s.forward("alice", TransportPref::Quic, ECHO).await;
    poll("the forward", SOON, || echo_ok(fwd.local_addr())).await;
    let b0 = s.brokers[0].running();
    poll("the probes' links closed", SOON, || async {
        match b0.agent_links() {
            1 => Ok(()),
            n => Err(format!("{n} agent links")),
        }
    })
    .await;

    // A stream on the first link, then the agent renews.
    let mut early = LiveConn::open(fwd.local_addr()).await.unwrap();
    early.echo(b"on the first link").await.unwrap();
    alice.renewed().await;
    // The next connection makes the agent link again with the renewed certificate; the early
    // stream stays where it is, on the link now retired.
    let mut late = LiveConn::open(fwd.local_addr()).await.unwrap();
    late.echo(b"on the new link").await.unwrap();
    early.echo(b"still on the retired link").await.unwrap();
    assert_eq!(
        b0.agent_links(),
        2,
        "the agent did not link again after renewing"
    );
    let old_end = alice.orig.peer.not_after;
    assert!(
        SystemTime::now() + Duration::from_secs(4) < old_end,
        "renewal came too late for this case to tell revocation from expiry"
    );

    s.admin
        .ok(
            "POST",
            &format!("/v1/brokers/{}/revoke", broker.orig.peer.id.id),
            None,
        )
        .await;
    // Both links go, the retired one included (the streams would end anyway: the connector
    // leaves the revoked broker too), long before the old certificate's end.
    poll(
        "the agent's links closed",
        Duration::from_secs(3),
        || async {
            match b0.agent_links() {
                0 => Ok(()),
                n => Err(format!("{n} agent links")),
            }
        },
    )
    .await;
    assert!(
        SystemTime::now() < old_end,
        "the retired link ended only with its certificate"
    );
    early.closed_within(Duration::from_secs(3)).await.unwrap();
    late.closed_within(Duration::from_secs(3)).await.unwrap();
}

/// Sends `data` on `s` and reads the same bytes back, leaving the stream open both ways.
async fn echo_open(s: &mut umbra_link::Stream, data: &[u8]) -> Result<(), String> {
    let run = async {
        s.send_chunk(bytes::Bytes::copy_from_slice(data))
            .await
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        while got.len() < data.len() {
            match s.recv_chunk().await.map_err(|e| e.to_string())? {
                Some(c) => got.extend_from_slice(&c),
                None => return Err("the stream ended".to_string()),
            }
        }
        if got == data {
            Ok(())
        } else {
            Err(format!("echo differs ({} bytes)", got.len()))
        }
    };
    tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .map_err(|_| "no echo within 3 s".to_string())?
}
