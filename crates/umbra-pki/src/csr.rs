//! Certificate signing requests: making them (device side) and checking them (CA side).
//!
//! A device generates its key locally and sends only a CSR, which proves it holds the key. The
//! CSR asks for nothing: no names, no extensions. The CA reads exactly two things from it, the
//! public key and the signature over it, and refuses requests that try to ask for more than the
//! CA is granting (a CA certificate, or names the device was not given).

use std::net::IpAddr;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::error::PkiError;

/// Largest CSR accepted, in bytes of PEM. A P-256 CSR is about 400 bytes.
const MAX_CSR_PEM: usize = 16 * 1024;

/// Generates an ECDSA P-256 private key, as PKCS#8 PEM.
pub fn generate_key_pem() -> Result<String, PkiError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?.serialize_pem())
}

/// Makes a CSR for `key_pem` (PKCS#8 PEM) that asks for no names: the CA decides them.
pub fn make_csr(key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::Key("not a PKCS#8 PEM key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "umbra device");
    params.distinguished_name = dn;
    Ok(params.serialize_request(&key)?.pem()?)
}

/// A subject alternative name the CA is about to grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GrantedName {
    Uri(String),
    Dns(String),
    Ip(IpAddr),
}

impl GrantedName {
    fn covers(&self, requested: &GeneralName<'_>) -> bool {
        match (self, requested) {
            (GrantedName::Uri(g), GeneralName::URI(r)) => g == r,
            (GrantedName::Dns(g), GeneralName::DNSName(r)) => g.eq_ignore_ascii_case(r),
            (GrantedName::Ip(IpAddr::V4(g)), GeneralName::IPAddress(r)) => g.octets() == *r,
            (GrantedName::Ip(IpAddr::V6(g)), GeneralName::IPAddress(r)) => g.octets() == *r,
            _ => false,
        }
    }
}

/// Parses a CSR, verifies its signature and checks that it asks for nothing beyond `granted`.
/// Returns the public key to certify.
pub(crate) fn check_csr(
    csr_pem: &str,
    granted: &[GrantedName],
) -> Result<SubjectPublicKeyInfo, PkiError> {
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(PkiError::csr("CSR is too large"));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| PkiError::csr("not a PEM certificate request"))?;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|_| PkiError::csr("malformed certificate request"))?;
    if !rest.is_empty() {
        return Err(PkiError::csr("trailing data after certificate request"));
    }
    // Proof of possession: the request is signed by the key it asks us to certify.
    csr.verify_signature()
        .map_err(|_| PkiError::csr("signature does not verify (proof of possession failed)"))?;

    // The CA copies nothing from the request, but a request that asks for more than it is
    // granted is either a bug or an attack; refuse it rather than silently narrow it.
    for attr in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &req.extensions {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(PkiError::csr("CSR requests a CA certificate"));
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if !granted.iter().any(|g| g.covers(name)) {
                            return Err(PkiError::csr(format!(
                                "CSR requests a name that is not being granted: {}",
                                describe(name)
                            )));
                        }
                    }
                }
                ParsedExtension::ParseError { .. } => {
                    return Err(PkiError::csr("CSR has a malformed extension"));
                }
                _ => {}
            }
        }
    }

    let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| PkiError::csr("unsupported public key type"))?;
    let alg = spki.algorithm();
    if ![
        &PKCS_ECDSA_P256_SHA256,
        &PKCS_ECDSA_P384_SHA384,
        &PKCS_ED25519,
    ]
    .contains(&alg)
    {
        return Err(PkiError::csr(
            "public key must be ECDSA P-256, ECDSA P-384 or Ed25519",
        ));
    }
    Ok(spki)
}

