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

fn http_client(tls: rustls::ClientConfig) -> Result<reqwest::Client, LinkError> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .https_only(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, LinkError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp.json().await?);
    }
    Err(api_error(status, resp).await)
}

async fn api_error(status: StatusCode, resp: reqwest::Response) -> LinkError {
    let error = match resp.bytes().await {
        Ok(body) => serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
            error: format!("HTTP {status} without an error body"),
            field: None,
        }),
        Err(e) => ApiError {
            error: format!("HTTP {status}; body unreadable: {e}"),
            field: None,
        },
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
    let mut resp = http.get(url).send().await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(api_error(status, resp).await);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_CA_PEM {
            return Err(LinkError::PinMismatch);
        }
        body.extend_from_slice(&chunk);
    }
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
