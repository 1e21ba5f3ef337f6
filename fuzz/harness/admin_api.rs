//! One input of the `admin_api` fuzz target: a request to the controller's REST API as an
//! administrator's client sends it (method, request target with its path parameters and query
//! string, body), served in process by the very router the controller's listener serves
//! (`Controller::fuzz_request`), on a real store seeded once per process with a user, a
//! group, a connector, a service, a policy, an enrolled device and an unspent enrollment token.
//!
//! Input: byte 0 picks the method (low 3 bits) and the credential (bit 7 set: a wrong admin
//! token, or none if bit 6 is set too); then the request target up to the first newline (one
//! that does not start with `/` is taken under `/v1/`, so mutants stay on the API); then the
//! body. `{device}`, `{connector}` and `{token}` in the target stand for the ids of the
//! seeded objects, which are random, so that seeds can name them.
//!
//! Checks, on every input: the controller never panics and never answers 5xx (a bad path,
//! query or body is the caller's error, never the store's); every refusal is the API's JSON
//! error (`{"error": "..."}`); a refused request changes nothing (snapshot version, admin
//! token, and every admin listing as before); a GET changes nothing; without the admin token
//! no admin route answers 2xx, and nothing changes. True if the request was served (2xx).
//!
//! Shared, through `#[path]`, by `fuzz/fuzz_targets/admin_api.rs` (libFuzzer) and by
//! `crates/umbra-controller/tests/fuzz_corpus.rs` (replays the corpus under `cargo test`).
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use umbra_controller::{Controller, ControllerConfig};

/// What the methods byte picks from (low 3 bits).
const METHODS: [&str; 8] = [
    "GET", "POST", "DELETE", "PATCH", "PUT", "GET", "HEAD", "OPTIONS",
];

/// Every admin listing: what a refused write must leave as it was.
const LISTINGS: [&str; 8] = [
    "/v1/users",
    "/v1/groups",
    "/v1/services",
    "/v1/policies",
    "/v1/enrollment-tokens",
    "/v1/devices",
    "/v1/connectors",
    "/v1/brokers/all",
];

struct Fixture {
    rt: tokio::runtime::Runtime,
    ctl: Controller,
    /// The current admin token: a served rotation replaces it.
    admin: Mutex<String>,
    device: String,
    connector: String,
    token: String,
}

/// The controller, started once per process on a fixed clock (listings and refusals do not
/// change with the time of day) in a fresh data directory, and seeded.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        umbra_pki::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("umbra-fuzz-admin-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let cfg = ControllerConfig {
            data_dir: dir,
            listen: "127.0.0.1:0".parse().unwrap(),
            ca_key: Some("ab".repeat(32)),
            ..Default::default()
        };
        let ctl = rt
            .block_on(Controller::start_with_clock(
                cfg,
                std::sync::Arc::new(move || now),
            ))
            .expect("controller");
        let admin = ctl.first_admin_token().expect("first start");
        let (device, connector, token) = rt.block_on(seed(&ctl, &admin));
        Fixture {
            rt,
            ctl,
            admin: Mutex::new(admin),
            device,
            connector,
            token,
        }
    })
}

