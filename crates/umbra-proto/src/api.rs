//! JSON bodies of the controller's REST API (`/v1/...`).
//!
//! Shared by the controller (server), the roles (enrollment, renewal, snapshot, heartbeat)
//! and the `umbra admin` CLI. Requests deny unknown fields so that a typo in a script is an
//! error, not a silently ignored option.
//!
//! Answers to the roles are read by what they are for. Those a role only takes information
//! from (an issued certificate, the broker list) ignore fields they do not know, so that a
//! controller upgraded first does not stop older agents and connectors from renewing. Those a
//! role enforces (the broker's [`Snapshot`], a connector's [`ConnectorConfig`]) deny them: a
//! field an older role does not understand may restrict access, so it keeps enforcing the last
//! one it understood instead (fail closed).

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::snapshot::{BrokerInfo, Snapshot};

/// Every error answer: a message for a person and, where one field is at fault, its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Enrollment tokens

/// A one-time enrollment token as handed to an operator:
/// `umb1.<sha256 of the CA certificate, hex>.<secret>`.
///
/// The CA hash lets the enrolling device pin the controller's CA before it trusts anything the
/// controller says; the secret is what the controller checks (it stores only its hash).
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    pub ca_sha256: [u8; 32],
    pub secret: String,
}

/// Why a string is not an enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed enrollment token (expected umb1.<ca hash>.<secret>)")]
pub struct TokenFormatError;

impl EnrollToken {
    const PREFIX: &'static str = "umb1";

    /// Parses the printed form.
    pub fn parse(s: &str) -> Result<Self, TokenFormatError> {
        let mut it = s.trim().split('.');
        let (Some(p), Some(h), Some(secret), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(TokenFormatError);
        };
        if p != Self::PREFIX
            || h.len() != 64
            || secret.len() < 16
            || secret.len() > 128
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TokenFormatError);
        }
        let mut ca_sha256 = [0u8; 32];
        for (i, out) in ca_sha256.iter_mut().enumerate() {
            *out = u8::from_str_radix(h.get(2 * i..2 * i + 2).ok_or(TokenFormatError)?, 16)
                .map_err(|_| TokenFormatError)?;
        }
        Ok(EnrollToken {
            ca_sha256,
            secret: secret.to_owned(),
        })
    }
}

impl fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.", Self::PREFIX)?;
        for b in self.ca_sha256 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ".{}", self.secret)
    }
}

// A token is a secret: never print it by accident.
impl fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollToken(..)")
    }
}

// ---------------------------------------------------------------------------------------------
// Enrollment and renewal

/// `POST /v1/enroll`: redeem a token, get a certificate for a key generated on the device.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The secret part of the token.
    pub token: String,
    /// PKCS#10 certificate signing request, PEM.
    pub csr_pem: String,
    /// The role the enrolling command is for (`agent`, `connector`, `broker`): a token of
    /// another role is refused without being spent. Absent: whatever the token's role is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest").finish_non_exhaustive()
    }
}

/// `POST /v1/renew` (client certificate required): a fresh certificate for the same identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// Answer to enrollment and renewal (fields it does not know are ignored: see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedCert {
    /// `umbra://ORG/ROLE/ID`.
    pub identity: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
    /// For agents: the user the device is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Brokers known now; refreshed later from `GET /v1/brokers`.
    pub brokers: Vec<BrokerInfo>,
}

// ---------------------------------------------------------------------------------------------
// Role control

/// `GET /v1/brokers` (any enrolled peer). With `?have=TAG`, the controller answers only once
/// the list differs from the one `TAG` names (a long poll; `204 No Content` when `?wait=S`,
/// at most 25 s, passes first).
/// Fields it does not know are ignored (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerList {
    pub brokers: Vec<BrokerInfo>,
    /// Names this list: what to send as `have` next.
    #[serde(default)]
    pub tag: String,
}

/// `GET /v1/connector/config` (connector certificate): the targets this connector may dial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    pub connector_id: String,
    pub version: u64,
    pub targets: Vec<PublishedTarget>,
}

