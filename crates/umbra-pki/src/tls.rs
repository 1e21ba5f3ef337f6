//! Every rustls configuration Umbra uses.
//!
//! One crypto backend (aws-lc-rs), TLS 1.3 only, and the hybrid post-quantum key exchange
//! X25519MLKEM768 offered first. Trust is the organisation CA alone: servers verify client
//! certificates against it (webpki, clientAuth EKU), clients verify servers against it
//! (webpki, serverAuth EKU, the expected DNS name). What a verified peer *is* comes from
//! [`crate::peer_cert`] on the leaf, never from here.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::time_provider::TimeProvider;
use rustls::{CertificateError, ClientConfig, NamedGroup, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::error::PkiError;
use crate::identity::TlsIdentity;

/// Only TLS 1.3 is ever negotiated.
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn provider_with(kx_groups: Vec<&'static dyn SupportedKxGroup>) -> CryptoProvider {
    let mut p = aws_lc_rs::default_provider();
    p.kx_groups = kx_groups;
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    p
}

/// The aws-lc-rs provider with key exchange groups [X25519MLKEM768, X25519, secp256r1] and
/// TLS 1.3 cipher suites.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        Arc::new(provider_with(vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
            aws_lc_rs::kx_group::SECP256R1,
        ]))
    })
    .clone()
}

/// The aws-lc-rs provider offering only X25519MLKEM768 (used for QUIC, where every peer is
/// Umbra's own code and there is no reason to accept a classical-only exchange).
pub fn crypto_provider_pq_only() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(provider_with(vec![aws_lc_rs::kx_group::X25519MLKEM768])))
        .clone()
}

/// Installs aws-lc-rs as the process-wide default rustls provider (for libraries that build
/// their own configs), with X25519MLKEM768 preferred. Idempotent; call first in every binary
/// and test harness.
pub fn install_crypto_provider() {
    let mut p = aws_lc_rs::default_provider();
    p.kx_groups = vec![
        aws_lc_rs::kx_group::X25519MLKEM768,
        aws_lc_rs::kx_group::X25519,
        aws_lc_rs::kx_group::SECP256R1,
        aws_lc_rs::kx_group::SECP384R1,
    ];
    // Err means a default is already installed, which is what was asked for.
    let _ = p.install_default();
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A certificate from the organisation CA is required.
    Required,
    /// A certificate is verified if presented; anonymous clients are let through (the caller
    /// then decides per request, e.g. the controller's public enrollment endpoint).
    Optional,
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

fn provider(pq_only: bool) -> Arc<CryptoProvider> {
    if pq_only {
        crypto_provider_pq_only()
    } else {
        crypto_provider()
    }
}

/// A TLS 1.3 server config presenting `id` and verifying clients against `id.ca`.
pub fn server_config(
    id: &TlsIdentity,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
    pq_only: bool,
) -> Result<ServerConfig, PkiError> {
    let provider = provider(pq_only);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.ca)?, provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => verifier.build()?,
        ClientAuth::Optional => verifier.allow_unauthenticated().build()?,
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain.clone(), id.key.clone_key())?;
    // No resumption: a resumed session would skip the certificate checks (expiry included)
    // that every link must pass. Links are long-lived, so full handshakes cost little.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The certificate a long-running server presents, replaceable while it runs: a renewed
/// certificate takes effect at the next handshake, without rebinding listeners. The lock is
/// taken once per handshake.
#[derive(Clone)]
pub struct ServerCertSlot(Arc<std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>>);

impl std::fmt::Debug for ServerCertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCertSlot(..)")
    }
}

