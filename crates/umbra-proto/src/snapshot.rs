//! The policy snapshot: everything a broker needs to decide locally.
//!
//! The controller builds one per organisation and streams it to every broker (JSON over the
//! controller's mutually authenticated HTTPS API, long-polled by version). A broker keeps the
//! last good snapshot on disk and goes on enforcing it while the controller is away, up to its
//! staleness limit. `version` only grows; a broker ignores a snapshot that is not newer than
//! the one it holds.

use serde::{Deserialize, Serialize};

/// A complete, versioned view of one organisation's access facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Grows with every committed admin change.
    pub version: u64,
    /// Organisation this snapshot describes.
    pub org: String,
    /// When the controller built it (Unix seconds).
    pub issued_at: u64,
    pub users: Vec<UserFacts>,
    pub groups: Vec<String>,
    pub devices: Vec<DeviceFacts>,
    pub connectors: Vec<ConnectorFacts>,
    pub brokers: Vec<BrokerInfo>,
    pub services: Vec<ServiceFacts>,
    /// Cedar policies; their union is the organisation's policy set.
    pub policies: Vec<PolicyText>,
    /// Serial numbers (lower-case hex, no leading zeros stripped) of revoked certificates that
    /// have not expired yet.
    pub revoked_serials: Vec<String>,
    /// Public keys that sign user tokens (empty until login lands).
    pub token_keys: Vec<TokenKey>,
}

/// A user and the groups they belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFacts {
    /// The user's id, their e-mail address.
    pub id: String,
    pub groups: Vec<String>,
    pub disabled: bool,
}

/// An enrolled device, bound to the user its enrollment token was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceFacts {
    pub id: String,
    pub user: String,
    pub revoked: bool,
}

/// An enrolled connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorFacts {
    pub id: String,
    pub name: String,
    pub revoked: bool,
}

/// A broker and where agents and connectors reach it. Fields it does not know are ignored:
/// it says where to go, never what is allowed (see `api`'s module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub id: String,
    pub name: String,
    /// `host:port` of its QUIC listener (UDP), if any.
    pub quic_addr: Option<String>,
    /// `host:port` of its TLS-over-TCP listener, if any.
    pub tcp_addr: Option<String>,
    /// DNS name its certificate is issued for (the TLS server name to verify).
    pub server_name: String,
}

/// A published service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFacts {
    pub name: String,
    /// `host:port` as the connector sees it.
    pub target: String,
    /// Ids of the connectors that may serve it.
    pub connectors: Vec<String>,
}

/// One stored Cedar policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyText {
    pub id: String,
    pub text: String,
}

/// A user-token signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKey {
    pub kid: String,
    pub public_key_pem: String,
}

impl Snapshot {
    /// The service called `name`, if published.
    pub fn service(&self, name: &str) -> Option<&ServiceFacts> {
        self.services.iter().find(|s| s.name == name)
    }
}
