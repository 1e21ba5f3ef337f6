//! Statements for the objects an administrator manages: users, groups, services, policies.

use std::collections::BTreeMap;

use sqlx::SqliteConnection;
use umbra_proto::api;

use super::to_u64;

// ---------------------------------------------------------------------------------------------
// Users

pub(crate) async fn list_users(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<api::User>, sqlx::Error> {
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT id, disabled, created_at FROM users WHERE org = $1 ORDER BY id")
            .bind(org)
            .fetch_all(&mut *c)
            .await?;
    let mut groups = memberships_by_user(c, org).await?;
    Ok(rows
        .into_iter()
        .map(|(id, disabled, created_at)| api::User {
            groups: groups.remove(&id).unwrap_or_default(),
            id,
            disabled: disabled != 0,
            created_at: to_u64(created_at),
        })
        .collect())
}

/// One user, if it exists.
pub(crate) async fn user(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
) -> Result<Option<api::User>, sqlx::Error> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT disabled, created_at FROM users WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_optional(&mut *c)
            .await?;
    let Some((disabled, created_at)) = row else {
        return Ok(None);
    };
    let groups: Vec<String> = sqlx::query_scalar(
        "SELECT group_name FROM group_members WHERE org = $1 AND user_id = $2 ORDER BY group_name",
    )
    .bind(org)
    .bind(id)
    .fetch_all(c)
    .await?;
    Ok(Some(api::User {
        id: id.to_owned(),
        groups,
        disabled: disabled != 0,
        created_at: to_u64(created_at),
    }))
}

/// user id -> sorted group names.
pub(crate) async fn memberships_by_user(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<BTreeMap<String, Vec<String>>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT user_id, group_name FROM group_members WHERE org = $1 ORDER BY user_id, group_name",
    )
    .bind(org)
    .fetch_all(c)
    .await?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (user, group) in rows {
        out.entry(user).or_default().push(group);
    }
    Ok(out)
}