impl ServerCertSlot {
    fn certified(
        id: &TlsIdentity,
        provider: &CryptoProvider,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, PkiError> {
        let key = provider.key_provider.load_private_key(id.key.clone_key())?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            id.cert_chain.clone(),
            key,
        )))
    }

    /// Presents `id` from the next handshake on. It must be issued by the same CA.
    pub fn replace(&self, id: &TlsIdentity) -> Result<(), PkiError> {
        let ck = Self::certified(id, &crypto_provider())?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ck;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServerCertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Like [`server_config`], but the certificate comes from `slot`, so a renewed one can be
/// swapped in while listeners keep running. Build several configs (say, QUIC and TCP) over one
/// slot with [`server_config_with_slot`].
pub fn server_config_reloadable(
    id: &TlsIdentity,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
    pq_only: bool,
) -> Result<(ServerConfig, ServerCertSlot), PkiError> {
    let slot = ServerCertSlot(Arc::new(std::sync::RwLock::new(ServerCertSlot::certified(
        id,
        &crypto_provider(),
    )?)));
    let cfg = server_config_with_slot(&id.ca, &slot, client_auth, alpn, pq_only)?;
    Ok((cfg, slot))
}

/// A TLS 1.3 server config presenting the certificate in `slot`, verifying clients against `ca`.
pub fn server_config_with_slot(
    ca: &CertificateDer<'static>,
    slot: &ServerCertSlot,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
    pq_only: bool,
) -> Result<ServerConfig, PkiError> {
    let provider = provider(pq_only);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => verifier.build()?,
        ClientAuth::Optional => verifier.allow_unauthenticated().build()?,
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(slot.clone()));
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A server config like [`server_config_reloadable`] with [`ClientAuth::Optional`], for a
/// server with a renewal route: a client certificate that expired at most `grace` ago, by
/// `time`, passes the handshake as if it were still valid (chain, signature and usage are
/// verified as of its last valid second). Such a server must refuse that certificate on every
/// request but renewal, and check there that its holder may still renew: a device that slept
/// past its certificate's expiry renews it instead of enrolling again. `time` is also the
/// clock of every other certificate check. A certificate not valid yet is never let through.
pub fn server_config_renewing(
    id: &TlsIdentity,
    alpn: &[&[u8]],
    grace: std::time::Duration,
    time: Arc<dyn TimeProvider>,
) -> Result<(ServerConfig, ServerCertSlot), PkiError> {
    let provider = crypto_provider();
    let slot = ServerCertSlot(Arc::new(std::sync::RwLock::new(ServerCertSlot::certified(
        id, &provider,
    )?)));
    let inner = WebPkiClientVerifier::builder_with_provider(roots(&id.ca)?, provider.clone())
        .allow_unauthenticated()
        .build()?;
    let verifier = Arc::new(ExpiredWithin { inner, grace });
    let mut cfg = ServerConfig::builder_with_details(provider, time)
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(slot.clone()));
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((cfg, slot))
}

/// A client certificate verifier that lets a leaf expired at most `grace` ago through, as
/// verified by `inner` at the leaf's own expiry. Every other refusal of `inner` stands.
#[derive(Debug)]
struct ExpiredWithin {
    inner: Arc<dyn ClientCertVerifier>,
    grace: std::time::Duration,
}

