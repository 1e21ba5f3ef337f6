//! Umbra's public-key infrastructure.
//!
//! Owns:
//! - the organisation CA ([`Ca`]): generation, sealing of its key at rest under a
//!   key-encryption key ([`KeyEncryptionKey`], [`SealedCa`]), and issuance from CSRs, where the
//!   CA decides every certificate field;
//! - the device side of enrollment: key generation and CSRs that ask for nothing
//!   ([`generate_key_pem`], [`make_csr`]);
//! - peer identity: the one `umbra://` URI SAN of a verified leaf certificate ([`peer_cert`]);
//! - identities on disk ([`TlsIdentity`], [`write_identity_dir`]);
//! - every rustls configuration ([`server_config`], [`client_config`]): aws-lc-rs, TLS 1.3
//!   only, X25519MLKEM768 first, the organisation CA as the only trust anchor.
//!
//! Does not own: who may enroll or renew (the controller), revocation (short lifetimes plus the
//! controller's device state), or what an identity may reach (policy). Nothing here reads the
//! clock: operations that need "now" take it, and serials are passed in.

mod ca;
mod crypto;
mod csr;
mod error;
mod identity;
mod seal;
mod tls;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
#[cfg(test)]
mod testutil;

pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use ca::{
    BACKDATE, Ca, DEFAULT_LIFETIME, IssueRequest, Issued, MAX_LIFETIME, broker_server_name,
};
pub use crypto::{ct_eq, random_bytes, sha256};
pub use csr::{generate_key_pem, make_csr};
pub use error::PkiError;
pub use identity::{
    PeerCert, TlsIdentity, cert_not_after, cert_written_at, check_private_dir, check_private_file,
    create_private_file, lock_instance, peer_cert, private_dir, private_dir_tight, rfc3339,
    sweep_temp_files, try_lock_renewal, write_identity_dir, write_private_file,
    write_private_file_or_remove, write_public_file,
};
pub use seal::{KeyEncryptionKey, SealedCa};
pub use tls::{
    ClientAuth, ServerCertSlot, client_config, crypto_provider, crypto_provider_pq_only,
    install_crypto_provider, kx_group_name, server_config, server_config_reloadable,
    server_config_renewing, server_config_with_slot,
};
