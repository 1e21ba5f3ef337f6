//! The OpenAPI 3.1 document served at `GET /v1/openapi.json`.
//!
//! Built with utoipa's builders from [`ROUTES`], one row per route of [`super::router`]. The
//! body schemas are derived from mirror types declared here, because the wire types live in
//! `umbra-proto`, which does not depend on utoipa; each mirror has the same fields as its
//! `umbra_proto::api` type (a test in `tests/api.rs` checks the document lists every route).

#![allow(dead_code)] // mirror types exist for their derived schemas only

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::ToSchema;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, Content, InfoBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr, Required,
    ResponseBuilder,
};

use crate::state::Ctx;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Auth {
    Public,
    /// Client certificate of one of the named roles.
    Peer(&'static str),
    Admin,
}

/// A response or request body.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body {
    None,
    One(&'static str),
    List(&'static str),
    Text(&'static str),
}

/// One documented route.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteDoc {
    pub(crate) method: &'static str,
    pub(crate) path: &'static str,
    pub(crate) auth: Auth,
    pub(crate) summary: &'static str,
    pub(crate) request: Body,
    pub(crate) status: u16,
    pub(crate) response: Body,
    pub(crate) query: &'static [&'static str],
}

impl RouteDoc {
    /// A listing of devices or connectors, paged by id (the audit log pages by number).
    fn response_is_list(&self) -> bool {
        matches!(self.response, Body::List("Device" | "Connector"))
    }
}

const fn r(
    method: &'static str,
    path: &'static str,
    auth: Auth,
    summary: &'static str,
    request: Body,
    status: u16,
    response: Body,
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        auth,
        summary,
        request,
        status,
        response,
        query: &[],
    }
}

const fn poll(
    path: &'static str,
    role: &'static str,
    summary: &'static str,
    body: &'static str,
) -> RouteDoc {
    RouteDoc {
        method: "get",
        path,
        auth: Auth::Peer(role),
        summary,
        request: Body::None,
        status: 200,
        response: Body::One(body),
        query: &["after", "wait"],
    }
}

use Auth::{Admin, Public};
use Body::{List, None as NoBody, One, Text};