/// One published target of a connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedTarget {
    pub service: String,
    pub target: String,
}

/// `POST /v1/broker/heartbeat` (broker certificate), every few seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerHeartbeat {
    pub name: String,
    pub quic_addr: Option<String>,
    pub tcp_addr: Option<String>,
    pub server_name: String,
    /// The snapshot version in force: the broker decides with it, and the live streams and
    /// links it no longer allows are ended already. What `GET /v1/rollout` counts as applied.
    pub snapshot_version: u64,
    /// Every live stream, or absent when the set is unchanged since the broker's last report
    /// that carried it (brokers send it when streams start or end, and every few seconds for
    /// the byte counts): a heartbeat woken for audit events does not resend thousands of
    /// streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<Vec<LiveStream>>,
    /// Live streams left out of `streams`: a heartbeat carries at most so many. Sent only
    /// with a list, and only when some were left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams_omitted: Option<u64>,
    /// Decisions and link events since the last heartbeat (bounded by the broker).
    pub audit: Vec<AuditRecord>,
    /// Where `audit` sits in the broker's numbering, so that the controller stores each event
    /// once when a broker resends after a failure or a crash. Absent: store as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_seq: Option<AuditSeq>,
}

/// The numbering of a broker's audit events: `audit[i]` is number `first + i` of `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSeq {
    /// Random, drawn when the broker's spool is created (a wiped broker starts a new one).
    pub epoch: u64,
    /// Number of the first event of the heartbeat (numbers start at 1 and have no gaps).
    pub first: u64,
}

/// A stream alive on a broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveStream {
    pub id: u64,
    pub broker: String,
    pub user: String,
    pub device: String,
    pub service: String,
    pub connector: String,
    pub transport: String,
    /// Unix seconds.
    pub started_at: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// One audit event: who did what to what, and the outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `admin`, `umbra://org/role/id`, or `anonymous`.
    pub actor: String,
    /// e.g. `stream.open`, `enroll`, `renew`, `revoke`, `service.create`.
    pub action: String,
    /// The object acted on (service name, device id, ...).
    pub target: String,
    /// `allow`, `deny`, `ok` or `error`.
    pub result: String,
    /// Structured detail (reason, policy ids, transport...). Never a secret.
    #[serde(default)]
    pub detail: serde_json::Value,
}

// ---------------------------------------------------------------------------------------------
// Admin objects

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub id: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub groups: Vec<String>,
    pub disabled: bool,
    pub created_at: u64,
}

/// `PATCH /v1/users/{id}`: the fields to change (at least one).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    /// A disabled user's devices are denied every stream and get no new certificate; their
    /// live streams end. Enabling again restores the devices whose certificate has not expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    pub name: String,
    /// `host:port` as the connector sees it.
    pub target: String,
    /// Names of the connectors that may serve it.
    pub connectors: Vec<String>,
}

/// `PATCH /v1/services/{name}`: the fields to change (at least one); the others stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateService {
    /// New `host:port` as the connector sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// New set of connectors that may serve it (replaces the old set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectors: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub target: String,
    pub connectors: Vec<String>,
    pub created_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePolicy {
    pub name: String,
    /// Cedar policy text; validated against Umbra's schema at write time.
    pub text: String,
}

/// `PUT /v1/policies/{name}`: the policy's new text, replacing the old in one change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacePolicy {
    /// Cedar policy text; validated against Umbra's schema at write time.
    pub text: String,
}

/// `POST /v1/policies/{name}/check`: a policy change to try without making it. With `text`,
/// the policy added (new name) or replaced; without, removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// What a policy change would do, were it made now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheckResult {
    /// `add`, `replace` or `remove`.
    pub change: String,
    /// The live streams (as `GET /v1/streams` lists them) the policy allows now and would
    /// not after the change: brokers would end them.
    pub ends: Vec<PolicyCheckEnd>,
    /// Live streams looked at.
    pub live: usize,
    /// Brokers whose streams could not be looked at (not heard from in the last 30 s): they
    /// apply the change too once they hold it.
    pub brokers_silent: usize,
    /// Live streams brokers carry but left out of their lists (more than a heartbeat
    /// carries): not looked at either. 0 from an older controller.
    #[serde(default)]
    pub streams_omitted: u64,
}

