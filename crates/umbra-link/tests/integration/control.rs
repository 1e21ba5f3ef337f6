//! ControllerClient and fetch_pinned_ca against a minimal HTTPS/1.1 server (hand-rolled, so
//! the test needs no HTTP server crate).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use umbra_link::{ControllerClient, LinkError, fetch_pinned_ca};
use umbra_pki::ClientAuth;
use umbra_proto::Role;

use crate::common::{Org, soon};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Thing {
    n: u32,
    who: String,
}

/// Bytes of the endless error body sent so far.
static ENDLESS_SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One HTTP/1.1 request from `s`: its head (request line and headers) and its body, read to
/// its `content-length`.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let mut req = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "request cut short");
        req.extend_from_slice(&buf[..n]);
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&req[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while req.len() < head_end + len {
        let n = s.read(&mut buf).await.unwrap();
        req.extend_from_slice(&buf[..n]);
    }
    (head, req[head_end..head_end + len].to_vec())
}

/// Serves one request per connection; answers depend on the path.
async fn server(org: &Org) -> String {
    let id = org.identity_with(
        Role::Controller,
        "ctl",
        vec!["127.0.0.1".into()],
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    let tls = umbra_pki::server_config(&id, ClientAuth::Optional, &[b"http/1.1"], false).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let ca_pem = org.ca.cert_pem().to_owned();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let ca_pem = ca_pem.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let who = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| umbra_pki::peer_cert(c).ok())
                    .map_or_else(|| "anonymous".to_owned(), |p| p.id.to_uri());
                let (head, body) = read_request(&mut s).await;
                let body = &body[..];
                let bearer = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: "))
                    .unwrap_or("")
                    .to_owned();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                if path == "/endless/v1/ca.pem" {
                    // An error answer that goes on for a GiB, sent until the client hangs up.
                    let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 1073741824\r\nconnection: close\r\n\r\n";
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let piece = vec![b' '; 64 * 1024];
                    for _ in 0..(1 << 14) {
                        if s.write_all(&piece).await.is_err() {
                            return;
                        }
                        ENDLESS_SENT.fetch_add(piece.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                    return;
                }
                let (status, ctype, out): (&str, &str, Vec<u8>) = match path.as_str() {
                    "/v1/thing" => (
                        "200 OK",
                        "application/json",
                        serde_json::to_vec(&Thing { n: 1, who }).unwrap(),
                    ),
                    "/v1/echo" => {
                        let mut t: Thing = serde_json::from_slice(body).unwrap();
                        t.n += 1;
                        t.who = who;
                        (
                            "200 OK",
                            "application/json",
                            serde_json::to_vec(&t).unwrap(),
                        )
                    }
                    "/v1/bearer" => (
                        "200 OK",
                        "application/json",
                        serde_json::to_vec(&Thing { n: 0, who: bearer }).unwrap(),
                    ),
                    "/v1/poll" => ("204 No Content", "application/json", vec![]),
                    "/v1/garbage" => ("200 OK", "application/json", b"\x1b[2J not json".to_vec()),
                    "/escape/v1/ca.pem" => (
                        "500 Internal Server Error",
                        "application/json",
                        br#"{"error":"\u001b[2Jgone\u0007","field":"\u001b]0;x"}"#.to_vec(),
                    ),
                    "/v1/ca.pem" => ("200 OK", "application/x-pem-file", ca_pem.into_bytes()),
                    _ => (
                        "404 Not Found",
                        "application/json",
                        br#"{"error":"no such thing","field":"id"}"#.to_vec(),
                    ),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    out.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
                s.write_all(&out).await.unwrap();
                let _ = s.shutdown().await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_client_json_errors_and_identity() {
    let org = Org::new();
    let url = server(&org).await;
    let agent = org.identity(Role::Agent, "dev1");

    let anon = ControllerClient::new(&url, &org.ca.cert_der(), None).unwrap();
    let t: Thing = soon("get", anon.get("/v1/thing")).await.unwrap();
    assert_eq!(
        t,
        Thing {
            n: 1,
            who: "anonymous".into()
        }
    );

    let c = ControllerClient::new(&format!("{url}/"), &org.ca.cert_der(), Some(&agent)).unwrap();
    let t: Thing = soon("get", c.get("/v1/thing")).await.unwrap();
    assert_eq!(t.who, "umbra://default/agent/dev1");
    let t: Thing = soon(
        "post",
        c.post(
            "/v1/echo",
            &Thing {
                n: 41,
                who: String::new(),
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        t,
        Thing {
            n: 42,
            who: "umbra://default/agent/dev1".into()
        }
    );

    match soon("404", c.get::<Thing>("/v1/nope")).await {
        Err(LinkError::Api { status, error }) => {
            assert_eq!(status, 404);
            assert_eq!(error.error, "no such thing");
            assert_eq!(error.field.as_deref(), Some("id"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        soon("204", c.get_opt::<Thing>("/v1/poll"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        soon("200", c.get_opt::<Thing>("/v1/thing"))
            .await
            .unwrap()
            .is_some()
    );

    // A success whose body is not the answer is an error that says so (read within a
    // bound, never whole whatever its size).
    match soon("garbage", c.get::<Thing>("/v1/garbage")).await {
        Err(LinkError::Api { status: 200, error }) => {
            assert!(error.error.contains("not valid"), "{}", error.error)
        }
        other => panic!("{other:?}"),
    }

    let admin = c.clone().with_bearer_token("s3cret").unwrap();
    assert!(!format!("{admin:?}").contains("s3cret"));
    let t: Thing = soon("bearer", admin.get("/v1/bearer")).await.unwrap();
    assert_eq!(t.who, "Bearer s3cret");

    // A server from another CA is not trusted.
    let other = Org::new();
    let distrust = ControllerClient::new(&url, &other.ca.cert_der(), None).unwrap();
    let e = soon("untrusted", distrust.get::<Thing>("/v1/thing"))
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Http(_)), "{e:?}");
    // The message says why, not only that sending failed.
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");

    // Nothing listening: the message says the connection was refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let nobody = format!("https://127.0.0.1:{port}");
    let c = ControllerClient::new(&nobody, &org.ca.cert_der(), None).unwrap();
    let e = soon("refused", c.get::<Thing>("/v1/thing"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Connection refused"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_ca_fetch() {
    let org = Org::new();
    let url = server(&org).await;
    let der = soon("fetch", fetch_pinned_ca(&url, &org.ca.sha256()))
        .await
        .unwrap();
    assert_eq!(der, org.ca.cert_der());
    let mut wrong = org.ca.sha256();
    wrong[0] ^= 1;
    assert!(matches!(
        soon("fetch", fetch_pinned_ca(&url, &wrong)).await,
        Err(LinkError::PinMismatch)
    ));
}

/// The CA fetch talks to a server nobody has authenticated yet: an error answer from it is
/// read only up to a bound (not a GiB into memory), and its text reaches the terminal without
/// control characters. The twin: a well-formed error is shown as the server wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_ca_fetch_bounds_and_escapes_error_answers() {
    let org = Org::new();
    let url = server(&org).await;
    let pin = org.ca.sha256();
    match soon("endless", fetch_pinned_ca(&format!("{url}/endless"), &pin)).await {
        Err(LinkError::Api { status, error }) => {
            assert_eq!(status, 500);
            assert!(error.error.contains("over 65536 bytes"), "{}", error.error);
        }
        other => panic!("{other:?}"),
    }
    // What the server got out before the client hung up: the bound and what socket and TLS
    // buffers held, far from the GiB announced.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = ENDLESS_SENT.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < 32 << 20, "{sent} bytes sent");
    match soon("escape", fetch_pinned_ca(&format!("{url}/escape"), &pin)).await {
        Err(LinkError::Api { status, error }) => {
            assert_eq!(status, 500);
            assert!(!error.error.contains('\u{1b}') && !error.error.contains('\u{7}'));
            assert!(error.error.contains("gone"), "{}", error.error);
            assert!(!error.field.unwrap().contains('\u{1b}'));
        }
        other => panic!("{other:?}"),
    }
    match soon("404", fetch_pinned_ca(&format!("{url}/nowhere"), &pin)).await {
        Err(LinkError::Api { status, error }) => {
            assert_eq!(status, 404);
            assert_eq!(error.error, "no such thing");
        }
        other => panic!("{other:?}"),
    }
}

/// How the stand-in controller below answers a renewal.
#[derive(Clone, Copy, Debug)]
enum RenewAnswer {
    /// As the real one does.
    Good,
    /// Signed by another CA.
    OtherCa,
    /// For another identity.
    OtherIdentity,
    /// By a clock two days behind: expired on arrival.
    ClockBehind,
    /// By a clock a day ahead: not valid yet.
    ClockAhead,
}

/// A stand-in controller that answers every `POST /v1/renew` with a certificate for the
/// CSR's key, as `how` says.
async fn renew_server(org: &Org, other: &Org, how: RenewAnswer) -> String {
    let id = org.identity_with(
        Role::Controller,
        "ctl",
        vec!["127.0.0.1".into()],
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    let tls = umbra_pki::server_config(&id, ClientAuth::Optional, &[b"http/1.1"], false).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    // The issuing CA: a copy of one of the two, made from its sealed form.
    let source = match how {
        RenewAnswer::OtherCa => &other.ca,
        _ => &org.ca,
    };
    let kek = umbra_pki::KeyEncryptionKey::generate();
    let ca = Arc::new(umbra_pki::Ca::unseal(&source.seal(&kek).unwrap(), &kek).unwrap());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, ca) = (acceptor.clone(), ca.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, body) = read_request(&mut s).await;
                let body: umbra_proto::api::RenewRequest = serde_json::from_slice(&body).unwrap();
                let day = Duration::from_secs(86_400);
                let (who, at) = match how {
                    RenewAnswer::OtherIdentity => ("d2", SystemTime::now()),
                    RenewAnswer::ClockBehind => ("d1", SystemTime::now() - 2 * day),
                    RenewAnswer::ClockAhead => ("d1", SystemTime::now() + day),
                    _ => ("d1", SystemTime::now()),
                };
                let identity = umbra_proto::PeerId::new(ca.org(), Role::Agent, who).unwrap();
                let issued = ca
                    .issue(
                        &umbra_pki::IssueRequest {
                            csr_pem: &body.csr_pem,
                            identity: identity.clone(),
                            dns_names: vec![],
                            lifetime: day,
                        },
                        at,
                        umbra_pki::random_bytes::<16>(),
                    )
                    .unwrap();
                let answer = umbra_proto::api::IssuedCert {
                    identity: identity.to_uri(),
                    cert_pem: issued.cert_pem,
                    ca_pem: ca.cert_pem().to_owned(),
                    serial: issued.serial_hex,
                    not_after: issued
                        .not_after
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs(),
                    user: None,
                    brokers: vec![],
                };
                let out = serde_json::to_vec(&answer).unwrap();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    out.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
                s.write_all(&out).await.unwrap();
                let _ = s.shutdown().await;
            });
        }
    });
    url
}

/// Writes an agent identity of `org`, valid for `lifetime` from now, into `dir`; the
/// identity as loaded back (what its holder uses).
fn agent_identity_in(
    org: &Org,
    dir: &std::path::Path,
    lifetime: Duration,
) -> umbra_pki::TlsIdentity {
    let p = umbra_pki::test_util::issue_pems(
        &org.ca,
        umbra_proto::PeerId::new(org.ca.org(), Role::Agent, "d1").unwrap(),
        vec![],
        SystemTime::now(),
        lifetime,
    )
    .unwrap();
    umbra_pki::write_identity_dir(dir, &p.key_pem, &p.cert_pem, org.ca.cert_pem()).unwrap();
    umbra_pki::TlsIdentity::load_dir(dir).unwrap()
}

/// Points the controller reference in `dir`, of `held`, at `url`.
fn controller_at(dir: &std::path::Path, held: &umbra_pki::TlsIdentity, url: String) {
    umbra_link::enroll::save_controller_ref(
        dir,
        &umbra_link::enroll::ControllerRef {
            url,
            identity: held.peer.id.to_uri(),
            user: None,
            brokers: vec![],
        },
    )
    .unwrap();
}

/// A renewal answer that does not check out never replaces the identity held: another CA,
/// another identity, a certificate this host's clock says has expired or has not started.
/// The twin: a good answer replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_answers_that_do_not_check_out_keep_the_identity() {
    let org = Org::new();
    let other = Org::new();
    for how in [
        RenewAnswer::OtherCa,
        RenewAnswer::OtherIdentity,
        RenewAnswer::ClockBehind,
        RenewAnswer::ClockAhead,
        RenewAnswer::Good,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let held = agent_identity_in(&org, dir.path(), Duration::from_secs(3600));
        let pems = |id: &umbra_pki::TlsIdentity| id.cert_chain[0].clone();
        controller_at(dir.path(), &held, renew_server(&org, &other, how).await);
        let r = soon("renewal", umbra_link::enroll::renew(dir.path(), &held)).await;
        let now = umbra_pki::TlsIdentity::load_dir(dir.path()).unwrap();
        match how {
            RenewAnswer::Good => {
                assert!(r.unwrap().is_some(), "renewed here");
                assert_ne!(pems(&now), pems(&held), "{how:?}: not replaced");
            }
            _ => {
                let e = r.unwrap_err().to_string();
                // A clock answer estimates the skew, from the renewed certificate.
                let want = match how {
                    RenewAnswer::OtherCa => "different CA",
                    RenewAnswer::OtherIdentity => "another identity",
                    RenewAnswer::ClockBehind => {
                        "already expired by this host's clock (this host's clock is about 2 d \
                         ahead of the controller's)"
                    }
                    _ => {
                        "not valid yet by this host's clock (this host's clock is about 1 d \
                         behind the controller's)"
                    }
                };
                assert!(e.contains(want), "{how:?}: {e}");
                assert_eq!(
                    pems(&now),
                    pems(&held),
                    "{how:?}: the held identity was replaced"
                );
            }
        }
    }
}

/// Renewals of one directory take turns: one that waited while another process renewed (it
/// held the lock) takes the certificate that one wrote and asks the controller for nothing
/// (here there is none to ask: a dead address). The twin: with nothing renewed meanwhile, it
/// does ask, and fails on that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_waited_for_another_takes_its_certificate() {
    let org = Org::new();
    let dir = tempfile::tempdir().unwrap();
    let held = agent_identity_in(&org, dir.path(), Duration::from_secs(3600));
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    controller_at(dir.path(), &held, format!("https://{dead}"));

    // Another process is renewing: the lock is held.
    let other = umbra_pki::try_lock_renewal(dir.path())
        .unwrap()
        .expect("free");
    let waiting = tokio::spawn({
        let (dir, held) = (dir.path().to_owned(), held.clone());
        async move { umbra_link::enroll::renew(&dir, &held).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "went ahead while another renewed");
    // That process writes its fresher certificate, and lets go.
    agent_identity_in(&org, dir.path(), Duration::from_secs(7200));
    drop(other);
    let r = soon("renewal", waiting).await.unwrap();
    assert!(r.unwrap().is_none(), "asked the controller again");
    let now = umbra_pki::TlsIdentity::load_dir(dir.path()).unwrap();
    assert_ne!(now.peer.serial_hex, held.peer.serial_hex);

    // The twin: the certificate held is the newest on disk, so it asks (and the dead address
    // fails it).
    let e = soon("renewal", umbra_link::enroll::renew(dir.path(), &now)).await;
    assert!(e.is_err(), "{e:?}");
}

/// A renewal the controller refuses (its TLS handshake does not accept the certificate; an
/// API answer 401 or 403) is told from one that could not reach it (nothing listening; a
/// 500): retrying the first changes nothing, the second may work later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_renewal_is_told_from_an_unreachable_controller() {
    let org = Org::new();
    let other = Org::new();
    let dir = tempfile::tempdir().unwrap();
    let held = agent_identity_in(&org, dir.path(), Duration::from_secs(3600));
    let renew_at = |url: String| {
        controller_at(dir.path(), &held, url);
        umbra_link::enroll::renew(dir.path(), &held)
    };
    let server_id = org.identity_with(
        Role::Controller,
        "ctl",
        vec!["127.0.0.1".into()],
        SystemTime::now(),
        Duration::from_secs(3600),
    );

    // A handshake that refuses the client's certificate (it trusts another CA for clients).
    let picky = umbra_pki::TlsIdentity {
        ca: other.ca.cert_der(),
        ..server_id.clone()
    };
    let tls =
        umbra_pki::server_config(&picky, ClientAuth::Required, &[b"http/1.1"], false).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let e = soon("refused handshake", renew_at(url)).await.unwrap_err();
    assert!(e.is_refusal(), "a refused handshake: {e}");

    // API answers: 403 and 401 are refusals, a 500 is not.
    for (status, refusal) in [(403, true), (401, true), (500, false)] {
        let tls = umbra_pki::server_config(&server_id, ClientAuth::Optional, &[b"http/1.1"], false)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                let _ = read_request(&mut s).await;
                let body = br#"{"error":"agent revoked"}"#;
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body).await;
                let _ = s.shutdown().await;
            }
        });
        let e = soon("API answer", renew_at(url)).await.unwrap_err();
        assert_eq!(e.is_refusal(), refusal, "{status}: {e}");
    }

    // Nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = soon("dead port", renew_at(format!("https://{dead}")))
        .await
        .unwrap_err();
    assert!(!e.is_refusal(), "an unreachable controller: {e}");
}

