//! Errors: why the controller cannot start ([`ControllerError`]), and why an API call failed
//! ([`ApiFailure`], which becomes an HTTP status and an `api::ApiError` body in one place).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use umbra_proto::api::ApiError;

use crate::config::ConfigError;
use crate::store::StoreOpenError;

/// Why [`crate::Controller::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory or a file in it could not be created or read.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// There is no controller database at this path (a reset was asked of a controller that
    /// never started).
    #[error(
        "no controller database at {0}: has a controller ever started with this data directory?"
    )]
    NotSetUp(PathBuf),
    /// The database could not be opened or queried.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// The database could not be opened, migrated, or is damaged (each names the database).
    #[error(transparent)]
    Store(#[from] StoreOpenError),
    /// The CA key-encryption key is missing or malformed.
    #[error("CA key: {0}")]
    CaKey(String),
    /// The stored CA could not be unsealed with the key given.
    #[error(
        "cannot unseal the CA stored in the database with the key from {source_name}: \
         it is not the key the CA was sealed with on first start (or the stored CA was altered)"
    )]
    CaUnseal { source_name: String },
    /// Certificate generation or TLS configuration failed.
    #[error("PKI: {0}")]
    Pki(#[from] umbra_pki::PkiError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl From<sqlx::Error> for ControllerError {
    fn from(e: sqlx::Error) -> Self {
        ControllerError::Database(e)
    }
}

/// A failed API call: status, message for a person, and the field at fault if one is.
#[derive(Debug, Clone)]
pub(crate) struct ApiFailure {
    pub(crate) status: StatusCode,
    pub(crate) error: String,
    pub(crate) field: Option<String>,
}

impl ApiFailure {
    pub(crate) fn new(status: StatusCode, error: impl Into<String>, field: Option<&str>) -> Self {
        ApiFailure {
            status,
            error: error.into(),
            field: field.map(str::to_owned),
        }
    }

    /// 400: the request is malformed or a value is invalid.
    pub(crate) fn invalid(field: &str, error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, Some(field))
    }

    /// 404: a named object does not exist.
    pub(crate) fn not_found(field: &str, error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error, Some(field))
    }

    /// 409: the change conflicts with the current state.
    pub(crate) fn conflict(field: &str, error: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, error, Some(field))
    }

    /// 401: no or wrong credentials.
    pub(crate) fn unauthorized(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, error, None)
    }

    /// 403: credentials known but not allowed here.
    pub(crate) fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, error, None)
    }

    /// 500: a local failure; the cause is logged, not sent.
    pub(crate) fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error", None)
    }

    pub(crate) fn body(&self) -> ApiError {
        ApiError {
            error: self.error.clone(),
            field: self.field.clone(),
        }
    }
}

impl From<sqlx::Error> for ApiFailure {
    /// The cause is logged, not sent, except for what the operator must act on: a store that
    /// is full or damaged (SQLite's primary result codes 13, and 11 or 26). A failed write
    /// changed nothing either way (its transaction is rolled back).
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error");
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        match code {
            Some(13) => ApiFailure::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "the controller's store is full (no space left for its database): nothing was \
                 changed; free space where the controller keeps its data, then retry",
                None,
            ),
            Some(11 | 26) => ApiFailure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the controller's store is damaged (its database file is malformed); see the \
                 controller's log, and restore the data directory from a backup",
                None,
            ),
            _ => ApiFailure::internal(),
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut resp = (status, Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
