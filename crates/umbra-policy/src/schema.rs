//! The Cedar schema every Umbra policy is validated against and every request is built for.
//!
//! Everything lives in namespace `Umbra`, so policies name `Umbra::User::"alice@example.com"`,
//! `Umbra::Group::"eng"`, `Umbra::Service::"web"` and `Umbra::Action::"connect"`.
//!
//! # Widening the context
//!
//! The request context is the named type `ConnectContext`. Later facts (device posture,
//! location, MFA age, ...) are added to it as *optional* attributes
//! (`posture?: Posture`, `mfa_age?: Long`), never as required ones: strict validation then makes
//! a policy that reads them guard with `context has posture`, and every policy already stored
//! keeps validating, so a broker or controller upgrade never rejects an existing snapshot.
//! Requests are built in exactly one place (`decide::cedar_context`), which is where a new
//! attribute gets its value.
//!
//! Entity types likewise only gain optional attributes or new parent types.

use cedar_policy::{EntityTypeName, EntityUid, Schema};

use crate::PolicyError;

/// The Umbra Cedar schema, in Cedar's human-readable schema syntax.
pub const SCHEMA: &str = r#"namespace Umbra {
  // Directory groups; users are members.
  entity Group;
  // A person, identified by e-mail address.
  entity User in [Group];
  // An enrolled device, bound to the user its enrollment token was issued for.
  entity Device = {
    owner: User,
  };
  // A published service, identified by name.
  entity Service;

  // What is known about one connection attempt. Grows only by optional attributes.
  type ConnectContext = {
    // The device the request comes from (its certificate identity).
    device: Device,
    // The agent's link to the broker: "quic" or "tcp".
    transport: String,
    // The broker's clock at decision time, Unix seconds.
    now: Long,
  };

  // Open a stream to a service.
  action connect appliesTo {
    principal: [User],
    resource: [Service],
    context: ConnectContext,
  };
}
"#;

pub(crate) const USER: &str = "Umbra::User";
pub(crate) const GROUP: &str = "Umbra::Group";
pub(crate) const DEVICE: &str = "Umbra::Device";
pub(crate) const SERVICE: &str = "Umbra::Service";
pub(crate) const ACTION: &str = "Umbra::Action";
pub(crate) const CONNECT: &str = "connect";

/// Parses [`SCHEMA`].
pub(crate) fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| PolicyError::Schema(e.to_string()))
}

/// The entity type names of the schema, parsed once per engine.
#[derive(Debug, Clone)]
pub(crate) struct Types {
    pub(crate) user: EntityTypeName,
    pub(crate) group: EntityTypeName,
    pub(crate) device: EntityTypeName,
    pub(crate) service: EntityTypeName,
    /// `Umbra::Action::"connect"`.
    pub(crate) connect: EntityUid,
}

impl Types {
    pub(crate) fn new() -> Result<Types, PolicyError> {
        let name = |s: &str| {
            s.parse::<EntityTypeName>()
                .map_err(|e| PolicyError::Schema(format!("entity type {s}: {e}")))
        };
        Ok(Types {
            user: name(USER)?,
            group: name(GROUP)?,
            device: name(DEVICE)?,
            service: name(SERVICE)?,
            connect: uid(&name(ACTION)?, CONNECT),
        })
    }
}

/// The entity `ty::"id"`; `id` is taken verbatim (no escaping involved).
pub(crate) fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(ty.clone(), cedar_policy::EntityId::new(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_parses_without_warnings() {
        let (_, warnings) = Schema::from_cedarschema_str(SCHEMA).unwrap();
        assert_eq!(warnings.count(), 0);
        assert!(Types::new().is_ok());
    }

    #[test]
    fn schema_declares_connect_for_user_on_service() {
        let s = schema().unwrap();
        let t = Types::new().unwrap();
        let principals: Vec<_> = s.principals_for_action(&t.connect).unwrap().collect();
        let resources: Vec<_> = s.resources_for_action(&t.connect).unwrap().collect();
        assert_eq!(principals, vec![&t.user]);
        assert_eq!(resources, vec![&t.service]);
    }
}
