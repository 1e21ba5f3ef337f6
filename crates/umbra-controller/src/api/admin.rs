//! Admin routes (bearer token): users, groups, services, policies, enrollment tokens, devices,
//! connectors, brokers, live streams, the audit trail, and the admin token itself.
//!
//! Every write validates all input first, then runs in one transaction that also stores its
//! audit record and bumps the snapshot version; a refused write changes nothing. That
//! transaction comes from `Ctx::admin_write`, which checks the caller's admin token again in
//! it: a token rotated or reset while the request's body was on the way is answered 401 and
//! changes nothing (a policy check, which reads after its body, checks it again too). A write its
//! handler refuses (an invalid value, a conflict, nothing by that name) adds an audit record
//! of the refusal; a request whose body or path does not even decode (malformed JSON, an
//! unknown field) is answered 400 naming the field before any handler runs, and is counted
//! in `umbra_controller_requests_total` by route and status, not audited.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sqlx::SqliteConnection;
use umbra_policy::{AccessRequest, Engine, Reason, RequestContext};
use umbra_proto::api::{
    self, AuditEntry, CreateEnrollToken, CreateGroup, CreatePolicy, CreateService, CreateUser,
    EnrollTokenInfo, LiveStream, ReplacePolicy, UpdateService, UpdateUser,
};

use super::{Admin, ApiJson, ApiPath, ApiQuery, created};
use crate::admin_token;
use crate::audit::{self, ADMIN};
use crate::enroll;
use crate::error::ApiFailure;
use crate::state::Ctx;
use crate::store::admin as q;
use crate::store::peers::{self, Kind, PeerRow};
use crate::store::to_u64;
use crate::validate;

/// Longest accepted policy text.
const MAX_POLICY_BYTES: usize = 64 * 1024;
/// A broker counts as live for `GET /v1/streams` if it sent a heartbeat this recently.
const LIVE_BROKER_SECS: i64 = 30;

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

// ---------------------------------------------------------------------------------------------
// Users

pub(super) async fn list_users(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Json<Vec<api::User>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    Ok(Json(q::list_users(&mut r, &ctx.org).await?))
}

pub(super) async fn create_user(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiJson(req): ApiJson<CreateUser>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let id = validate::user_id(&req.id, "id")?;
        let mut groups = req
            .groups
            .iter()
            .map(|g| validate::name(g, "groups"))
            .collect::<Result<Vec<_>, _>>()?;
        groups.sort();
        groups.dedup();
        let mut w = ctx.admin_write(&admin).await?;
        if q::user_disabled(w.conn(), &ctx.org, &id).await?.is_some() {
            return Err(ApiFailure::conflict(
                "id",
                format!("user {id} already exists"),
            ));
        }
        for g in &groups {
            if !q::group_exists(w.conn(), &ctx.org, g).await? {
                return Err(ApiFailure::not_found("groups", format!("no group {g}")));
            }
        }
        let now = ctx.now_secs();
        q::insert_user(w.conn(), &ctx.org, &id, now).await?;
        for g in &groups {
            q::add_member(w.conn(), &ctx.org, g, &id).await?;
        }
        let rec = audit::record(
            ctx.now(),
            ADMIN,
            "user.create",
            &id,
            true,
            json!({ "groups": groups }),
        );
        ctx.commit_change(w, &[rec]).await?;
        Ok(api::User {
            id,
            groups,
            disabled: false,
            created_at: to_u64(now),
        })
    }
    .await;
    ctx.audited(ADMIN, "user.create", &user_target(&req.id), res)
        .await
        .map(created)
}

pub(super) async fn delete_user(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let id = validate::user_id(&id, "id")?;
        let mut w = ctx.admin_write(&admin).await?;
        if q::user_disabled(w.conn(), &ctx.org, &id).await?.is_none() {
            return Err(ApiFailure::not_found("id", format!("no user {id}")));
        }
        // A deleted user's devices must not keep access: revoke them with the user.
        let devices = peers::devices_of_user(w.conn(), &ctx.org, &id).await?;
        let now = ctx.now_secs();
        for d in &devices {
            peers::peer_revoke(w.conn(), &ctx.org, Kind::Device, d, now).await?;
        }
        let (_, tokens) = q::delete_user(w.conn(), &ctx.org, &id).await?;
        let mut detail = json!({ "revoked_devices": devices, "deleted_tokens": tokens });
        name_policies(&mut detail, w.conn(), &ctx.org, umbra_policy::Named::User(id.clone()))
            .await?;
        let mut records = vec![audit::record(
            ctx.now(),
            ADMIN,
            "user.delete",
            &id,
            true,
            detail,
        )];
        // Each unused enrollment token deleted with the user, as a token deletion records it:
        // a search for the token finds where it went.
        for t in &tokens {
            records.push(audit::record(
                ctx.now(),
                ADMIN,
                "enroll_token.delete",
                t,
                true,
                json!({ "reason": "user deleted", "user": id }),
            ));
        }
        // Each revocation as `revoke` records it, so that a search for a device's revocation
        // finds this one too.
        for d in &devices {
            records.push(audit::record(
                ctx.now(),
                ADMIN,
                "revoke",
                &format!("{}/{d}", Kind::Device.role()),
                true,
                json!({ "role": Kind::Device.role().as_str(), "id": d, "owner": id, "reason": "user deleted" }),
            ));
        }
        ctx.commit_change(w, &records).await?;
        Ok(no_content())
    }
    .await;
    ctx.audited(ADMIN, "user.delete", &user_target(&id), res)
        .await
}

