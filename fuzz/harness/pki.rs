//! One input of the `umbra-pki` fuzz targets (`csr`, `peer_cert`): the parser calls the
//! product makes on peer input, and the invariants that must hold where a parse succeeds.
//!
//! Shared, through `#[path]`, by `fuzz/fuzz_targets/*.rs` (libFuzzer) and by
//! `crates/umbra-pki/tests/fuzz_corpus.rs` (replays the corpora under `cargo test`), so CI
//! and the fuzzer check the same thing. Uses only crates `umbra-pki` itself depends on.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use umbra_pki::{Ca, DEFAULT_LIFETIME, IssueRequest, Issued, broker_server_name};
use umbra_proto::{PeerId, Role};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Organisation of the fuzzing CA.
pub(crate) const ORG: &str = "fuzz";

/// The clock of every issuance here: fixed, so that runs are reproducible.
pub(crate) fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The fuzzing organisation's CA, made once per process.
pub(crate) fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::generate(ORG, now()).expect("a CA can be generated"))
}

/// `der` as PEM with `label`, 64 columns, as a device or a controller would send it.
pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// A CSR as the controller's CA checks it at enrollment and renewal (`Ca::issue`, which runs
/// the CSR check: PEM, DER, signature, requested extensions, key type) for an agent and for a
/// broker (granted its server name as well). Input starting with `-----` is the PEM text of
/// `EnrollRequest::csr_pem`; anything else is DER and wrapped in PEM first, so the fuzzer
/// mutates the structure rather than base64.
///
/// Never panics; an issued certificate names exactly the identity granted, is for the CSR's
/// key, is signed by the CA, is not a CA, and reports its serial and expiry truthfully.
/// True if a certificate was issued.
pub(crate) fn csr(data: &[u8]) -> bool {
    let wrapped;
    let csr_pem = if data.starts_with(b"-----") {
        // JSON strings are UTF-8: nothing else reaches the CA.
        let Ok(s) = std::str::from_utf8(data) else {
            return false;
        };
        s
    } else {
        wrapped = to_pem("CERTIFICATE REQUEST", data);
        wrapped.as_str()
    };
    let mut issued_any = false;
    for (role, id) in [(Role::Agent, "d1"), (Role::Broker, "b1")] {
        let identity = PeerId::new(ORG, role, id).expect("a valid identity");
        let dns_names = match role {
            Role::Broker => vec![broker_server_name(id)],
            _ => Vec::new(),
        };
        let req = IssueRequest {
            csr_pem,
            identity: identity.clone(),
            dns_names,
            lifetime: DEFAULT_LIFETIME,
        };
        if let Ok(issued) = ca().issue(&req, now(), [0x5a; 16]) {
            check_issued(csr_pem, &identity, &issued);
            issued_any = true;
        }
    }
    issued_any
}

fn check_issued(csr_pem: &str, identity: &PeerId, issued: &Issued) {
    let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
        .expect("an issued certificate is PEM");
    let peer = umbra_pki::peer_cert(&leaf).expect("an issued certificate carries an identity");
    assert_eq!(&peer.id, identity);
    assert_eq!(peer.serial_hex, issued.serial_hex);
    assert_eq!(peer.not_after, issued.not_after);
    assert_eq!(issued.not_after, now() + DEFAULT_LIFETIME);

    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("issued certificate parses");
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .expect("an accepted CSR is PEM");
    let (_, req) = X509CertificationRequest::from_der(der.as_ref()).expect("accepted CSR parses");
    let asked = &req.certification_request_info.subject_pki;
    assert_eq!(
        cert.public_key().algorithm,
        asked.algorithm,
        "key algorithm"
    );
    assert_eq!(
        cert.public_key().subject_public_key.data,
        asked.subject_public_key.data,
        "the certificate is for the CSR's key"
    );
    let ca_der = ca().cert_der();
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("CA parses");
    assert!(
        cert.verify_signature(Some(ca_cert.public_key())).is_ok(),
        "signed by the CA"
    );
    assert!(
        matches!(cert.basic_constraints(), Ok(Some(bc)) if !bc.value.ca),
        "an issued certificate is CA:false"
    );
}

/// A leaf certificate as the broker, the controller and the link code read a peer's identity
/// from it after a handshake (`umbra_pki::peer_cert`). Input starting with `-----` is a PEM
/// chain whose first certificate is read, as a device reads `IssuedCert::cert_pem`; anything
/// else is the DER the TLS handshake presented.
///
/// Never panics; an accepted certificate parses without trailing bytes, has exactly one URI
/// name, the strict form of the identity returned, and the serial and expiry it reports.
/// True if an identity was read.
pub(crate) fn peer_cert(data: &[u8]) -> bool {
    if data.starts_with(b"-----") {
        return CertificateDer::from_pem_slice(data).is_ok_and(|leaf| check_peer(&leaf));
    }
    check_peer(&CertificateDer::from(data))
}

fn check_peer(leaf: &CertificateDer<'_>) -> bool {
    let Ok(peer) = umbra_pki::peer_cert(leaf) else {
        return false;
    };
    assert_eq!(PeerId::from_uri(&peer.id.to_uri()).as_ref(), Ok(&peer.id));
    let (rest, cert) = x509_parser::parse_x509_certificate(leaf).expect("accepted leaf parses");
    assert!(rest.is_empty(), "accepted leaf has trailing bytes");
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(peer.serial_hex, serial);
    let secs = u64::try_from(cert.validity().not_after.timestamp()).expect("expiry after 1970");
    assert_eq!(peer.not_after, UNIX_EPOCH + Duration::from_secs(secs));
    let san = cert
        .subject_alternative_name()
        .expect("accepted leaf has one subjectAltName")
        .expect("accepted leaf has a subjectAltName");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [peer.id.to_uri()], "exactly one URI, the identity");
    assert_eq!(umbra_pki::peer_cert(leaf).ok(), Some(peer), "deterministic");
    true
}
