//! The one error type of this crate, and whose fault each failure is.
//!
//! [`LinkError::is_peer_fault`] separates a peer that broke the protocol or presented the wrong
//! identity (close that stream or link, count it against the peer) from the network failing,
//! local misuse, and the controller answering with an error. No variant carries key material or
//! tokens.

use std::io;

use umbra_proto::FrameError;
use umbra_proto::api::ApiError;

use crate::mux::MuxError;
use crate::transport::Refusal;

/// Why a link, stream or controller call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket I/O failed (connection refused or reset, address in use, ...).
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed (certificate not trusted, expired, wrong name, alert, ...).
    #[error("tls: {}{}", .0, clock_hint(.0))]
    Tls(#[from] rustls::Error),
    /// The QUIC connection failed or was closed.
    #[error("quic: {0}")]
    Quic(quinn::ConnectionError),
    /// A QUIC connection could not even be started (bad server name, endpoint stopping).
    #[error("quic connect: {0}")]
    QuicConnect(#[from] quinn::ConnectError),
    /// The multiplexer of a TLS link failed: the peer broke its protocol, or closed the link
    /// with an error code.
    #[error("link: {0}")]
    Mux(MuxError),
    /// The peer reset the stream, or stopped reading it; carries the application error code.
    #[error("stream reset by peer (code {0})")]
    StreamReset(u64),
    /// The peer sent bytes that are not a valid header frame.
    #[error("bad frame from peer: {0}")]
    Frame(FrameError),
    /// A frame given to `write_frame` cannot be encoded (a field too long): local misuse.
    #[error("cannot encode frame: {0}")]
    Encode(FrameError),
    /// The peer finished its half of the stream where a header frame was expected.
    #[error("stream ended before a complete frame")]
    StreamEnded,
    /// The handshake completed but the peer is not acceptable: no client certificate, no
    /// usable ALPN, or similar.
    #[error("handshake refused: {0}")]
    Handshake(&'static str),
    /// The peer's leaf certificate carries no valid Umbra identity.
    #[error("peer identity: {0}")]
    PeerIdentity(umbra_pki::PkiError),
    /// The server is not a broker (dialers only talk to brokers).
    #[error("peer is not a broker")]
    WrongPeer,
    /// A named deadline passed (handshake, relay idle, ...).
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The broker closed the link because this identity may not hold one: its certificate
    /// or its device or connector is revoked, or it is not enrolled (the broker's audit log
    /// has the exact reason).
    #[error(
        "refused by the broker: this identity may not connect (revoked, or not enrolled); \
         ask an administrator, or enroll again"
    )]
    Refused,
    /// The broker closed the link because this identity already holds as many links to it as
    /// it allows (`max_links_per_peer`). Not final: another broker may take the link, and
    /// this one once the identity's other links close.
    #[error(
        "refused by the broker: this identity already holds as many links to it as the broker \
         allows (are many agents or forwards running with one identity?)"
    )]
    TooManyLinks,
    /// The link or stream is closed (locally, or already finished).
    #[error("closed")]
    Closed,
    /// This side of the link does not open streams (see the crate docs on who opens).
    #[error("streams on this link are opened by the peer")]
    NotOpener,
    /// A configuration could not be used (e.g. a TLS config without the QUIC initial suite).
    #[error("configuration: {0}")]
    Config(String),
    /// HTTP to the controller failed below the API (connect, TLS, timeout, bad body).
    #[error("controller request: {}{}", with_causes(.0), tls_cause(.0).map_or("", clock_hint))]
    Http(#[from] reqwest::Error),
    /// The controller answered with an API error.
    #[error("controller answered {status}: {}", error.error)]
    Api { status: u16, error: ApiError },
    /// The CA fetched from the controller does not match the pinned hash.
    #[error("CA certificate does not match the pinned SHA-256")]
    PinMismatch,
}

/// What to check when a certificate was refused for its time: each side judges the other's
/// certificate by its own clock, so a wrong clock on either side looks like this.
fn clock_hint(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError};
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => " (judged by this host's clock: is it right?)",
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => {
            " (the peer judged this host's certificate by its own clock: is either clock wrong?)"
        }
        _ => "",
    }
}

/// The TLS error among `e`'s causes, if there is one.
pub(crate) fn tls_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        // hyper hands the TLS error on inside an io::Error, hyper-rustls inside another one,
        // and an io::Error's `source` skips what it wraps: look inside each.
        let mut inner: Option<&(dyn std::error::Error + 'static)> = Some(c);
        while let Some(i) = inner {
            if let Some(t) = i.downcast_ref::<rustls::Error>() {
                return Some(t);
            }
            inner = i
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .map(|w| w as &(dyn std::error::Error + 'static));
        }
        cause = c.source();
    }
    None
}

/// An error's message followed by its causes': reqwest's own says only "error sending request
/// for url (...)", and the cause (connection refused, timed out, certificate not trusted) is
/// what an operator needs.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        // Some layers repeat their cause in their own message.
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cause = c.source();
    }
    s
}