/// Every route the controller serves.
pub(crate) const ROUTES: &[RouteDoc] = &[
    r(
        "get",
        "/healthz",
        Public,
        "Liveness",
        NoBody,
        200,
        Text("text/plain"),
    ),
    r(
        "get",
        "/v1/ca.pem",
        Public,
        "The organisation CA certificate (PEM)",
        NoBody,
        200,
        Text("application/x-pem-file"),
    ),
    r(
        "post",
        "/v1/enroll",
        Public,
        "Redeem an enrollment token for a certificate",
        One("EnrollRequest"),
        200,
        One("IssuedCert"),
    ),
    r(
        "get",
        "/v1/openapi.json",
        Public,
        "This document",
        NoBody,
        200,
        Text("application/json"),
    ),
    r(
        "post",
        "/v1/renew",
        Auth::Peer("agent, connector or broker"),
        "A new certificate for the caller's identity",
        One("RenewRequest"),
        200,
        One("IssuedCert"),
    ),
    RouteDoc {
        method: "get",
        path: "/v1/brokers",
        auth: Auth::Peer("agent, connector or broker"),
        summary: "Brokers to connect to; with `have` (the `tag` of the list held), a long poll \
                  answered once the list differs (204 when nothing changed within `wait` s)",
        request: Body::None,
        status: 200,
        response: Body::One("BrokerList"),
        query: &["have", "wait"],
    },
    poll(
        "/v1/snapshot",
        "broker",
        "Long-poll the policy snapshot (204 when nothing newer than `after` within `wait` s; \
         at once when `after` is ahead of the store, which was restored)",
        "Snapshot",
    ),
    r(
        "post",
        "/v1/broker/heartbeat",
        Auth::Peer("broker"),
        "Broker liveness, live streams and audit records (at most 2 in flight per broker, \
         429 beyond)",
        One("BrokerHeartbeat"),
        200,
        One("HeartbeatAck"),
    ),
    poll(
        "/v1/connector/config",
        "connector",
        "Long-poll the targets published to this connector (204 on timeout; at once when \
         `after` is ahead of the store)",
        "ConnectorConfig",
    ),
    r(
        "get",
        "/v1/users",
        Admin,
        "List users",
        NoBody,
        200,
        List("User"),
    ),
    r(
        "post",
        "/v1/users",
        Admin,
        "Create a user",
        One("CreateUser"),
        201,
        One("User"),
    ),
    r(
        "delete",
        "/v1/users/{id}",
        Admin,
        "Delete a user (revokes their devices)",
        NoBody,
        204,
        NoBody,
    ),
    r(
        "patch",
        "/v1/users/{id}",
        Admin,
        "Disable or enable a user: a disabled user's devices are denied every stream (live ones \
         end) and get no new certificate",
        One("UpdateUser"),
        200,
        One("User"),
    ),
    r(
        "get",
        "/v1/groups",
        Admin,
        "List groups",
        NoBody,
        200,
        List("Group"),
    ),
    r(
        "post",
        "/v1/groups",
        Admin,
        "Create a group",
        One("CreateGroup"),
        201,
        One("Group"),
    ),
    r(
        "delete",
        "/v1/groups/{name}",
        Admin,
        "Delete a group",
        NoBody,
        204,
        NoBody,
    ),
    r(
        "post",
        "/v1/groups/{name}/members",
        Admin,
        "Add a member",
        One("AddMember"),
        200,
        One("Group"),
    ),
    r(
        "delete",
        "/v1/groups/{name}/members/{user}",
        Admin,
        "Remove a member",
        NoBody,
        204,
        NoBody,
    ),
    r(
        "get",
        "/v1/services",
        Admin,
        "List services",
        NoBody,
        200,
        List("Service"),
    ),
    r(
        "post",
        "/v1/services",
        Admin,
        "Publish a service",
        One("CreateService"),
        201,
        One("Service"),
    ),
    r(
        "delete",
        "/v1/services/{name}",
        Admin,
        "Delete a service",
        NoBody,
        204,
        NoBody,
    ),
    r(
        "patch",
        "/v1/services/{name}",
        Admin,
        "Change a service's target, connectors, or both, in one change; live streams on the \
         old route end",
        One("UpdateService"),
        200,
        One("Service"),
    ),
    r(
        "get",
        "/v1/policies",
        Admin,
        "List policies",
        NoBody,
        200,
        List("Policy"),
    ),
    r(
        "post",
        "/v1/policies",
        Admin,
        "Add a Cedar policy (validated against the schema)",
        One("CreatePolicy"),
        201,
        One("Policy"),
    ),
    r(
        "delete",
        "/v1/policies/{name}",
        Admin,
        "Delete a policy",
        NoBody,
        204,
        NoBody,
    ),
    r(
        "put",
        "/v1/policies/{name}",
        Admin,
        "Replace a policy's text in one change (validated first; live streams it still allows \
         go on)",
        One("ReplacePolicy"),
        200,
        One("Policy"),
    ),
    r(
        "post",
        "/v1/policies/{name}/check",
        Admin,
        "Which live streams a change of policy `name` would end (with `text`: added or \
         replaced; without: removed), decided as brokers will decide; changes nothing",
        One("PolicyCheck"),
        200,
        One("PolicyCheckResult"),
    ),
    r(
        "get",
        "/v1/enrollment-tokens",
        Admin,
        "List enrollment tokens (never their secrets)",
        NoBody,
        200,
        List("EnrollTokenInfo"),
    ),
    r(
        "post",
        "/v1/enrollment-tokens",
        Admin,
        "Create a one-time enrollment token (shown once)",
        One("CreateEnrollToken"),
        201,
        One("EnrollTokenCreated"),
    ),
    r(
        "delete",
        "/v1/enrollment-tokens/{id}",
        Admin,
        "Delete an enrollment token",
        NoBody,
        204,
        NoBody,
    ),
    r(
        "post",
        "/v1/admin-token/rotate",
        Admin,
        "Replace every admin token, the caller's included, with a new one (shown once)",
        NoBody,
        201,
        One("AdminTokenCreated"),
    ),
    RouteDoc {
        method: "get",
        path: "/v1/devices",
        auth: Admin,
        summary: "Devices in enrollment order: all, or those of `user`; a page of at most `limit` \
                  (1 to 1000) after the device `after` (the last id of the page before)",
        request: NoBody,
        status: 200,
        response: List("Device"),
        query: &["user", "after", "limit"],
    },
    r(
        "post",
        "/v1/devices/{id}/revoke",
        Admin,
        "Revoke a device and its certificates",
        NoBody,
        200,
        One("Device"),
    ),
    RouteDoc {
        method: "get",
        path: "/v1/connectors",
        auth: Admin,
        summary: "Connectors in enrollment order: all, or the instances named `name`; a page of \
                  at most `limit` (1 to 1000) after the connector `after` (the last id of the \
                  page before)",
        request: NoBody,
        status: 200,
        response: List("Connector"),
        query: &["name", "after", "limit"],
    },
    r(
        "post",
        "/v1/connectors/{id}/revoke",
        Admin,
        "Revoke a connector (by id or name) and its certificates",
        NoBody,
        200,
        One("Connector"),
    ),
    r(
        "get",
        "/v1/brokers/all",
        Admin,
        "List brokers with their last heartbeat",
        NoBody,
        200,
        List("Broker"),
    ),
    r(
        "post",
        "/v1/brokers/{id}/revoke",
        Admin,
        "Revoke a broker (by id or name) and its certificates",
        NoBody,
        200,
        One("Broker"),
    ),
    r(
        "get",
        "/v1/streams",
        Admin,
        "Live streams reported by brokers seen in the last 30 s; header \
         `x-umbra-brokers-silent`: how many brokers are left out, not heard from lately \
         (their streams may still run); header `x-umbra-streams-omitted`: how many live \
         streams brokers left out of their lists (more than one heartbeat carries)",
        NoBody,
        200,
        List("LiveStream"),
    ),
    RouteDoc {
        method: "get",
        path: "/v1/rollout",
        auth: Admin,
        summary: "Where every broker (not revoked) stands on snapshot `version` (default: the \
                  controller's current one): `applied` (heard from in the last 30 s, with the \
                  version or a newer one in force), `behind`, or `silent` (not heard from \
                  lately: nothing confirms it). With `wait` (seconds, at most 25) the answer \
                  comes once no broker is behind, or when the wait ends. Reads only",
        request: NoBody,
        status: 200,
        response: One("Rollout"),
        query: &["version", "wait"],
    },
    RouteDoc {
        method: "get",
        path: "/v1/audit",
        auth: Admin,
        summary: "Audit records after sequence number `after`, oldest first: the oldest `limit` \
                  (default 100) or the newest `last` (1 to 1000). `actor`, `action`, `target` \
                  and `result` keep only the records with that exact value",
        request: NoBody,
        status: 200,
        response: List("AuditEntry"),
        query: &[
            "after", "limit", "last", "actor", "action", "target", "result",
        ],
    },
    RouteDoc {
        method: "get",
        path: "/v1/access",
        auth: Admin,
        summary: "What the policy decides now, and why, for `user` (on `device`, or on a new \
                  device of theirs in good standing) and `service` (or every published \
                  service), over `transport` (`quic`, the default, or `tcp`). Reads only",
        request: NoBody,
        status: 200,
        response: One("Access"),
        query: &["user", "device", "service", "transport"],
    },
];

