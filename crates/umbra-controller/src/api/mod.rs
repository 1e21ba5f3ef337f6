//! The REST API: routes, request extraction, and the edge where errors become responses.
//!
//! Three audiences, told apart per route:
//! - public: `GET /healthz`, `GET /v1/ca.pem`, `POST /v1/enroll`, `GET /v1/openapi.json`;
//! - enrolled peers, authenticated by the client certificate of the TLS connection
//!   ([`ConnPeer`], checked against revocation on every call): renewal, broker list, snapshot
//!   and heartbeat (brokers), connector configuration (connectors);
//! - administrators, authenticated by `Authorization: Bearer <admin token>` ([`Admin`]),
//!   checked on the headers and again in the transaction of every admin write.
//!
//! Bodies are JSON; every error is an `api::ApiError` (unknown or missing JSON fields are
//! named in `field`). [`serve`] runs the HTTPS server itself so each request carries the
//! certificate its connection was authenticated with.

mod admin;
pub(crate) mod openapi;
mod peer;
pub(crate) mod serve;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::de::DeserializeOwned;

use crate::admin_token::Presented;
use crate::audit;
use crate::error::ApiFailure;
use crate::state::{ClientAddr, ConnPeer, Ctx};
use umbra_link::quota::Place;
use umbra_proto::Role;

/// Body limit of the routes devices call with a CSR (about 1 KiB with its token), far below
/// the default 2 MiB: what one identity, or anyone on an anonymous connection, can make the
/// controller hold is a multiple of it.
const SMALL_BODY: usize = 16 << 10;

/// Builds the router with every route. [`openapi::ROUTES`] documents the same list.
pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        // public
        .route("/healthz", get(peer::healthz))
        .route("/v1/ca.pem", get(peer::ca_pem))
        .route(
            "/v1/enroll",
            post(peer::enroll).layer(axum::extract::DefaultBodyLimit::max(SMALL_BODY)),
        )
        .route("/v1/openapi.json", get(openapi::serve))
        // enrolled peers
        .route(
            "/v1/renew",
            post(peer::renew).layer(axum::extract::DefaultBodyLimit::max(SMALL_BODY)),
        )
        .route("/v1/brokers", get(peer::brokers))
        .route("/v1/snapshot", get(peer::snapshot))
        .route(
            "/v1/broker/heartbeat",
            post(peer::heartbeat).layer(axum::extract::DefaultBodyLimit::max(16 << 20)),
        )
        .route("/v1/connector/config", get(peer::connector_config))
        // admin
        .route("/v1/users", get(admin::list_users).post(admin::create_user))
        .route(
            "/v1/users/{id}",
            delete(admin::delete_user).patch(admin::update_user),
        )
        .route(
            "/v1/groups",
            get(admin::list_groups).post(admin::create_group),
        )
        .route("/v1/groups/{name}", delete(admin::delete_group))
        .route("/v1/groups/{name}/members", post(admin::add_member))
        .route(
            "/v1/groups/{name}/members/{user}",
            delete(admin::remove_member),
        )
        .route(
            "/v1/services",
            get(admin::list_services).post(admin::create_service),
        )
        .route(
            "/v1/services/{name}",
            delete(admin::delete_service).patch(admin::update_service),
        )
        .route(
            "/v1/policies",
            get(admin::list_policies).post(admin::create_policy),
        )
        .route(
            "/v1/policies/{name}",
            delete(admin::delete_policy).put(admin::replace_policy),
        )
        .route(
            "/v1/enrollment-tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route("/v1/enrollment-tokens/{id}", delete(admin::delete_token))
        .route("/v1/admin-token/rotate", post(admin::rotate_admin_token))
        .route("/v1/devices", get(admin::list_devices))
        .route("/v1/devices/{id}/revoke", post(admin::revoke_device))
        .route("/v1/connectors", get(admin::list_connectors))
        .route("/v1/connectors/{id}/revoke", post(admin::revoke_connector))
        .route("/v1/brokers/all", get(admin::list_brokers))
        .route("/v1/brokers/{id}/revoke", post(admin::revoke_broker))
        .route("/v1/streams", get(admin::list_streams))
        .route("/v1/rollout", get(admin::rollout))
        .route("/v1/audit", get(admin::list_audit))
        .route("/v1/access", get(admin::access))
        .route("/v1/policies/{name}/check", post(admin::check_policy))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(count_requests))
        .with_state(ctx)
}

async fn not_found() -> ApiFailure {
    ApiFailure::new(StatusCode::NOT_FOUND, "no such route", None)
}

async fn method_not_allowed() -> ApiFailure {
    ApiFailure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
        None,
    )
}

/// `umbra_controller_requests_total{route, status}`; `route` is the route template, never
/// the concrete path (ids and e-mail addresses stay out of metric labels).
async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    metrics::counter!(
        "umbra_controller_requests_total",
        "route" => route,
        "status" => resp.status().as_u16().to_string()
    )
    .increment(1);
    resp
}

// ---------------------------------------------------------------------------------------------
// Extractors whose rejections are ApiError JSON.

/// A JSON body. Malformed JSON, unknown or missing fields answer 400 naming the field.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if serve::body_timed_out(&e) {
                ApiFailure::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time",
                    None,
                )
            } else {
                ApiFailure::new(e.status(), e.body_text(), None)
            }
        })?;
        json_body(&bytes).map(ApiJson)
    }
}

