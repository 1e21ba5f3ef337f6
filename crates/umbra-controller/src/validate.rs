//! Parsing of admin and peer input into values the store may hold.
//!
//! Each function returns the normalised value or an [`ApiFailure`] naming the field.

use std::net::{IpAddr, Ipv6Addr};

use crate::error::ApiFailure;

/// A service, group, connector, broker or policy name ([`umbra_proto::valid_name`]).
pub(crate) fn name(s: &str, field: &str) -> Result<String, ApiFailure> {
    if umbra_proto::valid_name(s) {
        Ok(s.to_owned())
    } else {
        Err(ApiFailure::invalid(
            field,
            format!(
                "{field} must be 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
            ),
        ))
    }
}

/// A connector's or broker's name: a [`name`] that is not shaped like a peer id (`c-`, `b-` or
/// `d-` and 16 hex digits). Revocation and listings take an id or a name, ids first: a name
/// spelled like another peer's id would make `connector revoke NAME` revoke that other peer.
pub(crate) fn peer_name(s: &str, field: &str) -> Result<String, ApiFailure> {
    let name = name(s, field)?;
    if looks_like_peer_id(&name) {
        return Err(ApiFailure::invalid(
            field,
            format!(
                "{field} {name} is shaped like a peer id (c-, b- or d- and 16 hex digits): choose another name"
            ),
        ));
    }
    Ok(name)
}

/// `c-`, `b-` or `d-` and 16 lowercase hex digits, as generated ids are.
pub(crate) fn looks_like_peer_id(s: &str) -> bool {
    matches!(s.as_bytes(), [b'c' | b'b' | b'd', b'-', rest @ ..]
        if rest.len() == 16 && rest.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)))
}

/// A user id: an e-mail address, stored lowercased ([`umbra_proto::user_id`]).
pub(crate) fn user_id(s: &str, field: &str) -> Result<String, ApiFailure> {
    umbra_proto::user_id(s)
        .ok_or_else(|| ApiFailure::invalid(field, format!("{field} must be an e-mail address")))
}

/// `host:port` with port 1-65535; host a DNS name, an IPv4 address or a bracketed IPv6 address
/// in its one standard spelling (a service target: what the lists show is what is dialed).
pub(crate) fn host_port(s: &str, field: &str) -> Result<String, ApiFailure> {
    parse_host_port(s, field, Spelling::Exact)
}

/// A broker's advertised `host:port`, as [`host_port`] checks it, but an IPv6 address is
/// stored in its standard spelling rather than refused (an IPv4-mapped one as the IPv4
/// address): a broker writes what its operator gave `--advertise-host`, and a spelling is no
/// reason to drop it from every broker list.
pub(crate) fn advertised_addr(s: &str, field: &str) -> Result<String, ApiFailure> {
    parse_host_port(s, field, Spelling::Normalise)
}

/// How [`parse_host_port`] takes an IPv6 address not in its standard spelling.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spelling {
    Exact,
    Normalise,
}

