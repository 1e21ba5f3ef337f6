//! The fuzz corpora of the `validate` and `admin_api` targets, replayed under `cargo test` (no
//! nightly, no libFuzzer): every file of `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`,
//! then seeded mutants of them, through the same check the fuzz target runs
//! (`fuzz/harness/controller.rs`, `fuzz/harness/admin_api.rs`). See `fuzz/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/harness/admin_api.rs"]
mod admin_api;
#[path = "../../../fuzz/harness/controller.rs"]
mod harness;
#[path = "../../../fuzz/harness/replay.rs"]
mod replay;

#[test]
fn validate() {
    let r = replay::replay("validate", 50_000, harness::validate);
    eprintln!("validate: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored input is accepted: the invariants went unchecked"
    );
}

/// The `seed-*` inputs of `validate`: values of each kind the controller stores, in the
/// spellings it keeps and the ones it normalises or refuses (`-refused`: no line accepted).
/// Written to a scratch directory; `UMBRA_FUZZ_WRITE_SEEDS=1` writes them to
/// `fuzz/corpus/validate/`.
#[test]
fn seed_generator_writes_values_the_controller_stores_and_refuses() {
    let dir = replay::seed_dir("validate");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(format!("seed-{name}.txt")), text).unwrap();
    };
    write("names", "demo\nwiki-2\neng.team\ndc_1\nc-0123456789abcdef");
    write(
        "users",
        "alice@example.test\nBob.Smith@Example.TEST\nx+tag@sub.example.test",
    );
    write(
        "targets",
        "10.0.0.5:8080\nwiki.internal:443\n[2001:db8::1]:22\nlocalhost:5432",
    );
    write(
        "advertised",
        "[2001:0db8:0000::1]:7401\n[::ffff:10.0.0.5]:7401\n[::1]:7401",
    );
    write(
        "all-refused",
        "Demo\n-x\n010.0.0.5:80\n10.0.0.5:080\n[::ffff:10.0.0.5:80\nhost:0\nhost:65536\n\
         \u{202e}evil:80\nno port\n@example.test",
    );
    let accepted = replay::check_seeds(&dir, harness::validate);
    assert_eq!(accepted, 4, "accepted seeds");
}

/// Requests to the admin API, each through the whole router on one seeded store. Fewer
/// mutants than the parsers' replays: each one is a request and up to 16 listings.
#[test]
fn admin_api() {
    let r = replay::replay("admin_api", 1_500, admin_api::admin_api);
    eprintln!("admin_api: {r:?}");
    assert!(
        r.stored_accepted > 0 && r.generated > r.generated_accepted,
        "the corpus must hold requests that are served, and mutants that are refused: {r:?}"
    );
}