/// `PATCH /v1/users/{id}`: disable or enable. Disabling keeps the user, their groups and
/// devices; the brokers deny the devices from the next snapshot on (live streams end), and
/// the devices get no new certificates until the user is enabled again.
pub(super) async fn update_user(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> Result<Response, ApiFailure> {
    let action = match req.disabled {
        Some(true) => "user.disable",
        Some(false) => "user.enable",
        None => "user.update",
    };
    let res = async {
        let id = validate::user_id(&id, "id")?;
        let Some(disabled) = req.disabled else {
            return Err(ApiFailure::invalid(
                "disabled",
                "nothing to change: give disabled (true or false)",
            ));
        };
        let mut w = ctx.admin_write(&admin).await?;
        let Some(was) = q::user_disabled(w.conn(), &ctx.org, &id).await? else {
            return Err(ApiFailure::not_found("id", format!("no user {id}")));
        };
        // Asking for the state the user is in changes nothing, and records nothing.
        if was != disabled {
            q::set_user_disabled(w.conn(), &ctx.org, &id, disabled).await?;
        }
        // The answer is read in the same transaction: what was committed, nothing later.
        let user = q::user(w.conn(), &ctx.org, &id)
            .await?
            .ok_or_else(ApiFailure::internal)?;
        if was != disabled {
            let devices = peers::devices_of_user(w.conn(), &ctx.org, &id).await?;
            let rec = audit::record(
                ctx.now(),
                ADMIN,
                action,
                &id,
                true,
                json!({ "devices": devices }),
            );
            ctx.commit_change(w, &[rec]).await?;
        }
        Ok(Json(user).into_response())
    }
    .await;
    ctx.audited(ADMIN, action, &user_target(&id), res).await
}

/// The target of a user's audit record: the id as stored (lowercased) when the request's
/// spelling is one, so that refusals and successes about one user share a target.
fn user_target(raw: &str) -> String {
    umbra_proto::user_id(raw).unwrap_or_else(|| raw.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Groups

pub(super) async fn list_groups(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Json<Vec<api::Group>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    Ok(Json(q::list_groups(&mut r, &ctx.org).await?))
}

pub(super) async fn create_group(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiJson(req): ApiJson<CreateGroup>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let name = validate::name(&req.name, "name")?;
        let mut w = ctx.admin_write(&admin).await?;
        if q::group_exists(w.conn(), &ctx.org, &name).await? {
            return Err(ApiFailure::conflict(
                "name",
                format!("group {name} already exists"),
            ));
        }
        q::insert_group(w.conn(), &ctx.org, &name, ctx.now_secs()).await?;
        let rec = audit::record(ctx.now(), ADMIN, "group.create", &name, true, json!({}));
        ctx.commit_change(w, &[rec]).await?;
        Ok(api::Group {
            name,
            members: Vec::new(),
        })
    }
    .await;
    ctx.audited(ADMIN, "group.create", &req.name, res)
        .await
        .map(created)
}

pub(super) async fn delete_group(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        // Who lost this group's access with it.
        let members = q::group_members(w.conn(), &ctx.org, &name).await?;
        if !q::delete_group(w.conn(), &ctx.org, &name).await? {
            return Err(ApiFailure::not_found("name", format!("no group {name}")));
        }
        let mut detail = json!({ "members": members });
        let named = umbra_policy::Named::Group(name.clone());
        name_policies(&mut detail, w.conn(), &ctx.org, named).await?;
        let rec = audit::record(ctx.now(), ADMIN, "group.delete", &name, true, detail);
        ctx.commit_change(w, &[rec]).await?;
        Ok(no_content())
    }
    .await;
    ctx.audited(ADMIN, "group.delete", &name, res).await
}

/// `POST /v1/groups/{name}/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddMember {
    pub(crate) user: String,
}

pub(super) async fn add_member(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<AddMember>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let user = validate::user_id(&req.user, "user")?;
        let mut w = ctx.admin_write(&admin).await?;
        if !q::group_exists(w.conn(), &ctx.org, &group).await? {
            return Err(ApiFailure::not_found("name", format!("no group {group}")));
        }
        if q::user_disabled(w.conn(), &ctx.org, &user).await?.is_none() {
            return Err(ApiFailure::not_found("user", format!("no user {user}")));
        }
        if q::is_member(w.conn(), &ctx.org, &group, &user).await? {
            return Err(ApiFailure::conflict(
                "user",
                format!("{user} is already a member of {group}"),
            ));
        }
        q::add_member(w.conn(), &ctx.org, &group, &user).await?;
        let members = q::group_members(w.conn(), &ctx.org, &group).await?;
        let rec = audit::record(
            ctx.now(),
            ADMIN,
            "group.member.add",
            &group,
            true,
            json!({ "user": user }),
        );
        ctx.commit_change(w, &[rec]).await?;
        Ok(Json(api::Group {
            name: group.clone(),
            members,
        })
        .into_response())
    }
    .await;
    let about = json!({ "user": umbra_proto::bounded(&req.user, 512) });
    ctx.audited_about(ADMIN, "group.member.add", &group, about, res)
        .await
}

pub(super) async fn remove_member(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath((group, user)): ApiPath<(String, String)>,
) -> Result<Response, ApiFailure> {
    let about = json!({ "user": umbra_proto::bounded(&user, 512) });
    let res = async {
        let user = validate::user_id(&user, "user")?;
        let mut w = ctx.admin_write(&admin).await?;
        if !q::group_exists(w.conn(), &ctx.org, &group).await? {
            return Err(ApiFailure::not_found("name", format!("no group {group}")));
        }
        if !q::remove_member(w.conn(), &ctx.org, &group, &user).await? {
            return Err(ApiFailure::not_found(
                "user",
                format!("{user} is not a member of {group}"),
            ));
        }
        let rec = audit::record(
            ctx.now(),
            ADMIN,
            "group.member.remove",
            &group,
            true,
            json!({ "user": user }),
        );
        ctx.commit_change(w, &[rec]).await?;
        Ok(no_content())
    }
    .await;
    ctx.audited_about(ADMIN, "group.member.remove", &group, about, res)
        .await
}

// ---------------------------------------------------------------------------------------------
// Services

pub(super) async fn list_services(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Json<Vec<api::Service>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    Ok(Json(q::list_services(&mut r, &ctx.org).await?))
}

/// A connector name is known if a live connector carries it or an unused token will create one.
async fn connector_known(
    c: &mut SqliteConnection,
    org: &str,
    name: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let live = peers::peers_named(c, org, Kind::Connector, name)
        .await?
        .iter()
        .any(|r| r.revoked_at.is_none());
    Ok(live || peers::name_reserved_by_token(c, org, Kind::Connector.role(), name, now).await?)
}

/// Validated, sorted, deduplicated connector names of a service (at least one).
fn connector_names(names: &[String]) -> Result<Vec<String>, ApiFailure> {
    if names.is_empty() {
        return Err(ApiFailure::invalid(
            "connectors",
            "a service needs at least one connector",
        ));
    }
    let mut connectors = names
        .iter()
        .map(|c| validate::peer_name(c, "connectors"))
        .collect::<Result<Vec<_>, _>>()?;
    connectors.sort();
    connectors.dedup();
    Ok(connectors)
}

/// Refuses the first connector name that is not [`connector_known`].
async fn connectors_known(
    c: &mut SqliteConnection,
    org: &str,
    names: &[String],
    now: i64,
) -> Result<(), ApiFailure> {
    for n in names {
        if !connector_known(c, org, n, now).await? {
            return Err(ApiFailure::not_found(
                "connectors",
                format!("no connector named {n} (enrolled, or with an unused token)"),
            ));
        }
    }
    Ok(())
}

