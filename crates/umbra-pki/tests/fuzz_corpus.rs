//! The fuzz corpora of the `umbra-pki` targets (`csr`, `peer_cert`), replayed under
//! `cargo test` (no nightly, no libFuzzer): every file of `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/`, then seeded mutants of them, through the same checks the fuzz
//! targets run (`fuzz/harness/pki.rs`). See `fuzz/README.md`.
//!
//! `seed_generator_writes_inputs_the_parsers_handle` makes the seed inputs of `csr`,
//! `peer_cert` and `api_request` with the crate's own APIs and checks them; with
//! `UMBRA_FUZZ_WRITE_SEEDS=1` it writes them into `fuzz/corpus/` (see `fuzz/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/harness/pki.rs"]
mod harness;
#[path = "../../../fuzz/harness/replay.rs"]
mod replay;

use std::fs;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ECDSA_P521_SHA512,
    PKCS_ED25519, SanType, SignatureAlgorithm,
};
use umbra_pki::{CertificateDer, IssueRequest, generate_key_pem, make_csr};
use umbra_proto::api::EnrollToken;
use umbra_proto::{PeerId, Role};

#[test]
fn csr() {
    let r = replay::replay("csr", 30_000, harness::csr);
    eprintln!("csr: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored CSR is accepted: the invariants went unchecked"
    );
}

#[test]
fn peer_cert() {
    let r = replay::replay("peer_cert", 30_000, harness::peer_cert);
    eprintln!("peer_cert: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored leaf is accepted: the invariants went unchecked"
    );
}

/// A CSR made on the spot is still accepted through the harness (the stored ones could go
/// stale if the CA's rules changed), and a certificate issued on the spot still reads.
#[test]
fn fresh_inputs_are_accepted() {
    let csr_pem = make_csr(&generate_key_pem().unwrap()).unwrap();
    assert!(harness::csr(csr_pem.as_bytes()));
    assert!(harness::csr(&pem_der(&csr_pem)));
    let leaf = issued_leaf(Role::Agent, "d1");
    assert!(harness::peer_cert(leaf.as_ref()));
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

fn issued_leaf(role: Role, id: &str) -> CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    let dns = match role {
        Role::Broker => vec![umbra_pki::broker_server_name(id)],
        _ => vec![],
    };
    let csr_pem = make_csr(&generate_key_pem().unwrap()).unwrap();
    let req = IssueRequest {
        csr_pem: &csr_pem,
        identity: PeerId::new(harness::ORG, role, id).unwrap(),
        dns_names: dns,
        lifetime: Duration::from_secs(3600),
    };
    let issued = harness::ca()
        .issue(&req, harness::now(), [0x42; 16])
        .unwrap();
    CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
}

/// A CSR over a fresh key of `alg`, with `edit` applied to otherwise default parameters.
fn csr_with(
    alg: &'static SignatureAlgorithm,
    edit: impl FnOnce(&mut CertificateParams),
) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "umbra device");
    edit(&mut p);
    p.serialize_request(&key).unwrap().der().to_vec()
}

