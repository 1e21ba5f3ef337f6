//! Sealing the CA private key at rest.
//!
//! The CA key is stored only encrypted under a key-encryption key (KEK) that the operator keeps
//! outside the database: AES-256-GCM with a random 96-bit nonce, and the SHA-256 of the CA
//! certificate's DER as associated data, so a sealed key cannot be paired with a different
//! certificate. Format: `base64(nonce || ciphertext || tag)`.
//!
//! The KEK never appears in `Debug` output or error messages.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::crypto::random_bytes;
use crate::error::PkiError;

/// A 256-bit key that encrypts the CA private key at rest.
#[derive(Clone)]
pub struct KeyEncryptionKey([u8; 32]);

impl KeyEncryptionKey {
    /// Wraps 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyEncryptionKey(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        KeyEncryptionKey(random_bytes())
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, PkiError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| PkiError::KeyEncryptionKey)?;
        Ok(KeyEncryptionKey(out))
    }

    /// Parses standard base64 of 32 bytes (surrounding whitespace ignored).
    pub fn from_base64(s: &str) -> Result<Self, PkiError> {
        let mut bytes = B64
            .decode(s.trim())
            .map_err(|_| PkiError::KeyEncryptionKey)?;
        let out: Result<[u8; 32], _> = bytes.as_slice().try_into();
        bytes.fill(0);
        out.map(KeyEncryptionKey)
            .map_err(|_| PkiError::KeyEncryptionKey)
    }

    /// Parses either form: 64 hex digits, else base64.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let t = s.trim();
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            Self::from_hex(t)
        } else {
            Self::from_base64(t)
        }
    }

    /// The key as base64, for writing a generated key to its file. Handle as a secret.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    fn aead(&self) -> Result<LessSafeKey, PkiError> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| PkiError::Crypto("AES-256-GCM key setup"))
    }
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyEncryptionKey(..)")
    }
}

/// A CA as stored: the certificate in clear and its private key sealed under a KEK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// `base64(nonce || AES-256-GCM(PKCS#8 DER of the CA key))`, AAD = SHA-256 of the cert DER.
    pub sealed_key: String,
}

/// Encrypts `plaintext` under `kek`, binding it to `aad`.
pub(crate) fn seal(
    kek: &KeyEncryptionKey,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<String, PkiError> {
    let key = kek.aead()?;
    let nonce_bytes: [u8; NONCE_LEN] = random_bytes();
    let mut buf = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
    buf.extend_from_slice(&nonce_bytes);
    let mut body = plaintext.to_vec();
    let sealed = key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(aad),
        &mut body,
    );
    if sealed.is_err() {
        body.fill(0);
        return Err(PkiError::Crypto("AES-256-GCM seal"));
    }
    buf.extend_from_slice(&body);
    Ok(B64.encode(buf))
}

/// Decrypts what [`seal`] produced. Any failure (bad base64, short input, wrong key, altered
/// ciphertext or AAD) is [`PkiError::Unseal`]. The caller must wipe the returned plaintext.
pub(crate) fn open(kek: &KeyEncryptionKey, aad: &[u8], sealed: &str) -> Result<Vec<u8>, PkiError> {
    let key = kek.aead()?;
    let raw = B64.decode(sealed.trim()).map_err(|_| PkiError::Unseal)?;
    if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(PkiError::Unseal);
    }
    let (nonce, body) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| PkiError::Unseal)?;
    let mut body = body.to_vec();
    let len = match key.open_in_place(nonce, Aad::from(aad), &mut body) {
        Ok(plain) => plain.len(),
        Err(_) => return Err(PkiError::Unseal),
    };
    body.truncate(len);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_parsing() {
        let hex_key = "00".repeat(32);
        assert!(KeyEncryptionKey::from_hex(&hex_key).is_ok());
        assert!(KeyEncryptionKey::parse(&hex_key).is_ok());
        assert!(KeyEncryptionKey::from_hex("00").is_err());
        assert!(KeyEncryptionKey::from_hex(&"zz".repeat(32)).is_err());
        let k = KeyEncryptionKey::generate();
        let b = k.to_base64();
        assert_eq!(KeyEncryptionKey::from_base64(&b).unwrap().0, k.0);
        assert_eq!(KeyEncryptionKey::parse(&format!("{b}\n")).unwrap().0, k.0);
        assert!(KeyEncryptionKey::from_base64("AAAA").is_err());
    }

    #[test]
    fn kek_debug_hides_key() {
        let k = KeyEncryptionKey::from_bytes([0xab; 32]);
        let d = format!("{k:?}");
        assert_eq!(d, "KeyEncryptionKey(..)");
        assert!(!d.to_lowercase().contains("ab"));
    }

    #[test]
    fn seal_round_trip_and_failures() {
        let k = KeyEncryptionKey::generate();
        let s = seal(&k, b"aad", b"secret").unwrap();
        assert_eq!(open(&k, b"aad", &s).unwrap(), b"secret");
        // Wrong key.
        let other = KeyEncryptionKey::generate();
        assert!(matches!(open(&other, b"aad", &s), Err(PkiError::Unseal)));
        // Wrong associated data.
        assert!(matches!(open(&k, b"other", &s), Err(PkiError::Unseal)));
        // Garbage and truncation.
        assert!(matches!(open(&k, b"aad", "!!"), Err(PkiError::Unseal)));
        assert!(matches!(open(&k, b"aad", "AAAA"), Err(PkiError::Unseal)));
    }
}
