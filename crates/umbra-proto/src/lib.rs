//! Umbra's wire vocabulary, free of I/O.
//!
//! This crate owns every message that crosses a process boundary:
//! - [`frame`]: the binary header frames at the start of each multiplexed stream on a link
//!   (agent -> broker `Open`, broker -> connector `Dial`, their replies, ping and service list).
//!   Hand-written codec, bounded, fuzzed; never panics on peer bytes.
//! - [`ident`]: how a peer's identity (organisation, role, id) is named in certificates.
//! - [`snapshot`]: the versioned policy snapshot the controller streams to brokers.
//! - [`api`]: JSON bodies of the controller's REST API (enrollment, renewal, broker and
//!   connector control, admin objects).
//!
//! It owns no sockets, clocks or randomness: drivers in the role crates do the I/O.

pub mod api;
pub mod frame;
pub mod ident;
pub mod snapshot;

pub use frame::{DialCode, Flow, Frame, FrameError, OpenCode};
pub use ident::{PeerId, Role};
pub use snapshot::Snapshot;

/// Validates a name used for services, groups and connectors: 1 to 63 characters of
/// lowercase ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names() {
        assert!(valid_name("demo"));
        assert!(valid_name("db-1.prod_eu"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("Demo"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"a".repeat(64)));
    }
}
