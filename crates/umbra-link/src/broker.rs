//! Dialing a broker as the controller lists it: its addresses and server name, with the
//! transports a peer allows tried in order (QUIC first, TLS over TCP where UDP is blocked).
//! Shared by agents and connectors.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use umbra_pki::TlsIdentity;
use umbra_proto::api::BrokerInfo;

use crate::{Link, LinkConfig, LinkError, Transport};

/// Which transports to try when dialing a broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportPref {
    /// QUIC first, then TLS over TCP when QUIC fails (UDP blocked).
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl TransportPref {
    /// The transports to try, in order.
    pub fn order(self) -> &'static [Transport] {
        match self {
            TransportPref::Auto => &[Transport::Quic, Transport::Tls],
            TransportPref::Quic => &[Transport::Quic],
            TransportPref::Tcp => &[Transport::Tls],
        }
    }
}

impl TransportPref {
    /// The name used in configuration and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportPref::Auto => "auto",
            TransportPref::Quic => "quic",
            TransportPref::Tcp => "tcp",
        }
    }
}

impl fmt::Display for TransportPref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no transport preference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?} (expected \"auto\", \"quic\" or \"tcp\")")]
pub struct UnknownTransportPref(pub String);

impl FromStr for TransportPref {
    type Err = UnknownTransportPref;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TransportPref::Auto),
            "quic" => Ok(TransportPref::Quic),
            "tcp" => Ok(TransportPref::Tcp),
            other => Err(UnknownTransportPref(other.to_owned())),
        }
    }
}

/// Why no link to a broker came up.
#[derive(Debug, thiserror::Error)]
pub enum DialBrokerError {
    #[error("broker lists no address for any allowed transport")]
    NoAddress,
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] umbra_pki::PkiError),
    #[error("{transport}: {source}")]
    Link {
        transport: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("{0}: no handshake in time")]
    Timeout(&'static str),
}

/// Dials `broker` presenting `identity`, trying the transports `pref` allows in order, each
/// bounded by `bound`; the last failure is returned. QUIC offers only the post-quantum hybrid
/// key exchange (every broker speaks it); TLS over TCP offers it first.
pub async fn dial_broker(
    broker: &BrokerInfo,
    pref: TransportPref,
    identity: &TlsIdentity,
    link_cfg: &LinkConfig,
    bound: Duration,
) -> Result<Link, DialBrokerError> {
    dial_broker_with(broker, pref, identity, link_cfg, bound, resolve).await
}

async fn dial_broker_with<R, F>(
    broker: &BrokerInfo,
    pref: TransportPref,
    identity: &TlsIdentity,
    link_cfg: &LinkConfig,
    bound: Duration,
    resolve: R,
) -> Result<Link, DialBrokerError>
where
    R: Fn(String) -> F,
    F: Future<Output = Result<SocketAddr, DialBrokerError>>,
{
    let mut last = DialBrokerError::NoAddress;
    for &transport in pref.order() {
        let addr = match transport {
            Transport::Quic => broker.quic_addr.as_deref(),
            Transport::Tls => broker.tcp_addr.as_deref(),
        };
        let Some(addr) = addr else { continue };
        // A broker advertised by name: the resolver counts against the same bound (the
        // system's own timeout is 5 s or more, longer than a failover may take).
        let deadline = tokio::time::Instant::now() + bound;
        let addr = match tokio::time::timeout_at(deadline, resolve(addr.to_owned())).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                last = e;
                continue;
            }
            Err(_) => {
                last = DialBrokerError::Resolve(format!("{addr} (no answer in time)"));
                continue;
            }
        };
        let tls = umbra_pki::client_config(
            &identity.ca,
            Some(identity),
            &[crate::ALPN],
            transport == Transport::Quic,
        )?;
        let r = tokio::time::timeout_at(
            deadline,
            crate::dial(
                addr,
                &broker.server_name,
                transport,
                Arc::new(tls),
                link_cfg,
            ),
        )
        .await;
        match r {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(source)) => {
                tracing::debug!(broker = %broker.name, transport = transport.as_str(), error = %source, "dial failed");
                last = DialBrokerError::Link {
                    transport: transport.as_str(),
                    source,
                };
            }
            Err(_) => last = DialBrokerError::Timeout(transport.as_str()),
        }
    }
    Err(last)
}

async fn resolve(hostport: String) -> Result<SocketAddr, DialBrokerError> {
    if let Ok(a) = hostport.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(&hostport)
        .await
        .ok()
        .and_then(|mut it| it.next())
        .ok_or(DialBrokerError::Resolve(hostport))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_names_and_order() {
        for p in [TransportPref::Auto, TransportPref::Quic, TransportPref::Tcp] {
            assert_eq!(p.as_str().parse::<TransportPref>(), Ok(p));
        }
        assert!("udp".parse::<TransportPref>().is_err());
        assert_eq!(
            TransportPref::Auto.order(),
            &[Transport::Quic, Transport::Tls]
        );
    }

    #[tokio::test]
    async fn a_broker_without_addresses_is_an_error() {
        umbra_pki::install_crypto_provider();
        let b = BrokerInfo {
            id: "b".into(),
            name: "b".into(),
            quic_addr: None,
            tcp_addr: None,
            server_name: "b.broker.umbra.internal".into(),
        };
        let ca = umbra_pki::Ca::generate("default", std::time::SystemTime::now()).unwrap();
        let id = umbra_pki::test_util::identity(&ca, umbra_proto::Role::Agent, "d1").unwrap();
        let r = dial_broker(
            &b,
            TransportPref::Auto,
            &id,
            &LinkConfig::default(),
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(r, Err(DialBrokerError::NoAddress)));
    }

    /// A broker listed by a name the resolver does not answer for: the dial gives up within
    /// its bound, for each transport, instead of waiting for the system resolver's timeout.
    /// (Paused time: the bound passes as soon as nothing else can happen.)
    #[tokio::test(start_paused = true)]
    async fn a_resolver_that_does_not_answer_counts_against_the_bound() {
        umbra_pki::install_crypto_provider();
        let b = BrokerInfo {
            id: "b".into(),
            name: "b".into(),
            quic_addr: Some("b.example.test:7401".into()),
            tcp_addr: Some("b.example.test:7401".into()),
            server_name: "b.broker.umbra.internal".into(),
        };
        let ca = umbra_pki::Ca::generate("default", std::time::SystemTime::now()).unwrap();
        let id = umbra_pki::test_util::identity(&ca, umbra_proto::Role::Agent, "d1").unwrap();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let t0 = tokio::time::Instant::now();
        let r = dial_broker_with(
            &b,
            TransportPref::Auto,
            &id,
            &LinkConfig::default(),
            Duration::from_secs(1),
            |_| {
                asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::future::pending()
            },
        )
        .await;
        assert!(
            matches!(&r, Err(DialBrokerError::Resolve(m)) if m.contains("no answer in time")),
            "{:?}",
            r.err()
        );
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
    }
}