impl LinkError {
    /// The kind of failure, for telling a new cause from a repeat of the last one in a run
    /// of failed polls: the controller unreachable (however: refused, reset, timed out), a
    /// TLS error (a certificate a clock makes invalid, say: named), or the controller's own
    /// refusal (its status and message).
    pub fn failure_kind(&self) -> String {
        match self {
            LinkError::Http(e) => match tls_cause(e) {
                Some(t) => format!("tls: {t}"),
                None => "unreachable".to_owned(),
            },
            LinkError::Api { status, error } => format!("{status}: {}", error.error),
            other => other.to_string(),
        }
    }

    /// The broker's refusal this error reports, if it is one.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            LinkError::Refused => Some(Refusal::Identity),
            LinkError::TooManyLinks => Some(Refusal::TooManyLinks),
            _ => None,
        }
    }

    /// True when the peer broke the protocol or is not who it must be: malformed frames, a
    /// stream that ended early, a refused handshake or certificate, the wrong role, a protocol
    /// violation on the wire. False for network failures, timeouts, local misuse and
    /// controller answers.
    pub fn is_peer_fault(&self) -> bool {
        match self {
            LinkError::Frame(_)
            | LinkError::StreamEnded
            | LinkError::Handshake(_)
            | LinkError::PeerIdentity(_)
            | LinkError::WrongPeer
            | LinkError::Tls(_) => true,
            LinkError::Quic(e) => matches!(
                e,
                quinn::ConnectionError::TransportError(_)
                    | quinn::ConnectionError::ConnectionClosed(_)
                    | quinn::ConnectionError::VersionMismatch
            ),
            LinkError::Mux(_) => true,
            _ => false,
        }
    }
}

impl LinkError {
    /// Whether a server's handshake failed because the peer's credential was refused: a
    /// certificate not trusted, expired, not a leaf, none, no Umbra identity, no `umbra/1`
    /// ALPN after the handshake. Unlike [`LinkError::is_peer_fault`], not a peer that gave up
    /// (closed its side, timed out) nor one whose QUIC Initial was refused (its source
    /// address, which one datagram can forge, proved nothing): over QUIC, only the TLS alerts
    /// about certificates count, which come after the client has answered from its address.
    pub fn is_refused_credential(&self) -> bool {
        match self {
            // Only what rustls says of the certificate: not the peer's alert (the peer refusing
            // us, or giving up), nor bytes that are not TLS or a client with nothing in common.
            LinkError::Tls(
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented,
            )
            | LinkError::Handshake(_)
            | LinkError::PeerIdentity(_)
            | LinkError::WrongPeer => true,
            LinkError::Quic(quinn::ConnectionError::TransportError(e)) => {
                // CRYPTO_ERROR (0x100 + TLS alert): bad_certificate, unsupported_certificate,
                // certificate_revoked, certificate_expired, certificate_unknown, unknown_ca,
                // access_denied, decrypt_error (a certificate's signature), and
                // certificate_required: alerts about the client's certificate flight, which a
                // client sends only once it has the server's from its address.
                let code = u64::from(e.code);
                code.checked_sub(0x100)
                    .is_some_and(|alert| matches!(alert, 42..=46 | 48 | 49 | 51 | 116))
            }
            _ => false,
        }
    }
}

impl From<FrameError> for LinkError {
    fn from(e: FrameError) -> Self {
        LinkError::Frame(e)
    }
}

/// Maps an I/O error from tokio-rustls, which wraps rustls errors, to the precise variant.
pub(crate) fn from_tls_io(e: io::Error) -> LinkError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => LinkError::Tls(tls.clone()),
        None => LinkError::Io(e),
    }
}

impl From<quinn::ReadError> for LinkError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => LinkError::StreamReset(code.into_inner()),
            quinn::ReadError::ConnectionLost(c) => from_conn(c),
            quinn::ReadError::ClosedStream
            | quinn::ReadError::IllegalOrderedRead
            | quinn::ReadError::ZeroRttRejected => LinkError::Closed,
        }
    }
}

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => LinkError::StreamReset(code.into_inner()),
            quinn::WriteError::ConnectionLost(c) => from_conn(c),
            quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => {
                LinkError::Closed
            }
        }
    }
}