/// A certificate is due for renewal by the controller's time, as this host's clock stood when
/// the certificate came (the time its file was written): a host 3 minutes behind renews a
/// 6-minute certificate 3 minutes earlier by its own clock (else after it expired), a host
/// ahead renews later by its own (else at once, after every renewal). Never later than a
/// twelfth of the lifetime before the expiry: a host 20 h ahead with day-long certificates,
/// or a file copied long after its issue. The twin: a file written when it was issued.
#[test]
fn renewal_is_due_by_the_controllers_time() {
    let org = Org::new();
    let dir = tempfile::tempdir().unwrap();
    // The controller's time of issue, whole seconds as in a certificate.
    let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let write = |lifetime: Duration| {
        let p = umbra_pki::test_util::issue_pems(
            &org.ca,
            umbra_proto::PeerId::new(org.ca.org(), Role::Agent, "d1").unwrap(),
            vec![],
            issued,
            lifetime,
        )
        .unwrap();
        umbra_pki::write_identity_dir(dir.path(), &p.key_pem, &p.cert_pem, org.ca.cert_pem())
            .unwrap();
        umbra_pki::TlsIdentity::load_dir(dir.path()).unwrap()
    };
    let written_at = |t: SystemTime| {
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("cert.pem"))
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    let due = |id| umbra_link::enroll::renew_due(dir.path(), id);
    let min = |m: u64| Duration::from_secs(60 * m);
    let six = write(min(6));
    written_at(issued);
    assert_eq!(due(&six), issued + min(4));
    written_at(issued - min(3));
    assert_eq!(due(&six), issued + min(1));
    written_at(issued + min(1));
    assert_eq!(due(&six), issued + min(5));
    let day = write(min(24 * 60));
    written_at(issued + min(2));
    assert_eq!(due(&day), issued + min(16 * 60 + 2));
    written_at(issued + min(20 * 60));
    // Capped: a twelfth of the lifetime granted (from the issue) before the end.
    assert_eq!(due(&day), issued + min(22 * 60));
}