/// `Some(disabled)` if the user exists.
pub(crate) async fn user_disabled(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
) -> Result<Option<bool>, sqlx::Error> {
    let v: Option<i64> =
        sqlx::query_scalar("SELECT disabled FROM users WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_optional(c)
            .await?;
    Ok(v.map(|d| d != 0))
}

/// Ids of the organisation's disabled users (few: a listing of devices reads them once).
pub(crate) async fn users_disabled(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<std::collections::BTreeSet<String>, sqlx::Error> {
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM users WHERE org = $1 AND disabled <> 0")
            .bind(org)
            .fetch_all(c)
            .await?;
    Ok(ids.into_iter().collect())
}

/// Sets a user's `disabled` flag; false if there is no such user.
pub(crate) async fn set_user_disabled(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    disabled: bool,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE users SET disabled = $1 WHERE org = $2 AND id = $3")
        .bind(i64::from(disabled))
        .bind(org)
        .bind(id)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

pub(crate) async fn insert_user(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO users (org, id, disabled, created_at) VALUES ($1, $2, 0, $3)")
        .bind(org)
        .bind(id)
        .bind(now)
        .execute(c)
        .await?;
    Ok(())
}

/// Deletes the user and their memberships and unused agent tokens. Returns whether it existed,
/// and the ids of the tokens deleted with it.
pub(crate) async fn delete_user(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
) -> Result<(bool, Vec<String>), sqlx::Error> {
    sqlx::query("DELETE FROM group_members WHERE org = $1 AND user_id = $2")
        .bind(org)
        .bind(id)
        .execute(&mut *c)
        .await?;
    let tokens: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM enroll_tokens WHERE org = $1 AND user_id = $2 AND used_at IS NULL \
         ORDER BY id",
    )
    .bind(org)
    .bind(id)
    .fetch_all(&mut *c)
    .await?;
    sqlx::query("DELETE FROM enroll_tokens WHERE org = $1 AND user_id = $2 AND used_at IS NULL")
        .bind(org)
        .bind(id)
        .execute(&mut *c)
        .await?;
    let r = sqlx::query("DELETE FROM users WHERE org = $1 AND id = $2")
        .bind(org)
        .bind(id)
        .execute(c)
        .await?;
    Ok((r.rows_affected() == 1, tokens))
}

// ---------------------------------------------------------------------------------------------
// Groups

pub(crate) async fn list_groups(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<api::Group>, sqlx::Error> {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM user_groups WHERE org = $1 ORDER BY name")
            .bind(org)
            .fetch_all(&mut *c)
            .await?;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT group_name, user_id FROM group_members WHERE org = $1 ORDER BY group_name, user_id",
    )
    .bind(org)
    .fetch_all(c)
    .await?;
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (g, u) in rows {
        members.entry(g).or_default().push(u);
    }
    Ok(names
        .into_iter()
        .map(|name| api::Group {
            members: members.remove(&name).unwrap_or_default(),
            name,
        })
        .collect())
}

pub(crate) async fn group_names(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM user_groups WHERE org = $1 ORDER BY name")
        .bind(org)
        .fetch_all(c)
        .await
}

pub(crate) async fn group_exists(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let v: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM user_groups WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_optional(c)
            .await?;
    Ok(v.is_some())
}

pub(crate) async fn insert_group(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO user_groups (org, name, created_at) VALUES ($1, $2, $3)")
        .bind(org)
        .bind(name)
        .bind(now)
        .execute(c)
        .await?;
    Ok(())
}

pub(crate) async fn delete_group(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query("DELETE FROM group_members WHERE org = $1 AND group_name = $2")
        .bind(org)
        .bind(name)
        .execute(&mut *c)
        .await?;
    let r = sqlx::query("DELETE FROM user_groups WHERE org = $1 AND name = $2")
        .bind(org)
        .bind(name)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

pub(crate) async fn is_member(
    c: &mut SqliteConnection,
    org: &str,
    group: &str,
    user: &str,
) -> Result<bool, sqlx::Error> {
    let v: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM group_members WHERE org = $1 AND group_name = $2 AND user_id = $3",
    )
    .bind(org)
    .bind(group)
    .bind(user)
    .fetch_optional(c)
    .await?;
    Ok(v.is_some())
}

pub(crate) async fn add_member(
    c: &mut SqliteConnection,
    org: &str,
    group: &str,
    user: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO group_members (org, group_name, user_id) VALUES ($1, $2, $3)")
        .bind(org)
        .bind(group)
        .bind(user)
        .execute(c)
        .await?;
    Ok(())
}

pub(crate) async fn remove_member(
    c: &mut SqliteConnection,
    org: &str,
    group: &str,
    user: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM group_members WHERE org = $1 AND group_name = $2 AND user_id = $3",
    )
    .bind(org)
    .bind(group)
    .bind(user)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub(crate) async fn group_members(
    c: &mut SqliteConnection,
    org: &str,
    group: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT user_id FROM group_members WHERE org = $1 AND group_name = $2 ORDER BY user_id",
    )
    .bind(org)
    .bind(group)
    .fetch_all(c)
    .await
}

// ---------------------------------------------------------------------------------------------
// Services

pub(crate) async fn list_services(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<api::Service>, sqlx::Error> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT name, target, created_at FROM services WHERE org = $1 ORDER BY name",
    )
    .bind(org)
    .fetch_all(&mut *c)
    .await?;
    let mut conns = service_connector_names(c, org).await?;
    Ok(rows
        .into_iter()
        .map(|(name, target, created_at)| api::Service {
            connectors: conns.remove(&name).unwrap_or_default(),
            name,
            target,
            created_at: to_u64(created_at),
        })
        .collect())
}

/// service name -> sorted connector names.
pub(crate) async fn service_connector_names(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<BTreeMap<String, Vec<String>>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT service, connector FROM service_connectors WHERE org = $1 ORDER BY service, connector",
    )
    .bind(org)
    .fetch_all(c)
    .await?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (s, c) in rows {
        out.entry(s).or_default().push(c);
    }
    Ok(out)
}

