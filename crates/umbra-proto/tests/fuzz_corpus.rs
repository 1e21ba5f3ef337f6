//! The fuzz corpora of the `umbra-proto` targets, replayed under `cargo test` (no nightly, no
//! libFuzzer): every file of `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`, then
//! seeded mutants of them, through the same checks the fuzz targets run
//! (`fuzz/harness/proto.rs`). See `fuzz/README.md`.

#[path = "../../../fuzz/harness/proto.rs"]
mod harness;
#[path = "../../../fuzz/harness/replay.rs"]
mod replay;

#[test]
fn frame() {
    let r = replay::replay("frame", 50_000, harness::frame);
    eprintln!("frame: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored input parses: the invariants went unchecked"
    );
}

#[test]
fn snapshot() {
    let r = replay::replay("snapshot", 20_000, harness::snapshot);
    eprintln!("snapshot: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored input parses: the invariants went unchecked"
    );
}

#[test]
fn identity() {
    let r = replay::replay("identity", 50_000, harness::identity);
    eprintln!("identity: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored input parses: the invariants went unchecked"
    );
}

#[test]
fn api_request() {
    let r = replay::replay("api_request", 20_000, harness::api_request);
    eprintln!("api_request: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored input parses: the invariants went unchecked"
    );
}

/// The `seed-*` inputs of `snapshot` (its libFuzzer-grown corpus is mostly malformed JSON):
/// one valid answer of each kind the controller sends peers, each accepted. Written to a
/// scratch directory; `UMBRA_FUZZ_WRITE_SEEDS=1` writes them to `fuzz/corpus/snapshot/`.
#[test]
fn seed_generator_writes_answers_the_parser_accepts() {
    use umbra_proto::api::{
        ApiError, BrokerInfo, BrokerList, ConnectorConfig, IssuedCert, PublishedTarget,
    };
    use umbra_proto::snapshot::{
        ConnectorFacts, DeviceFacts, PolicyText, ServiceFacts, TokenKey, UserFacts,
    };

    let dir = replay::seed_dir("snapshot");
    let write = |name: &str, json: Vec<u8>| {
        std::fs::write(dir.join(format!("seed-{name}.json")), json).unwrap();
    };
    let broker = BrokerInfo {
        id: "b1".into(),
        name: "eu-1".into(),
        quic_addr: Some("10.0.0.1:4433".into()),
        tcp_addr: None,
        server_name: "b1.broker.umbra.internal".into(),
    };
    let snap = umbra_proto::Snapshot {
        version: 7,
        org: "acme".into(),
        issued_at: 1_800_000_000,
        users: vec![UserFacts {
            id: "alice@example.com".into(),
            groups: vec!["eng".into()],
            disabled: false,
        }],
        groups: vec!["eng".into()],
        devices: vec![DeviceFacts {
            id: "d1".into(),
            user: "alice@example.com".into(),
            revoked: false,
        }],
        connectors: vec![ConnectorFacts {
            id: "c1".into(),
            name: "dc".into(),
            revoked: true,
        }],
        brokers: vec![broker.clone()],
        services: vec![ServiceFacts {
            name: "db".into(),
            target: "db.internal:5432".into(),
            connectors: vec!["c1".into()],
        }],
        policies: vec![PolicyText {
            id: "p1".into(),
            text: "permit(principal, action, resource);".into(),
        }],
        revoked_serials: vec!["4a5b".into()],
        token_keys: vec![TokenKey {
            kid: "k1".into(),
            public_key_pem: "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n".into(),
        }],
    };
    write("snapshot", serde_json::to_vec(&snap).unwrap());
    write(
        "snapshot-empty",
        serde_json::to_vec(&umbra_proto::Snapshot::default()).unwrap(),
    );
    write(
        "connector-config",
        serde_json::to_vec(&ConnectorConfig {
            connector_id: "c1".into(),
            version: 3,
            targets: vec![PublishedTarget {
                service: "db".into(),
                target: "[::1]:5432".into(),
            }],
        })
        .unwrap(),
    );
    write(
        "issued-cert",
        serde_json::to_vec(&IssuedCert {
            identity: "umbra://acme/agent/d1".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n".into(),
            ca_pem: String::new(),
            serial: "4a5b".into(),
            not_after: 1_800_086_400,
            user: Some("alice@example.com".into()),
            brokers: vec![broker.clone()],
        })
        .unwrap(),
    );
    write(
        "broker-list",
        serde_json::to_vec(&BrokerList {
            brokers: vec![broker],
            tag: "00112233445566778899aabbccddeeff".into(),
        })
        .unwrap(),
    );
    write(
        "api-error",
        serde_json::to_vec(&ApiError {
            error: "invalid JSON body: unknown field `nmae`".into(),
            field: Some("nmae".into()),
        })
        .unwrap(),
    );
    // Every one is a valid answer of its kind.
    let accepted = replay::check_seeds(&dir, harness::snapshot);
    assert_eq!(accepted, std::fs::read_dir(&dir).unwrap().count());
}

/// The replay itself: a check that panics fails the test, naming the input.
#[test]
#[should_panic(expected = "fuzz target frame: ")]
fn a_panicking_check_fails_the_replay() {
    replay::replay("frame", 0, |_| panic!("a planted failure"));
}
