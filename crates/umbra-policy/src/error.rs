//! The crate's one error type.
//!
//! Variants are grouped by whose fault the failure is, so callers can map them at their edge:
//! the controller answers [`PolicyError::is_admin_input`] errors with a 400 that quotes the
//! reason, a broker that gets any error from [`Engine::from_snapshot`](crate::Engine::from_snapshot)
//! keeps its previous engine and logs the reason.

/// Why a policy text or a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    // --- Admin input: a policy text that cannot be stored. ---
    /// The text parsed but holds no policy (empty, or comments only).
    #[error("policy text holds no policy")]
    Empty,
    /// The text is not valid Cedar. The reason names the line and column.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// The text holds a template (a policy with `?principal` or `?resource` slots); Umbra stores
    /// only static policies.
    #[error("templates are not supported: {0}")]
    Template(String),
    /// The text is valid Cedar but does not type-check against the Umbra schema (unknown entity
    /// type, attribute or action, wrong types), can never apply, or hides bidirectional control
    /// characters. The reason names the line and column.
    #[error("invalid policy: {0}")]
    Invalid(String),

    // --- Snapshot: facts the controller sent that cannot form an engine. ---
    /// A stored policy failed to parse or validate.
    #[error("stored policy `{id}`: {error}")]
    Stored {
        /// `PolicyText::id` of the offending policy.
        id: String,
        /// What is wrong with it (one of the admin-input variants).
        error: Box<PolicyError>,
    },
    /// Two policies ended up with the same Cedar policy id.
    #[error("duplicate policy id `{0}`")]
    DuplicatePolicyId(String),
    /// The snapshot's users, groups, devices or services are inconsistent (duplicates, or
    /// entities Cedar refuses).
    #[error("snapshot facts rejected: {0}")]
    Facts(String),

    // --- Local bug: never caused by input. ---
    /// The built-in schema did not parse; a bug in this crate, caught by its tests.
    #[error("built-in Umbra schema is invalid: {0}")]
    Schema(String),
}

impl PolicyError {
    /// True when the error describes a policy text an administrator wrote (answer with 400),
    /// false for snapshot inconsistencies and local bugs.
    pub fn is_admin_input(&self) -> bool {
        matches!(
            self,
            PolicyError::Empty
                | PolicyError::Syntax(_)
                | PolicyError::Template(_)
                | PolicyError::Invalid(_)
        )
    }
}