// ---------------------------------------------------------------------------------------------
// Mirror types (schemas only).

#[derive(ToSchema)]
struct ApiError {
    error: String,
    field: Option<String>,
}
#[derive(ToSchema)]
struct EnrollRequest {
    /// The printed token `umb1.<ca hash>.<secret>`, or only its secret.
    token: String,
    csr_pem: String,
    /// The role the enrolling command is for (`agent`, `connector`, `broker`); a token of
    /// another role is refused (400, field `role`) and not spent.
    role: Option<String>,
}
#[derive(ToSchema)]
struct RenewRequest {
    csr_pem: String,
}
#[derive(ToSchema)]
struct BrokerInfo {
    id: String,
    name: String,
    quic_addr: Option<String>,
    tcp_addr: Option<String>,
    server_name: String,
}
#[derive(ToSchema)]
struct IssuedCert {
    identity: String,
    cert_pem: String,
    ca_pem: String,
    serial: String,
    not_after: u64,
    user: Option<String>,
    brokers: Vec<BrokerInfo>,
}
#[derive(ToSchema)]
struct BrokerList {
    brokers: Vec<BrokerInfo>,
    tag: String,
}
#[derive(ToSchema)]
struct PublishedTarget {
    service: String,
    target: String,
}
#[derive(ToSchema)]
struct ConnectorConfig {
    connector_id: String,
    version: u64,
    targets: Vec<PublishedTarget>,
}
#[derive(ToSchema)]
struct LiveStream {
    id: u64,
    broker: String,
    user: String,
    device: String,
    service: String,
    connector: String,
    transport: String,
    started_at: u64,
    bytes_up: u64,
    bytes_down: u64,
}
#[derive(ToSchema)]
struct AuditRecord {
    at_ms: u64,
    actor: String,
    action: String,
    target: String,
    result: String,
    #[schema(value_type = Object)]
    detail: serde_json::Value,
}
#[derive(ToSchema)]
struct AuditEntry {
    seq: i64,
    at_ms: u64,
    actor: String,
    action: String,
    target: String,
    result: String,
    #[schema(value_type = Object)]
    detail: serde_json::Value,
    /// `controller`, or the identity URI of the broker that reported the record.
    source: String,
    /// When the controller stored it, by its own clock (Unix ms); `at_ms` is the source's
    /// time (a broker's clock for its records). Retention ages records by this one.
    received_ms: u64,
}
#[derive(ToSchema)]
struct BrokerHeartbeat {
    name: String,
    quic_addr: Option<String>,
    tcp_addr: Option<String>,
    server_name: String,
    snapshot_version: u64,
    /// Absent: the broker's live streams are unchanged since its last report.
    streams: Option<Vec<LiveStream>>,
    /// Live streams left out of `streams` (a heartbeat carries at most so many).
    streams_omitted: Option<u64>,
    audit: Vec<AuditRecord>,
    /// `audit[i]` is event number `first + i` of the broker's spool `epoch`; the controller
    /// stores each number once.
    audit_seq: Option<AuditSeq>,
}
#[derive(ToSchema)]
struct AuditSeq {
    epoch: u64,
    first: u64,
}
#[derive(ToSchema)]
struct HeartbeatAck {
    snapshot_version: u64,
    /// The broker's audit epoch as stored (absent without numbering).
    audit_epoch: Option<u64>,
    /// The last audit event number stored for that epoch.
    audit_last: Option<u64>,
}
#[derive(ToSchema)]
struct UserFacts {
    id: String,
    groups: Vec<String>,
    disabled: bool,
}
#[derive(ToSchema)]
struct DeviceFacts {
    id: String,
    user: String,
    revoked: bool,
}
#[derive(ToSchema)]
struct ConnectorFacts {
    id: String,
    name: String,
    revoked: bool,
}
#[derive(ToSchema)]
struct ServiceFacts {
    name: String,
    target: String,
    connectors: Vec<String>,
}
#[derive(ToSchema)]
struct PolicyText {
    id: String,
    text: String,
}
#[derive(ToSchema)]
struct TokenKey {
    kid: String,
    public_key_pem: String,
}
#[derive(ToSchema)]
struct Snapshot {
    version: u64,
    org: String,
    issued_at: u64,
    users: Vec<UserFacts>,
    groups: Vec<String>,
    devices: Vec<DeviceFacts>,
    connectors: Vec<ConnectorFacts>,
    brokers: Vec<BrokerInfo>,
    services: Vec<ServiceFacts>,
    policies: Vec<PolicyText>,
    revoked_serials: Vec<String>,
    token_keys: Vec<TokenKey>,
}
#[derive(ToSchema)]
struct CreateUser {
    id: String,
    groups: Option<Vec<String>>,
}
#[derive(ToSchema)]
struct User {
    id: String,
    groups: Vec<String>,
    disabled: bool,
    created_at: u64,
}
#[derive(ToSchema)]
struct UpdateUser {
    /// The one change a user takes for now (required).
    disabled: bool,
}
#[derive(ToSchema)]
struct CreateGroup {
    name: String,
}
#[derive(ToSchema)]
struct Group {
    name: String,
    members: Vec<String>,
}
#[derive(ToSchema)]
struct AddMember {
    user: String,
}
#[derive(ToSchema)]
struct CreateService {
    name: String,
    target: String,
    connectors: Vec<String>,
}
#[derive(ToSchema)]
struct UpdateService {
    target: Option<String>,
    connectors: Option<Vec<String>>,
}
#[derive(ToSchema)]
struct Service {
    name: String,
    target: String,
    connectors: Vec<String>,
    created_at: u64,
}
#[derive(ToSchema)]
struct CreatePolicy {
    name: String,
    text: String,
}
#[derive(ToSchema)]
struct ReplacePolicy {
    text: String,
}
#[derive(ToSchema)]
struct PolicyCheck {
    text: Option<String>,
}
#[derive(ToSchema)]
struct PolicyCheckEnd {
    stream: LiveStream,
    reason: String,
}
#[derive(ToSchema)]
struct PolicyCheckResult {
    change: String,
    ends: Vec<PolicyCheckEnd>,
    live: u64,
    brokers_silent: u64,
    /// Live streams brokers left out of their lists (more than a heartbeat carries).
    streams_omitted: u64,
}
#[derive(ToSchema)]
struct Policy {
    name: String,
    text: String,
    created_at: u64,
    /// In the answer to a write and in listings, only when there are some: the users, groups
    /// and services the text names that do not exist (`group eng`). The policy is written;
    /// it grants nothing through those until one of that name is made.
    unknown: Option<Vec<String>>,
}
#[derive(ToSchema)]
struct AccessDecision {
    service: String,
    allow: bool,
    reason: String,
    policies: Vec<String>,
    /// Why the policies could not be evaluated (reason `error` only).
    error: Option<String>,
}
#[derive(ToSchema)]
struct Access {
    user: String,
    device: Option<String>,
    transport: String,
    snapshot_version: u64,
    decisions: Vec<AccessDecision>,
}
#[derive(ToSchema)]
struct CreateEnrollToken {
    role: String,
    user: Option<String>,
    name: Option<String>,
    ttl_secs: Option<u64>,
}
#[derive(ToSchema)]
struct EnrollTokenCreated {
    id: String,
    token: String,
    role: String,
    expires_at: u64,
    /// Agent tokens: the user the device will belong to (lowercased).
    user: Option<String>,
    /// Connector and broker tokens: the peer's name.
    name: Option<String>,
}
#[derive(ToSchema)]
struct AdminTokenCreated {
    id: String,
    token: String,
    replaced: u64,
}
#[derive(ToSchema)]
struct EnrollTokenInfo {
    id: String,
    role: String,
    user: Option<String>,
    name: Option<String>,
    created_at: u64,
    expires_at: u64,
    used_at: Option<u64>,
    used_by: Option<String>,
}
#[derive(ToSchema)]
struct Device {
    id: String,
    user: String,
    created_at: u64,
    cert_serial: String,
    cert_not_after: u64,
    revoked: bool,
    cert_state: CredentialState,
    /// The last second at which the controller would renew `cert_serial` (its expiry plus
    /// `renew_grace_secs`; a disabled user's device only once enabled); absent when revoked.
    renew_until: Option<u64>,
}
/// Where the latest certificate stands: `valid`; `renewable` (expired, renewed on the
/// holder's return until `renew_until`); `lapsed` (enroll again); `user_disabled` (renewed
/// once the user is enabled, until `renew_until`); `revoked`; `unknown`.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
enum CredentialState {
    Valid,
    Renewable,
    Lapsed,
    UserDisabled,
    Revoked,
    Unknown,
}
#[derive(ToSchema)]
struct Connector {
    id: String,
    name: String,
    created_at: u64,
    cert_serial: String,
    cert_not_after: u64,
    revoked: bool,
    cert_state: CredentialState,
    renew_until: Option<u64>,
    /// The software version it last announced; absent if not known.
    version: Option<String>,
}
#[derive(ToSchema)]
struct Broker {
    id: String,
    name: String,
    quic_addr: Option<String>,
    tcp_addr: Option<String>,
    server_name: String,
    snapshot_version: u64,
    last_seen: u64,
    cert_not_after: u64,
    cert_state: CredentialState,
    renew_until: Option<u64>,
    /// The software version it last announced (with each heartbeat); absent if not known.
    version: Option<String>,
}