impl ClientCertVerifier for ExpiredWithin {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
                time,
                not_after,
            })) if time.as_secs().saturating_sub(not_after.as_secs()) <= self.grace.as_secs()
                // The expiry refused must be the leaf's own (a trust anchor carries none).
                && leaf_not_after(end_entity) == Some(not_after.as_secs()) =>
            {
                self.inner
                    .verify_client_cert(end_entity, intermediates, not_after)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The leaf's `notAfter`, Unix seconds.
fn leaf_not_after(leaf: &CertificateDer<'_>) -> Option<u64> {
    let na = crate::peer_cert(leaf).ok()?.not_after;
    Some(na.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs())
}

/// A TLS 1.3 client config trusting only `ca`, presenting `client` if given.
pub fn client_config(
    ca: &CertificateDer<'static>,
    client: Option<&TlsIdentity>,
    alpn: &[&[u8]],
    pq_only: bool,
) -> Result<ClientConfig, PkiError> {
    let builder = ClientConfig::builder_with_provider(provider(pq_only))
        .with_protocol_versions(TLS13_ONLY)?
        .with_root_certificates(roots(ca)?);
    let mut cfg = match client {
        Some(id) => builder.with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    // Every connection proves its certificates afresh (see `server_config`).
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The IANA name of a key exchange group, e.g. "X25519MLKEM768", "X25519", "secp256r1".
pub fn kx_group_name(g: NamedGroup) -> String {
    format!("{g:?}")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    use rustls::{ClientConnection, Connection, ProtocolVersion, ServerConnection};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{PrivateKeyDer, ServerName};
    use umbra_proto::Role;

    use super::*;
    use crate::testutil::Org;
    use crate::{PeerCert, broker_server_name, peer_cert};

    const ALPN: &[u8] = b"umbra/1";

    /// Moves every pending TLS record from `from` to `to` and lets `to` process them.
    fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// A complete in-memory handshake. The error is whichever side refused first.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
        server_name: &str,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut c = Connection::Client(ClientConnection::new(Arc::new(client), name)?);
        let mut s = Connection::Server(ServerConnection::new(Arc::new(server))?);
        for _ in 0..10 {
            transfer(&mut c, &mut s)?;
            transfer(&mut s, &mut c)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // Deliver what is still queued after the handshake (alerts, session tickets).
                transfer(&mut c, &mut s)?;
                transfer(&mut s, &mut c)?;
                let (Connection::Client(c), Connection::Server(s)) = (c, s) else {
                    unreachable!()
                };
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    /// The identity the server sees: from the leaf only, as callers must do it.
    fn client_identity(s: &ServerConnection) -> Option<PeerCert> {
        s.peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| peer_cert(leaf).unwrap())
    }

    struct Pair {
        org: Org,
        broker: TlsIdentity,
    }

    impl Pair {
        fn new() -> Pair {
            let org = Org::new("acme");
            let broker = org.identity(Role::Broker, "b1");
            Pair { org, broker }
        }

        fn server(&self, auth: ClientAuth) -> ServerConfig {
            server_config(&self.broker, auth, &[ALPN], false).unwrap()
        }

        fn connect(
            &self,
            client: Option<&TlsIdentity>,
            auth: ClientAuth,
        ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
            let cfg = client_config(&self.org.ca.cert_der(), client, &[ALPN], false).unwrap();
            handshake(cfg, self.server(auth), &broker_server_name("b1"))
        }
    }

    fn assert_refused_certificate(r: Result<(ClientConnection, ServerConnection), rustls::Error>) {
        match r {
            Err(rustls::Error::InvalidCertificate(e)) => eprintln!("refused: {e:?}"),
            Err(e) => panic!("refused, but not for the certificate: {e}"),
            Ok(_) => panic!("handshake succeeded"),
        }
    }

    #[test]
    fn a_renewed_server_certificate_is_presented_from_the_next_handshake() {
        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let (server, slot) =
            server_config_reloadable(&p.broker, ClientAuth::Required, &[ALPN], false).unwrap();
        let client = || client_config(&p.org.ca.cert_der(), Some(&agent), &[ALPN], false).unwrap();
        let serial = |c: &ClientConnection| {
            peer_cert(&c.peer_certificates().unwrap()[0])
                .unwrap()
                .serial_hex
        };
        let (c1, _) = handshake(client(), server.clone(), &broker_server_name("b1")).unwrap();
        assert_eq!(serial(&c1), p.broker.peer.serial_hex);
        let renewed = p.org.identity(Role::Broker, "b1");
        slot.replace(&renewed).unwrap();
        let (c2, _) = handshake(client(), server, &broker_server_name("b1")).unwrap();
        assert_eq!(serial(&c2), renewed.peer.serial_hex);
        assert_ne!(renewed.peer.serial_hex, p.broker.peer.serial_hex);
    }

    #[test]
    fn client_from_the_org_ca_is_accepted_with_its_identity() {
        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let (c, s) = p.connect(Some(&agent), ClientAuth::Required).unwrap();
        assert_eq!(
            client_identity(&s).unwrap().id,
            p.org.pid(Role::Agent, "d-1")
        );
        assert_eq!(client_identity(&s).unwrap(), agent.peer);
        // The client sees the broker's identity the same way.
        let server_leaf = &c.peer_certificates().unwrap()[0];
        assert_eq!(
            peer_cert(server_leaf).unwrap().id,
            p.org.pid(Role::Broker, "b1")
        );
        assert_eq!(c.alpn_protocol(), Some(ALPN));
        assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    }

    #[test]
    fn negotiated_group_is_x25519mlkem768() {
        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let (c, s) = p.connect(Some(&agent), ClientAuth::Required).unwrap();
        for g in [
            c.negotiated_key_exchange_group().unwrap(),
            s.negotiated_key_exchange_group().unwrap(),
        ] {
            assert_eq!(g.name(), NamedGroup::X25519MLKEM768);
            assert_eq!(kx_group_name(g.name()), "X25519MLKEM768");
        }
        assert_eq!(kx_group_name(NamedGroup::X25519), "X25519");
        assert_eq!(kx_group_name(NamedGroup::secp256r1), "secp256r1");
    }

    #[test]
    fn default_configs_offer_pq_first_and_pq_only_offers_nothing_else() {
        let names = |p: &CryptoProvider| -> Vec<NamedGroup> {
            p.kx_groups.iter().map(|g| g.name()).collect()
        };
        assert_eq!(
            names(&crypto_provider()),
            [
                NamedGroup::X25519MLKEM768,
                NamedGroup::X25519,
                NamedGroup::secp256r1
            ]
        );
        assert_eq!(
            names(&crypto_provider_pq_only()),
            [NamedGroup::X25519MLKEM768]
        );

        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let ca = p.org.ca.cert_der();
        let c = client_config(&ca, Some(&agent), &[ALPN], true).unwrap();
        assert_eq!(names(c.crypto_provider()), [NamedGroup::X25519MLKEM768]);
        let s = server_config(&p.broker, ClientAuth::Required, &[ALPN], true).unwrap();
        assert_eq!(names(s.crypto_provider()), [NamedGroup::X25519MLKEM768]);

        // pq-only on both ends works and uses the hybrid group.
        let (c, _) = handshake(c, s, &broker_server_name("b1")).unwrap();
        assert_eq!(
            c.negotiated_key_exchange_group().unwrap().name(),
            NamedGroup::X25519MLKEM768
        );

        // A pq-only server refuses a client that offers only classical groups.
        let mut prov = (*crypto_provider()).clone();
        prov.kx_groups = vec![aws_lc_rs::kx_group::X25519];
        let classical = ClientConfig::builder_with_provider(Arc::new(prov))
            .with_protocol_versions(TLS13_ONLY)
            .unwrap()
            .with_root_certificates(roots(&ca).unwrap())
            .with_client_auth_cert(agent.cert_chain.clone(), agent.key.clone_key())
            .unwrap();
        let s = server_config(&p.broker, ClientAuth::Required, &[ALPN], true).unwrap();
        match handshake(classical.clone(), s, &broker_server_name("b1")) {
            Err(rustls::Error::PeerIncompatible(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("classical-only client accepted by a pq-only server"),
        }
        // The same classical client still reaches a default server (X25519).
        let (c, _) = handshake(
            classical,
            p.server(ClientAuth::Required),
            &broker_server_name("b1"),
        )
        .unwrap();
        assert_eq!(
            c.negotiated_key_exchange_group().unwrap().name(),
            NamedGroup::X25519
        );
    }

    #[test]
    fn tls12_is_not_negotiated() {
        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let cfg = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(&p.org.ca.cert_der()).unwrap())
            .with_client_auth_cert(agent.cert_chain.clone(), agent.key.clone_key())
            .unwrap();
        match handshake(
            cfg,
            p.server(ClientAuth::Required),
            &broker_server_name("b1"),
        ) {
            Err(rustls::Error::PeerIncompatible(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("TLS 1.2 negotiated"),
        }
        // Our own configs carry only TLS 1.3 suites.
        assert!(
            crypto_provider()
                .cipher_suites
                .iter()
                .all(|s| s.version() == &rustls::version::TLS13)
        );
    }

    #[test]
    fn client_certificate_required_or_optional() {
        let p = Pair::new();
        // Required: no certificate, no connection.
        match p.connect(None, ClientAuth::Required) {
            Err(rustls::Error::NoCertificatesPresented) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("anonymous client accepted"),
        }
        // Optional: anonymous clients get through with no identity ...
        let (_, s) = p.connect(None, ClientAuth::Optional).unwrap();
        assert!(client_identity(&s).is_none());
        // ... a valid certificate is still verified and read ...
        let agent = p.org.identity(Role::Agent, "d-1");
        let (_, s) = p.connect(Some(&agent), ClientAuth::Optional).unwrap();
        assert_eq!(client_identity(&s).unwrap().id, agent.peer.id);
        // ... and a foreign one is still refused.
        let foreign = Org::new("acme").identity(Role::Agent, "d-1");
        assert_refused_certificate(p.connect(Some(&foreign), ClientAuth::Optional));
    }

    #[test]
    fn expired_client_certificate_is_refused() {
        let p = Pair::new();
        let past = SystemTime::now() - Duration::from_secs(10 * 24 * 3600);
        let old =
            p.org.load(
                &p.org
                    .pems_at(Role::Agent, "d-1", past, Duration::from_secs(24 * 3600)),
            );
        let r = p.connect(Some(&old), ClientAuth::Required);
        let Err(rustls::Error::InvalidCertificate(e)) = &r else {
            panic!("expected a certificate error");
        };
        assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
        // The twin issued now is accepted.
        let fresh = p.org.identity(Role::Agent, "d-1");
        assert!(p.connect(Some(&fresh), ClientAuth::Required).is_ok());
    }

    /// A clock fixed at a time a test chooses.
    #[derive(Debug)]
    struct FixedTime(SystemTime);

    impl TimeProvider for FixedTime {
        fn current_time(&self) -> Option<UnixTime> {
            Some(UnixTime::since_unix_epoch(
                self.0.duration_since(std::time::UNIX_EPOCH).unwrap(),
            ))
        }
    }

    /// A renewal server lets a certificate expired within its grace through the handshake,
    /// by its own clock, and nothing else: not one expired longer ago, one not valid yet, one
    /// from another CA, nor any expired one without a grace.
    #[test]
    fn a_renewal_server_admits_certificates_expired_within_its_grace() {
        let p = Pair::new();
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let server = |grace: Duration, at: SystemTime| {
            server_config_renewing(&p.broker, &[ALPN], grace, Arc::new(FixedTime(at)))
                .unwrap()
                .0
        };
        let connect = |id: &TlsIdentity, server: ServerConfig| {
            let cfg = client_config(&p.org.ca.cert_der(), Some(id), &[ALPN], false).unwrap();
            handshake(cfg, server, &broker_server_name("b1"))
        };
        // Valid for a day from two days ago: expired a day ago.
        let lapsed = p
            .org
            .load(&p.org.pems_at(Role::Agent, "d-1", now - 2 * day, day));
        let (_, s) = connect(&lapsed, server(2 * day, now)).unwrap();
        assert_eq!(client_identity(&s).unwrap(), lapsed.peer);
        // The grace is a bound: half a day is not enough, and none is none.
        assert_refused_certificate(connect(&lapsed, server(day / 2, now)));
        assert_refused_certificate(connect(&lapsed, server(Duration::ZERO, now)));
        // The server's clock decides, not the system's: half a day later the two-day grace
        // holds, two days later it is spent.
        assert!(connect(&lapsed, server(2 * day, now + day / 2)).is_ok());
        assert_refused_certificate(connect(&lapsed, server(2 * day, now + 2 * day)));
        // Not valid yet is no expiry: refused whatever the grace.
        let early = p
            .org
            .load(&p.org.pems_at(Role::Agent, "d-2", now + day, day));
        assert_refused_certificate(connect(&early, server(30 * day, now)));
        // Another CA's expired certificate is still another CA's.
        let foreign = Org::new("acme");
        let foreign = foreign.load(&foreign.pems_at(Role::Agent, "d-1", now - 2 * day, day));
        assert_refused_certificate(connect(&foreign, server(30 * day, now)));
        // The twins: a valid certificate, and no certificate at all (enrollment).
        let fresh = p.org.identity(Role::Agent, "d-3");
        let (_, s) = connect(&fresh, server(Duration::ZERO, now)).unwrap();
        assert_eq!(client_identity(&s).unwrap().id, fresh.peer.id);
        let anonymous = client_config(&p.org.ca.cert_der(), None, &[ALPN], false).unwrap();
        let (_, s) = handshake(anonymous, server(day, now), &broker_server_name("b1")).unwrap();
        assert!(client_identity(&s).is_none());
    }

    #[test]
    fn client_from_a_foreign_ca_is_refused() {
        let p = Pair::new();
        // Same organisation name, different CA: the name is not what is trusted.
        let foreign = Org::new("acme").identity(Role::Agent, "d-1");
        assert_refused_certificate(p.connect(Some(&foreign), ClientAuth::Required));
        assert!(
            p.connect(
                Some(&p.org.identity(Role::Agent, "d-1")),
                ClientAuth::Required
            )
            .is_ok()
        );
    }

    #[test]
    fn leaf_forged_with_a_device_key_is_refused() {
        let p = Pair::new();
        let pems = p.org.pems(Role::Agent, "d-1");
        let device = p.org.load(&pems);
        let device_key = KeyPair::from_pem(&pems.key).unwrap();

        // The device uses its own (CA:false) certificate as an issuer for someone else.
        let forged_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "umbra://acme/broker/b1");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI("umbra://acme/broker/b1".try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&device.cert_chain[0], &device_key).unwrap();
        let forged = params.signed_by(&forged_key, &issuer).unwrap();

        let forged_id = TlsIdentity {
            cert_chain: vec![forged.der().clone(), device.cert_chain[0].clone()],
            key: PrivateKeyDer::from_pem_slice(forged_key.serialize_pem().as_bytes()).unwrap(),
            ca: p.org.ca.cert_der(),
            peer: peer_cert(forged.der()).unwrap(),
        };
        assert_refused_certificate(p.connect(Some(&forged_id), ClientAuth::Required));
        // The device's own certificate keeps working.
        let (_, s) = p.connect(Some(&device), ClientAuth::Required).unwrap();
        assert_eq!(
            client_identity(&s).unwrap().id,
            p.org.pid(Role::Agent, "d-1")
        );
    }

    #[test]
    fn extra_chain_certificates_never_lend_their_identity() {
        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let connector = p.org.identity(Role::Connector, "c-1");
        // The agent appends someone else's valid certificate to its chain.
        let mut chain = agent.clone();
        chain.cert_chain.push(connector.cert_chain[0].clone());
        let (_, s) = p.connect(Some(&chain), ClientAuth::Required).unwrap();
        assert_eq!(s.peer_certificates().unwrap().len(), 2);
        assert_eq!(
            client_identity(&s).unwrap().id,
            p.org.pid(Role::Agent, "d-1")
        );
    }

    #[test]
    fn server_name_and_server_auth_are_checked() {
        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let ca = p.org.ca.cert_der();
        let cfg = || client_config(&ca, Some(&agent), &[ALPN], false).unwrap();
        // The wrong broker name.
        assert_refused_certificate(handshake(
            cfg(),
            p.server(ClientAuth::Required),
            &broker_server_name("b2"),
        ));
        // A certificate without serverAuth (an agent's) cannot act as a server.
        let impostor = server_config(&agent, ClientAuth::Required, &[ALPN], false).unwrap();
        assert_refused_certificate(handshake(cfg(), impostor, &broker_server_name("b1")));
        // A client trusting another CA refuses our broker.
        let other = Org::new("acme");
        let cfg = client_config(&other.ca.cert_der(), None, &[ALPN], false).unwrap();
        assert_refused_certificate(handshake(
            cfg,
            p.server(ClientAuth::Optional),
            &broker_server_name("b1"),
        ));
    }

    #[test]
    fn sessions_are_never_resumed() {
        let p = Pair::new();
        let agent = p.org.identity(Role::Agent, "d-1");
        let client = client_config(&p.org.ca.cert_der(), Some(&agent), &[ALPN], false).unwrap();
        let server = p.server(ClientAuth::Required);
        let (reloadable, _slot) =
            server_config_reloadable(&p.broker, ClientAuth::Required, &[ALPN], false).unwrap();
        // Each side refuses on its own, against a peer that would resume: a client that keeps
        // tickets, and servers that issue them.
        let mut resuming_client = client.clone();
        resuming_client.resumption = rustls::client::Resumption::in_memory_sessions(64);
        let resuming = |mut s: ServerConfig| {
            s.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
            s.send_tls13_tickets = 2;
            s
        };
        let pairs = [
            ("both sides ours", client.clone(), server.clone()),
            (
                "ours, reloadable server",
                client.clone(),
                reloadable.clone(),
            ),
            (
                "our server, a resuming client",
                resuming_client.clone(),
                server.clone(),
            ),
            (
                "our reloadable server, a resuming client",
                resuming_client,
                reloadable.clone(),
            ),
            (
                "our client, a resuming server",
                client.clone(),
                resuming(server.clone()),
            ),
        ];
        for (what, client, server) in pairs {
            for _ in 0..2 {
                let (c, s) =
                    handshake(client.clone(), server.clone(), &broker_server_name("b1")).unwrap();
                assert_eq!(
                    c.handshake_kind(),
                    Some(rustls::HandshakeKind::Full),
                    "{what}"
                );
                assert_eq!(
                    s.handshake_kind(),
                    Some(rustls::HandshakeKind::Full),
                    "{what}"
                );
            }
        }
        // The twin: two peers that both resume do resume, so the cases above show a refusal.
        let mut c2 = client_config(&p.org.ca.cert_der(), Some(&agent), &[ALPN], false).unwrap();
        c2.resumption = rustls::client::Resumption::in_memory_sessions(64);
        let s2 = resuming(server.clone());
        let kinds: Vec<_> = (0..2)
            .map(|_| {
                let (c, _) = handshake(c2.clone(), s2.clone(), &broker_server_name("b1")).unwrap();
                c.handshake_kind()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    }

    #[test]
    fn install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}