pub(super) async fn create_service(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiJson(req): ApiJson<CreateService>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let name = validate::name(&req.name, "name")?;
        let target = validate::host_port(&req.target, "target")?;
        let connectors = connector_names(&req.connectors)?;
        let now = ctx.now_secs();
        let mut w = ctx.admin_write(&admin).await?;
        if q::service_exists(w.conn(), &ctx.org, &name).await? {
            return Err(ApiFailure::conflict(
                "name",
                format!("service {name} already exists"),
            ));
        }
        connectors_known(w.conn(), &ctx.org, &connectors, now).await?;
        q::insert_service(w.conn(), &ctx.org, &name, &target, &connectors, now).await?;
        let rec = audit::record(
            ctx.now(),
            ADMIN,
            "service.create",
            &name,
            true,
            json!({ "target": target, "connectors": connectors }),
        );
        ctx.commit_change(w, &[rec]).await?;
        Ok(api::Service {
            name,
            target,
            connectors,
            created_at: to_u64(now),
        })
    }
    .await;
    ctx.audited(ADMIN, "service.create", &req.name, res)
        .await
        .map(created)
}

/// `PATCH /v1/services/{name}`: a new target, a new set of connectors, or both, in one
/// change. Live streams that the service no longer routes as they were (another target, or a
/// connector no longer in the set) end at the brokers; new streams take the new route.
pub(super) async fn update_service(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateService>,
) -> Result<Response, ApiFailure> {
    let res = async {
        if req.target.is_none() && req.connectors.is_none() {
            return Err(ApiFailure::invalid(
                "target",
                "nothing to change: give target, connectors, or both",
            ));
        }
        let target = req
            .target
            .as_deref()
            .map(|t| validate::host_port(t, "target"))
            .transpose()?;
        let connectors = req.connectors.as_deref().map(connector_names).transpose()?;
        let now = ctx.now_secs();
        let mut w = ctx.admin_write(&admin).await?;
        let Some(was) = q::service(w.conn(), &ctx.org, &name).await? else {
            return Err(ApiFailure::not_found("name", format!("no service {name}")));
        };
        if let Some(c) = &connectors {
            connectors_known(w.conn(), &ctx.org, c, now).await?;
        }
        let now_is = api::Service {
            target: target.unwrap_or_else(|| was.target.clone()),
            connectors: connectors.unwrap_or_else(|| was.connectors.clone()),
            ..was.clone()
        };
        if now_is != was {
            q::update_service(
                w.conn(),
                &ctx.org,
                &name,
                &now_is.target,
                &now_is.connectors,
            )
            .await?;
            let rec = audit::record(
                ctx.now(),
                ADMIN,
                "service.update",
                &name,
                true,
                json!({
                    "target": now_is.target,
                    "connectors": now_is.connectors,
                    "was": { "target": was.target, "connectors": was.connectors },
                }),
            );
            ctx.commit_change(w, &[rec]).await?;
        }
        Ok(Json(now_is).into_response())
    }
    .await;
    ctx.audited(ADMIN, "service.update", &name, res).await
}

pub(super) async fn delete_service(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        if !q::delete_service(w.conn(), &ctx.org, &name).await? {
            return Err(ApiFailure::not_found("name", format!("no service {name}")));
        }
        let mut detail = json!({});
        let named = umbra_policy::Named::Service(name.clone());
        name_policies(&mut detail, w.conn(), &ctx.org, named).await?;
        let rec = audit::record(ctx.now(), ADMIN, "service.delete", &name, true, detail);
        ctx.commit_change(w, &[rec]).await?;
        Ok(no_content())
    }
    .await;
    ctx.audited(ADMIN, "service.delete", &name, res).await
}

// ---------------------------------------------------------------------------------------------
// Policies

/// Every policy, each with what it names that does not exist (`unknown`): a removed group's
/// policies stay, grant nothing through it, and would grant to a group made later with its
/// name, so the listing keeps showing them.
pub(super) async fn list_policies(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Json<Vec<api::Policy>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    let mut all = q::list_policies(&mut r, &ctx.org).await?;
    for p in &mut all {
        // Stored texts were checked when written; one that no longer parses names nothing.
        let named = umbra_policy::named_entities(&p.text).unwrap_or_default();
        p.unknown = q::unknown_named(&mut r, &ctx.org, &named).await?;
    }
    Ok(Json(all))
}

/// Adds to a removal's audit `detail` the policies that name what was removed (`policies`):
/// they stay, grant nothing through it, and would grant to whatever is made later with its
/// name.
async fn name_policies(
    detail: &mut serde_json::Value,
    c: &mut SqliteConnection,
    org: &str,
    removed: umbra_policy::Named,
) -> Result<(), ApiFailure> {
    let naming = q::policies_naming(c, org, &removed).await?;
    if !naming.is_empty() {
        detail["policies"] = json!(naming);
    }
    Ok(())
}

/// Checks a policy text (size, Cedar syntax, Umbra's schema); the number of policies in it
/// and the users, groups and services it names.
fn policy_text(text: &str) -> Result<(usize, Vec<umbra_policy::Named>), ApiFailure> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(ApiFailure::invalid(
            "text",
            format!("policy text is longer than {MAX_POLICY_BYTES} bytes"),
        ));
    }
    let invalid =
        |e: umbra_policy::PolicyError| ApiFailure::invalid("text", format!("invalid policy: {e}"));
    let count = umbra_policy::validate_policy(text).map_err(invalid)?;
    Ok((count, umbra_policy::named_entities(text).map_err(invalid)?))
}

pub(super) async fn create_policy(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiJson(req): ApiJson<CreatePolicy>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let name = validate::name(&req.name, "name")?;
        let (count, named) = policy_text(&req.text)?;
        let mut w = ctx.admin_write(&admin).await?;
        if q::policy_exists(w.conn(), &ctx.org, &name).await? {
            return Err(ApiFailure::conflict(
                "name",
                format!("policy {name} already exists"),
            ));
        }
        let now = ctx.now_secs();
        q::insert_policy(w.conn(), &ctx.org, &name, &req.text, now).await?;
        let unknown = q::unknown_named(w.conn(), &ctx.org, &named).await?;
        let mut detail = json!({ "policies": count, "text": policy_in_audit(&req.text) });
        if !unknown.is_empty() {
            detail["unknown"] = json!(unknown);
        }
        let rec = audit::record(ctx.now(), ADMIN, "policy.create", &name, true, detail);
        ctx.commit_change(w, &[rec]).await?;
        Ok(api::Policy {
            name,
            text: req.text.clone(),
            created_at: to_u64(now),
            unknown,
        })
    }
    .await;
    ctx.audited(ADMIN, "policy.create", &req.name, res)
        .await
        .map(created)
}