/// A locally closed QUIC connection is [`LinkError::Closed`], the broker's refusal is the
/// error of its [`Refusal`]; anything else keeps its detail.
pub(crate) fn from_conn(e: quinn::ConnectionError) -> LinkError {
    match e {
        quinn::ConnectionError::LocallyClosed => LinkError::Closed,
        quinn::ConnectionError::ApplicationClosed(ref c) => {
            match u32::try_from(c.error_code.into_inner())
                .ok()
                .and_then(Refusal::from_code)
            {
                Some(r) => r.error(),
                None => LinkError::Quic(e),
            }
        }
        e => LinkError::Quic(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS error is found however deep in io::Errors it is wrapped (hyper-rustls wraps it
    /// in two).
    #[test]
    fn a_tls_error_is_found_inside_wrapped_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet);
        let twice = io::Error::other(io::Error::new(io::ErrorKind::InvalidData, tls.clone()));
        assert_eq!(tls_cause(&twice), Some(&tls));
        assert_eq!(tls_cause(&io::Error::other("no tls here")), None);
    }

    /// A certificate refused for its time says which clock judged it.
    #[test]
    fn time_refusals_name_the_clock() {
        use rustls::{AlertDescription, CertificateError};
        let e = LinkError::Tls(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
        assert!(
            e.to_string()
                .ends_with("(judged by this host's clock: is it right?)"),
            "{e}"
        );
        let e = LinkError::Tls(rustls::Error::AlertReceived(
            AlertDescription::CertificateExpired,
        ));
        assert!(e.to_string().contains("by its own clock"), "{e}");
        // Other TLS errors say nothing of clocks.
        let e = LinkError::Tls(rustls::Error::InvalidCertificate(
            CertificateError::BadSignature,
        ));
        assert!(!e.to_string().contains("clock"), "{e}");
    }

    /// Polls warn again only when the kind of failure changes: however the controller is
    /// unreachable, it is one kind; its refusals are told apart by what they say.
    #[tokio::test]
    async fn failures_of_one_kind_are_one_kind() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let client = reqwest::Client::new();
        let a = client
            .get(format!("http://{addr}/v1/snapshot?after=1"))
            .send();
        let b = client
            .get(format!("http://{addr}/v1/snapshot?after=2&wait=0"))
            .send();
        let (a, b) = (
            LinkError::Http(a.await.unwrap_err()),
            LinkError::Http(b.await.unwrap_err()),
        );
        assert_ne!(a.to_string(), b.to_string(), "the URLs differ");
        assert_eq!(a.failure_kind(), "unreachable");
        assert_eq!(b.failure_kind(), "unreachable");
        let api = |status, msg: &str| LinkError::Api {
            status,
            error: umbra_proto::api::ApiError {
                error: msg.to_owned(),
                field: None,
            },
        };
        let expired = api(401, "certificate expired at 2027-01-01T00:00:00Z");
        assert_eq!(
            expired.failure_kind(),
            api(401, "certificate expired at 2027-01-01T00:00:00Z").failure_kind()
        );
        assert_ne!(expired.failure_kind(), api(403, "revoked").failure_kind());
        assert_ne!(expired.failure_kind(), a.failure_kind());
    }

    /// What a listener reports for the audit trail: its refusals of a peer's credential, not
    /// a peer that refused it or gave up, and over QUIC not what an Initial alone (one
    /// datagram, from any address) can cause.
    #[test]
    fn refused_credentials_are_told_from_other_failures() {
        let quic = |alert: u8| {
            LinkError::Quic(quinn::ConnectionError::TransportError(
                quinn_proto::TransportError {
                    code: quinn_proto::TransportErrorCode::crypto(alert),
                    frame: None,
                    reason: String::new(),
                },
            ))
        };
        let refused = [
            LinkError::Tls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
            LinkError::Tls(rustls::Error::NoCertificatesPresented),
            LinkError::Handshake("no client certificate"),
            LinkError::WrongPeer,
            quic(48),
            quic(45),
            quic(51),
            quic(116),
        ];
        for e in &refused {
            assert!(e.is_refused_credential(), "{e}");
        }
        let not = [
            LinkError::Tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA,
            )),
            // `curl http://` at the TLS port; a TLS 1.2-only client.
            LinkError::Tls(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            )),
            LinkError::Tls(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls13RequiredForQuic,
            )),
            LinkError::Tls(rustls::Error::NoApplicationProtocol),
            quic(120), // no_application_protocol: decided on the Initial alone
            quic(40),
            LinkError::Quic(quinn::ConnectionError::TimedOut),
            LinkError::Timeout("handshake"),
            LinkError::Io(io::Error::from(io::ErrorKind::ConnectionReset)),
        ];
        for e in &not {
            assert!(!e.is_refused_credential(), "{e}");
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Middle(#[source] io::Error);

    #[test]
    fn causes_follow_the_message() {
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(
            with_causes(&Outer(Middle(refused()))),
            "error sending request: client error (Connect): connection refused"
        );
        assert_eq!(with_causes(&refused()), "connection refused");
    }
}