/// Decodes a JSON request body (nothing may follow the value).
fn json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiFailure> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| json_failure(&e))?;
    de.end().map_err(|e| {
        ApiFailure::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
            None,
        )
    })?;
    Ok(v)
}

/// Turns a serde error into a 400 naming the field: the one serde names (unknown, missing,
/// duplicate), else the top-level field whose value was refused (a wrong type, say).
fn json_failure(e: &serde_path_to_error::Error<serde_json::Error>) -> ApiFailure {
    decode_failure("invalid JSON body", e)
}

/// A 400 for a body or query that did not decode: `what: serde's message`, naming the field
/// serde names, else the top-level field whose value was refused.
fn decode_failure<E: std::fmt::Display>(
    what: &str,
    e: &serde_path_to_error::Error<E>,
) -> ApiFailure {
    let msg = e.inner().to_string();
    let field = field_named_in(&msg).or_else(|| match e.path().iter().next() {
        Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
        _ => None,
    });
    ApiFailure::new(
        StatusCode::BAD_REQUEST,
        format!("{what}: {msg}"),
        field.as_deref(),
    )
}

/// The field a serde message names: unknown, missing or duplicate.
fn field_named_in(msg: &str) -> Option<String> {
    ["unknown field `", "missing field `", "duplicate field `"]
        .iter()
        .find_map(|marker| {
            let start = msg.find(marker)? + marker.len();
            let len = msg[start..].find('`')?;
            Some(msg[start..start + len].to_owned())
        })
}

/// Path parameters.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e| ApiFailure::new(StatusCode::BAD_REQUEST, e.body_text(), None))
    }
}

/// Query parameters.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        query(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// Decodes a query string, naming the parameter it refuses: the one serde names (unknown,
/// missing, duplicate), else the one whose value is refused (`limit=ten`).
fn query<T: DeserializeOwned>(q: &str) -> Result<T, ApiFailure> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| decode_failure("invalid query", &e))
}

/// Proof that the request carried a valid admin bearer token when its headers arrived. It
/// keeps the token's hash: a handler that writes opens its transaction with
/// [`Ctx::admin_write`], which checks the token again there, since a rotation or a reset may
/// come while the body is on the way.
pub(crate) struct Admin(pub(crate) Presented);

impl FromRequestParts<Arc<Ctx>> for Admin {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &Arc<Ctx>,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let err = match token.map(Presented::new) {
            Some(t) if ctx.admin_ok(&t).await? => return Ok(Admin(t)),
            Some(_) => ApiFailure::unauthorized("invalid admin token"),
            None => ApiFailure::unauthorized("admin bearer token required"),
        };
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let source = parts.extensions.get::<ClientAddr>().map(|a| a.0.ip());
        ctx.audit_refusal(
            source,
            audit::ANONYMOUS,
            "admin.auth",
            &format!("{} {route}", parts.method),
            &err,
        )
        .await;
        Err(err)
    }
}

/// Heartbeats one broker identity may have in flight at once. A broker sends one at a time
/// (two leave room for one its client gave up on while the controller still reads it); each
/// may carry up to 16 MiB, read into memory, so without this bound one identity could make the
/// controller hold a heartbeat on every stream of every connection it may open.
pub(crate) const MAX_HEARTBEATS_PER_BROKER: usize = 2;

/// A heartbeat on a connection whose client certificate names a broker of this organisation,
/// enrolled and not revoked ([`Ctx::authorize_peer`]; the handler checks again in its own
/// transaction), holding one of that broker's [`MAX_HEARTBEATS_PER_BROKER`] places until the
/// handler returns. As an extractor it runs before the body is read, so only brokers in good
/// standing may send the large bodies the heartbeat allows, and a bounded number at once:
/// anyone else, a revoked broker's stolen key too, is refused on the headers, and a broker
/// with too many in flight is answered 429 on them.
pub(crate) struct HeartbeatConn {
    pub(crate) conn: ConnPeer,
    _place: Place,
}

impl FromRequestParts<Arc<Ctx>> for HeartbeatConn {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &Arc<Ctx>,
    ) -> Result<Self, Self::Rejection> {
        let conn = parts
            .extensions
            .get::<ConnPeer>()
            .cloned()
            .unwrap_or_default();
        let (peer, _, _) = ctx.authorize_peer(&conn, &[Role::Broker]).await?;
        let place = ctx.heartbeats.take(&peer.id.to_uri()).ok_or_else(|| {
            ApiFailure::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many heartbeats in flight for this broker \
                     (at most {MAX_HEARTBEATS_PER_BROKER})"
                ),
                None,
            )
        })?;
        Ok(HeartbeatConn {
            conn,
            _place: place,
        })
    }
}

/// A response for `Ok` values that are already responses.
pub(crate) fn created<T: serde::Serialize>(v: T) -> Response {
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        name: String,
    }

    fn field(body: &str) -> Option<String> {
        json_body::<T>(body.as_bytes()).unwrap_err().field
    }

    #[test]
    fn json_failures_name_the_field() {
        assert_eq!(field(r#"{"name":"a","nmae":"b"}"#).as_deref(), Some("nmae"));
        assert_eq!(field(r#"{}"#).as_deref(), Some("name"));
        assert_eq!(field(r#"{"name":7}"#).as_deref(), Some("name"));
        assert_eq!(field(r#"{"#), None);
        assert_eq!(field(r#"{"name":"a"} {}"#), None);
        assert_eq!(json_body::<T>(br#"{"name":"a"}"#).unwrap().name, "a");
    }
}
