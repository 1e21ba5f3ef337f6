//! HTTPS to the controller: JSON calls with mutual TLS, and the pinned first fetch of the CA.
//!
//! The client trusts only the organisation CA and presents this process's certificate when it
//! has one (enrolled roles); the controller's error bodies ([`ApiError`]) come back as
//! [`LinkError::Api`]. Before enrollment a device has no CA yet: [`fetch_pinned_ca`] fetches it
//! over TLS that authenticates nothing and accepts it only if its SHA-256 equals the pin from
//! the enrollment token.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;
use umbra_pki::TlsIdentity;
use umbra_proto::api::ApiError;

use crate::error::LinkError;

/// ALPN for the controller's HTTPS (HTTP/2 preferred).
const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
/// Connect plus TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request; above the controller's 25 s long polls.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest CA certificate PEM accepted from an unauthenticated server.
const MAX_CA_PEM: usize = 64 * 1024;

/// A JSON client for the controller's REST API.
#[derive(Clone)]
pub struct ControllerClient {
    http: reqwest::Client,
    base: String,
    bearer: Option<HeaderValue>,
}

impl std::fmt::Debug for ControllerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bearer token stays out of logs.
        f.debug_struct("ControllerClient")
            .field("base", &self.base)
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ControllerClient {
    /// A client for `base_url` (e.g. `https://controller:7443`), trusting only `ca` and
    /// presenting `identity` when given.
    pub fn new(
        base_url: &str,
        ca: &CertificateDer<'static>,
        identity: Option<&TlsIdentity>,
    ) -> Result<Self, LinkError> {
        let tls = umbra_pki::client_config(ca, identity, HTTP_ALPN, false)
            .map_err(|e| LinkError::Config(format!("controller TLS: {e}")))?;
        Ok(ControllerClient {
            http: http_client(tls)?,
            base: base_url.trim_end_matches('/').to_owned(),
            bearer: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` with every request (admin API).
    pub fn with_bearer_token(mut self, token: &str) -> Result<Self, LinkError> {
        let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| LinkError::Config("bearer token is not a valid header value".into()))?;
        v.set_sensitive(true);
        self.bearer = Some(v);
        Ok(self)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.bearer {
            Some(v) => rb.header(AUTHORIZATION, v.clone()),
            None => rb,
        }
    }

    /// `GET path` (e.g. `/v1/brokers`), decoding a JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, LinkError> {
        let resp = self.request(reqwest::Method::GET, path).send().await?;
        decode(resp).await
    }

    /// `GET path` for long polls: `None` on `204 No Content` (nothing new before the
    /// controller's deadline).
    pub async fn get_opt<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, LinkError> {
        let resp = self.request(reqwest::Method::GET, path).send().await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        decode(resp).await.map(Some)
    }

    /// `POST path` with a JSON body, decoding a JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, LinkError> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await?;
        decode(resp).await
    }
}

/// An HTTPS client to the controller that follows certificate renewal: rebuilt (with the
/// new certificate) whenever `identity` has changed since the last request.
pub struct RenewingClient {
    url: String,
    identity: tokio::sync::watch::Receiver<Arc<TlsIdentity>>,
    client: Option<(Arc<TlsIdentity>, ControllerClient)>,
}

impl RenewingClient {
    pub fn new(url: String, identity: tokio::sync::watch::Receiver<Arc<TlsIdentity>>) -> Self {
        RenewingClient {
            url,
            identity,
            client: None,
        }
    }

    /// The client for the identity held now.
    pub fn client(&mut self) -> Result<&ControllerClient, LinkError> {
        let id = self.identity.borrow().clone();
        let stale = match &self.client {
            Some((held, _)) => !Arc::ptr_eq(held, &id),
            None => true,
        };
        if stale {
            let c = ControllerClient::new(&self.url, &id.ca, Some(&id))?;
            self.client = Some((id, c));
        }
        match &self.client {
            Some((_, c)) => Ok(c),
            None => Err(LinkError::Closed),
        }
    }
}

/// Longest wait asked of the controller's broker-list long poll (its own cap is 25 s).
const BROKER_POLL_WAIT: Duration = Duration::from_secs(25);
/// First retry delay after a failed broker-list poll.
const BROKER_RETRY_BASE: Duration = Duration::from_secs(1);
/// What [`follow_broker_list`] logs when the controller answers again after failures.
pub const FOLLOWING_AGAIN: &str = "controller reachable again; following the broker list";

/// Follows the controller's broker list by long poll (`GET /v1/brokers?have=TAG`) until
/// `cancel`, and calls `changed` with each list that differs from the one held (`held` at
/// first). The controller answers as soon as the list changes, so a revoked broker leaves the
/// caller within about a second. When the controller cannot be reached the held list stays,
/// and the next try comes after a full-jitter backoff of at most `retry_cap`; the first answer
/// after that is logged ([`FOLLOWING_AGAIN`]), so an operator sees when the caller follows
/// the list again. The client follows `identity`, so a renewed certificate is used from the
/// next request.
pub async fn follow_broker_list<F, Fut>(
    url: &str,
    identity: tokio::sync::watch::Receiver<Arc<TlsIdentity>>,
    mut held: Vec<umbra_proto::api::BrokerInfo>,
    retry_cap: Duration,
    cancel: tokio_util::sync::CancellationToken,
    mut changed: F,
) where
    F: FnMut(Vec<umbra_proto::api::BrokerInfo>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut backoff =
        crate::backoff::Backoff::new(BROKER_RETRY_BASE, retry_cap.max(BROKER_RETRY_BASE));
    let mut client = RenewingClient::new(url.to_owned(), identity);
    let mut tag: Option<String> = None;
    // Since when the controller has not answered, if it has not.
    let mut failing: Option<std::time::Instant> = None;
    loop {
        let path = match &tag {
            Some(t) => format!("/v1/brokers?have={t}&wait={}", BROKER_POLL_WAIT.as_secs()),
            None => "/v1/brokers".to_owned(),
        };
        let answer = tokio::select! {
            () = cancel.cancelled() => return,
            r = async {
                match client.client() {
                    Ok(c) => c.get_opt::<umbra_proto::api::BrokerList>(&path).await,
                    Err(e) => Err(e),
                }
            } => r,
        };
        if answer.is_ok()
            && let Some(since) = failing.take()
        {
            tracing::info!(
                unreachable_ms = since.elapsed().as_millis() as u64,
                "{FOLLOWING_AGAIN}"
            );
        }
        match answer {
            Ok(Some(list)) => {
                backoff.reset();
                // The tag goes back into a URL: only a short alphanumeric one is used.
                let untagged = list.tag.is_empty()
                    || list.tag.len() > 64
                    || !list.tag.bytes().all(|b| b.is_ascii_alphanumeric());
                tag = (!untagged).then_some(list.tag);
                if list.brokers != held {
                    held = list.brokers.clone();
                    changed(list.brokers).await;
                }
                if untagged {
                    // A controller that cannot long-poll the list (or names it oddly): ask
                    // again later, not at once.
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(retry_cap) => {}
                    }
                }
            }
            // Nothing changed before the controller's deadline: ask again.
            Ok(None) => backoff.reset(),
            Err(e) => {
                failing.get_or_insert_with(std::time::Instant::now);
                // The next try asks for the list as it is, answered at once, not for a
                // change: that tells at once whether the controller is back.
                tag = None;
                let jitter = u64::from_le_bytes(umbra_pki::random_bytes::<8>());
                let delay = backoff.next_delay(jitter as f64 / u64::MAX as f64);
                tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot fetch the broker list; keeping the last known one");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn http_client(tls: rustls::ClientConfig) -> Result<reqwest::Client, LinkError> {
    Ok(reqwest::Client::builder()
        // The controller lists the version each broker and connector announces.
        .user_agent(concat!("umbra/", env!("CARGO_PKG_VERSION")))
        .tls_backend_preconfigured(tls)
        .https_only(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

/// The most of a successful answer's body read (a large organisation's snapshot is the
/// largest): a bound on what a server holding the controller's name can make a peer hold.
const MAX_ANSWER_BODY: usize = 256 << 20;

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, LinkError> {
    let status = resp.status();
    if !status.is_success() {
        return Err(api_error(status, resp).await);
    }
    let answer_error = |why: String| LinkError::Api {
        status: status.as_u16(),
        error: ApiError {
            error: why,
            field: None,
        },
    };
    match body_within(resp, MAX_ANSWER_BODY).await? {
        Some(body) => serde_json::from_slice(&body).map_err(|e| {
            answer_error(format!(
                "HTTP {status} with an answer that is not valid: {e}"
            ))
        }),
        None => Err(answer_error(format!(
            "HTTP {status} with an answer over {MAX_ANSWER_BODY} bytes"
        ))),
    }
}

/// The most of an error answer's body read: the controller's are a line of JSON. What
/// answers may be anyone (`fetch_pinned_ca` talks to an unauthenticated server).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The body of `resp`, `None` if it is longer than `limit`; never more than `limit` is held.
async fn body_within(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

async fn api_error(status: StatusCode, resp: reqwest::Response) -> LinkError {
    let unexplained = |why: String| ApiError {
        error: format!("HTTP {status} {why}"),
        field: None,
    };
    let error = match body_within(resp, MAX_ERROR_BODY).await {
        Ok(Some(body)) => match serde_json::from_slice::<ApiError>(&body) {
            // Printed to a terminal and logged: no control characters from the server.
            Ok(e) => ApiError {
                error: umbra_proto::escape_controls(&e.error).into_owned(),
                field: e
                    .field
                    .map(|f| umbra_proto::escape_controls(&f).into_owned()),
            },
            Err(_) => unexplained("without an error body".into()),
        },
        Ok(None) => unexplained(format!("with an error body over {MAX_ERROR_BODY} bytes")),
        Err(e) => unexplained(format!("; body unreadable: {e}")),
    };
    LinkError::Api {
        status: status.as_u16(),
        error,
    }
}

/// Fetches `GET {base_url}/v1/ca.pem` without authenticating the server, and accepts the
/// certificate only if the SHA-256 of its DER equals `pin` ([`LinkError::PinMismatch`]
/// otherwise, including for a body that is not a PEM certificate).
pub async fn fetch_pinned_ca(
    base_url: &str,
    pin: &[u8; 32],
) -> Result<CertificateDer<'static>, LinkError> {
    let provider = umbra_pki::crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(danger::AnyServerCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = HTTP_ALPN.iter().map(|p| p.to_vec()).collect();
    let http = http_client(tls)?;
    let url = format!("{}/v1/ca.pem", base_url.trim_end_matches('/'));
    let resp = http.get(url).send().await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(api_error(status, resp).await);
    }
    let body = body_within(resp, MAX_CA_PEM)
        .await?
        .ok_or(LinkError::PinMismatch)?;
    let der = CertificateDer::from_pem_slice(&body).map_err(|_| LinkError::PinMismatch)?;
    if !umbra_pki::ct_eq(&umbra_pki::sha256(&der), pin) {
        return Err(LinkError::PinMismatch);
    }
    Ok(der)
}

mod danger {
    //! Used only by `fetch_pinned_ca`, where the server is unauthenticated by design and the
    //! answer is checked against a pin instead.

    use super::*;

    /// Accepts any server certificate (still checks the handshake signature with it).
    #[derive(Debug)]
    pub(super) struct AnyServerCert(pub(super) Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyServerCert {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
