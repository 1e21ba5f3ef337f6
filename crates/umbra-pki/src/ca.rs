//! The organisation's certificate authority and certificate issuance.
//!
//! One self-signed ECDSA P-256 root per organisation, `pathlen:0`, so everything it signs is an
//! end entity. Issuance takes a CSR only as proof of possession of a key: the CA decides every
//! field of the certificate (subject, names, CA:false, key usages, validity, serial), and
//! refuses a request that asks for anything it is not granting. Time (`now`) and serial
//! randomness are parameters, so expiry and rotation are tested without clocks.
//!
//! The CA private key leaves this module only sealed ([`Ca::seal`]); `Debug` never shows it.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName};
use time::OffsetDateTime;
use umbra_proto::{PeerId, Role};

use crate::crypto::{random_bytes, sha256};
use crate::csr::{GrantedName, check_csr, generate_key_pem, make_csr};
use crate::error::PkiError;
use crate::identity::{parse_cert, to_system_time};
use crate::seal::{self, KeyEncryptionKey, SealedCa};

/// Longest lifetime of an issued certificate. Short-lived certificates are how access ends:
/// a revoked device cannot renew.
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Lifetime used when none is configured.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a CA certificate.
const CA_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 3600);
/// How long before it is issued a certificate starts: peers judge it by their own clocks, and
/// a host whose clock is behind the controller's by up to this much (a laptop without time
/// sync, a VM resumed) still takes a certificate issued a moment ago. Less than this refused
/// access after every issue and renewal wherever a clock was a few minutes behind. The
/// lifetime granted runs from the issue, not from this earlier start: see
/// `umbra_link::enroll::renew_at`.
pub const BACKDATE: Duration = Duration::from_secs(600);

/// An organisation's CA: certificate and (unsealed, in memory) private key.
pub struct Ca {
    org: String,
    key: KeyPair,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    sha256: [u8; 32],
}

/// What to issue: a CSR (proof of key possession) and the identity the CA grants it.
#[derive(Debug, Clone)]
pub struct IssueRequest<'a> {
    /// The requester's CSR, PEM. Only its public key is used.
    pub csr_pem: &'a str,
    /// The identity to put in the certificate (the one `umbra://` URI SAN).
    pub identity: PeerId,
    /// Extra DNS names or IP addresses (for servers: brokers, the controller).
    pub dns_names: Vec<String>,
    /// Validity from `now`; 1 s ..= [`MAX_LIFETIME`].
    pub lifetime: Duration,
}

/// An issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its serial number, lowercase hex (as [`crate::PeerCert::serial_hex`] reports it).
    pub serial_hex: String,
    /// End of validity (whole seconds).
    pub not_after: SystemTime,
}

