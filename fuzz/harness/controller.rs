//! One input of the `validate` fuzz target: the controller's checks of what administrators
//! and brokers send it as names, user ids, `host:port` values and announced versions
//! (`User-Agent`) (`validate.rs`, reached
//! through the `umbra_controller::fuzz_validate` hook).
//!
//! Shared, through `#[path]`, by `fuzz/fuzz_targets/validate.rs` (libFuzzer) and by
//! `crates/umbra-controller/tests/fuzz_corpus.rs` (replays the corpus under `cargo test`).
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use umbra_controller::fuzz_validate;

/// Printable ASCII only: what the store holds is shown in lists and audit records as is.
fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// UTF-8 input, one line per value: never panics; whatever a check accepts is printable
/// ASCII and accepted again as it was stored (normalising twice changes nothing, so a value
/// has one spelling); a name is stored as given, a peer name is a name, a user id is stored
/// lowercased, a service target is stored as given and within the 255 bytes a Dial frame
/// carries, a broker's address normalised is a target as given, and an announced version
/// is short, printable and what the peer sent. True if any check
/// accepted a line.
pub(crate) fn validate(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let mut accepted = false;
    for s in text.split('\n') {
        let v = fuzz_validate(s);
        if let Some(n) = &v.name {
            assert_eq!(n, s);
            assert!(printable(n), "{n:?}");
        }
        if let Some(p) = &v.peer_name {
            assert_eq!(
                v.name.as_ref(),
                Some(p),
                "a peer name that is no name: {p:?}"
            );
        }
        if let Some(u) = &v.user_id {
            assert!(printable(u), "{u:?}");
            assert_eq!(u, &u.to_ascii_lowercase(), "{u:?}");
            assert_eq!(
                fuzz_validate(u).user_id.as_ref(),
                Some(u),
                "not idempotent: {u:?}"
            );
        }
        if let Some(t) = &v.host_port {
            assert_eq!(t, s);
            assert!(printable(t) && t.len() <= 255, "{t:?}");
            assert_eq!(v.advertised_addr.as_ref(), Some(t), "{t:?}");
        }
        if let Some(a) = &v.advertised_addr {
            assert!(printable(a) && a.len() <= 255, "{a:?}");
            let again = fuzz_validate(a);
            assert_eq!(
                again.advertised_addr.as_ref(),
                Some(a),
                "not idempotent: {a:?}"
            );
            assert_eq!(
                again.host_port.as_ref(),
                Some(a),
                "normalised, refused: {a:?}"
            );
        }
        if let Some(version) = &v.announced_version {
            // Shown in listings as is: short, printable, and what follows `umbra/` as sent.
            assert!(printable(version) && version.len() <= 32, "{version:?}");
            assert!(
                s.starts_with(&format!("umbra/{version}")),
                "{s:?} -> {version:?}"
            );
            assert_eq!(
                fuzz_validate(&format!("umbra/{version}"))
                    .announced_version
                    .as_ref(),
                Some(version),
                "not idempotent: {version:?}"
            );
        }
        accepted |= v.name.is_some()
            || v.user_id.is_some()
            || v.host_port.is_some()
            || v.advertised_addr.is_some();
    }
    accepted
}