fn parse_host_port(s: &str, field: &str, spelling: Spelling) -> Result<String, ApiFailure> {
    let bad = |why: &str| ApiFailure::invalid(field, format!("{field} must be host:port ({why})"));
    // The broker names the target in its Dial frame, in at most 255 bytes.
    if s.len() > usize::from(u8::MAX) {
        return Err(bad("at most 255 bytes"));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    // Digits only, no leading zero: `+80` and `0080` parse as 80, and the same target would
    // be listed (and matched by the connector) under several spellings.
    let canonical =
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0');
    let port: u16 = port
        .parse()
        .ok()
        .filter(|_| canonical)
        .ok_or_else(|| bad("port is not a number 1-65535"))?;
    if port == 0 {
        return Err(bad("port is not a number 1-65535"));
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let Ok(addr) = inner.parse::<Ipv6Addr>() else {
            return Err(bad("invalid IPv6 address"));
        };
        // What the lists show is what is dialed: an IPv4 address dressed as IPv6 reaches the
        // IPv4 host, and one address has many IPv6 spellings. One form each.
        let v4 = addr.to_ipv4_mapped().map(|v4| (v4, "mapped")).or_else(|| {
            (!addr.is_loopback() && !addr.is_unspecified())
                .then(|| addr.to_ipv4())
                .flatten()
                .map(|v4| (v4, "compatible"))
        });
        let canonical = match v4 {
            Some((v4, _)) if spelling == Spelling::Normalise => format!("{v4}:{port}"),
            Some((v4, kind)) => {
                return Err(bad(&format!(
                    "an IPv4-{kind} IPv6 address; write the IPv4 address: {v4}:{port}"
                )));
            }
            None => format!("[{addr}]:{port}"),
        };
        if canonical != s {
            if spelling == Spelling::Normalise {
                return Ok(canonical);
            }
            return Err(bad(&format!(
                "write the IPv6 address in its standard form: {canonical}"
            )));
        }
        true
    } else if host.contains(':') {
        false
    } else if host.parse::<IpAddr>().is_ok() {
        true
    } else if umbra_proto::ends_in_a_number(host) {
        // Not a canonical address, yet the system resolver reads it as one with the old C
        // rules (octal, hex, short forms): `010.0.0.5` is 8.0.0.5 to the connector's dial
        // while every list and audit record shows it as written.
        return Err(bad(
            "an IPv4 address must be four decimal numbers without leading zeros, e.g. 10.0.0.5",
        ));
    } else {
        umbra_proto::dns_name(host)
    };
    if !host_ok {
        return Err(bad("invalid host"));
    }
    Ok(s.to_owned())
}

/// The version a peer announces in its `User-Agent` (`umbra/<version>`, what
/// `umbra_link::control` sends): at most 32 characters of letters, digits, `.`, `-` and `+`,
/// or `None` for anything else (an old peer, another client), which is shown as unknown.
pub(crate) fn announced_version(user_agent: Option<&str>) -> Option<String> {
    let v = user_agent?.strip_prefix("umbra/")?;
    let v = v.split(' ').next().unwrap_or(v);
    (!v.is_empty()
        && v.len() <= 32
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+')))
    .then(|| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a peer announces is kept only in the one shape `umbra_link` sends.
    #[test]
    fn announced_versions() {
        assert_eq!(
            announced_version(Some("umbra/0.1.0")).as_deref(),
            Some("0.1.0")
        );
        assert_eq!(
            announced_version(Some("umbra/1.2.3-rc.1+g1a2b (broker)")).as_deref(),
            Some("1.2.3-rc.1+g1a2b")
        );
        for bad in [
            "",
            "umbra/",
            "curl/8.0",
            "umbra/1.0\u{1b}[31m",
            "umbra/1;DROP",
            &format!("umbra/{}", "9".repeat(33)),
        ] {
            assert_eq!(announced_version(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(announced_version(None), None);
    }

    #[test]
    fn user_ids() {
        assert_eq!(
            user_id("Alice@Example.com", "id").unwrap(),
            "alice@example.com"
        );
        assert!(user_id("bob.smith+x@corp.example", "id").is_ok());
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@localhost",
            "a b@c.d",
            "a@b@c.d",
            "a\"@b.c",
            "a..b@c.d",
        ] {
            assert_eq!(
                user_id(bad, "id").unwrap_err().field.as_deref(),
                Some("id"),
                "{bad}"
            );
        }
    }

    #[test]
    fn peer_names_are_not_shaped_like_ids() {
        for id_like in [
            "c-2d3fff4da2f6bb11",
            "b-0123456789abcdef",
            "d-ffffffffffffffff",
        ] {
            let e = peer_name(id_like, "name").unwrap_err();
            assert_eq!(e.field.as_deref(), Some("name"), "{id_like}");
            assert!(e.error.contains("peer id"), "{}", e.error);
        }
        // Twins: near misses are names.
        for ok in [
            "dc-1",
            "c-2d3fff4da2f6bb1",
            "c-2d3fff4da2f6bb111",
            "x-2d3fff4da2f6bb11",
            "c-2d3fff4da2f6bb1g",
            "c-demo",
        ] {
            assert_eq!(peer_name(ok, "name").unwrap(), ok);
        }
    }

    #[test]
    fn ipv6_targets_have_one_spelling() {
        for (bad, hint) in [
            ("[::ffff:7f00:1]:8080", "127.0.0.1:8080"),
            ("[::FFFF:127.0.0.1]:8080", "127.0.0.1:8080"),
            ("[::ffff:10.0.0.5]:22", "10.0.0.5:22"),
            ("[::10.0.0.5]:22", "10.0.0.5:22"),
            ("[0:0:0:0:0:0:0:1]:8080", "[::1]:8080"),
            ("[FD00::1]:80", "[fd00::1]:80"),
            ("[fd00:0::1]:80", "[fd00::1]:80"),
        ] {
            let e = host_port(bad, "target").unwrap_err();
            assert_eq!(e.field.as_deref(), Some("target"), "{bad}");
            assert!(e.error.contains(hint), "{bad}: {}", e.error);
        }
        for good in [
            "[::1]:8080",
            "[::]:80",
            "[fd00::1]:80",
            "[2001:db8::5:1]:443",
        ] {
            assert_eq!(host_port(good, "target").unwrap(), good);
        }
    }

    /// A broker's advertised address is stored in the standard spelling, not refused.
    #[test]
    fn advertised_addresses_are_normalised() {
        for (given, stored) in [
            ("[2001:DB8::1]:7401", "[2001:db8::1]:7401"),
            ("[2001:db8:0:0::1]:7401", "[2001:db8::1]:7401"),
            ("[::ffff:203.0.113.5]:7401", "203.0.113.5:7401"),
            ("[2001:db8::1]:7401", "[2001:db8::1]:7401"),
            ("eu-1.example.test:7401", "eu-1.example.test:7401"),
            ("203.0.113.5:7401", "203.0.113.5:7401"),
        ] {
            assert_eq!(
                advertised_addr(given, "quic_addr").unwrap(),
                stored,
                "{given}"
            );
        }
        for bad in ["[zz]:1", "010.0.0.5:7401", "a b:1", "[::1]:0"] {
            assert!(advertised_addr(bad, "quic_addr").is_err(), "{bad}");
        }
    }

    #[test]
    fn targets() {
        for good in [
            "db.internal:5432",
            "10.0.0.1:22",
            "[::1]:8080",
            "localhost:1",
            "h:65535",
        ] {
            assert!(host_port(good, "target").is_ok(), "{good}");
        }
        for bad in [
            "db", "db:0", "db:65536", "db:x", ":80", "::1:80", "a b:80", "[zz]:1", "-a:1",
            "db:+80", "db:080", "db:", "db: 80",
        ] {
            assert!(host_port(bad, "target").is_err(), "{bad}");
        }
        // The same address written in the forms the resolver reads as IPv4 (octal, short,
        // decimal, hex): each would dial another address than the one shown.
        for odd in [
            "010.0.0.5:22",
            "127.1:80",
            "2130706433:80",
            "0x7f000001:80",
            "0X7F.1:80",
            "10.0.0.0x1:80",
            "db.internal.5:80",
        ] {
            let e = host_port(odd, "target").unwrap_err();
            assert_eq!(e.field.as_deref(), Some("target"), "{odd}");
            assert!(e.error.contains("decimal"), "{odd}: {}", e.error);
        }
        // One byte over what a Dial frame carries, and the longest that fits.
        let host = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(58));
        assert!(host_port(&format!("{host}:65535"), "target").is_err());
        assert_eq!(format!("{host}:6553").len(), 255);
        assert!(host_port(&format!("{host}:6553"), "target").is_ok());
        // Names that merely contain digits or start with 0x are names.
        for name in [
            "0x.example:80",
            "db1.internal:80",
            "0xdead.corp:1",
            "1a:80",
            "x-1:80",
        ] {
            assert!(host_port(name, "target").is_ok(), "{name}");
        }
    }

    #[test]
    fn names() {
        assert!(name("web", "name").is_ok());
        assert_eq!(
            name("Web", "name").unwrap_err().field.as_deref(),
            Some("name")
        );
    }
}

/// What each check makes of one input (`None`: refused). Not API: see
/// [`crate::fuzz_validate`].
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub name: Option<String>,
    pub peer_name: Option<String>,
    pub user_id: Option<String>,
    pub host_port: Option<String>,
    pub advertised_addr: Option<String>,
    /// [`announced_version`] of the input as a `User-Agent`.
    pub announced_version: Option<String>,
}

/// Runs every check on `s`.
pub(crate) fn all(s: &str) -> Validated {
    Validated {
        name: name(s, "f").ok(),
        peer_name: peer_name(s, "f").ok(),
        user_id: user_id(s, "f").ok(),
        host_port: host_port(s, "f").ok(),
        advertised_addr: advertised_addr(s, "f").ok(),
        announced_version: announced_version(Some(s)),
    }
}
