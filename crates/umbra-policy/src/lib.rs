//! Umbra's access policy: who may connect to which service, decided locally and purely.
//!
//! This crate owns
//! - the Cedar schema ([`SCHEMA`], namespace `Umbra`): users in groups, devices owned by users,
//!   services, and the one action `connect` with its request context;
//! - policy text handling: [`validate_policy`] for the controller's admin API (strict
//!   validation, readable reasons) and [`allow_policy`] to generate simple grants safely;
//! - compiling a [`Snapshot`](umbra_proto::Snapshot) into an [`Engine`] (entities and policy set
//!   built once per snapshot);
//! - the decision itself, [`Engine::decide`]: `(request, snapshot facts, now) -> Decision`,
//!   with a [`Reason`] for the audit log.
//!
//! It does not own: fetching or storing snapshots, clocks (the caller passes `now` in
//! [`RequestContext`]), authentication (the device id comes from a verified certificate), or
//! what a denied peer is told (the broker answers every denial the same way).
//!
//! ```
//! use umbra_policy::{AccessRequest, Engine, PolicySubject, RequestContext, allow_policy};
//! use umbra_proto::Snapshot;
//! use umbra_proto::snapshot::{DeviceFacts, PolicyText, ServiceFacts, UserFacts};
//!
//! let snapshot = Snapshot {
//!     version: 7,
//!     users: vec![UserFacts { id: "alice@example.com".into(), groups: vec!["eng".into()], disabled: false }],
//!     devices: vec![DeviceFacts { id: "d1".into(), user: "alice@example.com".into(), revoked: false }],
//!     services: vec![ServiceFacts { name: "web".into(), target: "10.0.0.5:80".into(), connectors: vec![] }],
//!     policies: vec![PolicyText {
//!         id: "eng-web".into(),
//!         text: allow_policy(&PolicySubject::Group("eng".into()), "web"),
//!     }],
//!     ..Snapshot::default()
//! };
//! let engine = Engine::from_snapshot(&snapshot)?;
//! let ctx = RequestContext { now_unix: 1_700_000_000, transport: "quic" };
//! let decision = engine.decide(&AccessRequest { device: "d1", service: "web", ctx });
//! assert!(decision.allow);
//! assert_eq!(decision.reason.as_str(), "permitted");
//! # Ok::<(), umbra_policy::PolicyError>(())
//! ```

mod decide;
mod engine;
mod entities;
mod error;
mod schema;
mod text;

pub use decide::{AccessRequest, Decision, Reason, RequestContext};
pub use engine::Engine;
pub use error::PolicyError;
pub use schema::SCHEMA;
pub use text::{Named, PolicySubject, allow_policy, named_entities, validate_policy};
