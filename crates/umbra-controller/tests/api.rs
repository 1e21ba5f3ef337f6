//! The controller over real HTTPS on 127.0.0.1: admin API, enrollment, renewal, distribution,
//! persistence across restarts, audit.

// A failed unwrap is a failed test here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use serde_json::{Value, json};
use umbra_controller::{Controller, ControllerConfig, ControllerError};
use umbra_pki::{CertificateDer, TlsIdentity};
use umbra_proto::api::{
    AdminTokenCreated, ApiError, AuditEntry, AuditRecord, BrokerList, ConnectorConfig,
    EnrollTokenCreated, IssuedCert,
};
use umbra_proto::{PeerId, Role, Snapshot};

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    dir: tempfile::TempDir,
    ctl: Controller,
    admin_token: String,
    ca: CertificateDer<'static>,
    http: reqwest::Client,
    /// Seconds added to the real clock.
    skew: Arc<AtomicU64>,
}

/// The real clock plus a skew the test can move.
fn clock(skew: &Arc<AtomicU64>) -> umbra_controller::Clock {
    let skew = skew.clone();
    Arc::new(move || SystemTime::now() + Duration::from_secs(skew.load(Ordering::SeqCst)))
}

async fn start(
    cfg: ControllerConfig,
    skew: &Arc<AtomicU64>,
) -> Result<Controller, ControllerError> {
    Controller::start_with_clock(cfg, clock(skew)).await
}