impl Ca {
    /// Creates a new CA for `org`: ECDSA P-256, CN "Umbra CA <org>", valid 10 years from `now`.
    pub fn generate(org: &str, now: SystemTime) -> Result<Ca, PkiError> {
        if !umbra_proto::valid_name(org) {
            return Err(PkiError::Name(format!("organisation {org:?}")));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Umbra CA {org}"));
        dn.push(DnType::OrganizationName, org);
        params.distinguished_name = dn;
        // pathlen:0 — this CA signs end entities only; a leaf can never act as an issuer.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_odt(sub(now, BACKDATE)?)?;
        params.not_after = to_odt(add(now, CA_LIFETIME)?)?;
        params.serial_number = Some(serial_number(random_bytes()));
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(Ca {
            org: org.to_owned(),
            key,
            cert_pem: cert.pem(),
            sha256: sha256(&cert_der),
            cert_der,
        })
    }

    /// Seals the private key under `kek` for storage.
    pub fn seal(&self, kek: &KeyEncryptionKey) -> Result<SealedCa, PkiError> {
        let mut pkcs8 = self.key.serialize_der();
        let sealed = seal::seal(kek, &self.sha256, &pkcs8);
        pkcs8.fill(0);
        Ok(SealedCa {
            cert_pem: self.cert_pem.clone(),
            sealed_key: sealed?,
        })
    }

    /// Opens a sealed CA. A wrong `kek`, or a sealed key or certificate that was altered, is
    /// [`PkiError::Unseal`].
    pub fn unseal(sealed: &SealedCa, kek: &KeyEncryptionKey) -> Result<Ca, PkiError> {
        let cert_der = CertificateDer::from_pem_slice(sealed.cert_pem.as_bytes())
            .map_err(|_| PkiError::Cert("CA certificate is not PEM".into()))?;
        let digest = sha256(&cert_der);
        let mut pkcs8 = seal::open(kek, &digest, &sealed.sealed_key)?;
        let key = KeyPair::try_from(pkcs8.as_slice());
        pkcs8.fill(0);
        let key = key.map_err(|_| PkiError::Key("sealed CA key is not a PKCS#8 key"))?;

        let cert = parse_cert(&cert_der)?;
        if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(PkiError::Key(
                "sealed CA key does not match the CA certificate",
            ));
        }
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(PkiError::Cert("CA certificate is not a CA".into())),
        }
        let org = cert
            .subject()
            .iter_organization()
            .next()
            .and_then(|a| a.as_str().ok())
            .filter(|o| umbra_proto::valid_name(o))
            .ok_or_else(|| PkiError::Cert("CA certificate has no valid organisation".into()))?
            .to_owned();
        Ok(Ca {
            org,
            key,
            cert_pem: sealed.cert_pem.clone(),
            sha256: digest,
            cert_der: cert_der.into_owned(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// SHA-256 of the CA certificate DER: the pin carried in enrollment tokens.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// The organisation this CA serves.
    pub fn org(&self) -> &str {
        &self.org
    }

    /// Signs a certificate for `req.identity` over the key in `req.csr_pem`.
    ///
    /// The CA decides every field: subject and SANs are exactly the identity URI plus
    /// `req.dns_names` (DNS or IP SANs), basicConstraints CA:false, keyUsage digitalSignature,
    /// extended key usage by role (agent, connector: clientAuth; broker, controller: serverAuth
    /// and clientAuth), validity `now - 60 s ..= now + lifetime`, serial from `serial`.
    ///
    /// Refused with [`PkiError::Csr`]: a CSR that is not PEM, does not parse or whose signature
    /// does not verify; one requesting a CA certificate or any name not being granted; a
    /// lifetime of zero or above [`MAX_LIFETIME`]; an identity of another organisation.
    pub fn issue(
        &self,
        req: &IssueRequest<'_>,
        now: SystemTime,
        serial: [u8; 16],
    ) -> Result<Issued, PkiError> {
        if req.lifetime.is_zero() {
            return Err(PkiError::csr("lifetime must be above zero"));
        }
        if req.lifetime > MAX_LIFETIME {
            return Err(PkiError::csr(format!(
                "lifetime {} s exceeds the maximum of {} s",
                req.lifetime.as_secs(),
                MAX_LIFETIME.as_secs()
            )));
        }
        if req.identity.org != self.org {
            return Err(PkiError::csr(format!(
                "identity belongs to organisation {:?}, this CA serves {:?}",
                req.identity.org, self.org
            )));
        }
        let uri = req.identity.to_uri();
        let mut granted = vec![GrantedName::Uri(uri.clone())];
        for name in &req.dns_names {
            granted.push(parse_server_name(name)?);
        }
        let public_key = check_csr(req.csr_pem, &granted)?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, uri);
        dn.push(DnType::OrganizationName, self.org.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = granted
            .into_iter()
            .map(|g| {
                Ok(match g {
                    GrantedName::Uri(u) => SanType::URI(u.try_into()?),
                    GrantedName::Dns(d) => SanType::DnsName(d.try_into()?),
                    GrantedName::Ip(ip) => SanType::IpAddress(ip),
                })
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match req.identity.role {
            Role::Agent | Role::Connector => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Broker | Role::Controller => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.not_before = to_odt(sub(now, BACKDATE)?)?;
        params.not_after = to_odt(add(now, req.lifetime)?)?;
        params.serial_number = Some(serial_number(serial));
        params.use_authority_key_identifier_extension = true;

        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let cert = params.signed_by(&public_key, &issuer)?;

        // Report what the certificate actually says, read back the way peers will read it.
        let parsed = parse_cert(cert.der())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial_hex: hex::encode(parsed.raw_serial()),
            not_after: to_system_time(parsed.validity().not_after.to_datetime())?,
        })
    }

    /// Issues a server certificate with a key generated here (for the controller's own HTTPS
    /// endpoint). Returns the certificate and the private key PEM.
    pub fn issue_server(
        &self,
        identity: &PeerId,
        names: &[String],
        lifetime: Duration,
        now: SystemTime,
        serial: [u8; 16],
    ) -> Result<(Issued, String), PkiError> {
        let key_pem = generate_key_pem()?;
        let csr_pem = make_csr(&key_pem)?;
        let issued = self.issue(
            &IssueRequest {
                csr_pem: &csr_pem,
                identity: identity.clone(),
                dns_names: names.to_vec(),
                lifetime,
            },
            now,
            serial,
        )?;
        Ok((issued, key_pem))
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("org", &self.org)
            .field("cert_sha256", &hex::encode(self.sha256))
            .finish_non_exhaustive()
    }
}

/// The DNS name brokers carry and agents/connectors verify: `<id>.broker.umbra.internal`.
pub fn broker_server_name(id: &str) -> String {
    format!("{id}.broker.umbra.internal")
}

/// A granted server name: an IP address, else a syntactically valid DNS name.
fn parse_server_name(name: &str) -> Result<GrantedName, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(GrantedName::Ip(ip));
    }
    DnsName::try_from(name)
        .map(|d| GrantedName::Dns(d.as_ref().to_ascii_lowercase()))
        .map_err(|_| PkiError::Name(format!("server name {name:?}")))
}

/// A positive 16-byte serial with its top byte non-zero, so its DER encoding is exactly these
/// 16 bytes (and hex of the encoding round-trips).
fn serial_number(mut serial: [u8; 16]) -> SerialNumber {
    serial[0] = (serial[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&serial)
}

fn to_odt(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::csr("time before 1970"))?
        .as_secs();
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| PkiError::csr("time out of range"))
}

fn add(t: SystemTime, d: Duration) -> Result<SystemTime, PkiError> {
    t.checked_add(d)
        .ok_or_else(|| PkiError::csr("time out of range"))
}

fn sub(t: SystemTime, d: Duration) -> Result<SystemTime, PkiError> {
    t.checked_sub(d)
        .ok_or_else(|| PkiError::csr("time out of range"))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use rcgen::CertificateParams;
    use x509_parser::extensions::GeneralName;

    use super::*;
    use crate::testutil::Org;
    use crate::{PeerCert, peer_cert};

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn request<'a>(csr: &'a str, identity: PeerId) -> IssueRequest<'a> {
        IssueRequest {
            csr_pem: csr,
            identity,
            dns_names: vec![],
            lifetime: DEFAULT_LIFETIME,
        }
    }

    #[test]
    fn generated_ca_is_a_pathlen0_root() {
        let ca = Ca::generate("acme", t0()).unwrap();
        assert_eq!(ca.org(), "acme");
        assert_eq!(ca.sha256(), sha256(&ca.cert_der()));
        let cert = parse_cert(&ca.cert_der).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "Umbra CA acme"
        );
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign());
        assert_eq!(
            to_system_time(cert.validity().not_after.to_datetime()).unwrap(),
            t0() + CA_LIFETIME
        );
        assert!(Ca::generate("Not Valid", t0()).is_err());
    }

    #[test]
    fn issued_certificate_fields_are_decided_by_the_ca() {
        let org = Org::new("acme");
        let key = generate_key_pem().unwrap();
        let csr = make_csr(&key).unwrap();
        let id = org.pid(Role::Agent, "d-1");
        let issued = org
            .ca
            .issue(&request(&csr, id.clone()), t0(), [0xff; 16])
            .unwrap();
        assert_eq!(issued.not_after, t0() + DEFAULT_LIFETIME);
        assert_eq!(issued.serial_hex, format!("7f{}", "ff".repeat(15)));

        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let cert = parse_cert(&der).unwrap();
        // CA:false, explicitly.
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        // digitalSignature only.
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        // Agent: clientAuth only.
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        // Exactly the identity URI.
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            vec![GeneralName::URI("umbra://acme/agent/d-1")]
        );
        // Validity: backdated by ten minutes.
        assert_eq!(
            to_system_time(cert.validity().not_before.to_datetime()).unwrap(),
            t0() - BACKDATE
        );
        // Issued by this CA.
        let ca = org.ca.cert_der();
        let ca_cert = parse_cert(&ca).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        // Peers read back the same facts.
        assert_eq!(
            peer_cert(&der).unwrap(),
            PeerCert {
                id,
                serial_hex: issued.serial_hex,
                not_after: issued.not_after
            }
        );
    }

    #[test]
    fn server_roles_get_server_auth_and_names() {
        let org = Org::new("acme");
        let csr = make_csr(&generate_key_pem().unwrap()).unwrap();
        let mut req = request(&csr, org.pid(Role::Broker, "b1"));
        req.dns_names = vec![broker_server_name("b1"), "127.0.0.1".into(), "::1".into()];
        let issued = org.ca.issue(&req, t0(), [1; 16]).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let cert = parse_cert(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            vec![
                GeneralName::URI("umbra://acme/broker/b1"),
                GeneralName::DNSName("b1.broker.umbra.internal"),
                GeneralName::IPAddress(&[127, 0, 0, 1]),
                GeneralName::IPAddress(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            ]
        );
        req.dns_names = vec!["not a name!".into()];
        assert!(matches!(
            org.ca.issue(&req, t0(), [1; 16]),
            Err(PkiError::Name(_))
        ));
    }

    #[test]
    fn lifetime_bounds() {
        let org = Org::new("acme");
        let csr = make_csr(&generate_key_pem().unwrap()).unwrap();
        let mut req = request(&csr, org.pid(Role::Agent, "d"));
        for bad in [Duration::ZERO, MAX_LIFETIME + Duration::from_secs(1)] {
            req.lifetime = bad;
            assert!(matches!(
                org.ca.issue(&req, t0(), [1; 16]),
                Err(PkiError::Csr(_))
            ));
        }
        for good in [Duration::from_secs(1), MAX_LIFETIME] {
            req.lifetime = good;
            let issued = org.ca.issue(&req, t0(), [1; 16]).unwrap();
            assert_eq!(issued.not_after, t0() + good);
        }
    }

    #[test]
    fn identity_of_another_org_is_refused() {
        let org = Org::new("acme");
        let csr = make_csr(&generate_key_pem().unwrap()).unwrap();
        let other = PeerId::new("evil", Role::Agent, "d").unwrap();
        let err = org
            .ca
            .issue(&request(&csr, other), t0(), [1; 16])
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");
    }

    #[test]
    fn csr_asking_for_more_is_refused_by_issue() {
        let org = Org::new("acme");
        let key = KeyPair::generate().unwrap();
        let id = org.pid(Role::Agent, "d");

        // A CA certificate.
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let err = org
            .ca
            .issue(&request(&csr, id.clone()), t0(), [1; 16])
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");

        // Someone else's identity.
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI("umbra://acme/broker/b1".try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let err = org
            .ca
            .issue(&request(&csr, id.clone()), t0(), [1; 16])
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");

        // An extra DNS name.
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::DnsName("example.com".try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let err = org
            .ca
            .issue(&request(&csr, id.clone()), t0(), [1; 16])
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");

        // Asking for exactly its own identity is fine.
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.to_uri().try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        org.ca
            .issue(&request(&csr, id.clone()), t0(), [1; 16])
            .unwrap();

        // Not a CSR at all.
        let err = org
            .ca
            .issue(&request("garbage", id), t0(), [1; 16])
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");
    }

    #[test]
    fn issue_server_returns_a_matching_key() {
        let org = Org::new("acme");
        let id = org.pid(Role::Controller, "controller");
        let (issued, key) = org
            .ca
            .issue_server(
                &id,
                &["localhost".into(), "127.0.0.1".into()],
                DEFAULT_LIFETIME,
                SystemTime::now(),
                [9; 16],
            )
            .unwrap();
        let tls = crate::TlsIdentity::from_pem(&issued.cert_pem, &key, org.ca.cert_pem()).unwrap();
        assert_eq!(tls.peer.id, id);
    }

    #[test]
    fn seal_unseal_round_trip() {
        let ca = Ca::generate("acme", t0()).unwrap();
        let kek = KeyEncryptionKey::generate();
        let sealed = ca.seal(&kek).unwrap();
        let back = Ca::unseal(&sealed, &kek).unwrap();
        assert_eq!(back.org(), "acme");
        assert_eq!(back.cert_pem(), ca.cert_pem());
        assert_eq!(back.sha256(), ca.sha256());
        assert_eq!(back.key.serialize_der(), ca.key.serialize_der());
        // The unsealed CA issues certificates that chain to the original.
        let csr = make_csr(&generate_key_pem().unwrap()).unwrap();
        let issued = back
            .issue(
                &request(&csr, PeerId::new("acme", Role::Agent, "d").unwrap()),
                t0(),
                [1; 16],
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let ca_der = ca.cert_der();
        parse_cert(&der)
            .unwrap()
            .verify_signature(Some(parse_cert(&ca_der).unwrap().public_key()))
            .unwrap();
    }

    #[test]
    fn unseal_with_wrong_kek_fails_clearly() {
        let ca = Ca::generate("acme", t0()).unwrap();
        let sealed = ca.seal(&KeyEncryptionKey::generate()).unwrap();
        let err = Ca::unseal(&sealed, &KeyEncryptionKey::generate()).unwrap_err();
        assert!(matches!(err, PkiError::Unseal));
        assert!(
            err.to_string().contains("wrong key-encryption key"),
            "{err}"
        );
    }

    #[test]
    fn unseal_of_tampered_data_fails() {
        let ca = Ca::generate("acme", t0()).unwrap();
        let kek = KeyEncryptionKey::generate();
        let sealed = ca.seal(&kek).unwrap();

        // One flipped ciphertext bit.
        let mut raw = B64.decode(&sealed.sealed_key).unwrap();
        let last = raw.len() - 20;
        raw[last] ^= 1;
        let tampered = SealedCa {
            cert_pem: sealed.cert_pem.clone(),
            sealed_key: B64.encode(&raw),
        };
        assert!(matches!(Ca::unseal(&tampered, &kek), Err(PkiError::Unseal)));

        // The key paired with another CA's certificate (AAD mismatch).
        let other = Ca::generate("acme", t0()).unwrap();
        let swapped = SealedCa {
            cert_pem: other.cert_pem().to_owned(),
            sealed_key: sealed.sealed_key.clone(),
        };
        assert!(matches!(Ca::unseal(&swapped, &kek), Err(PkiError::Unseal)));

        // Truncated.
        let short = SealedCa {
            cert_pem: sealed.cert_pem.clone(),
            sealed_key: sealed.sealed_key[..16].to_owned(),
        };
        assert!(matches!(Ca::unseal(&short, &kek), Err(PkiError::Unseal)));

        // The untouched twin still opens.
        assert!(Ca::unseal(&sealed, &kek).is_ok());
    }

    #[test]
    fn debug_never_shows_key_material() {
        let ca = Ca::generate("acme", t0()).unwrap();
        let d = format!("{ca:?}");
        let pkcs8 = ca.key.serialize_der();
        assert!(d.starts_with("Ca { org: \"acme\", cert_sha256: "), "{d}");
        assert!(!d.contains("PRIVATE"));
        // No 8-byte window of the key, in hex or base64, appears.
        for w in pkcs8.windows(8).step_by(4) {
            assert!(!d.contains(&hex::encode(w)));
            assert!(!d.contains(&B64.encode(w)));
        }
        let sealed = ca.seal(&KeyEncryptionKey::from_bytes([7; 32])).unwrap();
        assert!(!format!("{sealed:?}").contains(&hex::encode([7u8; 32])));
    }

    use base64::engine::general_purpose::STANDARD as B64;
}
