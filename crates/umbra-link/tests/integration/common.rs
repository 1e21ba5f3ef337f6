//! Fixtures: an organisation CA, identities issued by it, TLS configs, a listener.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use umbra_link::{ALPN, LinkConfig, Listener, Transport};
use umbra_pki::{Ca, ClientAuth, TlsIdentity, broker_server_name, client_config, server_config};
use umbra_proto::{PeerId, Role};

/// Runs an async test body once per transport, as two `#[tokio::test]`s.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name(umbra_link::Transport::Quic).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$name(umbra_link::Transport::Tls).await
            }
        }
    };
}
pub(crate) use both;

pub(crate) const BROKER: &str = "b1";

pub(crate) struct Org {
    pub(crate) ca: Ca,
}

impl Org {
    pub(crate) fn new() -> Org {
        umbra_pki::install_crypto_provider();
        Org {
            ca: Ca::generate("default", SystemTime::now()).unwrap(),
        }
    }

    pub(crate) fn identity_with(
        &self,
        role: Role,
        id: &str,
        dns_names: Vec<String>,
        now: SystemTime,
        lifetime: Duration,
    ) -> TlsIdentity {
        let p = umbra_pki::test_util::issue_pems(
            &self.ca,
            PeerId::new(self.ca.org(), role, id).unwrap(),
            dns_names,
            now,
            lifetime,
        )
        .unwrap();
        TlsIdentity::from_pem(&p.cert_pem, &p.key_pem, self.ca.cert_pem()).unwrap()
    }

    pub(crate) fn identity(&self, role: Role, id: &str) -> TlsIdentity {
        let dns = match role {
            Role::Broker => vec![broker_server_name(id)],
            _ => vec![],
        };
        self.identity_with(role, id, dns, SystemTime::now(), Duration::from_secs(3600))
    }

    pub(crate) fn server_tls(&self, id: &TlsIdentity) -> Arc<rustls::ServerConfig> {
        Arc::new(server_config(id, ClientAuth::Required, &[ALPN], false).unwrap())
    }

    /// A client config trusting this org's CA, presenting `id`.
    pub(crate) fn client_tls(&self, id: Option<&TlsIdentity>) -> Arc<rustls::ClientConfig> {
        Arc::new(client_config(&self.ca.cert_der(), id, &[ALPN], false).unwrap())
    }

    pub(crate) fn agent(&self) -> Arc<rustls::ClientConfig> {
        self.client_tls(Some(&self.identity(Role::Agent, "dev1")))
    }

    pub(crate) fn connector(&self) -> Arc<rustls::ClientConfig> {
        self.client_tls(Some(&self.identity(Role::Connector, "c1")))
    }

    /// A broker listener on both transports.
    pub(crate) async fn listener(&self, cfg: LinkConfig) -> Listener {
        let id = self.identity(Role::Broker, BROKER);
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Listener::bind(Some(lo), Some(lo), self.server_tls(&id), cfg)
            .await
            .unwrap()
    }
}

pub(crate) fn addr(l: &Listener, t: Transport) -> SocketAddr {
    match t {
        Transport::Quic => l.quic_addr().unwrap(),
        Transport::Tls => l.tcp_addr().unwrap(),
    }
}

pub(crate) fn server_name() -> String {
    broker_server_name(BROKER)
}

/// Test deadline for anything that should happen promptly.
pub(crate) async fn soon<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Deterministic pseudo-random bytes.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