/// A short, printable description of a requested name for error messages.
fn describe(name: &GeneralName<'_>) -> String {
    let s = match name {
        GeneralName::URI(u) => format!("URI {u}"),
        GeneralName::DNSName(d) => format!("DNS {d}"),
        GeneralName::IPAddress(b) => format!("IP {}", hex::encode(b)),
        GeneralName::RFC822Name(e) => format!("email {e}"),
        _ => "a non-URI/DNS/IP name".to_owned(),
    };
    // Peer-supplied: keep it short and printable.
    s.chars().filter(|c| !c.is_control()).take(120).collect()
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, IsCa, SanType};

    use super::*;

    fn uri(s: &str) -> GrantedName {
        GrantedName::Uri(s.to_owned())
    }

    #[test]
    fn device_csr_is_accepted() {
        let key = generate_key_pem().unwrap();
        let csr = make_csr(&key).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let spki = check_csr(&csr, &[uri("umbra://o/agent/a")]).unwrap();
        let kp = KeyPair::from_pem(&key).unwrap();
        assert_eq!(spki.der_bytes(), kp.der_bytes());
    }

    #[test]
    fn bad_key_pem_is_refused() {
        assert!(matches!(make_csr("nope"), Err(PkiError::Key(_))));
    }

    #[test]
    fn tampered_csr_signature_is_refused() {
        let csr = make_csr(&generate_key_pem().unwrap()).unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Flip a bit in the subject CN ("umbra device"), inside the signed part.
        let pos = der.windows(5).position(|w| w == b"umbra").unwrap();
        der[pos] ^= 0x01;
        let pem = to_pem(&der);
        let err = check_csr(&pem, &[]).unwrap_err();
        assert!(err.to_string().contains("proof of possession"), "{err}");
    }

    #[test]
    fn csr_with_other_key_signature_is_refused() {
        // Public key of A, signature made by B: splice B's signature onto A's request info.
        let a = make_csr(&generate_key_pem().unwrap()).unwrap();
        let b = make_csr(&generate_key_pem().unwrap()).unwrap();
        let a = CertificateSigningRequestDer::from_pem_slice(a.as_bytes()).unwrap();
        let b = CertificateSigningRequestDer::from_pem_slice(b.as_bytes()).unwrap();
        let (_, pa) =
            x509_parser::certification_request::X509CertificationRequest::from_der(a.as_ref())
                .unwrap();
        let (_, pb) =
            x509_parser::certification_request::X509CertificationRequest::from_der(b.as_ref())
                .unwrap();
        let info_a = pa.certification_request_info.raw;
        let info_b = pb.certification_request_info.raw;
        let end_b = info_b.as_ptr() as usize - b.as_ref().as_ptr() as usize + info_b.len();
        let mut body = info_a.to_vec();
        body.extend_from_slice(&b.as_ref()[end_b..]);
        let der = der_sequence(&body);
        assert!(check_csr(&to_pem(&der), &[]).is_err());
        // The legitimate twin passes.
        assert!(check_csr(&to_pem(a.as_ref()), &[]).is_ok());
    }

    #[test]
    fn csr_requesting_ca_is_refused() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = check_csr(&csr, &[]).unwrap_err();
        assert!(err.to_string().contains("CA certificate"), "{err}");
        // Explicit CA:false is harmless.
        params.is_ca = IsCa::ExplicitNoCa;
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(check_csr(&csr, &[]).is_ok());
    }

    #[test]
    fn csr_requesting_other_names_is_refused() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("umbra://o/broker/b1".try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = check_csr(&csr, &[uri("umbra://o/agent/a")]).unwrap_err();
        assert!(err.to_string().contains("not being granted"), "{err}");
        // Asking for exactly what is granted is fine.
        assert!(check_csr(&csr, &[uri("umbra://o/broker/b1")]).is_ok());

        params.subject_alt_names = vec![
            SanType::DnsName("b1.broker.umbra.internal".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let granted = [
            GrantedName::Dns("b1.broker.umbra.internal".into()),
            GrantedName::Ip("127.0.0.1".parse().unwrap()),
        ];
        assert!(check_csr(&csr, &granted).is_ok());
        assert!(check_csr(&csr, &granted[..1]).is_err());
        assert!(check_csr(&csr, &[GrantedName::Ip("::1".parse().unwrap())]).is_err());
    }

    /// Only the key types the CA issues for: an RSA or P-521 key is refused, naming the types;
    /// the twins, P-256, P-384 and Ed25519, are accepted.
    #[test]
    fn csr_key_types() {
        for (alg, ok) in [
            (&rcgen::PKCS_RSA_SHA256, false),
            (&rcgen::PKCS_ECDSA_P521_SHA512, false),
            (&rcgen::PKCS_ECDSA_P256_SHA256, true),
            (&rcgen::PKCS_ECDSA_P384_SHA384, true),
            (&rcgen::PKCS_ED25519, true),
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            match check_csr(&csr, &[]) {
                Ok(_) => assert!(ok, "{alg:?} accepted"),
                Err(e) => {
                    assert!(!ok, "{alg:?} refused: {e}");
                    if *alg == rcgen::PKCS_RSA_SHA256 {
                        let e = e.to_string();
                        assert!(e.contains("ECDSA P-256, ECDSA P-384 or Ed25519"), "{e}");
                    }
                }
            }
        }
    }

    /// Bytes after the request, inside the PEM, are refused; the same request without them
    /// is accepted.
    #[test]
    fn trailing_data_is_refused() {
        let csr = make_csr(&generate_key_pem().unwrap()).unwrap();
        let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let mut longer = der.as_ref().to_vec();
        longer.extend_from_slice(&[0x05, 0x00]);
        let err = check_csr(&to_pem(&longer), &[]).unwrap_err();
        assert!(err.to_string().contains("trailing data"), "{err}");
        assert!(check_csr(&to_pem(der.as_ref()), &[]).is_ok());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(check_csr("", &[]).is_err());
        assert!(
            check_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &[]
            )
            .is_err()
        );
        assert!(check_csr(&"A".repeat(MAX_CSR_PEM + 1), &[]).is_err());
    }

    fn der_sequence(body: &[u8]) -> Vec<u8> {
        let n = body.len();
        let mut der = match n {
            0..128 => vec![0x30, n as u8],
            128..256 => vec![0x30, 0x81, n as u8],
            _ => vec![0x30, 0x82, (n >> 8) as u8, n as u8],
        };
        der.extend_from_slice(body);
        der
    }

    fn to_pem(der: &[u8]) -> String {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b}\n-----END CERTIFICATE REQUEST-----\n")
    }
}
