//! The Umbra controller: the organisation's source of truth and its only certificate authority.
//!
//! It owns:
//! - the **store** (`store`): users, groups, services, Cedar policies, enrollment tokens,
//!   enrolled devices, connectors and brokers, issued certificates, the audit trail, and the
//!   snapshot version: SQLite through sqlx, portable SQL, embedded migrations;
//! - **CA custody** (`ca`): the CA key is stored sealed under a key-encryption key that is
//!   not in the database;
//! - **enrollment and renewal** (`enroll`): one-time tokens, atomic redemption, certificates
//!   whose every field the controller decides;
//! - the **REST API** (`api`): admin (bearer token), peers (client certificate), public, and
//!   its OpenAPI document;
//! - **distribution** (`distribution`): versioned snapshots long-polled by brokers, published
//!   targets long-polled by connectors;
//! - the **admin tokens** (`admin_token`): first token, rotation, reset from the host;
//! - **retention** (`housekeeping`): audit records older than `audit_retention_days`, and
//!   enrollment tokens spent or expired a month ago, are deleted by an hourly sweep;
//! - **audit** (`audit`; refusals of unauthenticated requests within a budget per source,
//!   `failures`) and metrics (`umbra_controller_requests_total{route,status}`,
//!   `umbra_enrollments_total{role,result}`, `umbra_renewals_total{role,result}`,
//!   `umbra_snapshot_version`, `umbra_audit_skipped_total{action}`,
//!   `umbra_controller_connections_refused_total{reason}`), recorded through the
//!   `metrics` facade. The embedding binary
//!   serves them on a listener of its own (loopback by default), never on the API port: the
//!   API is public, and counts of enrollments and requests are nobody's business there.
//!
//! It does not decide access: brokers do, from the snapshot, with `umbra-policy`. It never
//! sees user traffic.
//!
//! ```no_run
//! # async fn run() -> Result<(), umbra_controller::ControllerError> {
//! umbra_pki::install_crypto_provider();
//! let ctl = umbra_controller::Controller::start(Default::default()).await?;
//! if let Some(t) = ctl.first_admin_token() {
//!     println!("admin token (shown once): {t}");
//! }
//! # ctl.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod admin_token;
mod api;
mod audit;
mod ca;
mod config;
mod controller;
mod distribution;
mod enroll;
mod error;
mod failures;
mod housekeeping;
mod state;
mod store;
pub(crate) mod validate;

pub use admin_token::reset_admin_token;
pub use config::{ConfigError, ControllerConfig, MAX_TOKEN_TTL};
pub use controller::Controller;
pub use error::ControllerError;
pub use housekeeping::Swept;
pub use state::Clock;

/// Not API: for `fuzz/` (target `validate`) and its corpus replay test only. The controller's
/// checks of names, user ids and `host:port` values on one input.
#[doc(hidden)]
pub fn fuzz_validate(s: &str) -> validate::Validated {
    validate::all(s)
}