/// `PUT /v1/policies/{name}`: replaces the policy's text in one change, so there is no
/// moment without it (removing and adding it again would cut every stream it allows). Live
/// streams the new text still allows go on; the others end at the brokers.
pub(super) async fn replace_policy(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<ReplacePolicy>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let (count, named) = policy_text(&req.text)?;
        let mut w = ctx.admin_write(&admin).await?;
        let was = q::policy(w.conn(), &ctx.org, &name).await?.map(|p| p.text);
        if !q::set_policy_text(w.conn(), &ctx.org, &name, &req.text).await? {
            return Err(ApiFailure::not_found("name", format!("no policy {name}")));
        }
        // The answer is read in the same transaction: what was committed, nothing later.
        let mut policy = q::policy(w.conn(), &ctx.org, &name)
            .await?
            .ok_or_else(ApiFailure::internal)?;
        policy.unknown = q::unknown_named(w.conn(), &ctx.org, &named).await?;
        let mut detail = json!({
            "policies": count,
            "text": policy_in_audit(&req.text),
            "was": was.as_deref().map(policy_in_audit),
        });
        if !policy.unknown.is_empty() {
            detail["unknown"] = json!(policy.unknown);
        }
        let rec = audit::record(ctx.now(), ADMIN, "policy.update", &name, true, detail);
        ctx.commit_change(w, &[rec]).await?;
        Ok(Json(policy).into_response())
    }
    .await;
    ctx.audited(ADMIN, "policy.update", &name, res).await
}

pub(super) async fn delete_policy(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        let was = q::policy(w.conn(), &ctx.org, &name).await?.map(|p| p.text);
        if !q::delete_policy(w.conn(), &ctx.org, &name).await? {
            return Err(ApiFailure::not_found("name", format!("no policy {name}")));
        }
        let rec = audit::record(
            ctx.now(),
            ADMIN,
            "policy.delete",
            &name,
            true,
            json!({ "was": was.as_deref().map(policy_in_audit) }),
        );
        ctx.commit_change(w, &[rec]).await?;
        Ok(no_content())
    }
    .await;
    ctx.audited(ADMIN, "policy.delete", &name, res).await
}

/// A policy's text as its audit records keep it (what granted access, and when), up to 64 KiB.
fn policy_in_audit(text: &str) -> String {
    umbra_proto::bounded(text, 64 << 10).into_owned()
}

/// The engine of the stored policies (validated when written, so a failure is ours).
fn stored_engine(snapshot: &umbra_proto::Snapshot) -> Result<Engine, ApiFailure> {
    Engine::from_snapshot(snapshot).map_err(|e| {
        tracing::error!(error = %e, "stored policies do not compile");
        ApiFailure::internal()
    })
}

/// `POST /v1/policies/{name}/check`: which live streams a policy change (add, replace or
/// remove `name`) would end, decided as the brokers will decide once they hold it. Changes
/// nothing; an invalid text is refused as the change itself would be.
pub(super) async fn check_policy(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<api::PolicyCheck>,
) -> Result<Json<api::PolicyCheckResult>, ApiFailure> {
    // Checked as the change itself would be: adding or replacing checks the name and text,
    // removing only looks the name up (a name that cannot exist is "no policy", as there).
    let name = match &req.text {
        Some(text) => {
            policy_text(text)?;
            validate::name(&name, "name")?
        }
        None => name,
    };
    let mut r = ctx.admin_read(&admin).await?;
    let now = ctx.now_secs();
    let mut snapshot = crate::distribution::build_snapshot(&mut r, &ctx.org, now).await?;
    let Live {
        streams: live,
        brokers_silent,
        omitted: streams_omitted,
    } = live_streams(&ctx, &mut r).await?;
    drop(r);
    let before = stored_engine(&snapshot)?;
    let held = snapshot.policies.iter().position(|p| p.id == name);
    let change = match (held, req.text) {
        (Some(i), Some(text)) => {
            snapshot.policies[i].text = text;
            "replace"
        }
        (Some(i), None) => {
            snapshot.policies.remove(i);
            "remove"
        }
        (None, Some(text)) => {
            snapshot
                .policies
                .push(umbra_proto::snapshot::PolicyText { id: name, text });
            "add"
        }
        (None, None) => {
            return Err(ApiFailure::not_found("name", format!("no policy {name}")));
        }
    };
    let after = Engine::from_snapshot(&snapshot)
        .map_err(|e| ApiFailure::invalid("text", format!("invalid policy set: {e}")))?;
    // Only streams the policy allows now and would not after: one that is denied already
    // (a device revoked, a user disabled since the broker's report) ends for that reason,
    // not for this change. One decision pair per device, service and transport.
    let mut decided: HashMap<(&str, &str, &str), Option<String>> = HashMap::new();
    let mut ends = Vec::new();
    for s in &live {
        let transport: &'static str = if s.transport == "tcp" { "tcp" } else { "quic" };
        let why = decided
            .entry((&s.device, &s.service, transport))
            .or_insert_with(|| {
                let req = AccessRequest {
                    device: &s.device,
                    service: &s.service,
                    ctx: RequestContext {
                        now_unix: now,
                        transport,
                    },
                };
                let now_allowed = before.decide(&req).allow;
                let then = after.decide(&req);
                (now_allowed && !then.allow).then(|| then.reason.as_str().to_owned())
            })
            .clone();
        if let Some(reason) = why {
            ends.push(api::PolicyCheckEnd {
                stream: s.clone(),
                reason,
            });
        }
    }
    Ok(Json(api::PolicyCheckResult {
        change: change.to_owned(),
        ends,
        live: live.len(),
        brokers_silent,
        streams_omitted,
    }))
}

// ---------------------------------------------------------------------------------------------
// Access: what the policy decides, asked by an administrator

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccessQuery {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    transport: Option<String>,
}

/// Stands for "a device of the user in good standing" when no device is named. Real device
/// ids are `d-` and hex, so it names none of them.
const ANY_DEVICE: &str = "any-device";

