//! The agent: runs on a user's device and carries its connections to services through the
//! nearest broker.
//!
//! Read the modules in the order of one connection:
//!
//! 1. [`config`]: what the user sets.
//! 2. `identity`: the enrolled identity and `controller.json` (where the controller is, the
//!    last known brokers).
//! 3. `brokers`: measure every broker (fastest of three pings), rank nearest first, remember
//!    which are down.
//! 4. `session`: one held link to the current broker; `Open` a stream per connection, failing
//!    over to the next broker when the current one stops answering.
//! 5. `forward`: accept local TCP connections and relay each over its own stream.
//! 6. `status`: identity, broker round trip times, the services the user may reach.
//!
//! The certificate is renewed in the background while forwarding (new links use the renewed
//! identity), and by `status` and `services` once it is due; a forward whose certificate
//! expired without a renewal stops. Enrollment itself ([`enroll`]) is umbra-link's.
//!
//! Not owned here: the access decision (the broker's), and the wire format (umbra-proto).

mod brokers;
pub mod config;
mod forward;
mod identity;
mod session;
mod status;

use std::net::SocketAddr;

use umbra_proto::Role;

pub use config::{AgentConfig, ConfigError, TransportPref, UnknownTransportPref};
pub use forward::Forwarder;
pub use identity::Renewal;
pub use status::{BrokerStatus, Status, services, status};
pub use umbra_link::enroll::enroll;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No identity in `identity_dir`: the device is not enrolled.
    #[error("identity: {0} (enroll this device first)")]
    NotEnrolled(#[source] umbra_pki::PkiError),
    /// The identity in `identity_dir` cannot be used (files damaged, a directory or key
    /// others may change or read): the error says which.
    #[error("identity: {0}")]
    Identity(#[source] umbra_pki::PkiError),
    /// The certificate has expired (at the time given): renewal needs a valid one.
    #[error(
        "this device's certificate expired at {0} without a renewal (every agent command \
         renews it once it is due, and for a while after it expired, when the controller can \
         be reached: run one again to retry). Enroll this device again with a new token from \
         your administrator if that fails: \
         umbra agent enroll --controller URL --token-file FILE"
    )]
    Expired(String),
    /// The certificate has expired (at `at`) and the controller did not renew it.
    #[error(
        "this device's certificate expired at {at} and was not renewed: {error}. The \
         controller renews a certificate for a while after it expired (its renew grace): if \
         it could not be reached, try again once it can; if your user is disabled, it renews \
         once an administrator enables it again. If the device was revoked or expired too \
         long ago, enroll it again with a new token from your administrator: \
         umbra agent enroll --controller URL --token-file FILE"
    )]
    ExpiredUnrenewed { at: String, error: String },
    /// The identity is not an agent's.
    #[error("the identity in identity_dir is a {0} certificate, not an agent's")]
    WrongRole(Role),
    /// `controller.json` is missing or unreadable.
    #[error("controller reference: {0}")]
    ControllerRef(#[source] umbra_link::LinkError),
    /// A forwarder was started with nothing to forward.
    #[error("no service to forward")]
    NoForward,
    /// Not a service name.
    #[error("invalid service name {0:?}")]
    ServiceName(String),
    /// The local listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// A forward was asked to listen where other hosts can reach it.
    #[error(
        "refusing to listen on {0}: other hosts could connect there and reach the service as \
         this device's user. Listen on loopback (127.0.0.1, the default), or pass \
         --allow-remote-clients (allow_remote_clients = true) if sharing is intended"
    )]
    RemoteListen(SocketAddr),
    /// No broker answered.
    #[error("no broker reachable: {0}")]
    NoBroker(String),
    /// A broker refused this device's identity: revoked, or not enrolled.
    #[error("{}", umbra_link::LinkError::Refused)]
    Refused,
}