/// The `seed-*` inputs of `admin_api`: one request per route and query parameter, as the CLI
/// sends them (byte 0: method and credential, then the target, a newline and the body);
/// `-refused` ones carry a wrong admin token or none.
#[test]
fn seed_generator_writes_requests_to_every_admin_route() {
    let dir = replay::seed_dir("admin_api");
    // (file name, method index in the harness's table, credential bits, target, body)
    let seeds: &[(&str, u8, &str, &str)] = &[
        ("list-users", 0, "/v1/users", ""),
        ("list-groups", 0, "/v1/groups", ""),
        ("list-services", 0, "/v1/services", ""),
        ("list-policies", 0, "/v1/policies", ""),
        ("list-tokens", 0, "/v1/enrollment-tokens", ""),
        (
            "list-devices-user",
            0,
            "/v1/devices?user=Alice@Example.test&limit=2",
            "",
        ),
        (
            "list-devices-after",
            0,
            "/v1/devices?after={device}&limit=1",
            "",
        ),
        ("list-connectors-name", 0, "/v1/connectors?name=c1", ""),
        ("list-brokers", 0, "/v1/brokers/all?limit=5", ""),
        ("list-streams", 0, "/v1/streams", ""),
        (
            "audit-filter",
            0,
            "/v1/audit?limit=3&action=user.create&result=ok&actor=admin",
            "",
        ),
        ("audit-last", 0, "/v1/audit?last=2&target=demo", ""),
        ("audit-after", 0, "/v1/audit?after=1&limit=100", ""),
        (
            "access-user",
            0,
            "/v1/access?user=alice%40example.test&service=demo",
            "",
        ),
        (
            "access-device",
            0,
            "/v1/access?device={device}&transport=quic",
            "",
        ),
        ("openapi", 0, "/v1/openapi.json", ""),
        (
            "create-user",
            1,
            "/v1/users",
            r#"{"id":"carol@example.test","groups":["eng"]}"#,
        ),
        (
            "update-user",
            3,
            "/v1/users/bob@example.test",
            r#"{"disabled":true}"#,
        ),
        ("delete-user", 2, "/v1/users/carol%40example.test", ""),
        ("create-group", 1, "/v1/groups", r#"{"name":"ops"}"#),
        (
            "add-member",
            1,
            "/v1/groups/ops/members",
            r#"{"user":"bob@example.test"}"#,
        ),
        (
            "remove-member",
            2,
            "/v1/groups/ops/members/bob@example.test",
            "",
        ),
        ("delete-group", 2, "/v1/groups/ops", ""),
        (
            "create-service",
            1,
            "/v1/services",
            r#"{"name":"wiki","target":"[::ffff:10.0.0.5]:443","connectors":["c1"]}"#,
        ),
        (
            "update-service",
            3,
            "/v1/services/wiki",
            r#"{"target":"wiki.internal:8443"}"#,
        ),
        ("delete-service", 2, "/v1/services/wiki", ""),
        (
            "replace-policy",
            4,
            "/v1/policies/eng-demo",
            r#"{"text":"permit(principal == Umbra::User::\"alice@example.test\", action, resource);"}"#,
        ),
        ("check-policy", 1, "/v1/policies/eng-demo/check", r#"{}"#),
        (
            "create-token",
            1,
            "/v1/enrollment-tokens",
            r#"{"role":"broker","name":"b1","ttl_secs":600}"#,
        ),
        ("delete-token", 2, "/v1/enrollment-tokens/{token}", ""),
        (
            "revoke-connector",
            1,
            "/v1/connectors/{connector}/revoke",
            "",
        ),
        ("revoke-device", 1, "/v1/devices/{device}/revoke", ""),
        ("rotate", 1, "/v1/admin-token/rotate", ""),
        ("rotate-query", 1, "/v1/admin-token/rotate?x=1", ""),
        ("wrong-method", 4, "/v1/users", ""),
        ("no-route", 0, "users/x/y/z", ""),
    ];
    for &(name, method, target, body) in seeds {
        let mut input = vec![method];
        input.extend_from_slice(format!("{target}\n{body}").as_bytes());
        std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
    }
    // Without the admin token: a wrong one (bit 7), or none (bits 7 and 6).
    for (name, cred, method, target, body) in [
        ("wrong-token-list-users", 0x80u8, 0u8, "/v1/users", ""),
        ("no-token-head-users", 0xc0, 6, "/v1/users", ""),
        (
            "no-token-create-user",
            0xc0,
            1,
            "/v1/users",
            r#"{"id":"mallory@example.test"}"#,
        ),
        ("wrong-token-rotate", 0x80, 1, "/v1/admin-token/rotate", ""),
        (
            "no-token-revoke",
            0xc0,
            1,
            "/v1/devices/{device}/revoke",
            "",
        ),
    ] {
        let mut input = vec![cred | method];
        input.extend_from_slice(format!("{target}\n{body}").as_bytes());
        std::fs::write(dir.join(format!("seed-{name}-refused")), input).unwrap();
    }
    let accepted = replay::check_seeds(&dir, admin_api::admin_api);
    // Destructive seeds run in directory order on one store, so which are served depends on
    // the order; the reads alone are 16.
    assert!(accepted >= 16, "served seeds: {accepted}");
}