/// `GET /v1/access`: the broker's decision, made here on the controller's current snapshot,
/// for `user` (or `device`'s owner) and `service` (or every published service), so an
/// administrator can see who may reach what, and why, before and after a change. Reads only.
///
/// Without `device`, the decision is for a device of the user in good standing that no
/// policy names (a newly enrolled one, say); a policy on one device (`context.device`) needs
/// `device`. It is the policy's answer: a broker may still answer `Unavailable` (no connector
/// linked) or `Stale`, and applies it once it holds this snapshot version.
pub(super) async fn access(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiQuery(aq): ApiQuery<AccessQuery>,
) -> Result<Json<api::Access>, ApiFailure> {
    let transport: &'static str = match aq.transport.as_deref() {
        None | Some("quic") => "quic",
        Some("tcp") => "tcp",
        Some(_) => return Err(ApiFailure::invalid("transport", "quic or tcp")),
    };
    let mut r = ctx.store.read().await?;
    let now = ctx.now_secs();
    let mut snapshot = crate::distribution::build_snapshot(&mut r, &ctx.org, now).await?;
    drop(r);
    let user = match (&aq.user, &aq.device) {
        (None, None) => return Err(ApiFailure::invalid("user", "give user, device, or both")),
        (Some(u), _) => validate::user_id(u, "user")?,
        (None, Some(d)) => match snapshot.devices.iter().find(|x| &x.id == d) {
            Some(x) => x.user.clone(),
            None => return Err(ApiFailure::not_found("device", format!("no device {d}"))),
        },
    };
    if !snapshot.users.iter().any(|u| u.id == user) {
        return Err(ApiFailure::not_found("user", format!("no user {user}")));
    }
    let device = match &aq.device {
        Some(d) => match snapshot.devices.iter().find(|x| &x.id == d) {
            None => return Err(ApiFailure::not_found("device", format!("no device {d}"))),
            Some(x) if x.user != user => {
                return Err(ApiFailure::invalid(
                    "device",
                    format!("device {d} belongs to another user"),
                ));
            }
            Some(x) => x.id.clone(),
        },
        None => {
            snapshot.devices.push(umbra_proto::snapshot::DeviceFacts {
                id: ANY_DEVICE.into(),
                user: user.clone(),
                revoked: false,
            });
            ANY_DEVICE.to_owned()
        }
    };
    let engine = stored_engine(&snapshot)?;
    let services: Vec<String> = match &aq.service {
        Some(s) => vec![s.clone()],
        None => snapshot.services.iter().map(|s| s.name.clone()).collect(),
    };
    let mut decisions: Vec<api::AccessDecision> = services
        .into_iter()
        .map(|service| {
            let d = engine.decide(&AccessRequest {
                device: &device,
                service: &service,
                ctx: RequestContext {
                    now_unix: now,
                    transport,
                },
            });
            let policies = match &d.reason {
                Reason::Permitted { policies } | Reason::Forbidden { policies } => policies.clone(),
                _ => Vec::new(),
            };
            let error = match &d.reason {
                Reason::Error(e) => Some(umbra_proto::bounded(e, 2048).into_owned()),
                _ => None,
            };
            api::AccessDecision {
                service,
                allow: d.allow,
                reason: d.reason.as_str().to_owned(),
                policies,
                error,
            }
        })
        .collect();
    decisions.sort_by(|a, b| a.service.cmp(&b.service));
    Ok(Json(api::Access {
        user,
        device: (device != ANY_DEVICE).then_some(device),
        transport: transport.to_owned(),
        snapshot_version: snapshot.version,
        decisions,
    }))
}

// ---------------------------------------------------------------------------------------------
// Enrollment tokens

pub(super) async fn list_tokens(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Json<Vec<EnrollTokenInfo>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    let rows = peers::token_list(&mut r, &ctx.org).await?;
    Ok(Json(
        rows.into_iter()
            .map(|t| EnrollTokenInfo {
                id: t.id,
                role: t.role,
                user: t.user_id,
                name: t.name,
                created_at: to_u64(t.created_at),
                expires_at: to_u64(t.expires_at),
                used_at: t.used_at.map(to_u64),
                used_by: t.used_by,
            })
            .collect(),
    ))
}

pub(super) async fn create_token(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiJson(req): ApiJson<CreateEnrollToken>,
) -> Result<Response, ApiFailure> {
    let target = req.role.clone();
    let res = enroll::create_token(&ctx, &admin, req).await;
    ctx.audited(ADMIN, "enroll_token.create", &target, res)
        .await
        .map(created)
}

pub(super) async fn delete_token(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        if !peers::token_delete(w.conn(), &ctx.org, &id).await? {
            return Err(ApiFailure::not_found(
                "id",
                format!("no enrollment token {id}"),
            ));
        }
        let rec = audit::record(
            ctx.now(),
            ADMIN,
            "enroll_token.delete",
            &id,
            true,
            json!({}),
        );
        // In no snapshot: nothing for brokers to fetch.
        ctx.commit_quiet(w, &[rec]).await?;
        Ok(no_content())
    }
    .await;
    ctx.audited(ADMIN, "enroll_token.delete", &id, res).await
}

/// Replaces every admin token, the caller's included, with a new one (shown once). The old
/// tokens stop working as this commits.
pub(super) async fn rotate_admin_token(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Response, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        let (new, rec) =
            admin_token::replace(w.conn(), &ctx.org, ctx.now(), ADMIN, "admin_token.rotate")
                .await?;
        ctx.commit_quiet(w, &[rec]).await?;
        Ok(created(new))
    }
    .await;
    ctx.audited(ADMIN, "admin_token.rotate", "admin_token", res)
        .await
}

// ---------------------------------------------------------------------------------------------
// Devices, connectors, brokers

async fn device_view(
    ctx: &Ctx,
    c: &mut SqliteConnection,
    rows: Vec<PeerRow>,
) -> Result<Vec<api::Device>, sqlx::Error> {
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let certs = peers::latest_certs(c, &ctx.org, Kind::Device.role(), &ids).await?;
    // A disabled user's devices get no new certificate (see `enroll::renew`).
    let disabled = q::users_disabled(c, &ctx.org).await?;
    let now = whole_secs_up(ctx);
    Ok(rows
        .into_iter()
        .map(|d| {
            let cert = certs.get(&d.id).cloned();
            let (cert_state, renew_until) = credential(
                ctx,
                now,
                cert.as_ref(),
                d.revoked_at.is_some(),
                disabled.contains(&d.owner),
            );
            let (serial, not_after) = cert.unwrap_or_default();
            api::Device {
                id: d.id,
                user: d.owner,
                created_at: to_u64(d.created_at),
                cert_serial: serial,
                cert_not_after: not_after,
                revoked: d.revoked_at.is_some(),
                cert_state,
                renew_until,
            }
        })
        .collect())
}