/// Seeds the store through the API, as an administrator and two enrolling peers would.
/// Returns the ids of the device, the connector and an unspent token.
async fn seed(ctl: &Controller, admin: &str) -> (String, String, String) {
    let call = |method: &'static str, target: &'static str, body: String| async move {
        let (status, body) = ctl
            .fuzz_request(method, target, Some(admin), body.into_bytes())
            .await
            .expect("request");
        assert!(
            (200..300).contains(&status),
            "seeding {method} {target}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()
    };
    let enroll = |role: &'static str, token: serde_json::Value| async move {
        let key = umbra_pki::generate_key_pem().expect("key");
        let csr = umbra_pki::make_csr(&key).expect("csr");
        let body = serde_json::json!({"token": token["token"], "csr_pem": csr, "role": role});
        let (status, body) = ctl
            .fuzz_request("POST", "/v1/enroll", None, body.to_string().into_bytes())
            .await
            .expect("request");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let issued: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let identity = issued["identity"].as_str().unwrap().to_owned();
        identity.rsplit('/').next().unwrap().to_owned()
    };
    call("POST", "/v1/groups", r#"{"name":"eng"}"#.into()).await;
    call(
        "POST",
        "/v1/users",
        r#"{"id":"alice@example.test","groups":["eng"]}"#.into(),
    )
    .await;
    call("POST", "/v1/users", r#"{"id":"bob@example.test"}"#.into()).await;
    let t = call(
        "POST",
        "/v1/enrollment-tokens",
        r#"{"role":"connector","name":"c1"}"#.into(),
    )
    .await;
    let connector = enroll("connector", t).await;
    call(
        "POST",
        "/v1/services",
        r#"{"name":"demo","target":"127.0.0.1:8080","connectors":["c1"]}"#.into(),
    )
    .await;
    call(
        "POST",
        "/v1/policies",
        r#"{"name":"eng-demo","text":"permit(principal in Umbra::Group::\"eng\", action, resource == Umbra::Service::\"demo\");"}"#.into(),
    )
    .await;
    let t = call(
        "POST",
        "/v1/enrollment-tokens",
        r#"{"role":"agent","user":"alice@example.test"}"#.into(),
    )
    .await;
    let device = enroll("agent", t).await;
    let t = call(
        "POST",
        "/v1/enrollment-tokens",
        r#"{"role":"agent","user":"bob@example.test"}"#.into(),
    )
    .await;
    let token = t["id"].as_str().unwrap().to_owned();
    (device, connector, token)
}

/// What a refused request must not change: the snapshot version, whether the admin token
/// still works, and every admin listing.
async fn state(ctl: &Controller, admin: &str) -> (u64, bool, Vec<Vec<u8>>) {
    let mut lists = Vec::new();
    for l in LISTINGS {
        let (status, body) = ctl
            .fuzz_request("GET", l, Some(admin), Vec::new())
            .await
            .expect("request");
        assert_eq!(status, 200, "{l}: {}", String::from_utf8_lossy(&body));
        lists.push(body);
    }
    let works = ctl.admin_token_works(admin).await.expect("store");
    (ctl.snapshot_version(), works, lists)
}

/// The API's error body: a JSON object whose `error` is a non-empty message.
fn is_api_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.as_str().map(|s| !s.is_empty()))
        })
        .unwrap_or(false)
}

/// The routes anyone may fetch.
const PUBLIC: [&str; 3] = ["/healthz", "/v1/ca.pem", "/v1/openapi.json"];

/// What anyone may fetch: the health check, the CA certificate, the OpenAPI document.
fn is_public(body: &[u8]) -> bool {
    body == b"ok\n"
        || body.starts_with(b"-----BEGIN CERTIFICATE-----")
        || serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v.get("openapi").is_some())
}

pub(crate) fn admin_api(data: &[u8]) -> bool {
    let Some((&first, rest)) = data.split_first() else {
        return false;
    };
    let method = METHODS[usize::from(first & 7)];
    let (target, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return false;
    };
    let f = fixture();
    let target = target
        .replace("{device}", &f.device)
        .replace("{connector}", &f.connector)
        .replace("{token}", &f.token);
    let target = if target.starts_with('/') {
        target
    } else {
        format!("/v1/{target}")
    };
    let admin = f.admin.lock().unwrap().clone();
    let bearer = match first >> 6 {
        0 | 1 => Some(admin.as_str()),
        2 => Some("umbra-not-the-admin-token"),
        _ => None,
    };
    let is_admin = bearer == Some(admin.as_str());
    let reads = matches!(method, "GET" | "HEAD");

    f.rt.block_on(async {
        let before = state(&f.ctl, &admin).await;
        let Some((status, resp)) = f
            .ctl
            .fuzz_request(method, &target, bearer, body.to_vec())
            .await
        else {
            return false;
        };
        let shown = || {
            format!(
                "{method} {target:?}: {status} {}",
                String::from_utf8_lossy(&resp)
            )
        };
        assert!(status < 500, "a server error: {}", shown());
        let served = (200..300).contains(&status);
        if !served && method != "HEAD" {
            assert!(is_api_error(&resp), "not the API's error body: {}", shown());
        }
        let path = target.split('?').next().unwrap_or_default();
        if !is_admin && served {
            // A HEAD answer has no body to tell: its path must be a public one.
            let public = if method == "HEAD" {
                PUBLIC.contains(&path)
            } else {
                is_public(&resp)
            };
            assert!(
                reads && public,
                "served without the admin token: {}",
                shown()
            );
        }
        // A served rotation (whatever query the target carries) replaces the admin token.
        if served && is_admin && method == "POST" && path == "/v1/admin-token/rotate" {
            let v: serde_json::Value = serde_json::from_slice(&resp).expect("rotation answer");
            *f.admin.lock().unwrap() = v["token"].as_str().expect("new token").to_owned();
            return true;
        }
        if !served || reads || !is_admin {
            let after = state(&f.ctl, &admin).await;
            assert!(
                before == after,
                "changed state (version {} -> {}, admin token works {} -> {}): {}",
                before.0,
                after.0,
                before.1,
                after.1,
                shown()
            );
        }
        served
    })
}