fn self_signed(sans: Vec<SanType>) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn seed_generator_writes_inputs_the_parsers_handle() {
    let dirs: std::collections::BTreeMap<&str, std::path::PathBuf> =
        ["csr", "peer_cert", "api_request"]
            .into_iter()
            .map(|t| (t, replay::seed_dir(t)))
            .collect();
    let write = |target: &str, name: &str, bytes: &[u8]| {
        fs::write(dirs[target].join(format!("seed-{name}")), bytes).unwrap();
    };

    // csr: what devices send (DER and PEM), then what the CA must refuse or may ignore.
    let device_pem = make_csr(&generate_key_pem().unwrap()).unwrap();
    write("csr", "device-p256.der", &pem_der(&device_pem));
    write("csr", "device-p256.pem", device_pem.as_bytes());
    let leaf_pem = harness::to_pem("CERTIFICATE", issued_leaf(Role::Agent, "d1").as_ref());
    write(
        "csr",
        "after-a-certificate.pem",
        format!("{leaf_pem}{device_pem}").as_bytes(),
    );
    write(
        "csr",
        "p384.der",
        &csr_with(&PKCS_ECDSA_P384_SHA384, |_| {}),
    );
    write("csr", "ed25519.der", &csr_with(&PKCS_ED25519, |_| {}));
    if let Ok(k) = KeyPair::generate_for(&PKCS_ECDSA_P521_SHA512) {
        let csr = CertificateParams::default().serialize_request(&k).unwrap();
        write("csr", "p521-refused.der", csr.der().as_ref());
    }
    write(
        "csr",
        "asks-ca-refused.der",
        &csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }),
    );
    write(
        "csr",
        "explicit-no-ca.der",
        &csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
            p.is_ca = IsCa::ExplicitNoCa;
        }),
    );
    write(
        "csr",
        "asks-own-uri.der",
        &csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
            p.subject_alt_names = vec![uri("umbra://fuzz/agent/d1")];
        }),
    );
    write(
        "csr",
        "asks-other-uri-refused.der",
        &csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
            p.subject_alt_names = vec![uri("umbra://fuzz/broker/b9")];
        }),
    );
    write(
        "csr",
        "asks-broker-dns.der",
        &csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
            p.subject_alt_names = vec![SanType::DnsName(
                "B1.broker.umbra.internal".try_into().unwrap(),
            )];
        }),
    );
    write(
        "csr",
        "asks-ip-email-refused.der",
        &csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
            p.subject_alt_names = vec![
                SanType::IpAddress("10.0.0.1".parse().unwrap()),
                SanType::IpAddress("::1".parse().unwrap()),
                SanType::Rfc822Name("a@example.com".try_into().unwrap()),
            ];
        }),
    );
    write(
        "csr",
        "usages.der",
        &csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }),
    );

    // peer_cert: leaves the CA issues, then certificates that carry no usable identity.
    for (role, id) in [
        (Role::Agent, "d1"),
        (Role::Connector, "c1"),
        (Role::Broker, "b1"),
        (Role::Controller, "controller"),
    ] {
        write(
            "peer_cert",
            &format!("{role}.der"),
            issued_leaf(role, id).as_ref(),
        );
    }
    let chain = format!(
        "{}{}",
        harness::to_pem("CERTIFICATE", issued_leaf(Role::Agent, "d2").as_ref()),
        harness::ca().cert_pem()
    );
    write("peer_cert", "chain.pem", chain.as_bytes());
    write(
        "peer_cert",
        "ca-no-san.der",
        harness::ca().cert_der().as_ref(),
    );
    for (name, sans) in [
        (
            "two-uris",
            vec![uri("umbra://fuzz/agent/a"), uri("umbra://fuzz/agent/b")],
        ),
        (
            "email",
            vec![
                uri("umbra://fuzz/agent/a"),
                SanType::Rfc822Name("a@example.com".try_into().unwrap()),
            ],
        ),
        (
            "dns-only",
            vec![SanType::DnsName("x.example".try_into().unwrap())],
        ),
        ("https-uri", vec![uri("https://fuzz/agent/a")]),
        ("extra-segment", vec![uri("umbra://fuzz/agent/a/b")]),
        (
            "dns-ip",
            vec![
                uri("umbra://fuzz/broker/b2"),
                SanType::DnsName("b2.broker.umbra.internal".try_into().unwrap()),
                SanType::IpAddress("10.0.0.2".parse().unwrap()),
            ],
        ),
    ] {
        write(
            "peer_cert",
            &format!("self-signed-{name}.der"),
            &self_signed(sans),
        );
    }

    // api_request: every body a peer or an administrator sends, valid, and near misses.
    // (No serde_json here: the JSON is written out; `esc` makes a PEM a JSON string.)
    let token = EnrollToken {
        ca_sha256: umbra_pki::sha256(harness::ca().cert_der().as_ref()),
        secret: "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcd".into(),
    };
    let esc = |s: &str| s.replace('\n', "\\n");
    let csr = esc(&device_pem);
    let bodies = [
        ("enroll-printed-token", format!(r#"{{"token":"{token}","csr_pem":"{csr}"}}"#)),
        ("enroll-bare-secret", format!(r#"{{"token":" {} ","csr_pem":"{csr}"}}"#, token.secret)),
        ("enroll-unknown-field", r#"{"token":"x","csr_pem":"y","role":"broker"}"#.to_owned()),
        ("renew", format!(r#"{{"csr_pem":"{csr}"}}"#)),
        ("heartbeat", r#"{"name":"b1","quic_addr":"10.0.0.1:4433","tcp_addr":"[::1]:443",
"server_name":"b1.broker.umbra.internal","snapshot_version":7,
"streams":[{"id":1,"broker":"b1","user":"a@example.com","device":"d1","service":"db",
"connector":"c1","transport":"quic","started_at":1800000000,"bytes_up":10,"bytes_down":20}],
"audit":[{"at_ms":1800000000000,"actor":"umbra://fuzz/agent/d1","action":"stream.open",
"target":"db","result":"allow","detail":{"policy":["p1"],"rtt":1.5,"n":null,"s":"\u00e9\ud83d\ude00"}}],
"audit_seq":{"epoch":42,"first":1}}"#.to_owned()),
        ("heartbeat-minimal", r#"{"name":"b1","quic_addr":null,"tcp_addr":null,"server_name":"b1","snapshot_version":0,"audit":[]}"#.to_owned()),
        ("create-user", r#"{"id":"alice@example.com","groups":["eng"]}"#.to_owned()),
        ("create-group", r#"{"name":"eng"}"#.to_owned()),
        ("create-service", r#"{"name":"db","target":"db.internal:5432","connectors":["c1"]}"#.to_owned()),
        ("create-policy", r#"{"name":"p1","text":"permit(principal in Umbra::Group::\"eng\", action, resource == Umbra::Service::\"db\");"}"#.to_owned()),
        ("create-token-agent", r#"{"role":"agent","user":"alice@example.com"}"#.to_owned()),
        ("create-token-broker", r#"{"role":"broker","name":"b1","ttl_secs":3600}"#.to_owned()),
        ("update-user", r#"{"disabled":true}"#.to_owned()),
        ("update-service", r#"{"target":"[fd00::5]:5432","connectors":["c1","c2"]}"#.to_owned()),
        ("update-service-target", r#"{"target":"db2.internal:5432"}"#.to_owned()),
        ("check-policy-remove", "{}".to_owned()),
        ("replace-policy", r#"{"text":"permit(principal == Umbra::User::\"a@example.com\", action, resource);"}"#.to_owned()),
    ];
    for (name, body) in bodies {
        write("api_request", &format!("{name}.json"), body.as_bytes());
    }
    // None makes a check panic; valid ones are among them (some are meant to be refused).
    assert!(replay::check_seeds(&dirs["csr"], harness::csr) > 0);
    assert!(replay::check_seeds(&dirs["peer_cert"], harness::peer_cert) > 0);
    // The request bodies are checked by the `api_request` replay of `umbra-proto`, which owns
    // their types; here only that each was written.
    let bodies = fs::read_dir(&dirs["api_request"]).unwrap().count();
    assert!(bodies >= 10, "{bodies} request body seeds");
}