async fn connector_view(
    ctx: &Ctx,
    c: &mut SqliteConnection,
    rows: Vec<PeerRow>,
) -> Result<Vec<api::Connector>, sqlx::Error> {
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let certs = peers::latest_certs(c, &ctx.org, Kind::Connector.role(), &ids).await?;
    let mut versions = peers::connector_versions(c, &ctx.org, &ids).await?;
    let now = whole_secs_up(ctx);
    Ok(rows
        .into_iter()
        .map(|d| {
            let cert = certs.get(&d.id).cloned();
            let (cert_state, renew_until) =
                credential(ctx, now, cert.as_ref(), d.revoked_at.is_some(), false);
            let (serial, not_after) = cert.unwrap_or_default();
            api::Connector {
                version: versions.remove(&d.id),
                id: d.id,
                name: d.owner,
                created_at: to_u64(d.created_at),
                cert_serial: serial,
                cert_not_after: not_after,
                revoked: d.revoked_at.is_some(),
                cert_state,
                renew_until,
            }
        })
        .collect())
}

/// The controller's time in whole seconds, rounded up: certificate times are whole seconds,
/// and the renewal route compares them with the exact time, so within the second a window
/// ends it already refuses; a listing must not call it open then.
fn whole_secs_up(ctx: &Ctx) -> u64 {
    let d = ctx
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// [`enroll::credential_state`] of a listed peer's latest certificate (serial, not_after).
fn credential(
    ctx: &Ctx,
    now: u64,
    cert: Option<&(String, u64)>,
    revoked: bool,
    user_disabled: bool,
) -> (api::CredentialState, Option<u64>) {
    enroll::credential_state(
        now,
        cert.map(|c| c.1),
        ctx.renew_grace.as_secs(),
        revoked,
        user_disabled,
    )
}

/// Most peers one page of a listing returns.
const LIST_PAGE_MAX: i64 = 1000;

/// A listing of devices or connectors: all, or a page (`limit`, then `after` the last id of the
/// page before), of one owner if `user` (devices) or `name` (connectors) is given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PeerListQuery {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

/// Validates a listing's query for `kind` (devices filter by `user`, connectors by `name`, each
/// normalised as when it was stored; an unknown user is an error, not an empty list, so a typo
/// is not read as "no devices to revoke") and checks that the peer it pages `after` exists.
async fn peer_page(
    c: &mut SqliteConnection,
    org: &str,
    kind: Kind,
    q: &PeerListQuery,
) -> Result<PeerListPage, ApiFailure> {
    let owner = match (kind, &q.user, &q.name) {
        (Kind::Device, Some(u), None) => {
            let user = validate::user_id(u, "user")?;
            // A removed user's devices are still listed (revoked) under that user.
            let one = peers::PeerPage {
                owner: Some(&user),
                after: None,
                limit: Some(1),
            };
            if q::user_disabled(c, org, &user).await?.is_none()
                && peers::peer_list(c, org, Kind::Device, &one)
                    .await?
                    .is_empty()
            {
                return Err(ApiFailure::not_found("user", format!("no user {user}")));
            }
            Some(user)
        }
        (Kind::Device, _, Some(_)) => {
            return Err(ApiFailure::invalid(
                "name",
                "devices are listed by user, not by name",
            ));
        }
        (_, Some(_), _) => {
            return Err(ApiFailure::invalid(
                "user",
                format!("{}s are listed by name, not by user", kind.noun()),
            ));
        }
        (_, None, Some(n)) => Some(validate::name(n, "name")?),
        (_, None, None) => None,
    };
    if let Some(n) = q.limit
        && !(1..=LIST_PAGE_MAX).contains(&n)
    {
        return Err(ApiFailure::invalid(
            "limit",
            format!("must be between 1 and {LIST_PAGE_MAX}"),
        ));
    }
    if let Some(after) = q.after.as_deref()
        && (after.len() > 512 || peers::peer_get(c, org, kind, after).await?.is_none())
    {
        return Err(ApiFailure::invalid(
            "after",
            format!(
                "no {} {after}: give the last id of the page before",
                kind.noun()
            ),
        ));
    }
    Ok(PeerListPage {
        owner,
        after: q.after.clone(),
        limit: q.limit,
    })
}

/// A validated [`PeerListQuery`].
struct PeerListPage {
    owner: Option<String>,
    after: Option<String>,
    limit: Option<i64>,
}

impl PeerListPage {
    fn page(&self) -> peers::PeerPage<'_> {
        peers::PeerPage {
            owner: self.owner.as_deref(),
            after: self.after.as_deref(),
            limit: self.limit,
        }
    }
}

pub(super) async fn list_devices(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiQuery(q): ApiQuery<PeerListQuery>,
) -> Result<Json<Vec<api::Device>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    let page = peer_page(&mut r, &ctx.org, Kind::Device, &q).await?;
    let rows = peers::peer_list(&mut r, &ctx.org, Kind::Device, &page.page()).await?;
    Ok(Json(device_view(&ctx, &mut r, rows).await?))
}

pub(super) async fn list_connectors(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiQuery(q): ApiQuery<PeerListQuery>,
) -> Result<Json<Vec<api::Connector>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    let page = peer_page(&mut r, &ctx.org, Kind::Connector, &q).await?;
    let rows = peers::peer_list(&mut r, &ctx.org, Kind::Connector, &page.page()).await?;
    Ok(Json(connector_view(&ctx, &mut r, rows).await?))
}