#[derive(ToSchema)]
struct Rollout {
    version: u64,
    current: u64,
    applied: u64,
    behind: u64,
    silent: u64,
    brokers: Vec<RolloutBroker>,
}
#[derive(ToSchema)]
struct RolloutBroker {
    id: String,
    name: String,
    /// The version it reported in force (the streams it ends, ended) at its last heartbeat.
    snapshot_version: u64,
    last_seen: u64,
    state: RolloutState,
}
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
enum RolloutState {
    Applied,
    Behind,
    Silent,
}

// ---------------------------------------------------------------------------------------------

fn components() -> utoipa::openapi::Components {
    ComponentsBuilder::new()
        .schema_from::<ApiError>()
        .schema_from::<EnrollRequest>()
        .schema_from::<RenewRequest>()
        .schema_from::<BrokerInfo>()
        .schema_from::<IssuedCert>()
        .schema_from::<BrokerList>()
        .schema_from::<PublishedTarget>()
        .schema_from::<ConnectorConfig>()
        .schema_from::<LiveStream>()
        .schema_from::<AuditRecord>()
        .schema_from::<AuditEntry>()
        .schema_from::<BrokerHeartbeat>()
        .schema_from::<AuditSeq>()
        .schema_from::<HeartbeatAck>()
        .schema_from::<UserFacts>()
        .schema_from::<DeviceFacts>()
        .schema_from::<ConnectorFacts>()
        .schema_from::<ServiceFacts>()
        .schema_from::<PolicyText>()
        .schema_from::<TokenKey>()
        .schema_from::<Snapshot>()
        .schema_from::<CreateUser>()
        .schema_from::<User>()
        .schema_from::<UpdateUser>()
        .schema_from::<CreateGroup>()
        .schema_from::<Group>()
        .schema_from::<AddMember>()
        .schema_from::<CreateService>()
        .schema_from::<Service>()
        .schema_from::<UpdateService>()
        .schema_from::<CreatePolicy>()
        .schema_from::<Policy>()
        .schema_from::<ReplacePolicy>()
        .schema_from::<PolicyCheck>()
        .schema_from::<PolicyCheckEnd>()
        .schema_from::<PolicyCheckResult>()
        .schema_from::<AccessDecision>()
        .schema_from::<Access>()
        .schema_from::<CreateEnrollToken>()
        .schema_from::<EnrollTokenCreated>()
        .schema_from::<EnrollTokenInfo>()
        .schema_from::<AdminTokenCreated>()
        .schema_from::<Device>()
        .schema_from::<CredentialState>()
        .schema_from::<Connector>()
        .schema_from::<Broker>()
        .schema_from::<Rollout>()
        .schema_from::<RolloutBroker>()
        .schema_from::<RolloutState>()
        .security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        )
        .security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "A certificate issued by this controller at enrollment (TLS client auth)"
                        .into(),
                ),
                deprecated: None,
                extensions: None,
            },
        )
        .build()
}

