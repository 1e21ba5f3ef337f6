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

/// A user id as the controller stores it: an e-mail address of ASCII characters, trimmed
/// and lowercased; `None` if `s` is not one. Policies compare ids exactly, so a policy may
/// only name a user by the id this returns (see `umbra-policy`).
pub fn user_id(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() < 3 || s.len() > 254 {
        return None;
    }
    let (local, domain) = s.split_once('@')?;
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let domain_ok = domain.contains('.') && dns_name(domain);
    (local_ok && domain_ok).then_some(s)
}

/// Dot-separated labels of ASCII letters, digits, '-' and '_' (no empty label, none starting
/// or ending with '-'), at most 253 bytes.
pub fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Whether a host's last label is a number (all digits, or `0x` and hex digits), which the
/// resolver takes for an IPv4 address in some form; no DNS name ends in one (the WHATWG URL
/// standard's "ends in a number").
pub fn ends_in_a_number(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    last.strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A host a peer can be told to dial: an IP address, or a DNS name ([`dns_name`]) that the
/// resolver cannot read as an IPv4 address in an old form ([`ends_in_a_number`]).
pub fn dialable_host(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok() || (dns_name(s) && !ends_in_a_number(s))
}

/// `s` with its control characters (newlines, escapes, ...) and invisible formatting
/// characters (bidirectional overrides, zero-width characters, line separators) written as
/// escapes (`\n`, `\u{1b}`, `\u{202e}`), the rest as it is: for text a peer chose that ends
/// up in a log line, an audit record or a terminal, where a raw control character could forge
/// a line or rewrite one, and a bidirectional override could make a row read backwards.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !has_controls(s) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether `s` holds a control or invisible formatting character (see [`escape_controls`]).
pub fn has_controls(s: &str) -> bool {
    s.chars().any(is_control)
}

/// A control character (Unicode Cc), or one of the format characters (Cf) and separators
/// (Zl, Zp) that change how the text around them is shown while showing nothing themselves.
fn is_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{61c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0001}'
                | '\u{e0020}'..='\u{e007f}'
        )
}

/// `s` cut to at most `max` bytes, on a character boundary, marked `…` (the marker counts):
/// text a peer or a request chose, kept bounded where it is stored or shown.
pub fn bounded(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    const CUT: char = '…';
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub(CUT.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{CUT}", &s[..end]))
}

/// Longest target of an audit record, in bytes: the controller stores no longer one, and
/// refuses a broker's record with a longer one.
pub const AUDIT_TARGET_MAX: usize = 256;

/// `target` as an audit record holds it: every character outside printable ASCII escaped
/// (`\u{435}`), so that it cannot forge lines where records are shown, nor pass for another
/// name (a Cyrillic `е` in `dеmo`): every name Umbra stores is ASCII, so a legitimate target
/// is unchanged. Then [`bounded`] to [`AUDIT_TARGET_MAX`] (escapes make a name several times
/// longer, and a record with a longer target would be refused, who and the decision with it).
pub fn audit_target(target: &str) -> String {
    let escaped = if target.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        std::borrow::Cow::Borrowed(target)
    } else {
        let mut out = String::with_capacity(target.len() + 8);
        for c in target.chars() {
            if (' '..='~').contains(&c) {
                out.push(c);
            } else {
                out.extend(c.escape_default());
            }
        }
        std::borrow::Cow::Owned(out)
    };
    bounded(&escaped, AUDIT_TARGET_MAX).into_owned()
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn control_characters_are_escaped() {
        use super::{escape_controls, has_controls};
        assert_eq!(escape_controls("web"), "web");
        assert!(matches!(
            escape_controls("web"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(escape_controls("a\nWARN b"), "a\\nWARN b");
        assert_eq!(escape_controls("x\u{1b}[2Ky\r\t"), "x\\u{1b}[2Ky\\r\\t");
        // Not control characters: left as they are.
        assert_eq!(escape_controls("élan – ok"), "élan – ok");
        assert!(has_controls("a\u{7f}") && has_controls("\u{85}") && !has_controls("a b"));
        // Invisible formatting: a bidirectional override that would make "deny … wolla" read
        // as "allow", zero-width characters, separators.
        assert_eq!(escape_controls("demo\u{202e} wolla"), "demo\\u{202e} wolla");
        for c in ['\u{200b}', '\u{2066}', '\u{2028}', '\u{feff}', '\u{e0041}'] {
            assert!(has_controls(&format!("demo{c}")), "{c:?}");
        }
    }

    /// Cut on a character boundary, marked, within the bound; text within it is whole.
    #[test]
    fn bounded_text_and_audit_targets() {
        use super::{AUDIT_TARGET_MAX, audit_target, bounded, has_controls};
        assert_eq!(bounded("demo", 4), "demo");
        assert_eq!(bounded("demo!", 4), "d…");
        assert_eq!(bounded(&"é".repeat(10), 6), "é…");
        let fits = "s".repeat(AUDIT_TARGET_MAX);
        assert_eq!(audit_target(&fits), fits);
        // A name of control characters is several times longer once escaped: cut, marked.
        let hostile = audit_target(&"\u{1}".repeat(255));
        assert!(hostile.len() <= AUDIT_TARGET_MAX && hostile.ends_with('…'));
        assert!(hostile.starts_with("\\u{1}\\u{1}") && !has_controls(&hostile));
        let cut = audit_target(&"é".repeat(AUDIT_TARGET_MAX));
        assert!(cut.len() <= AUDIT_TARGET_MAX && cut.ends_with('…'));
        assert!(cut.starts_with("\\u{e9}\\u{e9}"), "{cut}");
        // A look-alike of a name cannot pass for it; a bidirectional override cannot turn
        // the row around; names as Umbra stores them are unchanged.
        assert_eq!(audit_target("d\u{435}mo"), "d\\u{435}mo");
        assert_eq!(audit_target("demo\u{202e} wolla"), "demo\\u{202e} wolla");
        for same in [
            "demo",
            "alice@example.com",
            "umbra://default/agent/d-0123456789abcdef",
            "10.0.0.5:22",
        ] {
            assert_eq!(audit_target(same), same);
        }
    }

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