/// One stream a policy change would end, and the decision's reason after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheckEnd {
    pub stream: LiveStream,
    /// `no_permit`, `forbidden`, ...
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub text: String,
    pub created_at: u64,
    /// In the answer to a write and in listings: the users, groups and services the text
    /// names that do not exist (`group eng`), each of which the policy grants nothing through
    /// until one of that name is made (a typo, or a group since removed: a group made later
    /// with its name gets its grant). The write is made all the same: a policy may be written
    /// before what it names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
}

/// `GET /v1/access`: what the policy decides now for a user (on one of their devices, or on
/// a new device of theirs in good standing), for one service or for every published one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub user: String,
    /// The device decided for; `None`: a device of the user in good standing that no policy
    /// names (a newly enrolled one, say).
    pub device: Option<String>,
    /// `quic` or `tcp`: the link transport the decisions assume (`context.transport`).
    pub transport: String,
    /// The controller's snapshot version the decisions were made on.
    pub snapshot_version: u64,
    /// One per service asked about, sorted by service.
    pub decisions: Vec<AccessDecision>,
}

/// One decision of [`Access`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessDecision {
    pub service: String,
    pub allow: bool,
    /// As in `stream.open` audit records: `permitted`, `no_permit`, `forbidden`,
    /// `unknown_service`, `disabled_user`, `revoked_device`...
    pub reason: String,
    /// The policies that permitted it, or the `forbid` policies that denied it.
    pub policies: Vec<String>,
    /// Why the policies could not be evaluated, for reason `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/enrollment-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollToken {
    /// `agent`, `connector` or `broker`.
    pub role: String,
    /// Agent tokens: the user the device will be bound to.
    #[serde(default)]
    pub user: Option<String>,
    /// Connector and broker tokens: the name it will have.
    #[serde(default)]
    pub name: Option<String>,
    /// Lifetime of the token; default 1 hour, at most 7 days.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A new admin token, which replaced every previous one. Shown once, here, and stored only as
/// a hash.
#[derive(Clone, Serialize, Deserialize)]
pub struct AdminTokenCreated {
    pub id: String,
    pub token: String,
    /// How many admin tokens it replaced (they no longer work).
    pub replaced: u64,
}

impl fmt::Debug for AdminTokenCreated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminTokenCreated")
            .field("id", &self.id)
            .field("replaced", &self.replaced)
            .finish_non_exhaustive()
    }
}