/// One service, if it exists.
pub(crate) async fn service(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<Option<api::Service>, sqlx::Error> {
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT target, created_at FROM services WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_optional(&mut *c)
            .await?;
    let Some((target, created_at)) = row else {
        return Ok(None);
    };
    let connectors: Vec<String> = sqlx::query_scalar(
        "SELECT connector FROM service_connectors WHERE org = $1 AND service = $2 ORDER BY connector",
    )
    .bind(org)
    .bind(name)
    .fetch_all(c)
    .await?;
    Ok(Some(api::Service {
        name: name.to_owned(),
        target,
        connectors,
        created_at: to_u64(created_at),
    }))
}

pub(crate) async fn service_exists(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let v: Option<i64> = sqlx::query_scalar("SELECT 1 FROM services WHERE org = $1 AND name = $2")
        .bind(org)
        .bind(name)
        .fetch_optional(c)
        .await?;
    Ok(v.is_some())
}

pub(crate) async fn insert_service(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
    target: &str,
    connectors: &[String],
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO services (org, name, target, created_at) VALUES ($1, $2, $3, $4)")
        .bind(org)
        .bind(name)
        .bind(target)
        .bind(now)
        .execute(&mut *c)
        .await?;
    set_service_connectors(c, org, name, connectors).await
}

/// Makes `connectors` the connectors of service `name`, in place of any it had.
async fn set_service_connectors(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
    connectors: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM service_connectors WHERE org = $1 AND service = $2")
        .bind(org)
        .bind(name)
        .execute(&mut *c)
        .await?;
    for conn in connectors {
        sqlx::query("INSERT INTO service_connectors (org, service, connector) VALUES ($1, $2, $3)")
            .bind(org)
            .bind(name)
            .bind(conn)
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// Replaces an existing service's target and connectors.
pub(crate) async fn update_service(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
    target: &str,
    connectors: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE services SET target = $1 WHERE org = $2 AND name = $3")
        .bind(target)
        .bind(org)
        .bind(name)
        .execute(&mut *c)
        .await?;
    set_service_connectors(c, org, name, connectors).await
}

pub(crate) async fn delete_service(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    set_service_connectors(c, org, name, &[]).await?;
    let r = sqlx::query("DELETE FROM services WHERE org = $1 AND name = $2")
        .bind(org)
        .bind(name)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

// ---------------------------------------------------------------------------------------------
// Policies

pub(crate) async fn list_policies(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<api::Policy>, sqlx::Error> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT name, body, created_at FROM policies WHERE org = $1 ORDER BY name")
            .bind(org)
            .fetch_all(c)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, text, created_at)| api::Policy {
            name,
            text,
            created_at: to_u64(created_at),
            unknown: Vec::new(),
        })
        .collect())
}

/// One policy, if it exists.
pub(crate) async fn policy(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<Option<api::Policy>, sqlx::Error> {
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT body, created_at FROM policies WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_optional(c)
            .await?;
    Ok(row.map(|(text, created_at)| api::Policy {
        name: name.to_owned(),
        text,
        created_at: to_u64(created_at),
        unknown: Vec::new(),
    }))
}

/// The names of the stored policies whose text names `what`, in name order.
pub(crate) async fn policies_naming(
    c: &mut SqliteConnection,
    org: &str,
    what: &umbra_policy::Named,
) -> Result<Vec<String>, sqlx::Error> {
    Ok(list_policies(c, org)
        .await?
        .into_iter()
        .filter(|p| umbra_policy::named_entities(&p.text).is_ok_and(|n| n.contains(what)))
        .map(|p| p.name)
        .collect())
}

/// Of what a policy text names, what does not exist in `org` (as a person reads it:
/// `group eng`), in the order given.
pub(crate) async fn unknown_named(
    c: &mut SqliteConnection,
    org: &str,
    named: &[umbra_policy::Named],
) -> Result<Vec<String>, sqlx::Error> {
    use umbra_policy::Named;
    let mut unknown = Vec::new();
    for n in named {
        let exists = match n {
            Named::User(id) => user_disabled(&mut *c, org, id).await?.is_some(),
            Named::Group(name) => group_exists(&mut *c, org, name).await?,
            Named::Service(name) => service_exists(&mut *c, org, name).await?,
        };
        if !exists {
            unknown.push(n.to_string());
        }
    }
    Ok(unknown)
}

pub(crate) async fn policy_exists(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let v: Option<i64> = sqlx::query_scalar("SELECT 1 FROM policies WHERE org = $1 AND name = $2")
        .bind(org)
        .bind(name)
        .fetch_optional(c)
        .await?;
    Ok(v.is_some())
}

pub(crate) async fn insert_policy(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
    text: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO policies (org, name, body, created_at) VALUES ($1, $2, $3, $4)")
        .bind(org)
        .bind(name)
        .bind(text)
        .bind(now)
        .execute(c)
        .await?;
    Ok(())
}

/// Replaces a policy's text; false if there is no such policy.
pub(crate) async fn set_policy_text(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
    text: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE policies SET body = $1 WHERE org = $2 AND name = $3")
        .bind(text)
        .bind(org)
        .bind(name)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

pub(crate) async fn delete_policy(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM policies WHERE org = $1 AND name = $2")
        .bind(org)
        .bind(name)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}