fn config(dir: &std::path::Path) -> ControllerConfig {
    ControllerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

fn ca_der(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn client(ca: &CertificateDer<'static>, id: Option<&TlsIdentity>) -> reqwest::Client {
    let tls = umbra_pki::client_config(ca, id, &[b"h2", b"http/1.1"], false).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap()
}

impl Harness {
    async fn start() -> Harness {
        Self::start_cfg(|_| {}).await
    }

    async fn start_cfg(f: impl FnOnce(&mut ControllerConfig)) -> Harness {
        umbra_pki::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        f(&mut cfg);
        let skew = Arc::new(AtomicU64::new(0));
        let ctl = start(cfg, &skew).await.unwrap();
        let admin_token = ctl
            .first_admin_token()
            .expect("first start creates a token");
        let ca = ca_der(&ctl.ca_pem());
        let http = client(&ca, None);
        Harness {
            dir,
            ctl,
            admin_token,
            ca,
            http,
            skew,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.ctl.url(), path)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.admin(method, path, body).await;
        assert!(s.is_success(), "{method} {path}: {s} {v}");
        v
    }

    async fn token(
        &self,
        role: &str,
        user: Option<&str>,
        name: Option<&str>,
    ) -> EnrollTokenCreated {
        let v = self
            .ok(
                "POST",
                "/v1/enrollment-tokens",
                Some(json!({ "role": role, "user": user, "name": name })),
            )
            .await;
        serde_json::from_value(v).unwrap()
    }

    async fn redeem(&self, token: &str, csr_pem: &str) -> reqwest::Response {
        self.http
            .post(self.url("/v1/enroll"))
            .json(&json!({ "token": token, "csr_pem": csr_pem }))
            .send()
            .await
            .unwrap()
    }

    /// Enrolls a peer the way a device does: key and CSR made locally.
    async fn enroll(&self, token: &str) -> (TlsIdentity, IssuedCert) {
        let key = umbra_pki::generate_key_pem().unwrap();
        let csr = umbra_pki::make_csr(&key).unwrap();
        let resp = self.redeem(token, &csr).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let issued: IssuedCert = resp.json().await.unwrap();
        let id = TlsIdentity::from_pem(&issued.cert_pem, &key, &issued.ca_pem).unwrap();
        (id, issued)
    }

    async fn agent(&self, user: &str) -> (TlsIdentity, IssuedCert) {
        let (s, v) = self
            .admin("POST", "/v1/users", Some(json!({ "id": user })))
            .await;
        assert!(s.is_success() || s == StatusCode::CONFLICT, "{s} {v}");
        let t = self.token("agent", Some(user), None).await;
        self.enroll(&t.token).await
    }

    async fn peer(&self, role: &str, name: &str) -> (TlsIdentity, IssuedCert) {
        let t = self.token(role, None, Some(name)).await;
        self.enroll(&t.token).await
    }

    async fn revoke_device(&self, device: &TlsIdentity) {
        let path = format!("/v1/devices/{}/revoke", device.peer.id.id);
        self.ok("POST", &path, None).await;
    }

    async fn set_disabled(&self, user: &str, disabled: bool) {
        let path = format!("/v1/users/{user}");
        self.ok("PATCH", &path, Some(json!({ "disabled": disabled })))
            .await;
    }

    fn as_peer(&self, id: &TlsIdentity) -> reqwest::Client {
        client(&self.ca, Some(id))
    }

    /// Asks for a new certificate over `peer`, the client of an enrolled identity.
    async fn renew(&self, peer: &reqwest::Client, body: Value) -> reqwest::Response {
        peer.post(self.url("/v1/renew"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Waits until the store records the certificate `serial`'s first use (written off the
    /// request's path), read from the database file itself.
    async fn first_use_recorded(&self, serial: &str) {
        let url = format!(
            "sqlite://{}?mode=ro",
            self.dir.path().join("umbra.db").display()
        );
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen: Option<i64> =
                sqlx::query_scalar("SELECT seen_at FROM certificates WHERE serial = $1")
                    .bind(serial)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if seen.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "first use of {serial} not recorded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pool.close().await;
    }

    /// The audit rows with `action`, oldest first.
    async fn audited(&self, action: &str) -> Vec<AuditRecord> {
        let path = format!("/v1/audit?limit=1000&action={action}");
        let all = self.audit_page(&path).await;
        assert!(all.iter().all(|e| e.record.action == action), "{all:?}");
        all.into_iter().map(|e| e.record).collect()
    }

    async fn audit_page(&self, path: &str) -> Vec<AuditEntry> {
        serde_json::from_value(self.ok("GET", path, None).await).unwrap()
    }

    /// [`Harness::audit_page`] with `token`, for tests that replaced the harness's own.
    async fn audit_page_with(&self, path: &str, token: &str) -> Vec<AuditEntry> {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        serde_json::from_str(&resp.text().await.unwrap()).unwrap()
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    c: &reqwest::Client,
    url: String,
) -> (StatusCode, Option<T>) {
    let resp = c.get(url).send().await.unwrap();
    let s = resp.status();
    if s == StatusCode::OK {
        (s, Some(resp.json().await.unwrap()))
    } else {
        (s, None)
    }
}

/// A certificate request for a key nobody keeps: for requests whose certificate is not used.
fn throwaway_csr() -> String {
    umbra_pki::make_csr(&umbra_pki::generate_key_pem().unwrap()).unwrap()
}

/// Whole seconds left of `id`'s certificate by the real clock.
fn secs_left(id: &TlsIdentity) -> u64 {
    id.peer
        .not_after
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs()
}

fn api_error(v: &Value) -> ApiError {
    serde_json::from_value(v.clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Admin API

#[tokio::test]
async fn admin_auth() {
    let h = Harness::start().await;
    let resp = h.http.get(h.url("/v1/users")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let err: ApiError = resp.json().await.unwrap();
    assert!(err.error.contains("token"));
    let resp = h
        .http
        .get(h.url("/v1/users"))
        .bearer_auth("umbra-admin-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(h.ok("GET", "/v1/users", None).await, json!([]));
    // Public routes need nothing.
    let pem = h
        .http
        .get(h.url("/v1/ca.pem"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(pem, h.ctl.ca_pem());
    let health = h.http.get(h.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    // Metrics are served by the binary on a listener of its own, never on the public API.
    let metrics = h.http.get(h.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::NOT_FOUND);
    // Peer routes refuse a caller without a client certificate.
    let resp = h
        .http
        .get(h.url("/v1/snapshot?after=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    h.ctl.shutdown().await;
}

/// Every admin route of the OpenAPI document (so also every route added later) refuses a
/// caller without the admin token, with a wrong one, and an enrolled device that presents
/// its certificate instead; none of those calls changes anything. The twin: the same
/// client with the token is served.
#[tokio::test]
async fn every_admin_route_needs_the_admin_token() {
    let h = Harness::start().await;
    let (device, _) = h.agent("ann@example.test").await;
    let as_device = h.as_peer(&device);
    let doc: Value = h
        .http
        .get(h.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let version = h.ctl.snapshot_version();
    let users = h.ok("GET", "/v1/users", None).await;
    let audit_len = h.audit_page("/v1/audit?limit=1000").await.len();
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if !op["tags"]
                .as_array()
                .is_some_and(|t| t.contains(&json!("admin")))
            {
                continue;
            }
            let url = h.url(
                &path
                    .replace("{id}", "ann@example.test")
                    .replace("{name}", "x")
                    .replace("{user}", "ann@example.test"),
            );
            let m: reqwest::Method = method.to_uppercase().parse().unwrap();
            for (who, client, token) in [
                ("nobody", &h.http, None),
                ("a wrong token", &h.http, Some("umbra-admin-wrong")),
                ("a device", &as_device, None),
                ("a device with a wrong token", &as_device, Some("x")),
            ] {
                let mut req = client.request(m.clone(), &url).json(&json!({}));
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let status = req.send().await.unwrap().status();
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} by {who}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} admin routes in the document");
    assert_eq!(h.ctl.snapshot_version(), version);
    assert_eq!(h.ok("GET", "/v1/users", None).await, users);
    // Refusals without a token are audited (within a budget), but nothing else was added.
    let after: Vec<AuditEntry> = h.audit_page("/v1/audit?limit=1000").await;
    assert!(
        after[audit_len..]
            .iter()
            .all(|e| e.record.result == "error"),
        "{:?}",
        &after[audit_len..]
    );
    h.ctl.shutdown().await;
}

/// The audit log is read by filters (exact actor, action, target, result) and from either
/// end (`limit`: the oldest, `last`: the newest), always oldest first. A bad query is a 400
/// naming the parameter; a filter value is data, never SQL.
#[tokio::test]
async fn audit_log_filters_and_newest() {
    let h = Harness::start().await;
    for u in ["a@example.com", "b@example.com", "c@example.com"] {
        h.ok("POST", "/v1/users", Some(json!({ "id": u }))).await;
    }
    let (s, _) = h
        .admin("POST", "/v1/users", Some(json!({ "id": "not-an-email" })))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let all = h.audit_page("/v1/audit?limit=1000").await;
    assert!(all.len() >= 5, "{all:?}");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));

    let created = h.audit_page("/v1/audit?action=user.create").await;
    let targets: Vec<&str> = created.iter().map(|e| e.record.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            "a@example.com",
            "b@example.com",
            "c@example.com",
            "not-an-email"
        ]
    );
    let failed = h
        .audit_page("/v1/audit?action=user.create&result=error")
        .await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].record.target, "not-an-email");
    let b = h
        .audit_page("/v1/audit?actor=admin&target=b%40example.com")
        .await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].record.action, "user.create");

    // The newest: the tail of the whole log, oldest first; with a filter, its tail.
    let newest = h.audit_page("/v1/audit?last=2").await;
    assert_eq!(newest, all[all.len() - 2..].to_vec());
    let newest = h.audit_page("/v1/audit?last=2&action=user.create").await;
    assert_eq!(newest, created[2..].to_vec());
    // `after` still pages forward, and combines with `last`.
    let after = h
        .audit_page(&format!("/v1/audit?after={}", created[1].seq))
        .await;
    assert_eq!(after.first().map(|e| e.seq), Some(created[1].seq + 1));
    let oldest = h.audit_page("/v1/audit?limit=1").await;
    assert_eq!(oldest, all[..1].to_vec());

    // A filter value is bound as data: SQL in it matches nothing and changes nothing.
    let injected = h
        .audit_page("/v1/audit?action=x%27%20OR%20%271%27%3D%271")
        .await;
    assert!(injected.is_empty(), "{injected:?}");
    assert_eq!(h.audit_page("/v1/audit?limit=1000").await.len(), all.len());

    let long = "a".repeat(513);
    for (query, field) in [
        ("limit=5&last=2", "last"),
        ("last=0", "last"),
        ("last=1001", "last"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        (&format!("action={long}") as &str, "action"),
        // A value of the wrong type names its parameter too, however the key is written.
        ("limit=ten", "limit"),
        ("action=x&after=-", "after"),
        ("%6Cast=1e3", "last"),
    ] {
        let (s, v) = h.admin("GET", &format!("/v1/audit?{query}"), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {v}");
        assert_eq!(api_error(&v).field.as_deref(), Some(field), "{query}: {v}");
    }
    let (s, v) = h.admin("GET", "/v1/audit?nosuch=1", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(api_error(&v).error.contains("nosuch"), "{v}");
    assert_eq!(api_error(&v).field.as_deref(), Some("nosuch"), "{v}");
    // The twin: the same parameters, written with escapes, are read.
    let (s, v) = h
        .admin("GET", "/v1/audit?%6Cast=2&action=x%20y", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Audit records older than `audit_retention_days` are deleted by the retention sweep, and
/// enrollment tokens used or expired more than 30 days ago too; the sweep records what it did.
/// The twins: a sweep with nothing aged out deletes nothing and records nothing, and with
/// retention 0 the records stay while the tokens still go.
#[tokio::test]
async fn the_retention_sweep_forgets_what_aged_out() {
    for retention in [30, 0] {
        let h = Harness::start_cfg(|c| c.audit_retention_days = retention).await;
        h.agent("ann@example.test").await;
        let pending = h.token("connector", None, Some("c1")).await;
        assert_eq!(
            h.ctl.sweep().await.unwrap(),
            umbra_controller::Swept::default()
        );
        let records = h.audit_page("/v1/audit?limit=1000").await.len() as u64;
        let tokens = h.ok("GET", "/v1/enrollment-tokens", None).await;
        assert_eq!(tokens.as_array().unwrap().len(), 2, "{tokens}");

        // 31 days on.
        h.skew.store(31 * 86_400, Ordering::SeqCst);
        let swept = h.ctl.sweep().await.unwrap();
        let audit_deleted = if retention == 0 { 0 } else { records };
        assert_eq!(
            swept,
            umbra_controller::Swept {
                audit: audit_deleted,
                tokens: 2
            },
            "[{retention}]"
        );
        let left = h.audit_page("/v1/audit?limit=1000").await;
        assert_eq!(
            left.len() as u64,
            records - audit_deleted + 1,
            "[{retention}] {left:?}"
        );
        let sweep = &left.last().unwrap().record;
        assert_eq!(sweep.action, "retention.sweep");
        assert_eq!(sweep.detail["audit_deleted"], audit_deleted);
        assert_eq!(sweep.detail["tokens_deleted"], 2);
        let tokens = h.ok("GET", "/v1/enrollment-tokens", None).await;
        assert_eq!(tokens, json!([]), "[{retention}] {}", pending.id);
        // Once more: nothing left to forget.
        assert_eq!(
            h.ctl.sweep().await.unwrap(),
            umbra_controller::Swept::default()
        );
    }
}

/// A broker's records keep the broker's time (`at_ms`) and carry the controller's time of
/// storing them (`received_ms`); retention ages them by the latter. A broker whose clock says
/// 1970 (no real-time clock) does not have its records deleted at the next sweep, and one
/// whose clock is ten years ahead does not keep them for ever. The twin: the controller's own
/// records have the two times equal, and age as before.
#[tokio::test]
async fn broker_records_age_by_when_the_controller_stored_them() {
    let h = Harness::start_cfg(|c| c.audit_retention_days = 30).await;
    let (broker, _) = h.peer("broker", "b1").await;
    let (dev, _) = h.agent("alice@example.com").await;
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ten_years_ms = 10 * 365 * 86_400_000;
    let record = |at_ms: u64, target: &str| {
        json!({
            "at_ms": at_ms, "actor": dev.peer.id.to_uri(), "action": "stream.open",
            "target": target, "result": "deny", "detail": {}
        })
    };
    let hb = json!({
        "name": "b1",
        "quic_addr": null,
        "tcp_addr": "127.0.0.1:4443",
        "server_name": umbra_pki::broker_server_name(&broker.peer.id.id),
        "snapshot_version": 0,
        "audit": [record(1, "clock-1970"), record(now_ms + ten_years_ms, "clock-ahead")],
    });
    assert_eq!(
        heartbeat(&h, &h.as_peer(&broker), &hb).await,
        StatusCode::OK
    );
    let by_target =
        |audit: &[AuditEntry], t: &str| audit.iter().find(|e| e.record.target == t).cloned();
    let audit = h.audit_page("/v1/audit?limit=1000").await;
    let before = now_ms.saturating_sub(60_000);
    for t in ["clock-1970", "clock-ahead"] {
        let e = by_target(&audit, t).unwrap_or_else(|| panic!("{t} not stored"));
        assert!(
            e.received_ms >= before && e.received_ms < now_ms + 60_000,
            "{t}: stored at {} by the controller's clock",
            e.received_ms
        );
    }
    assert_eq!(by_target(&audit, "clock-1970").unwrap().record.at_ms, 1);
    let own: Vec<&AuditEntry> = audit.iter().filter(|e| e.source == "controller").collect();
    assert!(!own.is_empty());
    assert!(
        own.iter().all(|e| e.received_ms == e.record.at_ms),
        "{own:?}"
    );

    // A sweep now forgets nothing: nothing was stored 30 days ago.
    assert_eq!(
        h.ctl.sweep().await.unwrap(),
        umbra_controller::Swept::default()
    );
    assert!(by_target(&h.audit_page("/v1/audit?limit=1000").await, "clock-1970").is_some());
    // 31 days on by the controller's clock, everything stored then is forgotten, the record
    // dated ten years ahead too.
    h.skew.store(31 * 86_400, Ordering::SeqCst);
    let swept = h.ctl.sweep().await.unwrap();
    assert_eq!(swept.audit, audit.len() as u64);
    let left = h.audit_page("/v1/audit?limit=1000").await;
    assert!(by_target(&left, "clock-ahead").is_none(), "{left:?}");
    assert_eq!(left.len(), 1, "only the sweep's own record: {left:?}");
}

/// The controller's own server certificate, issued at each start, is in the audit trail like
/// every certificate the CA signs, with its serial and names.
#[tokio::test]
async fn the_controllers_own_certificate_is_audited() {
    let h = Harness::start().await;
    let issued = h.audited("cert.issue").await;
    assert_eq!(issued.len(), 1, "{issued:?}");
    let r = &issued[0];
    assert!(r.target.ends_with("/controller/controller"), "{r:?}");
    assert!(
        r.detail["serial"].as_str().is_some_and(|s| !s.is_empty()),
        "{r:?}"
    );
    assert!(
        r.detail["names"].as_array().is_some_and(|n| !n.is_empty()),
        "{r:?}"
    );
}

/// A group membership change is recorded under the group whether it was made or refused, the
/// member in the detail: a search for the group finds both.
#[tokio::test]
async fn membership_changes_are_recorded_under_the_group() {
    let h = Harness::start().await;
    h.ok("POST", "/v1/groups", Some(json!({ "name": "eng" })))
        .await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "ann@example.test", "groups": [] })),
    )
    .await;
    let add = |user: &'static str| {
        let h = &h;
        async move {
            h.admin(
                "POST",
                "/v1/groups/eng/members",
                Some(json!({ "user": user })),
            )
            .await
            .0
        }
    };
    assert_eq!(add("ann@example.test").await, StatusCode::OK);
    assert_eq!(add("nobody@example.test").await, StatusCode::NOT_FOUND);
    let (s, _) = h
        .admin("DELETE", "/v1/groups/eng/members/nobody@example.test", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let records: Vec<(String, String, Value)> = h
        .audit_page("/v1/audit?target=eng&limit=1000")
        .await
        .into_iter()
        .filter(|r| r.record.action.starts_with("group.member"))
        .map(|r| {
            let r = r.record;
            (r.action, r.result, r.detail["user"].clone())
        })
        .collect();
    assert_eq!(
        records,
        [
            (
                "group.member.add".into(),
                "ok".into(),
                json!("ann@example.test")
            ),
            (
                "group.member.add".into(),
                "error".into(),
                json!("nobody@example.test")
            ),
            (
                "group.member.remove".into(),
                "error".into(),
                json!("nobody@example.test")
            ),
        ]
    );
}

#[tokio::test]
async fn users_and_groups_crud() {
    let h = Harness::start().await;
    h.ok("POST", "/v1/groups", Some(json!({ "name": "eng" })))
        .await;
    let (s, v) = h
        .admin("POST", "/v1/groups", Some(json!({ "name": "eng" })))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(api_error(&v).field.as_deref(), Some("name"));
    let (s, v) = h
        .admin("POST", "/v1/groups", Some(json!({ "name": "Bad Name" })))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(api_error(&v).field.as_deref(), Some("name"));

    let u = h
        .ok(
            "POST",
            "/v1/users",
            Some(json!({ "id": "alice@example.com", "groups": ["eng"] })),
        )
        .await;
    assert_eq!(u["groups"], json!(["eng"]));
    let (s, v) = h
        .admin("POST", "/v1/users", Some(json!({ "id": "not-an-email" })))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(api_error(&v).field.as_deref(), Some("id"));
    let (s, v) = h
        .admin(
            "POST",
            "/v1/users",
            Some(json!({ "id": "bob@example.com", "groups": ["nope"] })),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(api_error(&v).field.as_deref(), Some("groups"));
    let (s, _) = h
        .admin(
            "POST",
            "/v1/users",
            Some(json!({ "id": "alice@example.com" })),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "bob@example.com" })),
    )
    .await;
    let g = h
        .ok(
            "POST",
            "/v1/groups/eng/members",
            Some(json!({ "user": "bob@example.com" })),
        )
        .await;
    assert_eq!(
        g["members"],
        json!(["alice@example.com", "bob@example.com"])
    );
    let (s, _) = h
        .admin(
            "POST",
            "/v1/groups/eng/members",
            Some(json!({ "user": "bob@example.com" })),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, v) = h
        .admin(
            "POST",
            "/v1/groups/eng/members",
            Some(json!({ "user": "carol@example.com" })),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(api_error(&v).field.as_deref(), Some("user"));

    let groups = h.ok("GET", "/v1/groups", None).await;
    assert_eq!(
        groups,
        json!([{ "name": "eng", "members": ["alice@example.com", "bob@example.com"] }])
    );
    h.ok("DELETE", "/v1/groups/eng/members/alice@example.com", None)
        .await;
    let users = h.ok("GET", "/v1/users", None).await;
    assert_eq!(users.as_array().unwrap().len(), 2);
    assert_eq!(users[0]["id"], "alice@example.com");
    assert_eq!(users[0]["groups"], json!([]));
    assert_eq!(users[1]["groups"], json!(["eng"]));

    h.ok("DELETE", "/v1/users/bob@example.com", None).await;
    let (s, _) = h.admin("DELETE", "/v1/users/bob@example.com", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        h.ok("GET", "/v1/groups", None).await[0]["members"],
        json!([])
    );
    h.ok("DELETE", "/v1/groups/eng", None).await;
    assert_eq!(h.ok("GET", "/v1/groups", None).await, json!([]));
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn services_policies_and_failed_writes_change_nothing() {
    let h = Harness::start().await;
    // An unused connector token makes its name known.
    h.token("connector", None, Some("c1")).await;
    let v0 = h.ctl.snapshot_version();

    let bad = [
        (
            json!({ "name": "web", "target": "web:80", "connectors": ["nope"] }),
            StatusCode::NOT_FOUND,
            "connectors",
        ),
        (
            json!({ "name": "web", "target": "web", "connectors": ["c1"] }),
            StatusCode::BAD_REQUEST,
            "target",
        ),
        (
            json!({ "name": "web", "target": "web:0", "connectors": ["c1"] }),
            StatusCode::BAD_REQUEST,
            "target",
        ),
        (
            json!({ "name": "web", "target": "web:70000", "connectors": ["c1"] }),
            StatusCode::BAD_REQUEST,
            "target",
        ),
        (
            json!({ "name": "Web", "target": "web:80", "connectors": ["c1"] }),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            json!({ "name": "web", "target": "web:80", "connectors": [] }),
            StatusCode::BAD_REQUEST,
            "connectors",
        ),
    ];
    for (body, status, field) in bad {
        let (s, v) = h.admin("POST", "/v1/services", Some(body.clone())).await;
        assert_eq!(s, status, "{body}");
        assert_eq!(api_error(&v).field.as_deref(), Some(field), "{body}");
    }
    assert_eq!(h.ok("GET", "/v1/services", None).await, json!([]));
    assert_eq!(
        h.ctl.snapshot_version(),
        v0,
        "refused writes must not bump the version"
    );

    let s = h
        .ok(
            "POST",
            "/v1/services",
            Some(json!({ "name": "web", "target": "10.0.0.5:80", "connectors": ["c1"] })),
        )
        .await;
    assert_eq!(s["connectors"], json!(["c1"]));
    assert_eq!(h.ctl.snapshot_version(), v0 + 1);
    let (st, _) = h
        .admin(
            "POST",
            "/v1/services",
            Some(json!({ "name": "web", "target": "x:1", "connectors": ["c1"] })),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);

    // Policies: validated by Cedar against Umbra's schema.
    let good = umbra_policy::allow_policy(&umbra_policy::PolicySubject::Group("eng".into()), "web");
    h.ok(
        "POST",
        "/v1/policies",
        Some(json!({ "name": "eng-web", "text": good })),
    )
    .await;
    let v1 = h.ctl.snapshot_version();
    for text in [
        "this is not cedar",
        "permit(principal, action, resource) when { principal.no_such_attribute == 1 };",
    ] {
        let (s, v) = h
            .admin(
                "POST",
                "/v1/policies",
                Some(json!({ "name": "broken", "text": text })),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
        let e = api_error(&v);
        assert_eq!(e.field.as_deref(), Some("text"));
        assert!(
            e.error.len() > "invalid policy: ".len(),
            "a reason is given: {}",
            e.error
        );
    }
    let policies = h.ok("GET", "/v1/policies", None).await;
    assert_eq!(policies.as_array().unwrap().len(), 1);
    assert_eq!(policies[0]["name"], "eng-web");
    assert_eq!(h.ctl.snapshot_version(), v1);

    h.ok("DELETE", "/v1/policies/eng-web", None).await;
    h.ok("DELETE", "/v1/services/web", None).await;
    let (s, _) = h.admin("DELETE", "/v1/services/web", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(h.ok("GET", "/v1/services", None).await, json!([]));
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn unknown_and_missing_fields_are_named() {
    let h = Harness::start().await;
    let (s, v) = h
        .admin(
            "POST",
            "/v1/users",
            Some(json!({ "id": "a@example.com", "gropus": [] })),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(api_error(&v).field.as_deref(), Some("gropus"));
    let (s, v) = h
        .admin("POST", "/v1/services", Some(json!({ "name": "x" })))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(api_error(&v).field.is_some());
    let resp = h
        .http
        .post(h.url("/v1/enroll"))
        .json(&json!({ "token": "x", "csr_pem": "y", "extra": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let e: ApiError = resp.json().await.unwrap();
    assert_eq!(e.field.as_deref(), Some("extra"));
    assert_eq!(h.ok("GET", "/v1/users", None).await, json!([]));
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn token_validation() {
    let h = Harness::start().await;
    let cases = [
        (json!({ "role": "admin", "name": "x" }), "role"),
        (json!({ "role": "agent" }), "user"),
        (
            json!({ "role": "agent", "user": "nobody@example.com" }),
            "user",
        ),
        (json!({ "role": "connector" }), "name"),
        (
            json!({ "role": "connector", "name": "c1", "ttl_secs": 0 }),
            "ttl_secs",
        ),
        (
            json!({ "role": "broker", "name": "b1", "ttl_secs": 999999999 }),
            "ttl_secs",
        ),
    ];
    for (body, field) in cases {
        let (s, v) = h
            .admin("POST", "/v1/enrollment-tokens", Some(body.clone()))
            .await;
        assert!(s.is_client_error(), "{body}");
        assert_eq!(api_error(&v).field.as_deref(), Some(field), "{body}");
    }
    let t = h.token("broker", None, Some("b1")).await;
    assert!(t.token.starts_with("umb1."));
    // The answer says whom the token is for, as stored.
    assert_eq!((t.user.as_deref(), t.name.as_deref()), (None, Some("b1")));
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "ann@example.com" })),
    )
    .await;
    let a = h.token("agent", Some("Ann@Example.COM"), None).await;
    assert_eq!(
        (a.user.as_deref(), a.name.as_deref()),
        (Some("ann@example.com"), None)
    );
    h.ok("DELETE", &format!("/v1/enrollment-tokens/{}", a.id), None)
        .await;
    let list = h.ok("GET", "/v1/enrollment-tokens", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(
        !list
            .to_string()
            .contains(t.token.rsplit('.').next().unwrap())
    );
    h.ok("DELETE", &format!("/v1/enrollment-tokens/{}", t.id), None)
        .await;
    assert_eq!(
        h.redeem(&t.token, "x").await.status(),
        StatusCode::UNAUTHORIZED
    );
    h.ctl.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Enrollment and renewal

#[tokio::test]
async fn enrollment_happy_path_and_reuse() {
    let h = Harness::start().await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "alice@example.com" })),
    )
    .await;
    let t = h.token("agent", Some("alice@example.com"), None).await;
    let (id, issued) = h.enroll(&t.token).await;

    let peer = PeerId::from_uri(&issued.identity).unwrap();
    assert_eq!(peer.org, "default");
    assert_eq!(peer.role, Role::Agent);
    assert_eq!(id.peer.id, peer, "the certificate carries the identity");
    assert_eq!(id.peer.serial_hex, issued.serial);
    assert_eq!(issued.user.as_deref(), Some("alice@example.com"));
    assert_eq!(issued.ca_pem, h.ctl.ca_pem());
    // The certificate verifies: it authenticates a TLS connection to the controller.
    let (s, list) = get_json::<BrokerList>(&h.as_peer(&id), h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(list.unwrap().brokers.is_empty());

    // The device is bound to the token's user.
    let devices = h.ok("GET", "/v1/devices", None).await;
    assert_eq!(devices[0]["id"], peer.id.as_str());
    assert_eq!(devices[0]["user"], "alice@example.com");
    assert_eq!(devices[0]["cert_serial"], issued.serial.as_str());

    // A token works once.
    let key = umbra_pki::generate_key_pem().unwrap();
    let csr = umbra_pki::make_csr(&key).unwrap();
    let resp = h.redeem(&t.token, &csr).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let e: ApiError = resp.json().await.unwrap();
    assert!(e.error.contains("already used"), "{}", e.error);
    // Only the secret works too; an unknown one does not.
    let resp = h
        .redeem("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", &csr)
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let h = Harness::start().await;
    let t = h.token("connector", None, Some("c1")).await;
    h.skew.store(2 * 3600, Ordering::SeqCst);
    let key = umbra_pki::generate_key_pem().unwrap();
    let resp = h
        .redeem(&t.token, &umbra_pki::make_csr(&key).unwrap())
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let e: ApiError = resp.json().await.unwrap();
    assert!(e.error.contains("expired"), "{}", e.error);
    assert_eq!(h.ok("GET", "/v1/connectors", None).await, json!([]));
    h.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redemption_has_one_winner() {
    let h = Arc::new(Harness::start().await);
    let t = h.token("connector", None, Some("c1")).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let h = h.clone();
        let token = t.token.clone();
        let csr = throwaway_csr();
        tasks.push(tokio::spawn(async move {
            h.redeem(&token, &csr).await.status()
        }));
    }
    let mut ok = 0;
    for task in tasks {
        let s = task.await.unwrap();
        if s == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(s, StatusCode::FORBIDDEN);
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(
        h.ok("GET", "/v1/connectors", None)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Ids of a listing's entries, in order.
fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Device and connector listings page in enrollment order and filter by owner; a bad page
/// request names its parameter. The unpaged listing is the pages put together.
#[tokio::test]
async fn peer_listings_page_and_filter_by_owner() {
    let h = Harness::start().await;
    for (i, user) in ["alice@example.com", "bob@example.com"].iter().enumerate() {
        for _ in 0..3 - i {
            h.skew.fetch_add(1, Ordering::SeqCst);
            h.agent(user).await;
        }
    }
    let all = ids(&h.ok("GET", "/v1/devices", None).await);
    assert_eq!(all.len(), 5);
    // Pages of two, each after the last id of the one before, make up the whole list.
    let mut paged = Vec::new();
    let mut path = "/v1/devices?limit=2".to_owned();
    loop {
        let page = ids(&h.ok("GET", &path, None).await);
        assert!(page.len() <= 2);
        paged.extend(page.iter().cloned());
        match page.last() {
            Some(last) if page.len() == 2 => path = format!("/v1/devices?limit=2&after={last}"),
            _ => break,
        }
    }
    assert_eq!(paged, all);
    // By user: only theirs, with their certificates, and pageable too.
    let alice = h
        .ok("GET", "/v1/devices?user=alice@example.com", None)
        .await;
    assert_eq!(ids(&alice).len(), 3);
    for d in alice.as_array().unwrap() {
        assert_eq!(d["user"], "alice@example.com");
        assert!(!d["cert_serial"].as_str().unwrap().is_empty(), "{d}");
    }
    let first = ids(&h
        .ok("GET", "/v1/devices?user=alice@example.com&limit=2", None)
        .await);
    let rest = ids(&h
        .ok(
            "GET",
            &format!("/v1/devices?user=alice@example.com&after={}", first[1]),
            None,
        )
        .await);
    assert_eq!([first, rest].concat(), ids(&alice));
    // The user as an admin may type it: normalised as when it was stored.
    assert_eq!(
        ids(&h
            .ok("GET", "/v1/devices?user=%20Alice@Example.COM", None)
            .await),
        ids(&alice)
    );
    // A user with no device lists none; a user that does not exist is an error, not "none".
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "carol@example.com" })),
    )
    .await;
    assert_eq!(
        ids(&h
            .ok("GET", "/v1/devices?user=carol@example.com", None)
            .await),
        Vec::<String>::new()
    );
    let (s, v) = h
        .admin("GET", "/v1/devices?user=nobody@example.com", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(api_error(&v).field.as_deref(), Some("user"), "{v}");
    // A removed user's devices stay listed, revoked, under that user.
    h.ok("DELETE", "/v1/users/bob@example.com", None).await;
    let bob = h.ok("GET", "/v1/devices?user=bob@example.com", None).await;
    assert_eq!(ids(&bob).len(), 2, "{bob}");
    assert!(
        bob.as_array().unwrap().iter().all(|d| d["revoked"] == true),
        "{bob}"
    );

    // Connectors: by name.
    h.peer("connector", "c1").await;
    h.peer("connector", "c2").await;
    h.peer("connector", "c1").await;
    let c1 = h.ok("GET", "/v1/connectors?name=c1", None).await;
    assert_eq!(ids(&c1).len(), 2);
    assert!(c1.as_array().unwrap().iter().all(|c| c["name"] == "c1"));
    let all_c = ids(&h.ok("GET", "/v1/connectors", None).await);
    assert_eq!(all_c.len(), 3);
    let after_first = ids(&h
        .ok("GET", &format!("/v1/connectors?after={}", all_c[0]), None)
        .await);
    assert_eq!(after_first, all_c[1..]);

    let long = "a".repeat(513);
    for (path, field) in [
        ("/v1/devices?limit=0", "limit"),
        ("/v1/devices?limit=1001", "limit"),
        ("/v1/devices?limit=two", "limit"),
        ("/v1/devices?after=d-nosuch", "after"),
        // A connector's id is no place to page devices from.
        (&format!("/v1/devices?after={}", all_c[0]) as &str, "after"),
        ("/v1/devices?name=c1", "name"),
        (&format!("/v1/devices?user={long}@example.com"), "user"),
        ("/v1/devices?user=", "user"),
        ("/v1/connectors?name=C1", "name"),
        ("/v1/connectors?user=alice@example.com", "user"),
        ("/v1/connectors?nosuch=1", "nosuch"),
    ] {
        let (s, v) = h.admin("GET", path, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(api_error(&v).field.as_deref(), Some(field), "{path}: {v}");
    }
    h.ctl.shutdown().await;
}

/// A write refused after it wrote (deleting a group that does not exist runs its DELETE
/// first) never makes another writer fail: it once released the store's lock before its
/// rollback had run, and a writer that read first then met SQLite's lock (500, "database is
/// locked") about once in 150 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_never_fail_other_writers() {
    let h = Arc::new(Harness::start().await);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..150 {
                let (s, v) = if t % 2 == 0 {
                    h.admin("DELETE", "/v1/groups/nosuch", None).await
                } else {
                    let name = format!("g{t}-{i}");
                    h.admin("POST", "/v1/groups", Some(json!({ "name": name })))
                        .await
                };
                statuses.push((s, v));
            }
            statuses
        }));
    }
    let mut created = 0;
    for task in tasks {
        for (s, v) in task.await.unwrap() {
            assert!(
                s == StatusCode::NOT_FOUND || s == StatusCode::CREATED,
                "{s} {v}"
            );
            created += usize::from(s == StatusCode::CREATED);
        }
    }
    assert_eq!(created, 4 * 150);
    assert_eq!(
        h.ok("GET", "/v1/groups", None)
            .await
            .as_array()
            .unwrap()
            .len(),
        created
    );
}

/// A refused change about a user is recorded under the user's id as stored, whatever the
/// request's spelling: one user's history is found under one target.
#[tokio::test]
async fn refusals_about_a_user_are_filed_under_its_stored_id() {
    let h = Harness::start().await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "alice@example.com" })),
    )
    .await;
    let (s, _) = h
        .admin(
            "POST",
            "/v1/users",
            Some(json!({ "id": " Alice@Example.COM" })),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = h.admin("DELETE", "/v1/users/Bob@Example.COM", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let alice = h
        .audit_page("/v1/audit?limit=1000&target=alice@example.com&action=user.create")
        .await;
    let results: Vec<&str> = alice.iter().map(|e| e.record.result.as_str()).collect();
    assert_eq!(results, ["ok", "error"], "{alice:?}");
    let bob = h
        .audit_page("/v1/audit?limit=1000&target=bob@example.com&action=user.delete")
        .await;
    assert_eq!(bob.len(), 1, "{bob:?}");
    h.ctl.shutdown().await;
}

fn evil_csr(ca: bool, names: Vec<String>) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn csr_asking_for_more_is_refused_and_token_survives() {
    let h = Harness::start().await;
    let t = h.token("broker", None, Some("b1")).await;
    for csr in [
        evil_csr(true, vec![]),
        evil_csr(false, vec!["evil.example.com".into()]),
        evil_csr(false, vec!["b-x.broker.umbra.internal".into()]),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
    ] {
        let resp = h.redeem(&t.token, &csr).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e: ApiError = resp.json().await.unwrap();
        assert_eq!(e.field.as_deref(), Some("csr_pem"));
    }
    assert_eq!(h.ok("GET", "/v1/brokers/all", None).await, json!([]));
    // A refused request does not burn the token.
    let (id, issued) = h.enroll(&t.token).await;
    assert_eq!(id.peer.id.role, Role::Broker);
    let brokers = h.ok("GET", "/v1/brokers/all", None).await;
    assert_eq!(
        brokers[0]["server_name"],
        umbra_pki::broker_server_name(&id.peer.id.id).as_str()
    );
    assert_eq!(issued.identity, id.peer.id.to_uri());
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn renewal_and_revocation() {
    let h = Harness::start().await;
    let (broker, _) = h.peer("broker", "b1").await;
    let (dev, issued) = h.agent("alice@example.com").await;
    let c = h.as_peer(&dev);

    let key2 = umbra_pki::generate_key_pem().unwrap();
    let csr2 = umbra_pki::make_csr(&key2).unwrap();
    let resp = h.renew(&c, json!({ "csr_pem": csr2 })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let renewed: IssuedCert = resp.json().await.unwrap();
    assert_eq!(renewed.identity, issued.identity);
    assert_ne!(renewed.serial, issued.serial);
    assert_eq!(renewed.user.as_deref(), Some("alice@example.com"));
    let dev2 = TlsIdentity::from_pem(&renewed.cert_pem, &key2, &renewed.ca_pem).unwrap();
    assert_eq!(dev2.peer.id, dev.peer.id);

    // The renewal is audited, by and for the device, with the serial it replaces: the trail
    // must tie every certificate in circulation to the one it came from.
    let renewals = h.audited("renew").await;
    assert_eq!(renewals.len(), 1, "{renewals:?}");
    let r = &renewals[0];
    assert_eq!(r.result, "ok");
    assert_eq!(r.actor, issued.identity);
    assert_eq!(r.target, issued.identity);
    assert_eq!(r.detail["old_serial"], issued.serial.as_str());
    assert_eq!(r.detail["serial"], renewed.serial.as_str());

    // An agent may not fetch the snapshot.
    let (s, _) = get_json::<Snapshot>(&c, h.url("/v1/snapshot?after=0&wait=1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let device_id = dev.peer.id.id.clone();
    let d = h
        .ok("POST", &format!("/v1/devices/{device_id}/revoke"), None)
        .await;
    assert_eq!(d["revoked"], true);
    let resp = h.renew(&c, json!({ "csr_pem": csr2 })).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A revoked device trying to renew is in the trail as refused, naming the device.
    let renewals = h.audited("renew").await;
    assert_eq!(renewals.len(), 2, "{renewals:?}");
    let r = &renewals[1];
    assert_eq!(r.result, "error");
    assert_eq!(r.actor, issued.identity);
    assert_eq!(r.target, issued.identity);
    assert_eq!(r.detail["status"], 403);
    assert!(
        r.detail["error"].as_str().unwrap().contains("revoked"),
        "{r:?}"
    );
    // The renewed certificate is revoked too.
    let (s, _) = get_json::<BrokerList>(&h.as_peer(&dev2), h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let (s, snap) = get_json::<Snapshot>(&h.as_peer(&broker), h.url("/v1/snapshot?after=0")).await;
    assert_eq!(s, StatusCode::OK);
    let snap = snap.unwrap();
    assert!(snap.revoked_serials.contains(&issued.serial));
    assert!(snap.revoked_serials.contains(&renewed.serial));
    let dev_facts = snap.devices.iter().find(|d| d.id == device_id).unwrap();
    assert!(dev_facts.revoked);
    assert_eq!(dev_facts.user, "alice@example.com");
    h.ctl.shutdown().await;
}

/// A certificate that expired while its connection stayed open (HTTP/2 keeps one) polls no
/// more, and renews no more once past the renewal grace; the same certificate within its
/// lifetime does both.
#[tokio::test]
async fn an_expired_certificate_is_refused_on_an_open_connection() {
    let h = Harness::start().await;
    let (dev, _) = h.agent("alice@example.com").await;
    let c = h.as_peer(&dev);
    let (s, _) = get_json::<BrokerList>(&c, h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::OK);
    let lifetime = secs_left(&dev);
    // The controller's clock passes the certificate's end; the connection is the same one
    // (a new handshake would be judged by the moved clock).
    h.skew.store(lifetime + 60, Ordering::SeqCst);
    let (s, _) = get_json::<BrokerList>(&c, h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let key = umbra_pki::generate_key_pem().unwrap();
    let csr = umbra_pki::make_csr(&key).unwrap();
    h.skew.store(lifetime + 8 * 86_400, Ordering::SeqCst);
    let resp = h.renew(&c, json!({ "csr_pem": csr })).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: Value = resp.json().await.unwrap();
    // Named with its expiry by the controller's clock, which a peer whose clock disagrees
    // can tell from its own.
    let expiry = umbra_pki::rfc3339(dev.peer.not_after);
    assert!(
        api_error(&v)
            .error
            .contains(&format!("expired at {expiry} by the controller's clock")),
        "{v}"
    );
    // The twin: within its lifetime it polls and renews.
    h.skew.store(lifetime.saturating_sub(60), Ordering::SeqCst);
    let (s, _) = get_json::<BrokerList>(&c, h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::OK);
    let resp = h.renew(&c, json!({ "csr_pem": csr })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    h.ctl.shutdown().await;
}

/// The listings tell an operator where each credential stands, by the same rules as the
/// renewal route: valid; expired but renewed on its holder's return (until the grace ends);
/// lapsed (enroll again); revoked. A disabled user's device says so: it renews once the user
/// is enabled again, within the same bounds. Brokers list their certificate's expiry too.
#[tokio::test]
async fn listings_say_whether_a_certificate_still_renews() {
    let h = Harness::start().await;
    let day = 86_400;
    let grace = 7 * day;
    let (dev, issued) = h.agent("alice@example.com").await;
    let (revoked, _) = h.agent("alice@example.com").await;
    let (bob, bob_cert) = h.agent("bob@example.com").await;
    let (conn, conn_cert) = h.peer("connector", "c1").await;
    let (_broker, broker_cert) = h.peer("broker", "b1").await;
    let lifetime = secs_left(&dev);
    h.revoke_device(&revoked).await;
    h.set_disabled("bob@example.com", true).await;
    let devices = || async {
        let v = h.ok("GET", "/v1/devices", None).await;
        let by_id = |id: &str| {
            v.as_array()
                .unwrap()
                .iter()
                .find(|d| d["id"] == id)
                .cloned()
                .unwrap()
        };
        [&dev, &revoked, &bob].map(|d| {
            let d = by_id(&d.peer.id.id);
            (
                d["cert_state"].as_str().unwrap().to_owned(),
                d["renew_until"].as_u64(),
            )
        })
    };
    let connector = || async {
        let v = h.ok("GET", "/v1/connectors", None).await;
        let c = &v[0];
        (
            c["cert_state"].as_str().unwrap().to_owned(),
            c["renew_until"].as_u64(),
        )
    };
    let until = |not_after: u64| Some(not_after + grace);
    let s = |x: &str| x.to_owned();

    assert_eq!(
        devices().await,
        [
            (s("valid"), until(issued.not_after)),
            (s("revoked"), None),
            (s("user_disabled"), until(bob_cert.not_after)),
        ]
    );
    assert_eq!(connector().await, (s("valid"), until(conn_cert.not_after)));
    let v = h.ok("GET", "/v1/brokers/all", None).await;
    assert_eq!(v[0]["cert_not_after"], broker_cert.not_after, "{v}");
    assert_eq!(v[0]["cert_state"], "valid", "{v}");
    assert_eq!(v[0]["renew_until"], broker_cert.not_after + grace, "{v}");

    // Two days after expiry: renewable, but not the disabled user's device.
    h.skew.store(lifetime + 2 * day, Ordering::SeqCst);
    assert_eq!(
        devices().await,
        [
            (s("renewable"), until(issued.not_after)),
            (s("revoked"), None),
            (s("user_disabled"), until(bob_cert.not_after)),
        ]
    );
    assert_eq!(
        connector().await,
        (s("renewable"), until(conn_cert.not_after))
    );
    let v = h.ok("GET", "/v1/brokers/all", None).await;
    assert_eq!(v[0]["cert_state"], "renewable", "{v}");
    // What the listing promised holds: the device renews, and is valid again.
    let key = umbra_pki::generate_key_pem().unwrap();
    let resp = h
        .renew(
            &h.as_peer(&dev),
            json!({ "csr_pem": umbra_pki::make_csr(&key).unwrap() }),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let renewed: IssuedCert = resp.json().await.unwrap();
    assert_eq!(devices().await[0], (s("valid"), until(renewed.not_after)));
    // So does the disabled user's device, once the user is enabled: as listed.
    let resp = h
        .renew(&h.as_peer(&bob), json!({ "csr_pem": throwaway_csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    h.set_disabled("bob@example.com", false).await;
    assert_eq!(
        devices().await[2],
        (s("renewable"), until(bob_cert.not_after))
    );
    let resp = h
        .renew(&h.as_peer(&bob), json!({ "csr_pem": throwaway_csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Past the grace: lapsed, and the renewal route agrees.
    h.skew.store(lifetime + 8 * day, Ordering::SeqCst);
    assert_eq!(connector().await, (s("lapsed"), until(conn_cert.not_after)));
    let resp = h
        .renew(&h.as_peer(&conn), json!({ "csr_pem": throwaway_csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    h.ctl.shutdown().await;
}

/// A certificate that expired while its holder was away (a laptop asleep over a weekend, a
/// connector host powered off) renews within the controller's grace, on a new connection, and
/// opens nothing else; the renewal is audited with how long it had lapsed. Refused: beyond
/// the grace (at the handshake), a certificate a renewal already replaced, a revoked device,
/// a disabled user's device, and any expired certificate with the grace turned off.
#[tokio::test]
async fn an_expired_certificate_renews_within_the_grace_and_no_further() {
    let h = Harness::start().await;
    let day = 86_400;
    let (dev, issued) = h.agent("alice@example.com").await;
    let (other, _) = h.agent("alice@example.com").await;
    let (revoked, _) = h.agent("alice@example.com").await;
    let (bob, _) = h.agent("bob@example.com").await;
    let (conn, _) = h.peer("connector", "c1").await;
    let lifetime = secs_left(&dev);
    let csr = throwaway_csr;
    h.revoke_device(&revoked).await;
    h.set_disabled("bob@example.com", true).await;

    // Two days after expiry, by the controller's clock; every client below is a new
    // connection, so the handshake judges the certificate by that clock too.
    h.skew.store(lifetime + 2 * day, Ordering::SeqCst);
    let c = h.as_peer(&dev);
    // Only renewal is open to it.
    let (s, _) = get_json::<BrokerList>(&c, h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let key = umbra_pki::generate_key_pem().unwrap();
    let resp = h
        .renew(&c, json!({ "csr_pem": umbra_pki::make_csr(&key).unwrap() }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let renewed: IssuedCert = resp.json().await.unwrap();
    let dev2 = TlsIdentity::from_pem(&renewed.cert_pem, &key, &renewed.ca_pem).unwrap();
    assert_eq!(renewed.identity, issued.identity);
    assert_eq!(renewed.user.as_deref(), Some("alice@example.com"));
    let r = h.audited("renew").await;
    let r = r.last().unwrap();
    assert_eq!(
        (r.result.as_str(), r.actor.as_str()),
        ("ok", issued.identity.as_str())
    );
    let lapsed = r.detail["expired_secs"].as_u64().unwrap();
    assert!((2 * day - 5..2 * day + 120).contains(&lapsed), "{r:?}");
    // Once the renewed certificate is in use, the one it replaced renews no more, though
    // still within the grace.
    let (s, _) = get_json::<BrokerList>(&h.as_peer(&dev2), h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::OK);
    h.first_use_recorded(&dev2.peer.serial_hex).await;
    let resp = h.renew(&c, json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert!(api_error(&v).error.contains("in use"), "{v}");
    // A connector's renews the same way.
    let resp = h
        .renew(&h.as_peer(&conn), json!({ "csr_pem": csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // A revoked device and a disabled user's device do not.
    let resp = h
        .renew(&h.as_peer(&revoked), json!({ "csr_pem": csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = h.renew(&h.as_peer(&bob), json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert!(api_error(&v).error.contains("disabled"), "{v}");

    // Eight days after expiry, past the 7-day grace: refused with the reason (the handshake
    // lets it through for a month more, so that its holder learns why), and audited.
    h.skew.store(lifetime + 8 * day, Ordering::SeqCst);
    let resp = h
        .renew(&h.as_peer(&other), json!({ "csr_pem": csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: Value = resp.json().await.unwrap();
    assert!(
        api_error(&v)
            .error
            .contains("longer ago than renewal allows"),
        "{v}"
    );
    let r = h.audited("renew").await;
    let r = r.last().unwrap();
    assert_eq!(
        (r.result.as_str(), r.detail["status"].as_u64()),
        ("error", Some(401))
    );
    // Past that month too, the handshake itself refuses it.
    h.skew.store(lifetime + 40 * day, Ordering::SeqCst);
    let e = h
        .as_peer(&other)
        .post(h.url("/v1/renew"))
        .json(&json!({ "csr_pem": csr() }))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect() || e.is_request(), "{e:?}");
    h.ctl.shutdown().await;

    // With the grace turned off, an expired certificate is refused, saying so; the twin
    // within its lifetime renews.
    let h = Harness::start_cfg(|c| c.renew_grace_secs = 0).await;
    let (dev, _) = h.agent("alice@example.com").await;
    let lifetime = secs_left(&dev);
    h.skew.store(lifetime + 60, Ordering::SeqCst);
    let resp = h.renew(&h.as_peer(&dev), json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: Value = resp.json().await.unwrap();
    assert!(
        api_error(&v)
            .error
            .contains("renews no expired certificate"),
        "{v}"
    );
    h.skew.store(lifetime - 60, Ordering::SeqCst);
    let resp = h.renew(&h.as_peer(&dev), json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    h.ctl.shutdown().await;

    // Two-minute certificates, renewed within the hour (still on record when they expire).
    // A renewal whose certificate is in use replaces the old one for good: once expired, it
    // renews no more; the newest, expired as long, renews.
    let h = Harness::start_cfg(|c| c.cert_lifetime_secs = 120).await;
    let (old, _) = h.agent("alice@example.com").await;
    let key = umbra_pki::generate_key_pem().unwrap();
    let resp = h
        .renew(
            &h.as_peer(&old),
            json!({ "csr_pem": umbra_pki::make_csr(&key).unwrap() }),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let newer: IssuedCert = resp.json().await.unwrap();
    let newer = TlsIdentity::from_pem(&newer.cert_pem, &key, &newer.ca_pem).unwrap();
    let (s, _) = get_json::<BrokerList>(&h.as_peer(&newer), h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::OK, "the renewed certificate in use");
    // Its first use is recorded off the request's path: wait for it in the store.
    h.first_use_recorded(&newer.peer.serial_hex).await;
    // Still valid, the old certificate renews no more either: whoever copied it and its key
    // before the renewal cannot fork the identity (and lock its holder out later). Audited.
    let resp = h.renew(&h.as_peer(&old), json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert!(api_error(&v).error.contains("a copy of its key"), "{v}");
    let r = h.audited("renew").await;
    assert_eq!(r.last().map(|r| r.result.as_str()), Some("error"), "{r:?}");
    h.skew.store(300, Ordering::SeqCst);
    let resp = h.renew(&h.as_peer(&old), json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert!(api_error(&v).error.contains("in use"), "{v}");
    // The certificate in use, expired as long, renews.
    let resp = h
        .renew(&h.as_peer(&newer), json!({ "csr_pem": csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    h.skew.store(0, Ordering::SeqCst);

    // A renewal whose answer was lost (or never written to disk): nothing it issued was ever
    // used, so the expired certificate renews again, and the trail names the unused one.
    let (lost_from, lost_issued) = h.agent("alice@example.com").await;
    let resp = h
        .renew(&h.as_peer(&lost_from), json!({ "csr_pem": csr() }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let lost: IssuedCert = resp.json().await.unwrap();
    h.skew.store(300, Ordering::SeqCst);
    let resp = h
        .renew(&h.as_peer(&lost_from), json!({ "csr_pem": csr() }))
        .await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "a retried renewal after expiry"
    );
    let retried: IssuedCert = resp.json().await.unwrap();
    assert_ne!(retried.serial, lost.serial);
    let r = h.audited("renew").await;
    let r = r.last().unwrap();
    assert_eq!(r.detail["old_serial"], lost_issued.serial.as_str());
    assert_eq!(r.detail["earlier_unused"], json!([lost.serial]));
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn connector_revocation_and_refused_renewals_are_audited() {
    let h = Harness::start().await;
    let (conn, issued) = h.peer("connector", "c1").await;
    let id = conn.peer.id.id.clone();
    let c = h.as_peer(&conn);

    // A live connector asking for more than it is granted is refused, and the refusal is
    // audited against it; no certificate is issued.
    let resp = h
        .renew(
            &c,
            json!({ "csr_pem": evil_csr(false, vec!["evil.example.com".into()]) }),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let renewals = h.audited("renew").await;
    assert_eq!(renewals.len(), 1, "{renewals:?}");
    let r = &renewals[0];
    assert_eq!(
        (r.result.as_str(), r.actor.as_str(), r.target.as_str()),
        ("error", issued.identity.as_str(), issued.identity.as_str())
    );
    assert_eq!(r.detail["status"], 400);
    assert_eq!(r.detail["field"], "csr_pem");
    assert_eq!(
        h.ok("GET", "/v1/connectors", None).await[0]["cert_serial"],
        issued.serial.as_str()
    );

    // Revoking a connector is an admin change like any other: one audit row naming it.
    let v = h
        .ok("POST", &format!("/v1/connectors/{id}/revoke"), None)
        .await;
    assert_eq!(v["revoked"], true);
    let target = format!("connector/{id}");
    let revokes = h.audited("revoke").await;
    assert_eq!(revokes.len(), 1, "{revokes:?}");
    let r = &revokes[0];
    assert_eq!(
        (r.result.as_str(), r.actor.as_str(), r.target.as_str()),
        ("ok", "admin", target.as_str())
    );
    assert_eq!(r.detail["role"], "connector");
    assert_eq!(r.detail["id"], id.as_str());
    assert_eq!(r.detail["owner"], "c1");
    // Revoking it again changes nothing, so nothing more is recorded as done.
    h.ok("POST", &format!("/v1/connectors/{id}/revoke"), None)
        .await;
    assert_eq!(h.audited("revoke").await.len(), 1);
    // An unknown connector: refused, and the refusal is audited.
    let (s, _) = h.admin("POST", "/v1/connectors/nope/revoke", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let revokes = h.audited("revoke").await;
    assert_eq!(revokes.len(), 2);
    assert_eq!(
        (revokes[1].result.as_str(), revokes[1].target.as_str()),
        ("error", "connector/nope")
    );

    // The revoked connector can no longer renew, and that attempt is audited too.
    let csr = throwaway_csr();
    let resp = h.renew(&c, json!({ "csr_pem": csr })).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let renewals = h.audited("renew").await;
    assert_eq!(renewals.len(), 2, "{renewals:?}");
    let r = &renewals[1];
    assert_eq!(
        (r.result.as_str(), r.target.as_str()),
        ("error", issued.identity.as_str())
    );
    assert_eq!(r.detail["status"], 403);
    h.ctl.shutdown().await;
}

/// A CSR for `key_pem` that asks for a certificate valid until 2099. PKCS#10 has no validity
/// field, so the only way a request can ask is an extension; the private key usage period
/// (2.5.29.16) is the one that carries dates.
fn csr_asking_to_live_long(key_pem: &str) -> String {
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let mut params = rcgen::CertificateParams::default();
    // SEQUENCE { [0] notBefore, [1] notAfter }, both GeneralizedTime.
    let mut period = vec![0x30, 0x22, 0x80, 0x0f];
    period.extend_from_slice(b"20250101000000Z");
    period.extend_from_slice(&[0x81, 0x0f]);
    period.extend_from_slice(b"20991231235959Z");
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 16],
            period,
        ));
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// DER encoding of the OID 2.5.29.16 (private key usage period).
const KEY_USAGE_PERIOD_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x10];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `send` answers with a certificate that lives exactly `lifetime` from when it was issued,
/// whatever the request asked for: the answer's `not_after` and the certificate's own agree.
async fn assert_issued_for(
    lifetime: u64,
    send: impl std::future::Future<Output = reqwest::Response>,
) -> IssuedCert {
    let before = unix_now();
    let resp = send.await;
    let after = unix_now();
    assert_eq!(resp.status(), StatusCode::OK);
    let issued: IssuedCert = resp.json().await.unwrap();
    assert!(
        (before + lifetime..=after + lifetime).contains(&issued.not_after),
        "not_after {} is not {lifetime} s after issuance ({before}..={after})",
        issued.not_after
    );
    let in_cert = umbra_pki::cert_not_after(&issued.cert_pem).unwrap();
    assert_eq!(
        in_cert,
        SystemTime::UNIX_EPOCH + Duration::from_secs(issued.not_after)
    );
    // (`ca_der` decodes any certificate PEM; here the leaf.)
    assert!(
        !contains(ca_der(&issued.cert_pem).as_ref(), &KEY_USAGE_PERIOD_OID),
        "the CA copied the requested validity extension"
    );
    issued
}

/// Neither the JSON body nor the CSR can get a certificate that outlives the configured
/// lifetime: the body has no lifetime field (one is refused as unknown before the token is
/// touched), and a validity the CSR asks for in an extension is ignored like everything else
/// in it but the key. Checked with the default lifetime (24 h) and a configured one.
#[tokio::test]
async fn requested_lifetime_is_refused_or_ignored() {
    let long = 365 * 24 * 3600_u64;
    for configured in [None, Some(2 * 3600)] {
        let h = Harness::start_cfg(|c| {
            if let Some(secs) = configured {
                c.cert_lifetime_secs = secs;
            }
        })
        .await;
        let lifetime = configured.unwrap_or(24 * 3600);
        let t = h.token("connector", None, Some("c1")).await;
        let key = umbra_pki::generate_key_pem().unwrap();

        // A lifetime field: refused by name, and the token is not spent on it.
        let resp = h
            .http
            .post(h.url("/v1/enroll"))
            .json(&json!({
                "token": t.token,
                "csr_pem": umbra_pki::make_csr(&key).unwrap(),
                "lifetime_secs": long,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e: ApiError = resp.json().await.unwrap();
        assert_eq!(e.field.as_deref(), Some("lifetime_secs"));
        assert!(e.error.contains("lifetime_secs"), "{}", e.error);
        assert_eq!(h.ok("GET", "/v1/connectors", None).await, json!([]));

        // The same token with a CSR asking to live until 2099: the token still works, and
        // the certificate lives the configured lifetime.
        let csr = csr_asking_to_live_long(&key);
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap()
        };
        assert!(
            contains(der.as_ref(), &KEY_USAGE_PERIOD_OID),
            "the request really asks"
        );
        let issued = assert_issued_for(lifetime, h.redeem(&t.token, &csr)).await;
        let id = TlsIdentity::from_pem(&issued.cert_pem, &key, &issued.ca_pem).unwrap();
        let c = h.as_peer(&id);

        // Renewal: same rules.
        let resp = h
            .renew(&c, json!({ "csr_pem": csr, "lifetime_secs": long }))
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e: ApiError = resp.json().await.unwrap();
        assert_eq!(e.field.as_deref(), Some("lifetime_secs"));
        let renewed = assert_issued_for(lifetime, h.renew(&c, json!({ "csr_pem": csr }))).await;
        assert_ne!(renewed.serial, issued.serial);
        h.ctl.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Distribution

#[tokio::test]
async fn snapshot_long_poll_sees_changes_within_a_second() {
    let h = Harness::start().await;
    let (broker, _) = h.peer("broker", "b1").await;
    let b = h.as_peer(&broker);
    let (_, snap) = get_json::<Snapshot>(&b, h.url("/v1/snapshot?after=0")).await;
    let v = snap.unwrap().version;
    assert_eq!(v, h.ctl.snapshot_version());

    // Nothing newer: 204 when the wait ends.
    let t0 = Instant::now();
    let resp = b
        .get(h.url(&format!("/v1/snapshot?after={v}&wait=1")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(t0.elapsed() < Duration::from_secs(5));

    let poll = tokio::spawn({
        let b = b.clone();
        let url = h.url(&format!("/v1/snapshot?after={v}"));
        async move { get_json::<Snapshot>(&b, url).await }
    });
    // The poll waits when the change commits (the path under test: a change made before it
    // arrives is answered at once, without waiting).
    polls_waiting(&h, 1).await;
    let changed_at = Instant::now();
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "new@example.com" })),
    )
    .await;
    let (s, snap) = tokio::time::timeout(Duration::from_secs(1), poll)
        .await
        .expect("long poll answered within 1 s of the change")
        .unwrap();
    assert!(changed_at.elapsed() < Duration::from_secs(1));
    assert_eq!(s, StatusCode::OK);
    let snap = snap.unwrap();
    assert!(snap.version > v);
    assert!(snap.users.iter().any(|u| u.id == "new@example.com"));
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn connector_config_lists_only_its_targets() {
    let h = Harness::start().await;
    let (c1, _) = h.peer("connector", "c1").await;
    let (c2, _) = h.peer("connector", "c2").await;
    for (name, target, conns) in [
        ("web", "10.0.0.1:80", vec!["c1"]),
        ("db", "10.0.0.2:5432", vec!["c2"]),
        ("both", "10.0.0.3:22", vec!["c1", "c2"]),
    ] {
        h.ok(
            "POST",
            "/v1/services",
            Some(json!({ "name": name, "target": target, "connectors": conns })),
        )
        .await;
    }
    let (s, cfg) =
        get_json::<ConnectorConfig>(&h.as_peer(&c1), h.url("/v1/connector/config?after=0")).await;
    assert_eq!(s, StatusCode::OK);
    let cfg = cfg.unwrap();
    assert_eq!(cfg.connector_id, c1.peer.id.id);
    let names: Vec<&str> = cfg.targets.iter().map(|t| t.service.as_str()).collect();
    assert_eq!(names, ["both", "web"]);
    assert_eq!(cfg.targets[1].target, "10.0.0.1:80");

    // Long poll: a new service for c1 shows up.
    let poll = tokio::spawn({
        let c = h.as_peer(&c1);
        let url = h.url(&format!("/v1/connector/config?after={}", cfg.version));
        async move { get_json::<ConnectorConfig>(&c, url).await }
    });
    h.ok(
        "POST",
        "/v1/services",
        Some(json!({ "name": "ssh", "target": "10.0.0.4:22", "connectors": ["c1"] })),
    )
    .await;
    let (_, cfg2) = tokio::time::timeout(Duration::from_secs(1), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cfg2.unwrap().targets.len(), 3);

    // A broker or agent may not read connector config; a revoked connector neither.
    let (s, _) =
        get_json::<ConnectorConfig>(&h.as_peer(&c2), h.url("/v1/connector/config?after=0")).await;
    assert_eq!(s, StatusCode::OK);
    h.ok("POST", "/v1/connectors/c2/revoke", None).await;
    let (s, _) =
        get_json::<ConnectorConfig>(&h.as_peer(&c2), h.url("/v1/connector/config?after=0")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let conns = h.ok("GET", "/v1/connectors", None).await;
    let c2row = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "c2")
        .unwrap();
    assert_eq!(c2row["revoked"], true);
    h.ctl.shutdown().await;
}

/// Posts a broker heartbeat with `client`; the answer's status.
async fn heartbeat(h: &Harness, client: &reqwest::Client, body: &Value) -> StatusCode {
    client
        .post(h.url("/v1/broker/heartbeat"))
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
}

/// Brokers (with each heartbeat) and connectors (polling their targets) announce their
/// version in `User-Agent`; the listings show the last one announced, for an operator
/// upgrading a fleet. Anything but `umbra/<version>` is shown as not known.
#[tokio::test]
async fn listings_show_the_version_each_peer_announced() {
    let h = Harness::start().await;
    let (broker, _) = h.peer("broker", "b1").await;
    let (conn, _) = h.peer("connector", "c1").await;
    let hb = json!({
        "name": "b1",
        "quic_addr": "127.0.0.1:4433",
        "server_name": umbra_pki::broker_server_name(&broker.peer.id.id),
        "snapshot_version": h.ctl.snapshot_version(),
        "audit": [],
    });
    let beat = |ua: &'static str| {
        let (c, hb) = (h.as_peer(&broker), hb.clone());
        let url = h.url("/v1/broker/heartbeat");
        async move {
            let r = c
                .post(url)
                .header("user-agent", ua)
                .json(&hb)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    let poll = |ua: &'static str| {
        let c = h.as_peer(&conn);
        let url = h.url("/v1/connector/config?after=0");
        async move {
            let r = c.get(url).header("user-agent", ua).send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    let versions = || async {
        let b = h.ok("GET", "/v1/brokers/all", None).await;
        let c = h.ok("GET", "/v1/connectors", None).await;
        (b[0]["version"].clone(), c[0]["version"].clone())
    };
    assert_eq!(versions().await, (Value::Null, Value::Null));
    beat("umbra/7.8.9").await;
    poll("umbra/7.8.9 (connector)").await;
    assert_eq!(versions().await, (json!("7.8.9"), json!("7.8.9")));
    // An upgrade shows at the next heartbeat and poll.
    beat("umbra/7.9.0").await;
    poll("umbra/7.9.0").await;
    assert_eq!(versions().await, (json!("7.9.0"), json!("7.9.0")));
    // Not ours, or not a version: not known (never the text as sent).
    beat("curl/8.0").await;
    poll("umbra/1.0;rm").await;
    assert_eq!(versions().await, (Value::Null, Value::Null));
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn heartbeat_brokers_streams_and_audit() {
    let h = Harness::start().await;
    let (broker, _) = h.peer("broker", "b1").await;
    let (dev, _) = h.agent("alice@example.com").await;
    let b = h.as_peer(&broker);
    let v0 = h.ctl.snapshot_version();
    let hb = json!({
        "name": "b1",
        "quic_addr": "127.0.0.1:4433",
        "tcp_addr": "127.0.0.1:4443",
        "server_name": umbra_pki::broker_server_name(&broker.peer.id.id),
        "snapshot_version": v0,
        "streams": [{
            "id": 7, "broker": "spoofed", "user": "alice@example.com", "device": dev.peer.id.id,
            "service": "web", "connector": "c-1", "transport": "quic", "started_at": 1,
            "bytes_up": 10, "bytes_down": 20
        }],
        "audit": [{
            "at_ms": 1, "actor": dev.peer.id.to_uri(), "action": "stream.open", "target": "web",
            "result": "allow", "detail": { "policies": ["eng-web"] }
        }]
    });
    let resp = b
        .post(h.url("/v1/broker/heartbeat"))
        .json(&hb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ack: Value = resp.json().await.unwrap();
    assert!(
        ack["snapshot_version"].as_u64().unwrap() > v0,
        "new addresses bump the snapshot"
    );
    // Same addresses: no bump.
    let v1 = h.ctl.snapshot_version();
    assert_eq!(heartbeat(&h, &b, &hb).await, StatusCode::OK);
    assert_eq!(h.ctl.snapshot_version(), v1);

    let (_, list) = get_json::<BrokerList>(&h.as_peer(&dev), h.url("/v1/brokers")).await;
    let list = list.unwrap();
    assert_eq!(list.brokers.len(), 1);
    assert_eq!(list.brokers[0].quic_addr.as_deref(), Some("127.0.0.1:4433"));
    let all = h.ok("GET", "/v1/brokers/all", None).await;
    assert!(all[0]["last_seen"].as_u64().unwrap() > 0);
    let streams = h.ok("GET", "/v1/streams", None).await;
    assert_eq!(streams.as_array().unwrap().len(), 1);
    assert_eq!(streams[0]["broker"], broker.peer.id.id.as_str());
    let audit: Vec<AuditEntry> =
        serde_json::from_value(h.ok("GET", "/v1/audit?limit=1000", None).await).unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.record.action == "stream.open" && e.record.result == "allow")
    );

    // Numbered audit events are stored once: a resend after a crash or a lost answer adds
    // only what is new.
    let hr = &h;
    let count = |target: &'static str| async move {
        let audit: Vec<AuditEntry> =
            serde_json::from_value(hr.ok("GET", "/v1/audit?limit=1000", None).await).unwrap();
        audit.iter().filter(|e| e.record.target == target).count()
    };
    let numbered = |first: u64, targets: &[&str]| {
        let mut v = hb.clone();
        v["audit_seq"] = json!({ "epoch": 77, "first": first });
        v["audit"] = json!(
            targets
                .iter()
                .map(|t| json!({
                    "at_ms": 1, "actor": dev.peer.id.to_uri(), "action": "stream.open",
                    "target": t, "result": "deny", "detail": {}
                }))
                .collect::<Vec<_>>()
        );
        v
    };
    for (first, targets) in [
        (1, vec!["n1", "n2"]),
        (1, vec!["n1", "n2"]),
        (2, vec!["n2", "n3"]),
    ] {
        assert_eq!(
            heartbeat(&h, &b, &numbered(first, &targets)).await,
            StatusCode::OK
        );
    }
    assert_eq!(
        (count("n1").await, count("n2").await, count("n3").await),
        (1, 1, 1)
    );
    // The answer says where the numbering is stored: a broker whose spool is behind (a
    // full disk) numbers on from there. An empty numbered heartbeat (what a broker sends
    // first after a start) asks without moving it.
    let ack: Value = b
        .post(h.url("/v1/broker/heartbeat"))
        .json(&numbered(1, &[]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&ack["audit_epoch"], &ack["audit_last"]),
        (&json!(77), &json!(3)),
        "{ack}"
    );
    let mut bad = numbered(0, &["n4"]);
    assert_eq!(heartbeat(&h, &b, &bad).await, StatusCode::BAD_REQUEST);
    bad["audit_seq"] = json!({ "epoch": u64::MAX, "first": 1 });
    assert_eq!(heartbeat(&h, &b, &bad).await, StatusCode::BAD_REQUEST);
    assert_eq!(count("n4").await, 0, "a refused heartbeat stores nothing");

    // A heartbeat without a stream list (the set is unchanged) keeps the stored one and
    // still counts as a sign of life; an empty list clears it.
    h.skew.store(20, Ordering::SeqCst);
    let mut audit_only = hb.clone();
    audit_only.as_object_mut().unwrap().remove("streams");
    assert_eq!(heartbeat(&h, &b, &audit_only).await, StatusCode::OK);
    let streams = h.ok("GET", "/v1/streams", None).await;
    assert_eq!(streams.as_array().unwrap().len(), 1);
    assert_eq!(streams[0]["id"], 7);
    let seen = h.ok("GET", "/v1/brokers/all", None).await[0]["last_seen"]
        .as_u64()
        .unwrap();
    assert!(seen >= all[0]["last_seen"].as_u64().unwrap() + 20);
    h.skew.store(0, Ordering::SeqCst);

    // Streams of a broker not heard from for 30 s are not live.
    h.skew.store(60, Ordering::SeqCst);
    assert_eq!(h.ok("GET", "/v1/streams", None).await, json!([]));
    h.skew.store(0, Ordering::SeqCst);

    // A broker with more live streams than a heartbeat lists says how many it left out; the
    // listing and a policy check say so too. A heartbeat without a list keeps the count, and
    // a full list puts it back to 0.
    let omitted = || async {
        let resp = h
            .http
            .get(h.url("/v1/streams"))
            .bearer_auth(&h.admin_token)
            .send()
            .await
            .unwrap();
        resp.headers()["x-umbra-streams-omitted"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(omitted().await, "0");
    let mut many = hb.clone();
    many["streams_omitted"] = json!(40_000);
    assert_eq!(heartbeat(&h, &b, &many).await, StatusCode::OK);
    assert_eq!(omitted().await, "40000");
    assert_eq!(heartbeat(&h, &b, &audit_only).await, StatusCode::OK);
    assert_eq!(omitted().await, "40000");
    let check = h
        .ok(
            "POST",
            "/v1/policies/new-one/check",
            Some(json!({ "text": "permit(principal, action, resource);" })),
        )
        .await;
    assert_eq!(check["streams_omitted"], 40_000, "{check}");

    let mut none_left = hb.clone();
    none_left["streams"] = json!([]);
    assert_eq!(heartbeat(&h, &b, &none_left).await, StatusCode::OK);
    assert_eq!(h.ok("GET", "/v1/streams", None).await, json!([]));
    assert_eq!(omitted().await, "0");

    // Only brokers heartbeat; bad addresses are refused.
    assert_eq!(
        heartbeat(&h, &h.as_peer(&dev), &hb).await,
        StatusCode::FORBIDDEN
    );
    let mut bad = hb.clone();
    bad["quic_addr"] = json!("nowhere");
    assert_eq!(heartbeat(&h, &b, &bad).await, StatusCode::BAD_REQUEST);
    // An IPv6 address in another spelling is stored in the standard one, not refused; sent
    // again as it was, it is no change.
    let mut v6 = hb.clone();
    v6["quic_addr"] = json!("[2001:DB8:0::1]:4433");
    assert_eq!(heartbeat(&h, &b, &v6).await, StatusCode::OK);
    let listed = h.ok("GET", "/v1/brokers/all", None).await;
    assert_eq!(listed[0]["quic_addr"], "[2001:db8::1]:4433", "{listed}");
    let version = h.ctl.snapshot_version();
    assert_eq!(heartbeat(&h, &b, &v6).await, StatusCode::OK);
    assert_eq!(h.ctl.snapshot_version(), version);
    h.ctl.shutdown().await;
}

/// `GET /v1/rollout`: where each broker stands on a snapshot version, from what its
/// heartbeats report in force. Applied, behind, or silent (not heard from in 30 s, whatever
/// it reported); a wait ends as soon as no broker is behind, and does not wait for silent
/// ones. Refused: a version the store does not have yet, unknown parameters, no token.
#[tokio::test]
async fn rollout_tells_where_each_broker_stands() {
    let h = Harness::start().await;
    let mut brokers = Vec::new();
    for name in ["b1", "b2"] {
        let (id, _) = h.peer("broker", name).await;
        let client = h.as_peer(&id);
        let hb = move |version: u64| {
            json!({
                "name": name,
                "quic_addr": null,
                "tcp_addr": "127.0.0.1:4433",
                "server_name": umbra_pki::broker_server_name(&id.peer.id.id),
                "snapshot_version": version,
                "audit": [],
            })
        };
        brokers.push((client, hb));
    }
    async fn rollout(h: &Harness, query: &str) -> umbra_proto::api::Rollout {
        let v = h.ok("GET", &format!("/v1/rollout{query}"), None).await;
        serde_json::from_value(v).unwrap()
    }
    // Broker `i` reports the controller's current version in force.
    let beat_current = |i: usize| {
        let (client, hb) = &brokers[i];
        let h = &h;
        async move {
            let v = rollout(h, "").await.current;
            assert_eq!(heartbeat(h, client, &hb(v)).await, StatusCode::OK);
        }
    };
    let states = |r: &umbra_proto::api::Rollout| -> Vec<(String, &'static str)> {
        r.brokers
            .iter()
            .map(|b| (b.name.clone(), b.state.as_str()))
            .collect()
    };
    // A broker's first heartbeat registers its addresses, which is a change itself; the
    // second reports the version after it.
    for (client, hb) in &brokers {
        assert_eq!(heartbeat(&h, client, &hb(0)).await, StatusCode::OK);
    }
    let v1 = rollout(&h, "").await.current;
    for (client, hb) in &brokers {
        assert_eq!(heartbeat(&h, client, &hb(v1)).await, StatusCode::OK);
    }
    let r = rollout(&h, "").await;
    assert_eq!(
        (r.version, r.current, r.applied, r.behind, r.silent),
        (v1, v1, 2, 0, 0)
    );

    // A change: both brokers are behind until they report it in force.
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "bob@example.com" })),
    )
    .await;
    let v2 = rollout(&h, "").await.current;
    assert!(v2 > v1);
    let r = rollout(&h, "").await;
    assert_eq!((r.version, r.behind), (v2, 2));
    assert_eq!(
        states(&r),
        [("b1".to_owned(), "behind"), ("b2".to_owned(), "behind")]
    );
    // The older version is in force at both.
    let r = rollout(&h, &format!("?version={v1}")).await;
    assert_eq!((r.version, r.current, r.applied), (v1, v2, 2));

    // A wait is answered once the last broker behind reports the version, not at its end.
    let waiting = {
        let (http, url, token) = (
            h.http.clone(),
            h.url("/v1/rollout?wait=20"),
            h.admin_token.clone(),
        );
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r: umbra_proto::api::Rollout = http
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        heartbeat(&h, &brokers[0].0, &brokers[0].1(v2)).await,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished(), "answered with b2 still behind");
    assert_eq!(
        heartbeat(&h, &brokers[1].0, &brokers[1].1(v2)).await,
        StatusCode::OK
    );
    let (r, took) = waiting.await.unwrap();
    assert_eq!((r.version, r.applied, r.behind), (v2, 2, 0), "{r:?}");
    assert!(
        took < Duration::from_secs(15),
        "held to the end of its wait: {took:?}"
    );
    // A wait that ends with a broker behind answers with it behind.
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "carol@example.com" })),
    )
    .await;
    beat_current(0).await;
    let r = rollout(&h, "?wait=1").await;
    assert_eq!(
        states(&r),
        [("b1".to_owned(), "applied"), ("b2".to_owned(), "behind")]
    );

    // Refused, naming what: a version the store does not have, a parameter it does not
    // know; no token, no answer.
    let ahead = format!("/v1/rollout?version={}", rollout(&h, "").await.current + 1);
    let (s, e) = h.admin("GET", &ahead, None).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("version")),
        "{e}"
    );
    let (s, _) = h.admin("GET", "/v1/rollout?versoin=1", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let s = h
        .http
        .get(h.url("/v1/rollout"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // 31 s later by the controller's clock neither broker has been heard from lately: both
    // silent, whatever they reported, and a wait does not hold for them.
    h.skew.fetch_add(31, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let r = rollout(&h, "?wait=10").await;
    assert_eq!((r.applied, r.behind, r.silent), (0, 0, 2), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "held for silent brokers"
    );
    // b1 heard from again: applied. A revoked broker is not counted at all.
    beat_current(0).await;
    h.ok("POST", "/v1/brokers/b2/revoke", None).await;
    beat_current(0).await;
    let r = rollout(&h, "").await;
    assert_eq!(states(&r), [("b1".to_owned(), "applied")]);
}

/// Revoking a broker (by name) takes it out of the broker lists peers fetch and ends what
/// the controller serves it (heartbeat, snapshot, renewal); the other broker is untouched.
#[tokio::test]
async fn revoked_broker_is_unlisted_and_unserved() {
    let h = Harness::start().await;
    let (dev, _) = h.agent("alice@example.com").await;
    let mut brokers = Vec::new();
    for (name, port) in [("b1", 4433), ("b2", 4533)] {
        let (id, _) = h.peer("broker", name).await;
        let client = h.as_peer(&id);
        let hb = json!({
            "name": name,
            "quic_addr": format!("127.0.0.1:{port}"),
            "tcp_addr": format!("127.0.0.1:{port}"),
            "server_name": umbra_pki::broker_server_name(&id.peer.id.id),
            "snapshot_version": 0,
            "streams": [],
            "audit": [],
        });
        assert_eq!(heartbeat(&h, &client, &hb).await, StatusCode::OK);
        brokers.push((id, client, hb));
    }
    let listed = |c: reqwest::Client| {
        let url = h.url("/v1/brokers");
        async move {
            let (s, list) = get_json::<BrokerList>(&c, url).await;
            assert_eq!(s, StatusCode::OK);
            let mut names: Vec<String> =
                list.unwrap().brokers.into_iter().map(|b| b.name).collect();
            names.sort();
            names
        }
    };
    assert_eq!(listed(h.as_peer(&dev)).await, ["b1", "b2"]);

    let (s, _) = h.admin("POST", "/v1/brokers/nope/revoke", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let v = h.ctl.snapshot_version();
    let (s, body) = h.admin("POST", "/v1/brokers/b2/revoke", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.ctl.snapshot_version() > v, "a revocation is a change");
    // The answer is the broker, as listed, now revoked (by name here; its id is the key).
    let revoked: umbra_proto::api::Broker = serde_json::from_value(body).unwrap();
    assert_eq!(
        (
            revoked.name.as_str(),
            revoked.id.as_str(),
            revoked.cert_state
        ),
        (
            "b2",
            brokers[1].0.peer.id.id.as_str(),
            umbra_proto::api::CredentialState::Revoked
        )
    );
    assert_eq!(revoked.renew_until, None);

    // Agents, connectors and the other broker no longer see it.
    assert_eq!(listed(h.as_peer(&dev)).await, ["b1"]);
    assert_eq!(listed(brokers[0].1.clone()).await, ["b1"]);
    let all = h.ok("GET", "/v1/brokers/all", None).await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["name"], "b1");
    // The revoked broker is served nothing more: no heartbeat, snapshot or renewal.
    let csr = throwaway_csr;
    let (_, b2, hb2) = &brokers[1];
    assert_eq!(heartbeat(&h, b2, hb2).await, StatusCode::FORBIDDEN);
    let (s, _) = get_json::<Value>(b2, h.url("/v1/snapshot?after=0&wait=0")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let resp = h.renew(b2, json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // The twin: the other broker still is.
    let (_, b1, hb1) = &brokers[0];
    assert_eq!(heartbeat(&h, b1, hb1).await, StatusCode::OK);
    let (s, _) = get_json::<Value>(b1, h.url("/v1/snapshot?after=0&wait=0")).await;
    assert_eq!(s, StatusCode::OK);
    let resp = h.renew(b1, json!({ "csr_pem": csr() })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Audited, and revoking again changes nothing.
    let audit: Vec<AuditEntry> =
        serde_json::from_value(h.ok("GET", "/v1/audit?limit=1000", None).await).unwrap();
    let b2_id = brokers[1].0.peer.id.id.clone();
    let revokes = || {
        audit
            .iter()
            .filter(|e| e.record.action == "revoke" && e.record.target == format!("broker/{b2_id}"))
            .count()
    };
    assert_eq!(revokes(), 1, "{audit:?}");
    let v = h.ctl.snapshot_version();
    let (s, _) = h
        .admin("POST", &format!("/v1/brokers/{b2_id}/revoke"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h.ctl.snapshot_version(), v);
    h.ctl.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Persistence, CA custody, audit, OpenAPI

/// Copies the regular files of `from` into `to` (created), or back: a backup of a stopped
/// controller's data directory, and its restore (files the backup lacks are removed).
fn copy_data(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(to).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && !from.join(p.file_name().unwrap()).exists() {
            std::fs::remove_file(p).unwrap();
        }
    }
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// The store restored from a backup. A start moves the version to at least the clock in
/// milliseconds, so the restored store does not hand out a version a peer already holds
/// for other content: a peer holding the version from before the backup gets the store's
/// state at once. A peer ahead of the store (possible if the clock went back) gets it at once
/// too (a device revoked after the restore must not keep access until the counter catches
/// up); a peer at the store's version waits as usual.
#[tokio::test]
async fn peers_ahead_of_a_restored_store_get_its_state_at_once() {
    let h = Harness::start().await;
    let (broker, _) = h.peer("broker", "b1").await;
    let (conn, _) = h.peer("connector", "c1").await;
    h.ok(
        "POST",
        "/v1/services",
        Some(json!({ "name": "web", "target": "10.0.0.1:80", "connectors": ["c1"] })),
    )
    .await;
    let at_backup = h.ctl.snapshot_version();
    let Harness {
        dir,
        ctl,
        admin_token,
        skew,
        ..
    } = h;
    ctl.shutdown().await;
    let backup = tempfile::tempdir().unwrap();
    copy_data(dir.path(), backup.path());

    // After the backup: more changes, which the peers follow.
    let ctl = start(config(dir.path()), &skew).await.unwrap();
    let ca = ca_der(&ctl.ca_pem());
    let admin = client(&ca, None);
    for u in ["a@example.test", "b@example.test", "c@example.test"] {
        let r = admin
            .post(format!("{}/v1/users", ctl.url()))
            .bearer_auth(&admin_token)
            .json(&json!({ "id": u }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let ahead = ctl.snapshot_version();
    let url = |ctl: &Controller, p: &str| format!("{}{p}", ctl.url());
    ctl.shutdown().await;
    copy_data(backup.path(), dir.path());

    let ctl = start(config(dir.path()), &skew).await.unwrap();
    let restored = ctl.snapshot_version();
    assert!(at_backup < restored, "{at_backup} < {restored}");
    // The changes after the backup are gone. A peer ahead of the store (possible if the clock
    // went back, so that the start could not move the version past theirs) is simulated.
    assert!(ahead > at_backup);
    let ahead = restored + 1_000;
    let b = client(&ca, Some(&broker));
    let t0 = Instant::now();
    let (s, snap) = get_json::<Snapshot>(
        &b,
        url(&ctl, &format!("/v1/snapshot?after={ahead}&wait=10")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let snap = snap.unwrap();
    assert_eq!(snap.version, restored);
    assert!(snap.users.iter().all(|u| u.id != "a@example.test"));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let c = client(&ca, Some(&conn));
    let (s, cfg) = get_json::<ConnectorConfig>(
        &c,
        url(&ctl, &format!("/v1/connector/config?after={ahead}&wait=10")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let cfg = cfg.unwrap();
    assert_eq!((cfg.version, cfg.targets.len()), (restored, 1));
    // A peer that held the version the backup was taken at: the start moved past it.
    let t0 = Instant::now();
    let (s, snap) = get_json::<Snapshot>(
        &b,
        url(&ctl, &format!("/v1/snapshot?after={at_backup}&wait=10")),
    )
    .await;
    assert_eq!(
        (s, snap.map(|s| s.version)),
        (StatusCode::OK, Some(restored))
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The twin: a peer at the store's version waits for a change, as ever.
    let r = b
        .get(url(&ctl, &format!("/v1/snapshot?after={restored}&wait=1")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    ctl.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_state_ca_and_admin_token() {
    let h = Harness::start().await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "alice@example.com" })),
    )
    .await;
    let (dev, _) = h.agent("bob@example.com").await;
    let ca_pem = h.ctl.ca_pem();
    let version = h.ctl.snapshot_version();
    let Harness {
        dir,
        ctl,
        admin_token,
        skew,
        ..
    } = h;
    ctl.shutdown().await;

    let ctl = start(config(dir.path()), &skew).await.unwrap();
    assert_eq!(
        ctl.first_admin_token(),
        None,
        "the admin token is not re-issued"
    );
    assert_eq!(ctl.ca_pem(), ca_pem, "same CA");
    // A start moves the version on (to at least the clock in ms): see the restore test.
    assert!(ctl.snapshot_version() > version);
    let ca = ca_der(&ctl.ca_pem());
    let http = client(&ca, None);
    let users: Value = http
        .get(format!("{}/v1/users", ctl.url()))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users.as_array().unwrap().len(), 2);
    // Certificates issued before the restart still work.
    let resp = client(&ca, Some(&dev))
        .get(format!("{}/v1/brokers", ctl.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The generated KEK file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("ca.kek"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    ctl.shutdown().await;
}

/// Every file in the data directory (database, WAL, shared memory, CA files), raw bytes.
fn data_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The admin token never reaches the disk, only its SHA-256 (hex, as `Ctx::admin_ok` checks
/// it): a copy of the data directory or a backup must not hand out admin access.
#[tokio::test]
async fn admin_token_is_stored_only_as_its_hash() {
    let h = Harness::start().await;
    let token = h.admin_token.clone();
    // The random part alone too, in case it were stored without its prefix.
    let random = token.strip_prefix("umbra-admin-").unwrap().to_owned();
    let hash = hex::encode(umbra_pki::sha256(token.as_bytes()));
    let check = |files: &[(String, Vec<u8>)]| {
        for (name, bytes) in files {
            assert!(!contains(bytes, token.as_bytes()), "admin token in {name}");
            assert!(!contains(bytes, random.as_bytes()), "admin token in {name}");
        }
        // The hash is found, so the scan looks where the token would be.
        assert!(
            files.iter().any(|(_, b)| contains(b, hash.as_bytes())),
            "the token's hash is stored"
        );
    };
    // Twin: the token in hand works.
    assert_eq!(h.ok("GET", "/v1/users", None).await, json!([]));

    // While running, recent writes live in the WAL: it is read too.
    let files = data_files(h.dir.path());
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"umbra.db") && names.contains(&"umbra.db-wal"),
        "{names:?}"
    );
    check(&files);

    // After shutdown the WAL is checkpointed into the database file itself.
    let Harness { dir, ctl, skew, .. } = h;
    ctl.shutdown().await;
    let files = data_files(dir.path());
    check(&files);
    let db = &files.iter().find(|(n, _)| n == "umbra.db").unwrap().1;
    assert!(contains(db, hash.as_bytes()));

    // And the hash alone is enough to let the token in after a restart.
    let ctl = start(config(dir.path()), &skew).await.unwrap();
    let resp = client(&ca_der(&ctl.ca_pem()), None)
        .get(format!("{}/v1/users", ctl.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    ctl.shutdown().await;
}

/// `GET /v1/brokers?have=TAG&wait=S`, the long poll agents and connectors follow: with the
/// tag of the current list it waits, an admin change that leaves the list as it was does not
/// end the wait (no herd of agents at every change), and a revocation ends it at once with the
/// new list. An old or unknown tag is answered at once. A device revoked while waiting gets
/// its refusal, not the list.
#[tokio::test]
async fn broker_list_long_poll() {
    let h = Harness::start().await;
    let (dev, _) = h.agent("alice@example.com").await;
    for (name, port) in [("b1", 4433), ("b2", 4533)] {
        let (id, _) = h.peer("broker", name).await;
        let hb = json!({
            "name": name,
            "quic_addr": format!("127.0.0.1:{port}"),
            "tcp_addr": format!("127.0.0.1:{port}"),
            "server_name": umbra_pki::broker_server_name(&id.peer.id.id),
            "snapshot_version": 0,
            "streams": [],
            "audit": [],
        });
        assert_eq!(heartbeat(&h, &h.as_peer(&id), &hb).await, StatusCode::OK);
    }
    let agent = h.as_peer(&dev);
    let (s, list) = get_json::<BrokerList>(&agent, h.url("/v1/brokers")).await;
    assert_eq!(s, StatusCode::OK);
    let list = list.unwrap();
    assert_eq!(list.brokers.len(), 2);
    assert_eq!(list.tag.len(), 32, "{list:?}");
    let poll = |have: String, wait: u64| {
        let url = h.url(&format!("/v1/brokers?have={have}&wait={wait}"));
        let c = agent.clone();
        async move { get_json::<BrokerList>(&c, url).await }
    };

    // An unknown tag: the list at once, with the same tag as before.
    let (s, again) = poll("0123".into(), 25).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again.unwrap().tag, list.tag);

    // Unchanged list, unrelated change meanwhile: the wait runs out (204).
    let waiting = tokio::spawn(poll(list.tag.clone(), 2));
    polls_waiting(&h, 1).await;
    let v = h.ctl.snapshot_version();
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "bob@example.com" })),
    )
    .await;
    assert!(h.ctl.snapshot_version() > v);
    let (s, body) = waiting.await.unwrap();
    assert_eq!(
        s,
        StatusCode::NO_CONTENT,
        "woken by an unrelated change: {body:?}"
    );

    // A revocation during the wait answers it with the new list (the deadline would be 204).
    let waiting = tokio::spawn(poll(list.tag.clone(), 25));
    polls_waiting(&h, 1).await;
    h.ok("POST", "/v1/brokers/b2/revoke", None).await;
    let (s, new) = waiting.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let new = new.unwrap();
    let names: Vec<&str> = new.brokers.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["b1"]);
    assert_ne!(new.tag, list.tag);

    // The device is revoked while it waits: the answer is its refusal.
    let waiting = tokio::spawn(poll(new.tag.clone(), 25));
    polls_waiting(&h, 1).await;
    h.ok(
        "POST",
        &format!("/v1/devices/{}/revoke", dev.peer.id.id),
        None,
    )
    .await;
    let (s, _) = waiting.await.unwrap();
    assert_eq!(s, StatusCode::FORBIDDEN);
    h.ctl.shutdown().await;
}

/// One identity may have at most 16 long polls waiting at once (each holds a task and a
/// connection on the controller); the 17th is answered 429 at once. Another identity is not
/// held back, and the places come back when the polls end.
#[tokio::test]
async fn long_polls_per_identity_are_bounded() {
    let h = Harness::start().await;
    let (alice, _) = h.agent("alice@example.com").await;
    let (bob, _) = h.agent("bob@example.com").await;
    let tag = |c: reqwest::Client| {
        let url = h.url("/v1/brokers");
        async move { get_json::<BrokerList>(&c, url).await.1.unwrap().tag }
    };
    let have = tag(h.as_peer(&alice)).await;
    let poll = |c: reqwest::Client, wait: u64| {
        let url = h.url(&format!("/v1/brokers?have={have}&wait={wait}"));
        async move { c.get(url).send().await.unwrap().status() }
    };
    // Each on a client of its own, as a misbehaving peer would open them.
    let waiting: Vec<_> = (0..16)
        .map(|_| tokio::spawn(poll(h.as_peer(&alice), 6)))
        .collect();
    // Once all 16 wait, the next is refused at once. (A probe that finds a place free, while
    // the 16 are still arriving, is answered at once too, and gives its place back.)
    let t0 = std::time::Instant::now();
    loop {
        match poll(h.as_peer(&alice), 0).await {
            StatusCode::TOO_MANY_REQUESTS => break,
            s => assert_eq!(s, StatusCode::NO_CONTENT),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the 17th poll was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without `have` nothing waits, so nothing is counted.
    assert_eq!(tag(h.as_peer(&alice)).await, have);
    assert_eq!(poll(h.as_peer(&bob), 1).await, StatusCode::NO_CONTENT);
    for w in waiting {
        assert_eq!(w.await.unwrap(), StatusCode::NO_CONTENT);
    }
    assert_eq!(poll(h.as_peer(&alice), 1).await, StatusCode::NO_CONTENT);
    h.ctl.shutdown().await;
}

/// A TLS connection to the controller speaking HTTP/1.1, with or without a client certificate.
async fn tls_conn(
    h: &Harness,
    id: Option<&TlsIdentity>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = umbra_pki::client_config(&h.ca, id, &[b"http/1.1"], false).unwrap();
    let tcp = tokio::net::TcpStream::connect(h.ctl.local_addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The head of the next response on `io` (status line and headers), read byte by byte so
/// that nothing after it is consumed; "" if none arrives within 5 s or the connection ends.
async fn response_head<T: tokio::io::AsyncRead + Unpin>(io: &mut T) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            match io.read(&mut b).await {
                Ok(1) => got.push(b[0]),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// Everything the controller sends on `io` until it closes it (at most 10 s): the rest of a
/// response to a request sent with `connection: close`.
async fn rest_of<T: tokio::io::AsyncRead + Unpin>(io: &mut T) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// Starts `POST path` on a connection of its own: sends the headers, with
/// `Expect: 100-continue` and the length of `body`, and no body. The controller answers
/// `100 Continue` when the handler starts to read the body, that is once every check made on
/// the headers alone has passed; the head it answered with is returned with the connection.
async fn post_headers_only(
    h: &Harness,
    id: Option<&TlsIdentity>,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    String,
) {
    headers_only(h, id, "POST", path, bearer, body).await
}

/// [`post_headers_only`] for any method.
async fn headers_only(
    h: &Harness,
    id: Option<&TlsIdentity>,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    String,
) {
    use tokio::io::AsyncWriteExt;
    let mut io = tls_conn(h, id).await;
    let auth = bearer.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: controller\r\n{auth}content-type: application/json\r\n\
         expect: 100-continue\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    io.write_all(head.as_bytes()).await.unwrap();
    let answered = response_head(&mut io).await;
    (io, answered)
}

/// Sends `body` on a request started by [`post_headers_only`]; the whole response.
async fn send_body(
    mut io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    body: &str,
) -> String {
    use tokio::io::AsyncWriteExt;
    io.write_all(body.as_bytes()).await.unwrap();
    rest_of(&mut io).await
}

/// A body that stalls is answered (and let go) after the body deadline, not held for as
/// long as the peer's connection lives; a body over a device route's limit is refused at
/// once. The twin: a whole body on the same kind of connection is served.
#[tokio::test]
async fn stalled_or_oversized_bodies_are_not_held() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start().await;
    let (dev, _) = h.agent("alice@example.com").await;
    let key = umbra_pki::generate_key_pem().unwrap();
    let csr = umbra_pki::make_csr(&key).unwrap();
    let body = json!({ "csr_pem": csr }).to_string();
    let head = format!(
        "POST /v1/renew HTTP/1.1\r\nhost: controller\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // Sends the headers and `parts` of the body, `gap` apart; the status line answered.
    let send = |parts: Vec<String>, gap: Duration| {
        let (h, dev, head) = (&h, &dev, head.clone());
        async move {
            let mut io = tls_conn(h, Some(dev)).await;
            io.write_all(head.as_bytes()).await.unwrap();
            let t0 = Instant::now();
            for p in parts {
                tokio::time::sleep(gap).await;
                io.write_all(p.as_bytes()).await.unwrap();
            }
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                use tokio::io::AsyncReadExt;
                let _ = io.read_to_end(&mut got).await;
            })
            .await;
            let text = String::from_utf8_lossy(&got).into_owned();
            (text.lines().next().unwrap_or("").to_owned(), t0.elapsed())
        }
    };
    // Half of it, then nothing: answered 408 at the deadline (10 s), not held.
    let (status, took) = send(vec![body[..body.len() / 2].to_owned()], Duration::ZERO).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "answered after {took:?}"
    );
    // The twin: the same body trickled in over 3 s is served.
    let thirds: Vec<String> = body
        .as_bytes()
        .chunks(body.len() / 3 + 1)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let (status, _) = send(thirds, Duration::from_secs(1)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    let c = h.as_peer(&dev);
    let big = "A".repeat(100 << 10);
    let resp = h.renew(&c, json!({ "csr_pem": big })).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let resp = h.renew(&c, json!({ "csr_pem": csr })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    h.ctl.shutdown().await;
}

/// Whether the server has closed `io` within `within` (EOF or reset); `false` if it is still
/// open then.
async fn closed_by_server<T: tokio::io::AsyncRead + Unpin>(io: &mut T, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let read_to_end = async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}

/// The API is public, so what unauthenticated connections may hold is bounded: handshakes in
/// progress (a flood of stalled ones only evicts the oldest, and the admin is served
/// meanwhile), and connections without a client certificate (at most so many, each for at
/// most `anonymous_connection_secs`), and connections per enrolled identity. The twins: an
/// enrolled peer's connection outlives `anonymous_connection_secs`, and another identity is
/// not held back by one at its limit.
#[tokio::test]
async fn stalled_and_idle_connections_cannot_keep_clients_out() {
    let h = Harness::start_cfg(|c| {
        c.max_pending_handshakes = 4;
        c.max_anonymous_connections = 4;
        c.anonymous_connection_secs = 2;
        c.max_connections_per_peer = 2;
    })
    .await;
    let (alice, _) = h.agent("alice@example.com").await;
    let (bob, _) = h.agent("bob@example.com").await;

    // Ten connections that never send a ClientHello.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(
            tokio::net::TcpStream::connect(h.ctl.local_addr())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let users = h.ok("GET", "/v1/users", None).await;
    assert_eq!(users.as_array().unwrap().len(), 2);
    let mut closed = 0;
    for c in &mut stalled {
        if closed_by_server(c, Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    // At most four handshakes are held: the six oldest were closed, and the admin's own
    // handshake evicted one more.
    assert!(
        (6..=10).contains(&closed),
        "{closed} of 10 stalled handshakes closed"
    );
    drop(stalled);

    // Six connections without a client certificate: the two oldest are closed at once.
    let mut anonymous = Vec::new();
    for _ in 0..6 {
        anonymous.push(tls_conn(&h, None).await);
    }
    let mut peer = tls_conn(&h, Some(&alice)).await;
    for (i, c) in anonymous.iter_mut().enumerate().take(2) {
        assert!(
            closed_by_server(c, Duration::from_secs(1)).await,
            "anonymous connection {i} was not evicted"
        );
    }
    // The other four are closed once they are 2 s old; the enrolled peer's is not.
    for (i, c) in anonymous.iter_mut().enumerate().skip(2) {
        assert!(
            closed_by_server(c, Duration::from_secs(10)).await,
            "anonymous connection {i} outlived anonymous_connection_secs"
        );
    }
    assert!(
        !closed_by_server(&mut peer, Duration::from_secs(1)).await,
        "the enrolled peer's connection was closed"
    );
    // An identity holds at most two connections: alice's third is closed at once, while her
    // second and bob's first stay.
    let mut second = tls_conn(&h, Some(&alice)).await;
    let mut third = tls_conn(&h, Some(&alice)).await;
    let mut bobs = tls_conn(&h, Some(&bob)).await;
    assert!(
        closed_by_server(&mut third, Duration::from_secs(2)).await,
        "a third connection of one identity was kept"
    );
    for (who, c) in [
        ("alice's second", &mut second),
        ("bob's", &mut bobs),
        ("alice's first", &mut peer),
    ] {
        assert!(
            !closed_by_server(c, Duration::from_millis(500)).await,
            "{who} connection was closed"
        );
    }
    // And the admin is still served, on a connection of its own.
    let users = h.ok("GET", "/v1/users", None).await;
    assert_eq!(users.as_array().unwrap().len(), 2);
    h.ctl.shutdown().await;
}

/// `GET /v1/users` with `token`: its status.
async fn users_with(http: &reqwest::Client, base: &str, token: &str) -> StatusCode {
    http.get(format!("{base}/v1/users"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

/// `POST /v1/admin-token/rotate` replaces every admin token, the caller's included; the old
/// one stops working as it commits, the new one works, also after a restart. Refused
/// rotations (no token, a wrong one, the replaced one) change nothing.
#[tokio::test]
async fn admin_token_rotation() {
    let h = Harness::start().await;
    let base = h.ctl.url();
    let old = h.admin_token.clone();
    let rotate = |token: Option<&str>| {
        let mut req = h.http.post(h.url("/v1/admin-token/rotate"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };

    // Refused: no token, a wrong token. The current one still works after each.
    assert_eq!(
        rotate(None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let wrong = rotate(Some("umbra-admin-wrong")).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(users_with(&h.http, &base, &old).await, StatusCode::OK);

    let resp = rotate(Some(&old)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let first: AdminTokenCreated = resp.json().await.unwrap();
    assert!(first.token.starts_with("umbra-admin-"), "{first:?}");
    assert_ne!(first.token, old);
    assert_eq!(first.replaced, 1);
    assert_eq!(
        users_with(&h.http, &base, &old).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        users_with(&h.http, &base, &first.token).await,
        StatusCode::OK
    );
    // The replaced token cannot rotate either.
    assert_eq!(
        rotate(Some(&old)).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        users_with(&h.http, &base, &first.token).await,
        StatusCode::OK
    );

    // Again: the token just issued is replaced in turn.
    let second: AdminTokenCreated = rotate(Some(&first.token))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second.replaced, 1);
    assert_eq!(
        users_with(&h.http, &base, &first.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        users_with(&h.http, &base, &second.token).await,
        StatusCode::OK
    );

    // Audited, with no token in the trail.
    let audit = h
        .http
        .get(h.url("/v1/audit?limit=1000"))
        .bearer_auth(&second.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let entries: Vec<AuditEntry> = serde_json::from_str(&audit).unwrap();
    let rotations: Vec<&AuditRecord> = entries
        .iter()
        .map(|e| &e.record)
        .filter(|r| r.action == "admin_token.rotate")
        .collect();
    let ok: Vec<&str> = rotations
        .iter()
        .filter(|r| r.result == "ok")
        .map(|r| r.target.as_str())
        .collect();
    assert_eq!(ok, [first.id.as_str(), second.id.as_str()], "{audit}");
    for t in [&old, &first.token, &second.token] {
        assert!(
            !audit.contains(t.as_str()),
            "an admin token in the audit trail"
        );
    }

    // Persisted: after a restart the last token works and the others do not.
    let Harness { dir, ctl, skew, .. } = h;
    ctl.shutdown().await;
    let ctl = start(config(dir.path()), &skew).await.unwrap();
    assert_eq!(ctl.first_admin_token(), None);
    let http = client(&ca_der(&ctl.ca_pem()), None);
    assert_eq!(
        users_with(&http, &ctl.url(), &second.token).await,
        StatusCode::OK
    );
    for t in [&old, &first.token] {
        assert_eq!(
            users_with(&http, &ctl.url(), t).await,
            StatusCode::UNAUTHORIZED
        );
    }
    ctl.shutdown().await;
}

/// An admin write is made only if the token that authorised it is still current when the
/// write commits, not only when the request's headers arrived: a request whose token is
/// rotated while its body is on the way (a body may take up to 10 s) changes nothing and is
/// answered 401, so a leaked token stops working for requests already under way too. The
/// twin: the same request with the new token is served.
#[tokio::test]
async fn a_token_rotated_while_a_body_is_on_the_way_writes_nothing() {
    let h = Harness::start().await;
    let body = json!({ "role": "broker", "name": "b1" }).to_string();
    let path = "/v1/enrollment-tokens";
    let (pending, answered) = post_headers_only(&h, None, path, Some(&h.admin_token), &body).await;
    assert!(answered.starts_with("HTTP/1.1 100"), "{answered}");

    // Rotated meanwhile, with the same token, on another connection.
    let resp = h
        .http
        .post(h.url("/v1/admin-token/rotate"))
        .bearer_auth(&h.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let new: AdminTokenCreated = resp.json().await.unwrap();

    let answer = send_body(pending, &body).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(!answer.contains("umbra-enroll"), "{answer}");
    let tokens = |token: String| {
        let h = &h;
        async move {
            let resp = h
                .http
                .get(h.url(path))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Vec<Value>>().await.unwrap()
        }
    };
    assert_eq!(tokens(new.token.clone()).await, Vec::<Value>::new());

    // The twin: the same request, its token current throughout, is served.
    let (pending, answered) = post_headers_only(&h, None, path, Some(&new.token), &body).await;
    assert!(answered.starts_with("HTTP/1.1 100"), "{answered}");
    let answer = send_body(pending, &body).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(tokens(new.token.clone()).await.len(), 1);

    // The refused write is audited as a refusal.
    let audit = h
        .audit_page_with(
            "/v1/audit?limit=1000&action=enroll_token.create",
            &new.token,
        )
        .await;
    let results: Vec<(&str, Option<u64>)> = audit
        .iter()
        .map(|e| (e.record.result.as_str(), e.record.detail["status"].as_u64()))
        .collect();
    assert_eq!(results, [("error", Some(401)), ("ok", None)], "{audit:?}");
    h.ctl.shutdown().await;
}

/// Every admin request with a body checks its token again once the body is in, in the
/// transaction that would write: rotated meanwhile, it is answered 401 and changes nothing.
/// Route by route, since each handler opens its transaction itself; the state (every listing)
/// is the same before and after each refused request. The twin of each is the request with
/// the new token, served.
#[tokio::test]
async fn every_admin_body_is_checked_against_the_token_current_when_it_arrives() {
    let h = Harness::start().await;
    let mut token = h.admin_token.clone();
    let call = |method: &'static str, path: &'static str, token: String| {
        let h = &h;
        async move {
            let resp = h
                .http
                .request(method.parse().unwrap(), h.url(path))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let state = |token: String| async move {
        let mut all = Vec::new();
        for path in [
            "/v1/users",
            "/v1/groups",
            "/v1/services",
            "/v1/policies",
            "/v1/enrollment-tokens",
        ] {
            let (s, v) = call("GET", path, token.clone()).await;
            assert_eq!(s, StatusCode::OK, "{path}");
            all.push(v);
        }
        all
    };
    // What the requests below act on.
    for (path, body) in [
        ("/v1/users", json!({ "id": "alice@example.com" })),
        ("/v1/groups", json!({ "name": "eng" })),
        (
            "/v1/enrollment-tokens",
            json!({ "role": "connector", "name": "c1" }),
        ),
        (
            "/v1/services",
            json!({ "name": "web", "target": "10.0.0.5:80", "connectors": ["c1"] }),
        ),
        (
            "/v1/policies",
            json!({ "name": "p1", "text": "permit (principal, action, resource == Umbra::Service::\"web\");" }),
        ),
    ] {
        let resp = h
            .http
            .post(h.url(path))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }
    let text = "forbid (principal, action, resource == Umbra::Service::\"web\");";
    let cases: Vec<(&str, &str, Value)> = vec![
        ("POST", "/v1/users", json!({ "id": "eve@example.com" })),
        (
            "PATCH",
            "/v1/users/alice@example.com",
            json!({ "disabled": true }),
        ),
        ("POST", "/v1/groups", json!({ "name": "ops" })),
        (
            "POST",
            "/v1/groups/eng/members",
            json!({ "user": "alice@example.com" }),
        ),
        (
            "POST",
            "/v1/services",
            json!({ "name": "db", "target": "10.0.0.6:5432", "connectors": ["c1"] }),
        ),
        (
            "PATCH",
            "/v1/services/web",
            json!({ "target": "10.0.0.7:80" }),
        ),
        (
            "POST",
            "/v1/policies",
            json!({ "name": "p2", "text": text }),
        ),
        ("PUT", "/v1/policies/p1", json!({ "text": text })),
        ("POST", "/v1/policies/p1/check", json!({ "text": text })),
        (
            "POST",
            "/v1/enrollment-tokens",
            json!({ "role": "broker", "name": "b9" }),
        ),
    ];
    for (method, path, body) in cases {
        let body = body.to_string();
        let before = state(token.clone()).await;
        let (pending, answered) = headers_only(&h, None, method, path, Some(&token), &body).await;
        assert!(
            answered.starts_with("HTTP/1.1 100"),
            "{method} {path}: {answered}"
        );
        let (s, v) = call("POST", "/v1/admin-token/rotate", token.clone()).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let new = v["token"].as_str().unwrap().to_owned();
        let answer = send_body(pending, &body).await;
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{method} {path}: {answer}"
        );
        assert_eq!(
            state(new.clone()).await,
            before,
            "{method} {path} changed something"
        );
        // The twin: with the token current throughout, the same request is served.
        let (pending, answered) = headers_only(&h, None, method, path, Some(&new), &body).await;
        assert!(
            answered.starts_with("HTTP/1.1 100"),
            "{method} {path}: {answered}"
        );
        let answer = send_body(pending, &body).await;
        assert!(
            answer.starts_with("HTTP/1.1 2"),
            "{method} {path} with the new token: {answer}"
        );
        token = new;
    }
    h.ctl.shutdown().await;
}

/// `reset_admin_token` (`umbra controller --reset-admin-token`) replaces a lost or leaked
/// token from the host, with no admin token at all, and a running controller honours it at
/// once. It refuses a data directory that holds no controller, and creates nothing there.
#[tokio::test]
async fn admin_token_reset_from_the_host() {
    let h = Harness::start().await;
    let base = h.ctl.url();
    let cfg = config(h.dir.path());
    let t = umbra_controller::reset_admin_token(&cfg, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(t.replaced, 1);
    assert_eq!(
        users_with(&h.http, &base, &h.admin_token).await,
        StatusCode::UNAUTHORIZED,
        "the running controller still takes the old token"
    );
    assert_eq!(users_with(&h.http, &base, &t.token).await, StatusCode::OK);
    let audit = h.audit_page_with("/v1/audit?limit=1000", &t.token).await;
    assert!(
        audit
            .iter()
            .any(|e| e.record.action == "admin_token.reset" && e.record.target == t.id),
        "no admin_token.reset audit record"
    );
    h.ctl.shutdown().await;

    let empty = tempfile::tempdir().unwrap();
    let err = umbra_controller::reset_admin_token(&config(empty.path()), SystemTime::now())
        .await
        .unwrap_err();
    assert!(matches!(err, ControllerError::NotSetUp(_)), "{err:?}");
    assert!(
        err.to_string().contains("has a controller ever started"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(empty.path()).unwrap().count(),
        0,
        "a refused reset created files"
    );
}

/// Refusals of unauthenticated requests are audited with their source address, within a
/// budget per source: a flood of wrong admin tokens and bad enrollment tokens from one
/// address writes a bounded number of records (each still gets its 401), the admin
/// holding the real token is served throughout, and the source's next record, once its budget
/// has refilled, counts the refusals that were not written.
#[tokio::test]
async fn refusals_are_audited_with_their_source_within_a_budget() {
    let h = Harness::start().await;
    const FLOOD: usize = 60;
    for i in 0..FLOOD {
        let resp = h
            .http
            .get(h.url("/v1/users"))
            .bearer_auth(format!("umbra-admin-guess-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let bad = h.redeem(&format!("not-a-token-{i}"), "junk").await;
        assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
        if i % 10 == 0 {
            // Twin: the real token is never held back.
            assert_eq!(h.ok("GET", "/v1/users", None).await, json!([]));
        }
    }
    let refusals = |records: &[AuditRecord]| -> Vec<AuditRecord> {
        records
            .iter()
            .filter(|r| r.result == "error" && (r.action == "admin.auth" || r.action == "enroll"))
            .cloned()
            .collect()
    };
    let all: Vec<AuditEntry> =
        serde_json::from_value(h.ok("GET", "/v1/audit?limit=1000", None).await).unwrap();
    let written = refusals(&all.iter().map(|e| e.record.clone()).collect::<Vec<_>>());
    assert!(
        !written.is_empty() && written.len() <= 20,
        "{} refusal records for {} refusals from one address",
        written.len(),
        2 * FLOOD
    );
    for r in &written {
        assert_eq!(r.detail["source"], "127.0.0.1", "{r:?}");
    }
    let skipped_before: u64 = written
        .iter()
        .filter_map(|r| r.detail["skipped"].as_u64())
        .sum();

    // Once the source's budget has refilled (one record per 2 s), the next refusal is
    // written, with the count of those that were not.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = h
        .http
        .get(h.url("/v1/users"))
        .bearer_auth("umbra-admin-guess-last")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let all: Vec<AuditEntry> =
        serde_json::from_value(h.ok("GET", "/v1/audit?limit=1000", None).await).unwrap();
    let now = refusals(&all.iter().map(|e| e.record.clone()).collect::<Vec<_>>());
    assert_eq!(now.len(), written.len() + 1);
    let last = now.last().unwrap();
    let skipped = last.detail["skipped"].as_u64().unwrap_or(0) + skipped_before;
    assert_eq!(
        written.len() as u64 + skipped,
        2 * FLOOD as u64,
        "every refusal is either a record or counted in one: {last:?}"
    );
    h.ctl.shutdown().await;
}

/// A first start that fails after the database was set up (here: the listen port is taken)
/// leaves no admin token behind that nobody was shown: the next start creates the first
/// token, shows it, and it works.
#[tokio::test]
async fn a_failed_first_start_leaves_no_unseen_admin_token() {
    umbra_pki::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let skew = Arc::new(AtomicU64::new(0));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(dir.path());
    cfg.listen = taken.local_addr().unwrap();
    let err = start(cfg.clone(), &skew).await.unwrap_err();
    assert!(matches!(err, ControllerError::Bind { .. }), "{err:?}");

    drop(taken);
    let ctl = start(cfg, &skew).await.unwrap();
    let token = ctl
        .first_admin_token()
        .expect("the first start that succeeds shows the first admin token");
    assert!(ctl.admin_token_works(&token).await.unwrap());
    let http = client(&ca_der(&ctl.ca_pem()), None);
    assert_eq!(users_with(&http, &ctl.url(), &token).await, StatusCode::OK);
    ctl.shutdown().await;
}

#[tokio::test]
async fn wrong_ca_key_fails_start_clearly() {
    umbra_pki::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let skew = Arc::new(AtomicU64::new(0));
    let mut cfg = config(dir.path());
    cfg.ca_key = Some("11".repeat(32));
    let ctl = start(cfg.clone(), &skew).await.unwrap();
    let ca_pem = ctl.ca_pem();
    ctl.shutdown().await;
    assert!(
        !dir.path().join("ca.kek").exists(),
        "a configured key is not written to disk"
    );

    cfg.ca_key = Some("22".repeat(32));
    let err = start(cfg.clone(), &skew).await.unwrap_err();
    assert!(matches!(err, ControllerError::CaUnseal { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("cannot unseal") && msg.contains("ca_key"),
        "{msg}"
    );
    assert!(!msg.contains(&"22".repeat(32)));

    // No key at all for a sealed CA: a clear error too.
    cfg.ca_key = None;
    let err = start(cfg.clone(), &skew).await.unwrap_err();
    assert!(err.to_string().contains("no key was given"), "{err}");

    // The right key still works (same key as base64).
    cfg.ca_key = Some("ERERERERERERERERERERERERERERERERERERERERERE=".into());
    let ctl = start(cfg, &skew).await.unwrap();
    assert_eq!(ctl.ca_pem(), ca_pem);
    ctl.shutdown().await;
}

#[tokio::test]
async fn audit_records_without_secrets() {
    let h = Harness::start().await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "alice@example.com" })),
    )
    .await;
    let t = h.token("agent", Some("alice@example.com"), None).await;
    let (dev, _) = h.enroll(&t.token).await;
    let _ = h.redeem(&t.token, "junk").await; // refused reuse
    let _ = h
        .admin("POST", "/v1/groups", Some(json!({ "name": "Bad" })))
        .await; // refused write
    let _ = h
        .http
        .get(h.url("/v1/users"))
        .bearer_auth("umbra-admin-guess")
        .send()
        .await;
    h.ok(
        "POST",
        &format!("/v1/devices/{}/revoke", dev.peer.id.id),
        None,
    )
    .await;

    let raw = h.ok("GET", "/v1/audit", None).await;
    let entries: Vec<AuditEntry> = serde_json::from_value(raw.clone()).unwrap();
    let has = |action: &str, result: &str| {
        entries
            .iter()
            .any(|e| e.record.action == action && e.record.result == result)
    };
    assert!(has("user.create", "ok"));
    assert!(has("enroll_token.create", "ok"));
    assert!(has("enroll", "ok"));
    assert!(has("enroll", "error"));
    assert!(has("group.create", "error"));
    assert!(has("admin.auth", "error"));
    assert!(has("revoke", "ok"));
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));

    let text = raw.to_string();
    let secret = t.token.rsplit('.').next().unwrap();
    assert!(!text.contains(secret), "enrollment secret in audit");
    assert!(!text.contains(&h.admin_token), "admin token in audit");
    assert!(
        !text.contains("umbra-admin-guess"),
        "presented token in audit"
    );

    // Paging.
    let first = entries[0].seq;
    let page: Vec<AuditEntry> = serde_json::from_value(
        h.ok("GET", &format!("/v1/audit?after={first}&limit=2"), None)
            .await,
    )
    .unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0].seq, entries[1].seq);
    h.ctl.shutdown().await;
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let h = Harness::start().await;
    let doc: Value = h
        .http
        .get(h.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in [
        ("get", "/healthz"),
        ("get", "/v1/ca.pem"),
        ("post", "/v1/enroll"),
        ("get", "/v1/openapi.json"),
        ("post", "/v1/renew"),
        ("get", "/v1/brokers"),
        ("get", "/v1/snapshot"),
        ("post", "/v1/broker/heartbeat"),
        ("get", "/v1/connector/config"),
        ("get", "/v1/users"),
        ("post", "/v1/users"),
        ("delete", "/v1/users/{id}"),
        ("patch", "/v1/users/{id}"),
        ("get", "/v1/groups"),
        ("post", "/v1/groups"),
        ("delete", "/v1/groups/{name}"),
        ("post", "/v1/groups/{name}/members"),
        ("delete", "/v1/groups/{name}/members/{user}"),
        ("get", "/v1/services"),
        ("post", "/v1/services"),
        ("delete", "/v1/services/{name}"),
        ("patch", "/v1/services/{name}"),
        ("get", "/v1/policies"),
        ("post", "/v1/policies"),
        ("delete", "/v1/policies/{name}"),
        ("put", "/v1/policies/{name}"),
        ("post", "/v1/policies/{name}/check"),
        ("get", "/v1/enrollment-tokens"),
        ("post", "/v1/enrollment-tokens"),
        ("delete", "/v1/enrollment-tokens/{id}"),
        ("post", "/v1/admin-token/rotate"),
        ("get", "/v1/devices"),
        ("post", "/v1/devices/{id}/revoke"),
        ("get", "/v1/connectors"),
        ("post", "/v1/connectors/{id}/revoke"),
        ("get", "/v1/brokers/all"),
        ("post", "/v1/brokers/{id}/revoke"),
        ("get", "/v1/streams"),
        ("get", "/v1/rollout"),
        ("get", "/v1/audit"),
        ("get", "/v1/access"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path}"
        );
        // ... and the route really exists (not 404 "no such route").
        let url = h.url(
            &path
                .replace("{id}", "x")
                .replace("{name}", "x")
                .replace("{user}", "x@y.z"),
        );
        let resp = h
            .http
            .request(method.to_uppercase().parse().unwrap(), url)
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::NOT_FOUND {
            let e: ApiError = resp.json().await.unwrap();
            assert_ne!(e.error, "no such route", "{method} {path}");
        }
    }
    assert_eq!(paths.len(), 33);
    // Query parameters have the types the routes read.
    let audit = doc["paths"]["/v1/audit"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let ty = |name: &str| {
        audit
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["schema"]["type"].clone())
    };
    assert_eq!(ty("limit"), Some(json!("integer")));
    assert_eq!(ty("actor"), Some(json!("string")));
    assert_eq!(ty("result"), Some(json!("string")));
    h.ctl.shutdown().await;
}

/// The heartbeat's large body limit (16 MiB) is for brokers only: any other connection,
/// a revoked broker's too (its certificate still valid), is refused on its headers, before
/// the controller reads or holds its body. The twin: a
/// broker's request is read (nothing is answered before its body is complete).
#[tokio::test]
async fn only_brokers_get_a_heartbeat_body_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let (agent, _) = h.agent("alice@example.com").await;
    let (broker, _) = h.peer("broker", "b1").await;
    let (revoked, _) = h.peer("broker", "b2").await;
    h.ok(
        "POST",
        &format!("/v1/brokers/{}/revoke", revoked.peer.id.id),
        None,
    )
    .await;
    let head = "POST /v1/broker/heartbeat HTTP/1.1\r\nhost: controller\r\n\
                content-type: application/json\r\ncontent-length: 16000000\r\n\r\n{";
    let answer_within = |id: Option<TlsIdentity>| {
        let h = &h;
        async move {
            let mut c = tls_conn(h, id.as_ref()).await;
            c.write_all(head.as_bytes()).await.unwrap();
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(1500), c.read(&mut buf)).await {
                Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Ok(Err(e)) => Some(format!("error: {e}")),
                Err(_) => None,
            }
        }
    };
    for (who, id, status) in [
        ("no certificate", None, "401"),
        ("an agent", Some(agent), "403"),
        ("a revoked broker", Some(revoked), "403"),
    ] {
        let got = answer_within(id).await;
        assert!(
            got.as_deref()
                .is_some_and(|s| s.starts_with(&format!("HTTP/1.1 {status}"))),
            "{who}: {got:?}"
        );
    }
    assert_eq!(
        answer_within(Some(broker)).await,
        None,
        "a broker's body is read"
    );
    h.ctl.shutdown().await;
}

/// A broker identity may have at most two heartbeats in flight (a broker sends one at a
/// time, and each may carry up to 16 MiB): one more is answered 429 on its headers, before
/// any of its body is read. The twins: another broker is not held back, and once the held
/// heartbeats end the broker is served again.
#[tokio::test]
async fn heartbeats_in_flight_per_broker_are_bounded() {
    let h = Harness::start().await;
    let (b1, _) = h.peer("broker", "b1").await;
    let (b2, _) = h.peer("broker", "b2").await;
    let hb = |id: &TlsIdentity, name: &str| {
        json!({
            "name": name,
            "quic_addr": "127.0.0.1:4433",
            "tcp_addr": "127.0.0.1:4443",
            "server_name": umbra_pki::broker_server_name(&id.peer.id.id),
            "snapshot_version": 0,
            "audit": []
        })
    };
    let body = hb(&b1, "b1").to_string();
    let path = "/v1/broker/heartbeat";
    // Two heartbeats whose bodies are on the way (each on a connection of its own).
    let mut held = Vec::new();
    for _ in 0..2 {
        let (io, answered) = post_headers_only(&h, Some(&b1), path, None, &body).await;
        assert!(answered.starts_with("HTTP/1.1 100"), "{answered}");
        held.push(io);
    }
    // A third is refused on its headers: no 100 Continue, and an error in JSON.
    for _ in 0..2 {
        let (mut io, answered) = post_headers_only(&h, Some(&b1), path, None, &body).await;
        assert!(answered.starts_with("HTTP/1.1 429"), "{answered}");
        let rest = rest_of(&mut io).await;
        let err: ApiError = serde_json::from_str(rest.trim_start_matches(|c| c != '{'))
            .unwrap_or_else(|e| panic!("{e}: {rest}"));
        assert!(err.error.contains("heartbeats"), "{err:?}");
    }
    // Another broker is served meanwhile.
    assert_eq!(
        heartbeat(&h, &h.as_peer(&b2), &hb(&b2, "b2")).await,
        StatusCode::OK
    );
    // The held ones are served once their bodies arrive, and then the broker again.
    for io in held {
        let answer = send_body(io, &body).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(
        heartbeat(&h, &h.as_peer(&b1), &hb(&b1, "b1")).await,
        StatusCode::OK
    );
    h.ctl.shutdown().await;
}

/// A broker or connector revoked while its long poll waits is answered with the refusal,
/// not with the snapshot or targets its own revocation published. The twin: the poll of one
/// not revoked is answered with the new snapshot.
#[tokio::test]
async fn a_peer_revoked_while_waiting_gets_nothing() {
    let h = Harness::start().await;
    let (b1, _) = h.peer("broker", "b1").await;
    let (b2, _) = h.peer("broker", "b2").await;
    let (c1, _) = h.peer("connector", "c1").await;
    let v = h.ctl.snapshot_version();
    let wait = |id: &TlsIdentity, path: String| {
        let c = h.as_peer(id);
        let url = h.url(&path);
        tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
    };
    let b1_poll = wait(&b1, format!("/v1/snapshot?after={v}&wait=10"));
    let b2_poll = wait(&b2, format!("/v1/snapshot?after={v}&wait=10"));
    polls_waiting(&h, 2).await;
    h.ok(
        "POST",
        &format!("/v1/brokers/{}/revoke", b1.peer.id.id),
        None,
    )
    .await;
    assert_eq!(b1_poll.await.unwrap(), StatusCode::FORBIDDEN);
    assert_eq!(b2_poll.await.unwrap(), StatusCode::OK);
    let v = h.ctl.snapshot_version();
    let c1_poll = wait(&c1, format!("/v1/connector/config?after={v}&wait=10"));
    polls_waiting(&h, 1).await;
    h.ok(
        "POST",
        &format!("/v1/connectors/{}/revoke", c1.peer.id.id),
        None,
    )
    .await;
    assert_eq!(c1_poll.await.unwrap(), StatusCode::FORBIDDEN);
    h.ctl.shutdown().await;
}

/// A broker reports records of its own decisions; it cannot write records that read as the
/// administrator's or the controller's, nor unbounded ones, nor list live streams of other
/// users or of devices never enrolled. Those are left out, and that it tried is recorded by
/// the controller. Every record says who wrote it. The twins: the broker's legitimate record
/// and stream in the same heartbeat are stored.
#[tokio::test]
async fn a_broker_cannot_write_others_audit_records() {
    let h = Harness::start().await;
    let (broker, _) = h.peer("broker", "b1").await;
    let (dev, _) = h.agent("alice@example.com").await;
    let b = h.as_peer(&broker);
    let record = |actor: &str, action: &str, target: &str| {
        json!({ "at_ms": 1, "actor": actor, "action": action, "target": target,
                "result": "allow", "detail": {} })
    };
    let stream = |id: u64, user: &str, device: &str, service: &str| {
        json!({ "id": id, "broker": "b1", "user": user, "device": device, "service": service,
                "connector": "c-1", "transport": "quic", "started_at": 1, "bytes_up": 0,
                "bytes_down": 0 })
    };
    let alice_dev = dev.peer.id.id.as_str();
    let hb = json!({
        "name": "b1",
        "server_name": umbra_pki::broker_server_name(&broker.peer.id.id),
        "snapshot_version": h.ctl.snapshot_version(),
        "audit": [
            record("admin", "user.delete", "alice@example.com"),
            record(&dev.peer.id.to_uri(), "stream.open", &"x".repeat(10_000)),
            record(&dev.peer.id.to_uri(), "stream.open", "web"),
        ],
        // Live streams: alice's own, one said to be bob's on alice's device, one of a device
        // that was never enrolled, one with an oversized field.
        "streams": [
            stream(1, "alice@example.com", alice_dev, "web"),
            stream(2, "bob@example.com", alice_dev, "web"),
            stream(3, "alice@example.com", "d-0000000000000000", "web"),
            stream(4, "alice@example.com", alice_dev, &"x".repeat(10_000)),
        ]
    });
    assert_eq!(heartbeat(&h, &b, &hb).await, StatusCode::OK);
    let listed = h.ok("GET", "/v1/streams", None).await;
    let ids: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1], "{listed}");
    let all = h.audit_page("/v1/audit?limit=1000").await;
    assert!(
        !all.iter().any(|e| e.record.action == "user.delete"),
        "{all:?}"
    );
    let opens: Vec<&AuditEntry> = all
        .iter()
        .filter(|e| e.record.action == "stream.open")
        .collect();
    assert_eq!(opens.len(), 1, "{opens:?}");
    assert_eq!(opens[0].record.target, "web");
    assert_eq!(opens[0].source, broker.peer.id.to_uri());
    let report = h.audit_page("/v1/audit?action=audit.report").await;
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!(report[0].record.actor, broker.peer.id.to_uri());
    assert_eq!(report[0].record.result, "error");
    assert_eq!(
        report[0].record.detail["refused"], 5,
        "2 records and 3 streams"
    );
    assert_eq!(report[0].source, "controller");
    assert!(
        all.iter()
            .filter(|e| e.record.action == "user.create")
            .all(|e| e.source == "controller")
    );
    h.ctl.shutdown().await;
}

/// Changes in place: a service's route, a policy's text, a user's standing. Each is one
/// change (one snapshot version, one audit record); each refused change (bad value, unknown
/// object, nothing to change, unknown field) says which field and changes nothing.
#[tokio::test]
async fn updates_are_one_change_and_refused_ones_change_nothing() {
    let h = Harness::start().await;
    h.token("connector", None, Some("c1")).await;
    h.token("connector", None, Some("c2")).await;
    h.ok(
        "POST",
        "/v1/services",
        Some(json!({ "name": "web", "target": "10.0.0.5:80", "connectors": ["c1"] })),
    )
    .await;
    let allow_eng =
        umbra_policy::allow_policy(&umbra_policy::PolicySubject::Group("eng".into()), "web");
    h.ok(
        "POST",
        "/v1/policies",
        Some(json!({ "name": "eng-web", "text": allow_eng })),
    )
    .await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "ann@example.test" })),
    )
    .await;

    // Refused: each names its field, and nothing moves.
    let v0 = h.ctl.snapshot_version();
    let services0 = h.ok("GET", "/v1/services", None).await;
    let policies0 = h.ok("GET", "/v1/policies", None).await;
    let users0 = h.ok("GET", "/v1/users", None).await;
    let refused = [
        (
            "PATCH",
            "/v1/services/web",
            json!({}),
            StatusCode::BAD_REQUEST,
            "target",
        ),
        (
            "PATCH",
            "/v1/services/web",
            json!({ "target": "web" }),
            StatusCode::BAD_REQUEST,
            "target",
        ),
        (
            "PATCH",
            "/v1/services/web",
            json!({ "connectors": [] }),
            StatusCode::BAD_REQUEST,
            "connectors",
        ),
        (
            "PATCH",
            "/v1/services/web",
            json!({ "target": "10.0.0.6:80", "connectors": ["nope"] }),
            StatusCode::NOT_FOUND,
            "connectors",
        ),
        (
            "PATCH",
            "/v1/services/web",
            json!({ "port": 81 }),
            StatusCode::BAD_REQUEST,
            "port",
        ),
        (
            "PATCH",
            "/v1/services/nosuch",
            json!({ "target": "10.0.0.6:80" }),
            StatusCode::NOT_FOUND,
            "name",
        ),
        (
            "PUT",
            "/v1/policies/eng-web",
            json!({ "text": "this is not cedar" }),
            StatusCode::BAD_REQUEST,
            "text",
        ),
        (
            "PUT",
            "/v1/policies/eng-web",
            json!({ "text": "permit(principal, action, resource) when { principal.no_such_attribute == 1 };" }),
            StatusCode::BAD_REQUEST,
            "text",
        ),
        (
            "PUT",
            "/v1/policies/eng-web",
            json!({ "text": "x".repeat(65 * 1024) }),
            StatusCode::BAD_REQUEST,
            "text",
        ),
        (
            "PUT",
            "/v1/policies/eng-web",
            json!({ "name": "other", "text": allow_eng }),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            "PUT",
            "/v1/policies/nosuch",
            json!({ "text": allow_eng }),
            StatusCode::NOT_FOUND,
            "name",
        ),
        (
            "PATCH",
            "/v1/users/ann@example.test",
            json!({}),
            StatusCode::BAD_REQUEST,
            "disabled",
        ),
        (
            "PATCH",
            "/v1/users/ann@example.test",
            json!({ "disabled": "yes" }),
            StatusCode::BAD_REQUEST,
            "disabled",
        ),
        (
            "PATCH",
            "/v1/users/ann@example.test",
            json!({ "groups": [] }),
            StatusCode::BAD_REQUEST,
            "groups",
        ),
        (
            "PATCH",
            "/v1/users/nobody@example.test",
            json!({ "disabled": true }),
            StatusCode::NOT_FOUND,
            "id",
        ),
    ];
    for (method, path, body, status, field) in refused {
        let (s, v) = h.admin(method, path, Some(body.clone())).await;
        assert_eq!(s, status, "{method} {path} {body}: {v}");
        assert_eq!(
            api_error(&v).field.as_deref(),
            Some(field),
            "{method} {path} {body}: {v}"
        );
    }
    assert_eq!(h.ok("GET", "/v1/services", None).await, services0);
    assert_eq!(h.ok("GET", "/v1/policies", None).await, policies0);
    assert_eq!(h.ok("GET", "/v1/users", None).await, users0);
    assert_eq!(h.ctl.snapshot_version(), v0, "refused changes bump nothing");

    // A new target alone keeps the connectors; new connectors alone keep the target.
    let s = h
        .ok(
            "PATCH",
            "/v1/services/web",
            Some(json!({ "target": "10.0.0.6:8080" })),
        )
        .await;
    assert_eq!(s["target"], "10.0.0.6:8080");
    assert_eq!(s["connectors"], json!(["c1"]));
    assert_eq!(h.ctl.snapshot_version(), v0 + 1);
    let s = h
        .ok(
            "PATCH",
            "/v1/services/web",
            Some(json!({ "connectors": ["c2", "c1", "c2"] })),
        )
        .await;
    assert_eq!(s["target"], "10.0.0.6:8080");
    assert_eq!(s["connectors"], json!(["c1", "c2"]));
    assert_eq!(h.ok("GET", "/v1/services", None).await[0], s);
    assert_eq!(h.ctl.snapshot_version(), v0 + 2);
    // The same values again: nothing to record.
    h.ok(
        "PATCH",
        "/v1/services/web",
        Some(json!({ "target": "10.0.0.6:8080" })),
    )
    .await;
    assert_eq!(h.ctl.snapshot_version(), v0 + 2);
    let updates = h.audited("service.update").await;
    let ok: Vec<_> = updates.iter().filter(|r| r.result == "ok").collect();
    assert_eq!(ok.len(), 2, "{updates:?}");
    assert_eq!(ok[0].detail["was"]["target"], "10.0.0.5:80");
    assert_eq!(ok[0].detail["target"], "10.0.0.6:8080");
    assert_eq!(ok[1].detail["was"]["connectors"], json!(["c1"]));

    // The policy's text is replaced under its name, and brokers get it in the snapshot.
    let allow_ann = umbra_policy::allow_policy(
        &umbra_policy::PolicySubject::User("ann@example.test".into()),
        "web",
    );
    let p = h
        .ok(
            "PUT",
            "/v1/policies/eng-web",
            Some(json!({ "text": allow_ann })),
        )
        .await;
    assert_eq!(p["name"], "eng-web");
    assert_eq!(p["text"], allow_ann.as_str());
    assert_eq!(p["created_at"], policies0[0]["created_at"]);
    assert_eq!(h.ctl.snapshot_version(), v0 + 3);
    let (broker, _) = h.peer("broker", "b1").await;
    let (s, snap) = get_json::<Snapshot>(&h.as_peer(&broker), h.url("/v1/snapshot?after=0")).await;
    assert_eq!(s, StatusCode::OK);
    let snap = snap.unwrap();
    assert_eq!(snap.policies.len(), 1);
    assert_eq!(snap.policies[0].text, allow_ann);
    let replaced = h.audited("policy.update").await;
    assert_eq!(
        replaced.iter().filter(|r| r.result == "ok").count(),
        1,
        "{replaced:?}"
    );
    // Refusals are in the trail too (all but the body that did not parse, which never
    // reached the handler).
    assert_eq!(replaced.iter().filter(|r| r.result == "error").count(), 4);

    // Disable, and the snapshot says so; disabling again records nothing more; enable.
    let v = h.ctl.snapshot_version();
    let u = h
        .ok(
            "PATCH",
            "/v1/users/ann@example.test",
            Some(json!({ "disabled": true })),
        )
        .await;
    assert_eq!(u["disabled"], true);
    h.ok(
        "PATCH",
        "/v1/users/ann@example.test",
        Some(json!({ "disabled": true })),
    )
    .await;
    assert_eq!(h.ctl.snapshot_version(), v + 1);
    let (_, snap) = get_json::<Snapshot>(&h.as_peer(&broker), h.url("/v1/snapshot?after=0")).await;
    let ann = |s: &Snapshot| {
        s.users
            .iter()
            .find(|u| u.id == "ann@example.test")
            .unwrap()
            .disabled
    };
    assert!(ann(&snap.unwrap()));
    let disables = h.audited("user.disable").await;
    let ok: Vec<_> = disables.iter().filter(|r| r.result == "ok").collect();
    assert_eq!(ok.len(), 1, "{disables:?}");
    assert_eq!(ok[0].target, "ann@example.test");
    // The refused one, for a user who does not exist, is there too.
    assert_eq!(disables.len(), 2, "{disables:?}");
    let u = h
        .ok(
            "PATCH",
            "/v1/users/ann@example.test",
            Some(json!({ "disabled": false })),
        )
        .await;
    assert_eq!(u["disabled"], false);
    let (_, snap) = get_json::<Snapshot>(&h.as_peer(&broker), h.url("/v1/snapshot?after=0")).await;
    assert!(!ann(&snap.unwrap()));
    assert_eq!(h.audited("user.enable").await.len(), 1);
    h.ctl.shutdown().await;
}

/// A disabled user's devices get no new certificate (the refusal is audited), and a new
/// enrollment for the user is refused; enabled again, the same device renews. Another user's
/// device renews throughout.
#[tokio::test]
async fn a_disabled_users_devices_are_not_renewed() {
    let h = Harness::start().await;
    let (dev, issued) = h.agent("ann@example.test").await;
    let (other, _) = h.agent("ben@example.test").await;
    let unused = h.token("agent", Some("ann@example.test"), None).await;
    let hr = &h;
    let renew = |id: &TlsIdentity| {
        let h = hr;
        let c = h.as_peer(id);
        async move {
            let key = umbra_pki::generate_key_pem().unwrap();
            let csr = umbra_pki::make_csr(&key).unwrap();
            h.renew(&c, json!({ "csr_pem": csr })).await.status()
        }
    };
    assert_eq!(renew(&dev).await, StatusCode::OK);

    h.ok(
        "PATCH",
        "/v1/users/ann@example.test",
        Some(json!({ "disabled": true })),
    )
    .await;
    assert_eq!(renew(&dev).await, StatusCode::FORBIDDEN);
    assert_eq!(renew(&other).await, StatusCode::OK, "another user's device");
    let key = umbra_pki::generate_key_pem().unwrap();
    let resp = h
        .redeem(&unused.token, &umbra_pki::make_csr(&key).unwrap())
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let refused: Vec<_> = h
        .audited("renew")
        .await
        .into_iter()
        .filter(|r| r.result == "error")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].actor, issued.identity);
    assert!(
        refused[0].detail["error"]
            .as_str()
            .unwrap()
            .contains("disabled"),
        "{refused:?}"
    );

    h.ok(
        "PATCH",
        "/v1/users/ann@example.test",
        Some(json!({ "disabled": false })),
    )
    .await;
    assert_eq!(renew(&dev).await, StatusCode::OK);
    h.ctl.shutdown().await;
}

async fn access(h: &Harness, q: &str) -> umbra_proto::api::Access {
    let v = h.ok("GET", &format!("/v1/access?{q}"), None).await;
    serde_json::from_value(v).unwrap()
}

/// `GET /v1/access` answers what a broker would decide, and why: per service for a user on
/// a new device of theirs, or on one device; refusals name their field.
#[tokio::test]
async fn access_says_who_may_reach_what_and_why() {
    let h = Harness::start().await;
    h.token("connector", None, Some("c1")).await;
    h.ok("POST", "/v1/groups", Some(json!({ "name": "eng" })))
        .await;
    for (id, groups) in [
        ("ann@example.test", json!(["eng"])),
        ("ben@example.test", json!([])),
    ] {
        h.ok(
            "POST",
            "/v1/users",
            Some(json!({ "id": id, "groups": groups })),
        )
        .await;
    }
    for svc in ["web", "db"] {
        h.ok(
            "POST",
            "/v1/services",
            Some(json!({ "name": svc, "target": "10.0.0.5:80", "connectors": ["c1"] })),
        )
        .await;
    }
    let policies = [
        (
            "eng-web",
            umbra_policy::allow_policy(&umbra_policy::PolicySubject::Group("eng".into()), "web"),
        ),
        (
            "all-db",
            umbra_policy::allow_policy(&umbra_policy::PolicySubject::Everyone, "db"),
        ),
        (
            "no-db-for-ann",
            r#"forbid(principal == Umbra::User::"ann@example.test", action, resource == Umbra::Service::"db");"#.to_owned(),
        ),
        (
            "web-over-tcp",
            r#"permit(principal == Umbra::User::"ben@example.test", action, resource == Umbra::Service::"web") when { context.transport == "tcp" };"#.to_owned(),
        ),
    ];
    for (name, text) in policies {
        h.ok(
            "POST",
            "/v1/policies",
            Some(json!({ "name": name, "text": text })),
        )
        .await;
    }
    let brief = |a: &umbra_proto::api::Access| -> Vec<(String, bool, String, Vec<String>)> {
        a.decisions
            .iter()
            .map(|d| {
                (
                    d.service.clone(),
                    d.allow,
                    d.reason.clone(),
                    d.policies.clone(),
                )
            })
            .collect()
    };
    let s = |x: &str| x.to_owned();

    let ann = access(&h, &s("user=ann@example.test")).await;
    assert_eq!(ann.device, None);
    assert_eq!(ann.transport, "quic");
    assert_eq!(ann.snapshot_version, h.ctl.snapshot_version());
    assert_eq!(
        brief(&ann),
        vec![
            (s("db"), false, s("forbidden"), vec![s("no-db-for-ann")]),
            (s("web"), true, s("permitted"), vec![s("eng-web")]),
        ]
    );
    let ben = access(&h, &s("user=ben@example.test")).await;
    assert_eq!(
        brief(&ben),
        vec![
            (s("db"), true, s("permitted"), vec![s("all-db")]),
            (s("web"), false, s("no_permit"), vec![]),
        ]
    );
    let ben_tcp = access(&h, &s("user=ben@example.test&service=web&transport=tcp")).await;
    assert_eq!(
        brief(&ben_tcp),
        vec![(s("web"), true, s("permitted"), vec![s("web-over-tcp")])]
    );
    let nosuch = access(&h, &s("user=ann@example.test&service=nosuch")).await;
    assert_eq!(
        brief(&nosuch),
        vec![(s("nosuch"), false, s("unknown_service"), vec![])]
    );
    assert!(ann.decisions.iter().all(|d| d.error.is_none()), "{ann:?}");
    // A policy that valid text cannot evaluate (an overflow): denied, saying why.
    h.ok(
        "POST",
        "/v1/policies",
        Some(json!({ "name": "overflows", "text": r#"forbid(principal, action, resource == Umbra::Service::"db") when { context.now * 9223372036854775807 > 0 };"# })),
    )
    .await;
    let erring = access(&h, &s("user=ben@example.test&service=db")).await;
    assert_eq!(
        (
            erring.decisions[0].allow,
            erring.decisions[0].reason.as_str()
        ),
        (false, "error"),
        "{erring:?}"
    );
    assert!(
        erring.decisions[0]
            .error
            .as_deref()
            .is_some_and(|e| !e.is_empty()),
        "{erring:?}"
    );
    let (st, _) = h.admin("DELETE", "/v1/policies/overflows", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // Disabled, and one device revoked: the same reasons the broker gives.
    let (dev, _) = h.agent("ann@example.test").await;
    let (dev2, _) = h.agent("ann@example.test").await;
    let d = dev.peer.id.id.clone();
    h.ok("POST", &format!("/v1/devices/{d}/revoke"), None).await;
    let on_revoked = access(&h, &format!("device={d}&service=web")).await;
    assert_eq!(on_revoked.user, "ann@example.test");
    assert_eq!(on_revoked.device.as_deref(), Some(d.as_str()));
    assert_eq!(brief(&on_revoked)[0].2, "revoked_device");
    let on_good = access(
        &h,
        &format!(
            "user=ann@example.test&device={}&service=web",
            dev2.peer.id.id
        ),
    )
    .await;
    assert!(on_good.decisions[0].allow, "{on_good:?}");
    h.ok(
        "PATCH",
        "/v1/users/ann@example.test",
        Some(json!({ "disabled": true })),
    )
    .await;
    let disabled = access(&h, &s("user=ann@example.test&service=web")).await;
    assert_eq!(brief(&disabled)[0].2, "disabled_user");

    // Refused questions name their field and record nothing.
    let audit_before = h.audit_page("/v1/audit?last=1").await;
    for (q, status, field) in [
        (s(""), StatusCode::BAD_REQUEST, Some("user")),
        (
            s("user=nobody@example.test"),
            StatusCode::NOT_FOUND,
            Some("user"),
        ),
        (s("device=d-0000"), StatusCode::NOT_FOUND, Some("device")),
        (
            format!("user=ben@example.test&device={d}"),
            StatusCode::BAD_REQUEST,
            Some("device"),
        ),
        (
            s("user=ben@example.test&transport=udp"),
            StatusCode::BAD_REQUEST,
            Some("transport"),
        ),
        (
            s("user=ben@example.test&who=me"),
            StatusCode::BAD_REQUEST,
            Some("who"),
        ),
    ] {
        let (st, v) = h.admin("GET", &format!("/v1/access?{q}"), None).await;
        assert_eq!(st, status, "{q}: {v}");
        assert_eq!(api_error(&v).field.as_deref(), field, "{q}: {v}");
    }
    assert_eq!(h.audit_page("/v1/audit?last=1").await, audit_before);
    // (Admin only: `every_admin_route_needs_the_admin_token`.)
    h.ctl.shutdown().await;
}

/// `POST /v1/policies/{name}/check` names the live streams a policy change would end (a
/// replacement, a removal, an added `forbid`), decided as brokers decide, and changes
/// nothing; the twin changes that end nothing list nothing, and a bad text is refused.
#[tokio::test]
async fn a_policy_change_can_be_checked_first() {
    let h = Harness::start().await;
    h.token("connector", None, Some("c1")).await;
    h.ok("POST", "/v1/groups", Some(json!({ "name": "eng" })))
        .await;
    for svc in ["web", "db"] {
        h.ok(
            "POST",
            "/v1/services",
            Some(json!({ "name": svc, "target": "10.0.0.5:80", "connectors": ["c1"] })),
        )
        .await;
    }
    let (ann, _) = h.agent("ann@example.test").await;
    let (ben, _) = h.agent("ben@example.test").await;
    let (cat, _) = h.agent("cat@example.test").await;
    h.ok(
        "POST",
        "/v1/groups/eng/members",
        Some(json!({ "user": "ann@example.test" })),
    )
    .await;
    let allow = |s: umbra_policy::PolicySubject, svc: &str| umbra_policy::allow_policy(&s, svc);
    use umbra_policy::PolicySubject::{Everyone, Group, User};
    h.ok(
        "POST",
        "/v1/policies",
        Some(json!({ "name": "web", "text": allow(Everyone, "web") })),
    )
    .await;
    h.ok(
        "POST",
        "/v1/policies",
        Some(json!({ "name": "db", "text": allow(Group("eng".into()), "db") })),
    )
    .await;
    // A broker reports three live streams: ann on web and db, ben on web.
    let (broker, _) = h.peer("broker", "b1").await;
    let stream = |id: u64, dev: &TlsIdentity, user: &str, svc: &str| {
        json!({
            "id": id, "broker": "b1", "user": user, "device": dev.peer.id.id, "service": svc,
            "connector": "c-1", "transport": "quic", "started_at": 1, "bytes_up": 0, "bytes_down": 0
        })
    };
    let hb = json!({
        "name": "b1", "quic_addr": "127.0.0.1:4433", "tcp_addr": null,
        "server_name": umbra_pki::broker_server_name(&broker.peer.id.id),
        "snapshot_version": h.ctl.snapshot_version(),
        "streams": [
            stream(1, &ann, "ann@example.test", "web"),
            stream(2, &ann, "ann@example.test", "db"),
            stream(3, &ben, "ben@example.test", "web"),
            stream(4, &cat, "cat@example.test", "web"),
        ],
        "audit": []
    });
    assert_eq!(
        heartbeat(&h, &h.as_peer(&broker), &hb).await,
        StatusCode::OK
    );
    // cat's device is revoked after the broker's report: her stream ends for that, whatever
    // any policy change does, and no check counts it.
    h.ok(
        "POST",
        &format!("/v1/devices/{}/revoke", cat.peer.id.id),
        None,
    )
    .await;
    let version = h.ctl.snapshot_version();
    let policies = h.ok("GET", "/v1/policies", None).await;

    let check = |name: &'static str, body: Value| {
        let h = &h;
        async move {
            let v = h
                .ok("POST", &format!("/v1/policies/{name}/check"), Some(body))
                .await;
            let r: umbra_proto::api::PolicyCheckResult = serde_json::from_value(v).unwrap();
            assert_eq!((r.live, r.brokers_silent), (4, 0));
            let mut ends: Vec<(u64, String)> = r
                .ends
                .iter()
                .map(|e| (e.stream.id, e.reason.clone()))
                .collect();
            ends.sort();
            (r.change, ends)
        }
    };
    // web for ann only: ben's stream would end.
    assert_eq!(
        check(
            "web",
            json!({ "text": allow(User("ann@example.test".into()), "web") })
        )
        .await,
        ("replace".to_owned(), vec![(3, "no_permit".to_owned())])
    );
    // db removed: ann's db stream would end.
    assert_eq!(
        check("db", json!({})).await,
        ("remove".to_owned(), vec![(2, "no_permit".to_owned())])
    );
    // A new forbid for ann everywhere: both of hers.
    let forbid = r#"forbid(principal == Umbra::User::"ann@example.test", action, resource);"#;
    assert_eq!(
        check("no-ann", json!({ "text": forbid })).await,
        (
            "add".to_owned(),
            vec![(1, "forbidden".to_owned()), (2, "forbidden".to_owned())]
        )
    );
    // Twins: a broader text, a new permit: nothing ends.
    assert_eq!(
        check("db", json!({ "text": allow(Everyone, "db") })).await,
        ("replace".to_owned(), vec![])
    );
    assert_eq!(
        check("extra", json!({ "text": allow(Everyone, "db") })).await,
        ("add".to_owned(), vec![])
    );
    // Refused: a bad text, removing what is not there, an unknown field.
    for (name, body, status, field) in [
        (
            "web",
            json!({ "text": "permit(" }),
            StatusCode::BAD_REQUEST,
            "text",
        ),
        ("nosuch", json!({}), StatusCode::NOT_FOUND, "name"),
        ("web", json!({ "txt": "x" }), StatusCode::BAD_REQUEST, "txt"),
    ] {
        let (s, v) = h
            .admin("POST", &format!("/v1/policies/{name}/check"), Some(body))
            .await;
        assert_eq!(s, status, "{name}: {v}");
        assert_eq!(api_error(&v).field.as_deref(), Some(field), "{name}: {v}");
    }
    assert_eq!(h.ctl.snapshot_version(), version, "a check changes nothing");
    assert_eq!(h.ok("GET", "/v1/policies", None).await, policies);
    h.ctl.shutdown().await;
}

/// The HTTP/2 SETTINGS the controller announces on a new connection (id -> value).
async fn h2_settings(h: &Harness, id: Option<&TlsIdentity>) -> std::collections::HashMap<u16, u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = tls_conn(h, id).await;
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            // SETTINGS, not its ACK.
            if head[3] == 4 && head[4] & 1 == 0 {
                return payload
                    .chunks_exact(6)
                    .map(|e| {
                        (
                            u16::from_be_bytes([e[0], e[1]]),
                            u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
                        )
                    })
                    .collect();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the controller's SETTINGS")
}

/// A connection without a client certificate (anyone's) may have 4 requests in progress and
/// 64 KiB of unread body per stream and in all, so that the anonymous connections together
/// cannot make the controller hold gigabytes of request bodies. The twin: an enrolled peer's
/// connection keeps 32 (its long polls need them).
#[tokio::test]
async fn anonymous_connections_get_few_streams_and_small_windows() {
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const INITIAL_WINDOW_SIZE: u16 = 0x4;
    let h = Harness::start().await;
    let anonymous = h2_settings(&h, None).await;
    assert_eq!(
        anonymous.get(&MAX_CONCURRENT_STREAMS),
        Some(&4),
        "{anonymous:?}"
    );
    assert_eq!(
        anonymous.get(&INITIAL_WINDOW_SIZE),
        Some(&(64 << 10)),
        "{anonymous:?}"
    );
    let (dev, _) = h.agent("alice@example.com").await;
    let enrolled = h2_settings(&h, Some(&dev)).await;
    assert_eq!(
        enrolled.get(&MAX_CONCURRENT_STREAMS),
        Some(&32),
        "{enrolled:?}"
    );
}

/// One identity is issued at most 8 certificates an hour: renewing in a loop is refused (429,
/// audited) instead of costing a durable write each and swelling every snapshot's revoked
/// serials once the device is revoked. The twins: another identity renews meanwhile, and the
/// same one renews again an hour later.
#[tokio::test]
async fn an_identity_renewing_in_a_loop_is_refused() {
    let h = Harness::start().await;
    let (dev, _) = h.agent("ann@example.test").await;
    let (other, _) = h.agent("ben@example.test").await;
    // Enrolled, then 7 renewals: 8 valid certificates.
    for i in 0..7 {
        assert_eq!(
            renew_with_new_key(&h, &dev).await.status(),
            StatusCode::OK,
            "renewal {i}"
        );
    }
    let refused = renew_with_new_key(&h, &dev).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let e: ApiError = refused.json().await.unwrap();
    assert!(e.error.contains("renewed too often"), "{}", e.error);
    assert_eq!(
        renew_with_new_key(&h, &other).await.status(),
        StatusCode::OK
    );
    let audit = h.ok("GET", "/v1/audit?limit=1000", None).await;
    let refusals = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "renew" && r["result"] != "ok")
        .count();
    assert_eq!(refusals, 1, "{audit}");
    // An hour on, with the certificate it has (still valid for most of its day).
    h.skew.store(3601, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(renew_with_new_key(&h, &dev).await.status(), StatusCode::OK);
}

/// An enrolling host whose clock is a day behind the controller's is told so: the
/// certificate is not valid yet by its clock. The identity is written all the same (the
/// token is spent), and works once the clock is set right. The twins: 15 minutes behind is
/// within what certificates allow (they start 10 minutes before their issue, and a host may
/// see one start 10 minutes ahead), and no skew at all.
#[tokio::test]
async fn an_enrolling_host_whose_clock_is_off_is_told_so() {
    let h = Harness::start().await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "ann@example.test" })),
    )
    .await;
    let enroll = |dir: std::path::PathBuf| {
        let h = &h;
        async move {
            let token = h.token("agent", Some("ann@example.test"), None).await.token;
            umbra_link::enroll::enroll(&h.ctl.url(), &token, &dir, Role::Agent).await
        }
    };
    for (skew, refused) in [(86_400, true), (15 * 60, false), (0, false)] {
        h.skew.store(skew, Ordering::SeqCst);
        let dir = h.dir.path().join(format!("agent-{skew}"));
        let r = enroll(dir.clone()).await;
        if refused {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("this host's clock is about 1 d behind the controller's")
                    && e.contains("not valid yet")
                    && e.contains("identity is written"),
                "{e}"
            );
        } else {
            r.unwrap_or_else(|e| panic!("{skew} s: {e}"));
        }
        // Written either way.
        let id = TlsIdentity::load_dir(&dir).unwrap();
        assert_eq!(id.peer.id.role, Role::Agent);
    }
}

/// A renewal of `id`'s certificate for a new key.
async fn renew_with_new_key(h: &Harness, id: &TlsIdentity) -> reqwest::Response {
    let key = umbra_pki::generate_key_pem().unwrap();
    let csr = umbra_pki::make_csr(&key).unwrap();
    h.renew(&h.as_peer(id), json!({ "csr_pem": csr })).await
}

/// A controller whose clock ran half an hour ahead for a while, and was set right since, does not
/// count the certificates it stamped in its future against an identity's renewals: else the
/// identity could not renew for as long as the clock had been ahead. The twin: while the
/// clock is ahead, the limit holds.
#[tokio::test]
async fn certificates_stamped_ahead_do_not_hold_renewals_back() {
    let h = Harness::start().await;
    let (dev, _) = h.agent("ann@example.test").await;
    h.skew.store(1800, Ordering::SeqCst);
    for i in 0..7 {
        let r = renew_with_new_key(&h, &dev).await;
        assert_eq!(r.status(), StatusCode::OK, "renewal {i}");
    }
    let r = renew_with_new_key(&h, &dev).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // Set right: only the enrollment's certificate is within the last hour.
    h.skew.store(0, Ordering::SeqCst);
    let r = renew_with_new_key(&h, &dev).await;
    assert_eq!(r.status(), StatusCode::OK);
}

/// An enrollment command for one role given a token of another (`umbra broker enroll` with
/// an agent's token) is refused, naming the command to use, and the token is not spent. The
/// twins: the right role, and a request that names none, redeem it.
#[tokio::test]
async fn a_token_of_another_role_is_refused_and_not_spent() {
    let h = Harness::start().await;
    let redeem_as = |token: String, role: Option<&'static str>| {
        let h = &h;
        async move {
            let key = umbra_pki::generate_key_pem().unwrap();
            let csr = umbra_pki::make_csr(&key).unwrap();
            let mut body = json!({ "token": token, "csr_pem": csr });
            if let Some(r) = role {
                body["role"] = json!(r);
            }
            h.http
                .post(h.url("/v1/enroll"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "ann@example.test", "groups": [] })),
    )
    .await;
    let agent = h.token("agent", Some("ann@example.test"), None).await.token;
    let r = redeem_as(agent.clone(), Some("broker")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(e.field.as_deref(), Some("role"));
    assert!(e.error.contains("use `umbra agent enroll`"), "{}", e.error);
    let r = redeem_as(agent.clone(), Some("root")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(h.ok("GET", "/v1/devices", None).await, json!([]));
    assert_eq!(
        redeem_as(agent, Some("agent")).await.status(),
        StatusCode::OK
    );

    let connector = h.token("connector", None, Some("c1")).await.token;
    assert_eq!(
        redeem_as(connector.clone(), Some("agent")).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(redeem_as(connector, None).await.status(), StatusCode::OK);
}

/// Waits until `n` long polls wait at the controller (so a change made next is the one that
/// wakes them, not one they find on arrival).
async fn polls_waiting(h: &Harness, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while h.ctl.long_polls_waiting() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} long polls never waited"));
}

/// Two live connectors under one name (instances of one connector): revoking the name is
/// refused, listing both ids, and nothing is revoked; each is revoked by its id. The twin: a
/// name only one live connector carries is revoked by name.
#[tokio::test]
async fn revoking_a_name_several_peers_carry_is_refused() {
    let h = Harness::start().await;
    let t1 = h.token("connector", None, Some("dc")).await.token;
    let t2 = h.token("connector", None, Some("dc")).await.token;
    let (a, _) = h.enroll(&t1).await;
    let (b, _) = h.enroll(&t2).await;
    let (s, v) = h.admin("POST", "/v1/connectors/dc/revoke", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains(&a.peer.id.id) && msg.contains(&b.peer.id.id),
        "{msg}"
    );
    let listed = h.ok("GET", "/v1/connectors", None).await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["revoked"] == false),
        "{listed}"
    );
    h.ok(
        "POST",
        &format!("/v1/connectors/{}/revoke", a.peer.id.id),
        None,
    )
    .await;
    // One live instance left: the name now names it.
    let v = h.ok("POST", "/v1/connectors/dc/revoke", None).await;
    assert_eq!(v["id"], b.peer.id.id.as_str());
    assert_eq!(v["revoked"], true);
}

/// What granted access, and when, can be read from the audit log alone: a policy's records
/// keep its text (and the text it replaced or removed), and a group's removal names the
/// members who lost it.
#[tokio::test]
async fn policy_and_group_changes_keep_their_content_in_the_audit_log() {
    let h = Harness::start().await;
    let first = r#"permit (principal in Umbra::Group::"eng", action, resource);"#;
    let second = r#"permit (principal in Umbra::Group::"ops", action, resource);"#;
    h.ok("POST", "/v1/groups", Some(json!({ "name": "eng" })))
        .await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "ann@example.test", "groups": ["eng"] })),
    )
    .await;
    h.ok(
        "POST",
        "/v1/policies",
        Some(json!({ "name": "p", "text": first })),
    )
    .await;
    h.ok("PUT", "/v1/policies/p", Some(json!({ "text": second })))
        .await;
    let (s, _) = h.admin("DELETE", "/v1/policies/p", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h.admin("DELETE", "/v1/groups/eng", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let created = h.audited("policy.create").await;
    assert_eq!(created[0].detail["text"], first);
    let updated = h.audited("policy.update").await;
    assert_eq!(
        (&updated[0].detail["was"], &updated[0].detail["text"]),
        (&json!(first), &json!(second))
    );
    let deleted = h.audited("policy.delete").await;
    assert_eq!(deleted[0].detail["was"], second);
    let group = h.audited("group.delete").await;
    assert_eq!(group[0].detail["members"], json!(["ann@example.test"]));
}

/// Enrollment tokens are in no snapshot: creating or deleting one wakes no broker (the
/// version stays), while a change brokers need still moves it.
#[tokio::test]
async fn token_writes_leave_the_snapshot_version_alone() {
    let h = Harness::start().await;
    let v = h.ctl.snapshot_version();
    let t = h.token("connector", None, Some("c1")).await;
    let (s, _) = h
        .admin("DELETE", &format!("/v1/enrollment-tokens/{}", t.id), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h.ctl.snapshot_version(), v);
    h.ok("POST", "/v1/groups", Some(json!({ "name": "eng" })))
        .await;
    assert!(h.ctl.snapshot_version() > v);
}

/// Deleting a user revokes their devices, and each revocation is recorded as an
/// administrator's own revocation is (`revoke`, `agent/ID`), so a search for it finds it.
/// Their unused enrollment tokens go too, each recorded as a token deletion; the twin: a token
/// of another user stays.
#[tokio::test]
async fn deleting_a_user_records_each_device_revoked() {
    let h = Harness::start().await;
    let (dev, _) = h.agent("ann@example.test").await;
    let unused = h.token("agent", Some("ann@example.test"), None).await;
    h.ok(
        "POST",
        "/v1/users",
        Some(json!({ "id": "ben@example.test", "groups": [] })),
    )
    .await;
    let kept = h.token("agent", Some("ben@example.test"), None).await;
    let (s, _) = h.admin("DELETE", "/v1/users/ann@example.test", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let deletions = h.audited("enroll_token.delete").await;
    assert_eq!(
        deletions
            .iter()
            .map(|r| (r.target.as_str(), r.detail["reason"].as_str()))
            .collect::<Vec<_>>(),
        [(unused.id.as_str(), Some("user deleted"))],
        "{deletions:?}"
    );
    let tokens = h.ok("GET", "/v1/enrollment-tokens", None).await;
    let ids: Vec<&str> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert!(
        ids.contains(&kept.id.as_str()) && !ids.contains(&unused.id.as_str()),
        "{tokens}"
    );
    let revokes = h.audited("revoke").await;
    let target = format!("agent/{}", dev.peer.id.id);
    assert!(
        revokes
            .iter()
            .any(|r| r.target == target && r.detail["reason"] == "user deleted"),
        "{revokes:?}"
    );
    let devices = h.ok("GET", "/v1/devices", None).await;
    assert!(
        devices
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["revoked"] == true),
        "{devices}"
    );
}