/// The token is shown once, here, and stored only as a hash.
#[derive(Clone, Serialize, Deserialize)]
pub struct EnrollTokenCreated {
    pub id: String,
    pub token: String,
    pub role: String,
    pub expires_at: u64,
    /// Agent tokens: the user the device will belong to, as stored (lowercased).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Connector and broker tokens: the name the peer will have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl fmt::Debug for EnrollTokenCreated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollTokenCreated")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("expires_at", &self.expires_at)
            .field("user", &self.user)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An enrollment token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollTokenInfo {
    pub id: String,
    pub role: String,
    pub user: Option<String>,
    pub name: Option<String>,
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
    /// Identity URI of the peer that redeemed it.
    pub used_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub user: String,
    pub created_at: u64,
    pub cert_serial: String,
    pub cert_not_after: u64,
    pub revoked: bool,
    /// Where its credential stands (absent from controllers before it: `unknown`).
    #[serde(default)]
    pub cert_state: CredentialState,
    /// The last second at which the controller would renew `cert_serial`: its expiry plus
    /// the controller's `renew_grace_secs` (for a disabled user's device: once enabled).
    /// Absent when it would not renew it at all (revoked).
    #[serde(default)]
    pub renew_until: Option<u64>,
}

/// Where a device's, connector's or broker's latest certificate stands, as the controller
/// would judge a renewal of it now. Judged on the latest certificate issued, which is the one
/// its holder has unless the answer that carried it was lost: a holder left with the one
/// before may find its window ends sooner (that one's expiry plus the grace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    /// Valid; its holder renews it before it expires.
    Valid,
    /// Expired, and the controller still renews it (until `renew_until`): the holder gets a
    /// new one as soon as it is back, with no new enrollment.
    Renewable,
    /// Expired, and the controller renews it no more: the holder must enroll again.
    Lapsed,
    /// A device whose user is disabled: refused everywhere, and renewed only once the user
    /// is enabled again (until `renew_until`; after that it lapses).
    UserDisabled,
    /// The device, connector or broker is revoked.
    Revoked,
    /// No certificate on record, or a state this client does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

impl CredentialState {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialState::Valid => "valid",
            CredentialState::Renewable => "renewable",
            CredentialState::Lapsed => "lapsed",
            CredentialState::UserDisabled => "user_disabled",
            CredentialState::Revoked => "revoked",
            CredentialState::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connector {
    pub id: String,
    pub name: String,
    pub created_at: u64,
    pub cert_serial: String,
    pub cert_not_after: u64,
    pub revoked: bool,
    /// As for [`Device::cert_state`].
    #[serde(default)]
    pub cert_state: CredentialState,
    /// As for [`Device::renew_until`].
    #[serde(default)]
    pub renew_until: Option<u64>,
    /// The software version it last announced (`None`: not known).
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    pub id: String,
    pub name: String,
    pub quic_addr: Option<String>,
    pub tcp_addr: Option<String>,
    pub server_name: String,
    pub snapshot_version: u64,
    /// Unix seconds of the last heartbeat; 0 if never.
    pub last_seen: u64,
    /// Expiry of its latest certificate (0 if none on record, or an older controller).
    #[serde(default)]
    pub cert_not_after: u64,
    /// As for [`Device::cert_state`].
    #[serde(default)]
    pub cert_state: CredentialState,
    /// As for [`Device::renew_until`].
    #[serde(default)]
    pub renew_until: Option<u64>,
    /// The software version it last announced (`None`: not known).
    #[serde(default)]
    pub version: Option<String>,
}

/// `GET /v1/rollout`: whether the brokers enforce a snapshot version (the controller's current
/// one unless another is asked about), so that an administrator can tell when a change (a
/// revocation, say) is in force everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version asked about.
    pub version: u64,
    /// The controller's current version.
    pub current: u64,
    /// How many brokers are [`RolloutState::Applied`], [`RolloutState::Behind`] and
    /// [`RolloutState::Silent`].
    pub applied: u64,
    pub behind: u64,
    pub silent: u64,
    /// Every broker not revoked, by name.
    pub brokers: Vec<RolloutBroker>,
}

/// One broker of a [`Rollout`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutBroker {
    pub id: String,
    pub name: String,
    /// The version it reported in force at its last heartbeat.
    pub snapshot_version: u64,
    /// Unix seconds of its last heartbeat; 0 if never.
    pub last_seen: u64,
    pub state: RolloutState,
}

