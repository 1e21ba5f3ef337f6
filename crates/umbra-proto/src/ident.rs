//! How peers are named in certificates.
//!
//! A certificate issued by an organisation's CA carries exactly one URI subject alternative
//! name `umbra://ORG/ROLE/ID`. That URI, read from the leaf certificate the TLS handshake
//! proved, is the only source of a peer's identity: no other name, no other certificate in the
//! chain, nothing the peer says later.

use std::fmt;
use std::str::FromStr;

use crate::valid_name;

/// What a certificate holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// An enrolled user device.
    Agent,
    /// A connector next to private apps.
    Connector,
    /// A broker (enforcement point).
    Broker,
    /// The controller's own API endpoint.
    Controller,
}

impl Role {
    /// The word used in URIs, tokens and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
            Role::Broker => "broker",
            Role::Controller => "controller",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "agent" => Role::Agent,
            "connector" => Role::Connector,
            "broker" => Role::Broker,
            "controller" => Role::Controller,
            _ => return Err(IdentError::Role),
        })
    }
}

/// A peer's identity: organisation, role and the id the controller gave it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    pub org: String,
    pub role: Role,
    pub id: String,
}

/// Why a string is not a peer identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    #[error("identity URI must start with umbra://")]
    Scheme,
    #[error("identity URI must be umbra://ORG/ROLE/ID")]
    Shape,
    #[error("unknown role in identity URI")]
    Role,
    #[error("invalid organisation or id in identity URI")]
    Name,
}

impl PeerId {
    /// Builds an identity, checking that `org` and `id` are valid names.
    pub fn new(org: &str, role: Role, id: &str) -> Result<Self, IdentError> {
        if !valid_name(org) || !valid_name(id) {
            return Err(IdentError::Name);
        }
        Ok(PeerId {
            org: org.to_owned(),
            role,
            id: id.to_owned(),
        })
    }

    /// The URI SAN form, `umbra://ORG/ROLE/ID`.
    pub fn to_uri(&self) -> String {
        format!("umbra://{}/{}/{}", self.org, self.role, self.id)
    }

    /// Parses the URI SAN form strictly: no port, query, fragment, extra segment or case
    /// variation is accepted.
    pub fn from_uri(uri: &str) -> Result<Self, IdentError> {
        let rest = uri.strip_prefix("umbra://").ok_or(IdentError::Scheme)?;
        let mut parts = rest.split('/');
        let (Some(org), Some(role), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentError::Shape);
        };
        PeerId::new(org, role.parse()?, id)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = PeerId::new("default", Role::Agent, "d-1a2b").unwrap();
        assert_eq!(p.to_uri(), "umbra://default/agent/d-1a2b");
        assert_eq!(PeerId::from_uri(&p.to_uri()).unwrap(), p);
    }

    #[test]
    fn strict() {
        for bad in [
            "https://default/agent/x",
            "umbra://default/agent",
            "umbra://default/agent/x/y",
            "umbra://default/admin/x",
            "umbra://Default/agent/x",
            "umbra://default/agent/",
            "umbra://default:443/agent/x",
            "umbra://default/agent/x?y",
            "UMBRA://default/agent/x",
        ] {
            assert!(PeerId::from_uri(bad).is_err(), "{bad}");
        }
    }
}
