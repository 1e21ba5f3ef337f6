//! The one error type of this crate.
//!
//! Variants keep apart whose fault a failure is: a refused signing request (the requester's),
//! a certificate without a usable identity (the peer's), a wrong key-encryption key or damaged
//! sealed key (the operator's), and local I/O or crypto failures. No message carries key
//! material, tokens or plaintext.

use std::io;
use std::path::PathBuf;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A certificate signing request, or the issue request around it, was refused.
    #[error("certificate request refused: {0}")]
    Csr(String),
    /// The sealed CA key could not be opened: wrong key-encryption key, or the sealed key or
    /// its certificate were altered.
    #[error(
        "cannot unseal the CA key: wrong key-encryption key, or sealed key or CA certificate altered"
    )]
    Unseal,
    /// A key-encryption key was not 32 bytes of hex or base64.
    #[error("key-encryption key must be 32 bytes, given as 64 hex digits or base64")]
    KeyEncryptionKey,
    /// A certificate could not be parsed or is not what it should be.
    #[error("invalid certificate: {0}")]
    Cert(String),
    /// A certificate does not carry exactly one valid `umbra://` identity.
    #[error("certificate identity: {0}")]
    Identity(String),
    /// A private key could not be read, or does not match its certificate.
    #[error("private key: {0}")]
    Key(&'static str),
    /// A name (organisation, DNS name) is not acceptable.
    #[error("invalid name: {0}")]
    Name(String),
    /// Reading or writing an identity file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", "create directory", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Certificate or request generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A cryptographic primitive failed unexpectedly (not caused by input).
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}

impl PkiError {
    pub(crate) fn csr(reason: impl Into<String>) -> Self {
        PkiError::Csr(reason.into())
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        PkiError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