pub(super) async fn list_brokers(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Json<Vec<api::Broker>>, ApiFailure> {
    let mut r = ctx.store.read().await?;
    let rows = peers::brokers_active(&mut r, &ctx.org).await?;
    // Only brokers not revoked are listed.
    Ok(Json(broker_view(&ctx, &mut r, rows, false).await?))
}

/// Brokers as listed, each judged by its latest certificate.
async fn broker_view(
    ctx: &Ctx,
    c: &mut SqliteConnection,
    rows: Vec<peers::BrokerRow>,
    revoked: bool,
) -> Result<Vec<api::Broker>, ApiFailure> {
    let ids: Vec<&str> = rows.iter().map(|b| b.id.as_str()).collect();
    let certs = peers::latest_certs(c, &ctx.org, Kind::Broker.role(), &ids).await?;
    let now = whole_secs_up(ctx);
    Ok(rows
        .into_iter()
        .map(|b| {
            let cert = certs.get(&b.id);
            let (cert_state, renew_until) = credential(ctx, now, cert, revoked, false);
            api::Broker {
                cert_not_after: cert.map_or(0, |c| c.1),
                id: b.id,
                name: b.name,
                quic_addr: b.quic_addr,
                tcp_addr: b.tcp_addr,
                server_name: b.server_name,
                snapshot_version: to_u64(b.snapshot_version),
                last_seen: to_u64(b.last_seen),
                cert_state,
                renew_until,
                version: b.version,
            }
        })
        .collect())
}

/// Revokes the peers in `rows` (those not yet revoked) with one audit record each; answers
/// with the state after the change.
async fn revoke_rows(
    ctx: &Ctx,
    mut w: crate::store::WriteTx,
    kind: Kind,
    rows: Vec<PeerRow>,
) -> Result<Vec<PeerRow>, ApiFailure> {
    let now = ctx.now_secs();
    let mut records = Vec::new();
    let mut out = Vec::new();
    for mut row in rows {
        if row.revoked_at.is_none() {
            peers::peer_revoke(w.conn(), &ctx.org, kind, &row.id, now).await?;
            records.push(audit::record(
                ctx.now(),
                ADMIN,
                "revoke",
                &format!("{}/{}", kind.role(), row.id),
                true,
                json!({ "role": kind.role().as_str(), "id": row.id, "owner": row.owner }),
            ));
            row.revoked_at = Some(now);
        }
        out.push(row);
    }
    if records.is_empty() {
        // Already revoked: nothing changes, nothing to bump.
        drop(w);
    } else {
        ctx.commit_change(w, &records).await?;
    }
    Ok(out)
}

pub(super) async fn revoke_device(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<api::Device>, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        let row = peers::peer_get(w.conn(), &ctx.org, Kind::Device, &id)
            .await?
            .ok_or_else(|| ApiFailure::not_found("id", format!("no device {id}")))?;
        revoke_rows(&ctx, w, Kind::Device, vec![row]).await
    }
    .await;
    // Only the revocation is audited: once it is committed (with its record), a failure to
    // read the answer is not a failed revocation.
    let rows = ctx
        .audited(ADMIN, "revoke", &format!("agent/{id}"), res)
        .await?;
    let mut r = ctx.store.read().await?;
    device_view(&ctx, &mut r, rows)
        .await?
        .pop()
        .map(Json)
        .ok_or_else(ApiFailure::internal)
}

pub(super) async fn revoke_connector(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<api::Connector>, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        let rows = by_id_or_name(&ctx, w.conn(), Kind::Connector, &id).await?;
        revoke_rows(&ctx, w, Kind::Connector, rows).await
    }
    .await;
    // As for devices: only the revocation is audited.
    let rows = ctx
        .audited(ADMIN, "revoke", &format!("connector/{id}"), res)
        .await?;
    let mut r = ctx.store.read().await?;
    connector_view(&ctx, &mut r, rows)
        .await?
        .pop()
        .map(Json)
        .ok_or_else(ApiFailure::internal)
}

/// The connectors or brokers `id` names: the one with that id, else the one live one carrying
/// that name, else the last one that carried it (revoking it again changes nothing). A name
/// several live ones carry (instances of one connector) is refused, listing their ids: one
/// revocation would end them all while its answer could name only one.
async fn by_id_or_name(
    ctx: &Ctx,
    c: &mut SqliteConnection,
    kind: Kind,
    id: &str,
) -> Result<Vec<PeerRow>, ApiFailure> {
    if let Some(row) = peers::peer_get(c, &ctx.org, kind, id).await? {
        return Ok(vec![row]);
    }
    let named = peers::peers_named(c, &ctx.org, kind, id).await?;
    let live: Vec<PeerRow> = named
        .iter()
        .filter(|r| r.revoked_at.is_none())
        .cloned()
        .collect();
    match (live.len(), named.last()) {
        (1, _) => Ok(live),
        (n @ 2.., _) => {
            let role = kind.role().as_str();
            let ids: Vec<&str> = live.iter().map(|r| r.id.as_str()).collect();
            Err(ApiFailure::conflict(
                "id",
                format!(
                    "{n} live {role}s are named {id} ({}): revoke each by its id",
                    ids.join(", ")
                ),
            ))
        }
        (0, Some(last)) => Ok(vec![last.clone()]),
        (0, None) => Err(ApiFailure::not_found(
            "id",
            format!("no {} with id or name {id}", kind.role().as_str()),
        )),
    }
}

