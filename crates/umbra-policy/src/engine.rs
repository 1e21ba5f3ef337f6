//! The engine: one snapshot's policies and facts, compiled once, queried many times.
//!
//! A broker builds a new [`Engine`] for every snapshot it accepts and swaps it in whole
//! (e.g. behind an `ArcSwap`); an engine is never mutated, so there is nothing to diff or lock.
//! If a snapshot cannot be compiled the broker keeps the previous engine.

use cedar_policy::{Authorizer, Entities, PolicySet, Schema, Validator};
use umbra_proto::Snapshot;

use crate::PolicyError;
use crate::entities::{self, Facts};
use crate::schema::{self, Types};
use crate::text;

/// Compiled access rules for one snapshot. `Send + Sync`; share it behind an `Arc`.
pub struct Engine {
    pub(crate) version: u64,
    pub(crate) schema: Schema,
    pub(crate) types: Types,
    pub(crate) policies: PolicySet,
    pub(crate) entities: Entities,
    pub(crate) facts: Facts,
    pub(crate) authorizer: Authorizer,
}

impl Engine {
    /// Compiles `s`: parses and strictly validates every stored policy (ids as described in
    /// the `text` module: `<id>`, `<id>#1`, ...) and builds the entity store.
    ///
    /// Any stored policy that fails to parse or validate, a duplicate policy id, or
    /// inconsistent facts (duplicate users, devices or services) fail the whole snapshot:
    /// enforcing a subset of the policies could silently drop a `forbid`.
    pub fn from_snapshot(s: &Snapshot) -> Result<Engine, PolicyError> {
        let schema = schema::schema()?;
        let types = Types::new()?;
        let validator = Validator::new(schema.clone());
        let mut policies = PolicySet::new();
        for stored in &s.policies {
            let set = text::parse_stored(&validator, &stored.id, &stored.text)?;
            for policy in set.policies() {
                policies
                    .add(policy.clone())
                    .map_err(|_| PolicyError::DuplicatePolicyId(policy.id().to_string()))?;
            }
        }
        let (facts, entities) = entities::build(s, &types, &schema)?;
        Ok(Engine {
            version: s.version,
            schema,
            types,
            policies,
            entities,
            facts,
            authorizer: Authorizer::new(),
        })
    }

    /// The snapshot version this engine was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The user `device` is bound to, if the device is in the snapshot (revoked or not).
    pub fn device_owner(&self, device: &str) -> Option<&str> {
        self.facts.devices.get(device).map(|d| d.owner.as_str())
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.version)
            .field("policies", &self.policies.num_of_policies())
            .field("users", &self.facts.users.len())
            .field("devices", &self.facts.devices.len())
            .field("services", &self.facts.services.len())
            .finish_non_exhaustive()
    }
}