fn content(body: Body) -> Option<(&'static str, Content)> {
    match body {
        Body::None => None,
        Body::One(name) => Some((
            "application/json",
            Content::new(Some(RefOr::Ref(Ref::from_schema_name(name)))),
        )),
        Body::List(name) => Some((
            "application/json",
            Content::new(Some(RefOr::T(Schema::Array(
                ArrayBuilder::new()
                    .items(Ref::from_schema_name(name))
                    .build(),
            )))),
        )),
        Body::Text(mime) => Some((
            mime,
            Content::new(Some(RefOr::T(Schema::Object(
                ObjectBuilder::new().schema_type(Type::String).build(),
            )))),
        )),
    }
}

fn path_params(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(str::to_owned)
        .collect()
}

/// Builds the document.
pub(crate) fn document() -> OpenApi {
    let mut paths = Paths::new();
    for route in ROUTES {
        let method = match route.method {
            "get" => HttpMethod::Get,
            "post" => HttpMethod::Post,
            "delete" => HttpMethod::Delete,
            "put" => HttpMethod::Put,
            "patch" => HttpMethod::Patch,
            _ => continue,
        };
        let mut op = OperationBuilder::new()
            .summary(Some(route.summary))
            .operation_id(Some(format!(
                "{}{}",
                route.method,
                route.path.replace(['/', '.', '{', '}', '-'], "_")
            )));
        op = op.tag(match route.auth {
            Auth::Public => "public",
            Auth::Peer(_) => "peer",
            Auth::Admin => "admin",
        });
        match route.auth {
            Auth::Public => {}
            Auth::Peer(roles) => {
                op = op
                    .description(Some(format!("Client certificate of role: {roles}.")))
                    .security(SecurityRequirement::new(
                        "client_certificate",
                        Vec::<String>::new(),
                    ));
            }
            Auth::Admin => {
                op = op.security(SecurityRequirement::new(
                    "admin_token",
                    Vec::<String>::new(),
                ));
            }
        }
        for p in path_params(route.path) {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(p)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
            );
        }
        for q in route.query {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(*q)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .schema(Some(ObjectBuilder::new().schema_type(
                        // Counts and sequence positions are numbers; names, ids and tags are
                        // strings (a listing of peers pages after an id).
                        if ["after", "wait", "limit", "last", "version"].contains(q)
                            && !(*q == "after" && route.response_is_list())
                        {
                            Type::Integer
                        } else {
                            Type::String
                        },
                    ))),
            );
        }
        if let Some((mime, c)) = content(route.request) {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content(mime, c)
                    .required(Some(Required::True))
                    .build(),
            ));
        }
        let mut ok = ResponseBuilder::new().description("success");
        if let Some((mime, c)) = content(route.response) {
            ok = ok.content(mime, c);
        }
        op = op.response(route.status.to_string(), ok.build());
        if route.query.contains(&"after") && route.auth != Auth::Admin {
            op = op.response(
                "204",
                ResponseBuilder::new()
                    .description("nothing newer than `after` before the wait ended")
                    .build(),
            );
        }
        if route.query.contains(&"have") {
            op = op.response(
                "204",
                ResponseBuilder::new()
                    .description("still the list `have` names when the wait ended")
                    .build(),
            );
        }
        let err = ResponseBuilder::new()
            .description("error (4xx/5xx)")
            .content(
                "application/json",
                Content::new(Some(RefOr::Ref(Ref::from_schema_name("ApiError")))),
            )
            .build();
        op = op.response("default", err);
        paths.add_path_operation(route.path, vec![method], op.build());
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Umbra controller API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Enrollment, renewal, distribution to brokers and connectors, and administration of an Umbra organisation.",
                )),
        )
        .paths(paths)
        .components(Some(components()))
        .build()
}

static DOCUMENT: OnceLock<String> = OnceLock::new();

pub(super) async fn serve(State(_ctx): State<Arc<Ctx>>) -> Response {
    let json = DOCUMENT.get_or_init(|| document().to_json().unwrap_or_else(|_| String::from("{}")));
    ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_every_route() {
        let doc = serde_json::to_value(document()).unwrap();
        for route in ROUTES {
            assert!(
                doc["paths"][route.path][route.method].is_object(),
                "{} {}",
                route.method,
                route.path
            );
        }
        assert!(doc["components"]["schemas"]["Snapshot"].is_object());
        assert_eq!(
            path_params("/v1/groups/{name}/members/{user}"),
            ["name", "user"]
        );
    }
}
