//! Snapshot facts -> Cedar entities and the lookup tables the decision checks before Cedar.
//!
//! Built once per snapshot. The Cedar entity store holds every group (listed or referenced by a
//! user), every user with their group parents, every device with its `owner`, and every
//! service. The tables answer the questions Cedar is not asked: is the device known, is it
//! revoked, is its owner enabled, is the service published.

use std::collections::{BTreeSet, HashMap, HashSet};

use cedar_policy::{Entities, Entity, RestrictedExpression, Schema};
use umbra_proto::Snapshot;

use crate::PolicyError;
use crate::schema::{Types, uid};

/// What the decision needs to know about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceFact {
    pub(crate) owner: String,
    pub(crate) revoked: bool,
}

/// Lookup tables over one snapshot's facts.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    pub(crate) devices: HashMap<String, DeviceFact>,
    /// User id -> disabled.
    pub(crate) users: HashMap<String, bool>,
    /// Published services, sorted (so `services_for` needs no sort).
    pub(crate) services: BTreeSet<String>,
}

impl Facts {
    /// True when `user` is in the snapshot and not disabled.
    pub(crate) fn user_enabled(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|disabled| !disabled)
    }
}

/// Builds the tables and the schema-checked Cedar entity store for `s`.
///
/// Duplicate users, devices or services are refused rather than resolved: which of two
/// conflicting facts wins must not depend on list order.
pub(crate) fn build(
    s: &Snapshot,
    types: &Types,
    schema: &Schema,
) -> Result<(Facts, Entities), PolicyError> {
    let mut facts = Facts::default();
    let mut entities =
        Vec::with_capacity(s.groups.len() + s.users.len() + s.devices.len() + s.services.len());

    let mut groups: BTreeSet<&str> = s.groups.iter().map(String::as_str).collect();
    for user in &s.users {
        if facts.users.insert(user.id.clone(), user.disabled).is_some() {
            return Err(PolicyError::Facts(format!("duplicate user {:?}", user.id)));
        }
        groups.extend(user.groups.iter().map(String::as_str));
        let parents: HashSet<_> = user.groups.iter().map(|g| uid(&types.group, g)).collect();
        entities.push(Entity::new_no_attrs(uid(&types.user, &user.id), parents));
    }
    entities.extend(
        groups
            .into_iter()
            .map(|g| Entity::new_no_attrs(uid(&types.group, g), HashSet::new())),
    );

    for device in &s.devices {
        let fact = DeviceFact {
            owner: device.user.clone(),
            revoked: device.revoked,
        };
        if facts.devices.insert(device.id.clone(), fact).is_some() {
            return Err(PolicyError::Facts(format!(
                "duplicate device {:?}",
                device.id
            )));
        }
        let owner = RestrictedExpression::new_entity_uid(uid(&types.user, &device.user));
        let entity = Entity::new(
            uid(&types.device, &device.id),
            HashMap::from([("owner".to_owned(), owner)]),
            HashSet::new(),
        )
        .map_err(|e| PolicyError::Facts(format!("device {:?}: {e}", device.id)))?;
        entities.push(entity);
    }

    for service in &s.services {
        if !facts.services.insert(service.name.clone()) {
            return Err(PolicyError::Facts(format!(
                "duplicate service {:?}",
                service.name
            )));
        }
        entities.push(Entity::new_no_attrs(
            uid(&types.service, &service.name),
            HashSet::new(),
        ));
    }

    let entities = Entities::from_entities(entities, Some(schema))
        .map_err(|e| PolicyError::Facts(e.to_string()))?;
    Ok((facts, entities))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::schema;
    use umbra_proto::snapshot::{DeviceFacts, ServiceFacts, UserFacts};

    fn snapshot() -> Snapshot {
        Snapshot {
            groups: vec!["eng".into()],
            users: vec![UserFacts {
                id: "alice@example.com".into(),
                groups: vec!["eng".into(), "oncall".into()],
                disabled: false,
            }],
            devices: vec![DeviceFacts {
                id: "d1".into(),
                user: "alice@example.com".into(),
                revoked: false,
            }],
            services: vec![ServiceFacts {
                name: "web".into(),
                target: "10.0.0.1:80".into(),
                connectors: vec![],
            }],
            ..Snapshot::default()
        }
    }

    #[test]
    fn builds_entities_and_tables() {
        let types = Types::new().unwrap();
        let (facts, entities) = build(&snapshot(), &types, &schema().unwrap()).unwrap();
        assert!(facts.user_enabled("alice@example.com"));
        assert!(!facts.user_enabled("bob@example.com"));
        assert_eq!(facts.devices["d1"].owner, "alice@example.com");
        let alice = uid(&types.user, "alice@example.com");
        // A group only referenced by a user still exists and is an ancestor.
        assert!(entities.get(&uid(&types.group, "oncall")).is_some());
        assert!(entities.is_ancestor_of(&uid(&types.group, "oncall"), &alice));
        assert!(entities.get(&uid(&types.device, "d1")).is_some());
        assert!(entities.get(&uid(&types.service, "web")).is_some());
    }

    #[test]
    fn duplicates_are_refused() {
        let types = Types::new().unwrap();
        let schema = schema().unwrap();
        let mut s = snapshot();
        s.users.push(s.users[0].clone());
        assert!(matches!(
            build(&s, &types, &schema),
            Err(PolicyError::Facts(_))
        ));
        let mut s = snapshot();
        s.devices.push(s.devices[0].clone());
        assert!(matches!(
            build(&s, &types, &schema),
            Err(PolicyError::Facts(_))
        ));
        let mut s = snapshot();
        s.services.push(s.services[0].clone());
        assert!(matches!(
            build(&s, &types, &schema),
            Err(PolicyError::Facts(_))
        ));
    }
}
