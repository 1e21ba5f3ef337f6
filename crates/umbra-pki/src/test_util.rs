//! Fixtures for tests of crates that need real certificates from a real CA but no controller
//! (feature `test-util`; never enabled in a shipped binary).

use std::time::{Duration, SystemTime};

use umbra_proto::{PeerId, Role};

use crate::{Ca, IssueRequest, PkiError, TlsIdentity, broker_server_name};
use crate::{generate_key_pem, make_csr, random_bytes};

/// A key made here and the certificate `ca` issued for it, as PEM.
pub struct IssuedPems {
    pub key_pem: String,
    pub cert_pem: String,
}

/// Issues a certificate for `identity` (plus `dns_names`) from `ca`, for a fresh key, valid
/// from `now` for `lifetime` — the same CSR path a device takes at enrollment.
pub fn issue_pems(
    ca: &Ca,
    identity: PeerId,
    dns_names: Vec<String>,
    now: SystemTime,
    lifetime: Duration,
) -> Result<IssuedPems, PkiError> {
    let key_pem = generate_key_pem()?;
    let csr = make_csr(&key_pem)?;
    let issued = ca.issue(
        &IssueRequest {
            csr_pem: &csr,
            identity,
            dns_names,
            lifetime,
        },
        now,
        random_bytes(),
    )?;
    Ok(IssuedPems {
        key_pem,
        cert_pem: issued.cert_pem,
    })
}

/// An identity for `role`/`id` in `ca`'s organisation, valid for an hour from now; brokers get
/// their server name.
pub fn identity(ca: &Ca, role: Role, id: &str) -> Result<TlsIdentity, PkiError> {
    let dns = match role {
        Role::Broker => vec![broker_server_name(id)],
        _ => vec![],
    };
    let pid = PeerId::new(ca.org(), role, id).map_err(|e| PkiError::Identity(e.to_string()))?;
    let p = issue_pems(ca, pid, dns, SystemTime::now(), Duration::from_secs(3600))?;
    TlsIdentity::from_pem(&p.cert_pem, &p.key_pem, ca.cert_pem())
}