/// Revokes a broker (id or name): the controller stops serving it (snapshots, heartbeats,
/// renewal) and drops it from the broker lists that connectors and forwarding agents follow
/// (long polls, answered at once); they then close their links to it.
pub(super) async fn revoke_broker(
    Admin(admin): Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<api::Broker>, ApiFailure> {
    let res = async {
        let mut w = ctx.admin_write(&admin).await?;
        let rows = by_id_or_name(&ctx, w.conn(), Kind::Broker, &id).await?;
        revoke_rows(&ctx, w, Kind::Broker, rows).await
    }
    .await;
    // As for devices: only the revocation is audited.
    let rows = ctx
        .audited(ADMIN, "revoke", &format!("broker/{id}"), res)
        .await?;
    let mut r = ctx.store.read().await?;
    let mut brokers = Vec::with_capacity(rows.len());
    for row in rows {
        brokers.extend(peers::broker_get(&mut r, &ctx.org, &row.id).await?);
    }
    broker_view(&ctx, &mut r, brokers, true)
        .await?
        .pop()
        .map(Json)
        .ok_or_else(ApiFailure::internal)
}

// ---------------------------------------------------------------------------------------------
// Streams and audit

/// Header of `GET /v1/streams`: how many brokers (not revoked) the list leaves out, not
/// heard from in the last 30 s. Their streams may still run (a broker cut off from the
/// controller carries its streams on); an empty list with silent brokers is not "no streams".
pub(crate) const BROKERS_SILENT_HEADER: &str = "x-umbra-brokers-silent";
/// Header of `GET /v1/streams`: how many live streams the brokers heard from lately left out
/// of their lists (a heartbeat carries at most so many).
pub(crate) const STREAMS_OMITTED_HEADER: &str = "x-umbra-streams-omitted";

pub(super) async fn list_streams(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
) -> Result<Response, ApiFailure> {
    let mut r = ctx.store.read().await?;
    let live = live_streams(&ctx, &mut r).await?;
    Ok((
        [
            (BROKERS_SILENT_HEADER, live.brokers_silent.to_string()),
            (STREAMS_OMITTED_HEADER, live.omitted.to_string()),
        ],
        Json(live.streams),
    )
        .into_response())
}

/// The live streams brokers heard from lately report, and what the list leaves out.
struct Live {
    streams: Vec<LiveStream>,
    /// Brokers (not revoked) not heard from lately, or with a list that cannot be read.
    brokers_silent: usize,
    /// Streams the brokers heard from left out of their lists.
    omitted: u64,
}

async fn live_streams(ctx: &Ctx, c: &mut SqliteConnection) -> Result<Live, ApiFailure> {
    let since = ctx.now_secs() - LIVE_BROKER_SECS;
    let rows = peers::brokers_active(c, &ctx.org).await?;
    let mut live = Live {
        streams: Vec::new(),
        brokers_silent: 0,
        omitted: 0,
    };
    for b in rows {
        if b.last_seen < since {
            live.brokers_silent += 1;
            continue;
        }
        match serde_json::from_str::<Vec<LiveStream>>(&b.streams) {
            Ok(s) => {
                live.streams.extend(s);
                live.omitted = live.omitted.saturating_add(to_u64(b.streams_omitted));
            }
            Err(e) => {
                live.brokers_silent += 1;
                tracing::warn!(broker = %b.id, error = %e, "stored streams unreadable");
            }
        }
    }
    Ok(live)
}

// ---------------------------------------------------------------------------------------------
// Rollout: whether the brokers enforce a version

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RolloutQuery {
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    wait: Option<u64>,
}

/// How often a waiting `GET /v1/rollout` reads the brokers' reports again. Brokers report at
/// each heartbeat (every second by default), to whichever controller shares the store: the
/// store is what is read, not this process's own heartbeats.
const ROLLOUT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// `GET /v1/rollout?version=V&wait=S`: where every broker (not revoked) stands on version `V`
/// (default: the controller's current one). With `wait` (seconds, at most 25), the answer
/// comes once no broker heard from lately is behind, or when the wait ends: silent brokers
/// are not waited for, since nothing says they will be back. Reads only.
pub(super) async fn rollout(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiQuery(q): ApiQuery<RolloutQuery>,
) -> Result<Json<api::Rollout>, ApiFailure> {
    let wait = std::time::Duration::from_secs(q.wait.unwrap_or(0)).min(super::peer::MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let report = rollout_now(&ctx, q.version).await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if report.behind == 0 || left.is_zero() || *shutdown.borrow() {
            return Ok(Json(report));
        }
        tokio::select! {
            () = tokio::time::sleep(ROLLOUT_POLL.min(left)) => {}
            _ = shutdown.changed() => return Ok(Json(report)),
        }
    }
}

async fn rollout_now(ctx: &Ctx, version: Option<u64>) -> Result<api::Rollout, ApiFailure> {
    let mut r = ctx.store.read().await?;
    let current = crate::store::counter(&mut r, &ctx.org, crate::store::SNAPSHOT_VERSION).await?;
    let version = version.unwrap_or(current);
    if version > current {
        return Err(ApiFailure::invalid(
            "version",
            format!("version {version} is ahead of the controller's current version {current}"),
        ));
    }
    let since = ctx.now_secs() - LIVE_BROKER_SECS;
    let rows = peers::broker_versions(&mut r, &ctx.org).await?;
    drop(r);
    let brokers: Vec<api::RolloutBroker> = rows
        .into_iter()
        .map(|(id, name, held, last_seen)| api::RolloutBroker {
            state: rollout_state(to_u64(held), last_seen >= since, version),
            id,
            name,
            snapshot_version: to_u64(held),
            last_seen: to_u64(last_seen),
        })
        .collect();
    let count = |s| brokers.iter().filter(|b| b.state == s).count() as u64;
    Ok(api::Rollout {
        version,
        current,
        applied: count(api::RolloutState::Applied),
        behind: count(api::RolloutState::Behind),
        silent: count(api::RolloutState::Silent),
        brokers,
    })
}

/// Where a broker that reported `held` in force stands on `version`; `heard` is whether it
/// reported lately. A broker not heard from confirms nothing, whatever it last reported.
/// Pure.
fn rollout_state(held: u64, heard: bool, version: u64) -> api::RolloutState {
    match (heard, held >= version) {
        (false, _) => api::RolloutState::Silent,
        (true, true) => api::RolloutState::Applied,
        (true, false) => api::RolloutState::Behind,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    last: Option<i64>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    result: Option<String>,
}

/// Most records one audit request returns.
const AUDIT_PAGE_MAX: i64 = 1000;
/// Longest filter value: longer than any actor, action, target or result that is stored.
const AUDIT_FILTER_MAX: usize = 512;

/// Validates an audit query: `limit` (the oldest) or `last` (the newest), each 1 to 1000,
/// never both; filters of at most 512 bytes.
fn audit_query(aq: &AuditQuery) -> Result<peers::AuditQuery<'_>, ApiFailure> {
    let page = |field: &str, n: i64| {
        if (1..=AUDIT_PAGE_MAX).contains(&n) {
            Ok(n)
        } else {
            Err(ApiFailure::invalid(
                field,
                format!("must be between 1 and {AUDIT_PAGE_MAX}"),
            ))
        }
    };
    let (limit, newest) = match (aq.limit, aq.last) {
        (Some(_), Some(_)) => {
            return Err(ApiFailure::invalid(
                "last",
                "give `limit` (the oldest records) or `last` (the newest), not both",
            ));
        }
        (_, Some(n)) => (page("last", n)?, true),
        (n, None) => (page("limit", n.unwrap_or(100))?, false),
    };
    let filter = |field: &str, v: &'_ Option<String>| match v {
        Some(v) if v.len() > AUDIT_FILTER_MAX => Err(ApiFailure::invalid(
            field,
            format!("at most {AUDIT_FILTER_MAX} bytes"),
        )),
        _ => Ok(()),
    };
    filter("actor", &aq.actor)?;
    filter("action", &aq.action)?;
    filter("target", &aq.target)?;
    filter("result", &aq.result)?;
    Ok(peers::AuditQuery {
        after: aq.after.unwrap_or(0),
        limit,
        newest,
        actor: aq.actor.as_deref(),
        action: aq.action.as_deref(),
        target: aq.target.as_deref(),
        result: aq.result.as_deref(),
    })
}

pub(super) async fn list_audit(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiQuery(aq): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiFailure> {
    let q = audit_query(&aq)?;
    let mut r = ctx.store.read().await?;
    Ok(Json(peers::audit_list(&mut r, &ctx.org, &q).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::RolloutState::{Applied, Behind, Silent};

    #[test]
    fn a_broker_confirms_a_version_only_when_heard_from_lately() {
        assert_eq!(rollout_state(7, true, 7), Applied);
        assert_eq!(rollout_state(9, true, 7), Applied);
        assert_eq!(rollout_state(6, true, 7), Behind);
        // Silent: what it reported last is no confirmation, newer or not.
        assert_eq!(rollout_state(9, false, 7), Silent);
        assert_eq!(rollout_state(0, false, 7), Silent);
    }
}