/// Where a broker stands on the version a [`Rollout`] asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Heard from lately, and enforcing the version or a newer one: the streams and links it
    /// no longer allows are ended.
    Applied,
    /// Heard from lately, and enforcing an older version (it applies a change within about a
    /// second, and reports it at its next heartbeat).
    Behind,
    /// Not heard from in the last 30 s: it enforces the snapshot it holds until its staleness
    /// limit, and denies every stream after that. Nothing confirms the version there.
    #[serde(other)]
    Silent,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Applied => "applied",
            RolloutState::Behind => "behind",
            RolloutState::Silent => "silent",
        }
    }
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
    /// Who wrote it: `controller`, or the identity URI of the broker that reported it.
    #[serde(default)]
    pub source: String,
    /// When the controller stored it, by the controller's clock (Unix ms). `at_ms` is its
    /// source's time: for a broker's record, the broker's clock, which may be wrong. Retention
    /// ages records by this one. 0 from an older controller.
    #[serde(default)]
    pub received_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a newer controller may add: information answers take it, enforced ones refuse it
    /// (the role keeps the last one it understood). Twins: the same bodies without the field
    /// parse, and a missing required field is an error either way.
    #[test]
    fn unknown_fields_in_answers_by_what_they_are_for() {
        let broker = r#"{"id":"b1","name":"b1","quic_addr":"127.0.0.1:7401","tcp_addr":null,"server_name":"b1.broker.umbra.test"NEW}"#;
        let issued = format!(
            r#"{{"identity":"umbra://o/agent/d1","cert_pem":"c","ca_pem":"a","serial":"01","not_after":1,"brokers":[{}]NEW}}"#,
            broker.replace("NEW", "")
        );
        let list = format!(
            r#"{{"brokers":[{}],"tag":"t"NEW}}"#,
            broker.replace("NEW", "")
        );
        let extra = r#","region":"eu-west""#;
        for (what, body) in [
            ("broker", broker.to_owned()),
            ("issued", issued),
            ("list", list),
        ] {
            let plain = body.replace("NEW", "");
            let newer = body.replace("NEW", extra);
            let ok = |b: &str| match what {
                "broker" => serde_json::from_str::<BrokerInfo>(b).map(drop),
                "issued" => serde_json::from_str::<IssuedCert>(b).map(drop),
                _ => serde_json::from_str::<BrokerList>(b).map(drop),
            };
            ok(&plain).unwrap_or_else(|e| panic!("{what}: {e}"));
            ok(&newer).unwrap_or_else(|e| panic!("{what} with a new field: {e}"));
            // Without a field it needs (a broker's name, here or in the lists): an error.
            assert!(
                ok(&plain.replacen(r#""name":"b1","#, "", 1)).is_err(),
                "{what}"
            );
        }

        let targets = r#"{"connector_id":"c1","version":3,"targets":[{"service":"web","target":"10.0.0.1:80"NEW}]}"#;
        serde_json::from_str::<ConnectorConfig>(&targets.replace("NEW", "")).unwrap();
        let e = serde_json::from_str::<ConnectorConfig>(
            &targets.replace("NEW", r#","ports_only":[443]"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ports_only"), "{e}");
        let snap = Snapshot::default();
        let mut v = serde_json::to_value(&snap).unwrap();
        serde_json::from_value::<Snapshot>(v.clone()).unwrap();
        v["require_posture"] = serde_json::json!(true);
        let e = serde_json::from_value::<Snapshot>(v).unwrap_err();
        assert!(e.to_string().contains("require_posture"), "{e}");
    }

    #[test]
    fn token_round_trip() {
        let t = EnrollToken {
            ca_sha256: [0xab; 32],
            secret: "s3cr3t-AbCdEfGhIjKlMn_op".into(),
        };
        let s = t.to_string();
        assert!(s.starts_with("umb1.abab"));
        assert_eq!(EnrollToken::parse(&s).unwrap(), t);
        assert_eq!(format!("{t:?}"), "EnrollToken(..)");
    }

    #[test]
    fn token_rejects_malformed() {
        let good_hash = "ab".repeat(32);
        for bad in [
            String::new(),
            format!("umb2.{good_hash}.abcdefghijklmnopq"),
            format!("umb1.{}.abcdefghijklmnopq", "ab".repeat(31)),
            format!("umb1.{}.abcdefghijklmnopq", "zz".repeat(32)),
            format!("umb1.{good_hash}.short"),
            format!("umb1.{good_hash}.has space in it!!"),
            format!("umb1.{good_hash}.abcdefghijklmnopq.extra"),
        ] {
            assert!(EnrollToken::parse(&bad).is_err(), "{bad}");
        }
    }
}
