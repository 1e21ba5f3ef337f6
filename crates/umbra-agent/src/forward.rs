//! Local port forwarding: every TCP connection accepted on a local address becomes one stream
//! to a service through the broker fabric.
//!
//! Owns the local listener and the per-connection task (open a stream via the session, then
//! relay). Refusals are per connection: a denied connection is closed and logged, and the
//! forwarder goes on accepting.
//!
//! Whoever connects to a forward reaches the service as this device's user: the broker sees
//! only the device. So a forward listens on loopback unless the configuration says
//! `allow_remote_clients` ([`listen_allowed`]); access stays one user on one device.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use umbra_link::Counters;
use umbra_link::enroll::spawn_renewal;

use crate::config::AgentConfig;
use crate::session::{OpenError, Session};
use crate::{AgentError, identity};

/// Whether a forward may listen on `addr`: loopback always (IPv4-mapped loopback included),
/// any other address (`0.0.0.0` and `::` too) only when remote clients are allowed. Pure.
pub(crate) fn listen_allowed(addr: SocketAddr, allow_remote_clients: bool) -> bool {
    allow_remote_clients || addr.ip().to_canonical().is_loopback()
}

/// A running local forwarder for one service.
pub struct Forwarder {
    local_addr: SocketAddr,
    service: String,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Binds `listen`, picks the nearest broker and starts accepting connections for
    /// `service`. Brokers are not required to be reachable yet: each connection tries them.
    pub async fn start(
        cfg: AgentConfig,
        service: &str,
        listen: SocketAddr,
    ) -> Result<Forwarder, AgentError> {
        cfg.validate()?;
        if !umbra_proto::valid_name(service) {
            return Err(AgentError::ServiceName(service.to_owned()));
        }
        if !listen_allowed(listen, cfg.allow_remote_clients) {
            return Err(AgentError::RemoteListen(listen));
        }
        if !listen_allowed(listen, false) {
            tracing::warn!(
                %service,
                %listen,
                "forward open to other hosts (allow_remote_clients): they reach the service as this device's user"
            );
        }
        let (id, cref) = identity::load(&cfg.identity_dir, SystemTime::now())?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| AgentError::Listen(listen, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| AgentError::Listen(listen, e))?;

        let id = Arc::new(id);
        let cref = identity::refresh_brokers(&cfg, &id, cref).await;
        let identity_rx = spawn_renewal(cfg.identity_dir.clone(), id);
        let session = Arc::new(
            Session::connect(cfg.clone(), identity_rx.clone(), cref.brokers.clone()).await,
        );

        let cancel = CancellationToken::new();
        let span = tracing::info_span!("forward", %service, listen = %local_addr);
        let task = tokio::spawn(
            run(
                listener,
                session,
                service.to_owned(),
                cfg,
                identity_rx,
                cref,
                cancel.clone(),
            )
            .instrument(span),
        );
        tracing::info!(%service, listen = %local_addr, "forwarding");
        Ok(Forwarder {
            local_addr,
            service: service.to_owned(),
            cancel,
            task: Some(task),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The service forwarded to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Stops accepting and closes the broker link (connections in flight are cut).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn run(
    listener: TcpListener,
    session: Arc<Session>,
    service: String,
    cfg: AgentConfig,
    identity_rx: tokio::sync::watch::Receiver<Arc<umbra_pki::TlsIdentity>>,
    cref: umbra_link::enroll::ControllerRef,
    cancel: CancellationToken,
) {
    let service: Arc<str> = Arc::from(service);
    // Its own task: a slow controller must not hold up accepting connections.
    let refresher = tokio::spawn(
        refresh_brokers(
            session.clone(),
            cfg.clone(),
            identity_rx,
            cref,
            cancel.clone(),
        )
        .in_current_span(),
    );
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let span = tracing::debug_span!("conn", %peer);
                    tokio::spawn(
                        forward_one(tcp, session.clone(), service.clone(), cfg.idle_timeout())
                            .instrument(span),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = refresher.await;
    session.close().await;
}

/// Follows the broker list (a long poll on the controller, see
/// [`umbra_link::follow_broker_list`]); a changed list is remembered in `controller.json` and
/// goes to the session, which stops using (and closes its links to) a broker no longer
/// listed. Retries wait at most `broker_refresh_secs`.
async fn refresh_brokers(
    session: Arc<Session>,
    cfg: AgentConfig,
    identity_rx: tokio::sync::watch::Receiver<Arc<umbra_pki::TlsIdentity>>,
    cref: umbra_link::enroll::ControllerRef,
    cancel: CancellationToken,
) {
    let url = cref.url.clone();
    let held = cref.brokers.clone();
    let mut cref = cref;
    umbra_link::follow_broker_list(
        &url,
        identity_rx,
        held,
        cfg.broker_refresh(),
        cancel,
        |brokers| {
            tracing::info!(brokers = brokers.len(), "broker list updated");
            identity::remember_brokers(&cfg, &mut cref, brokers.clone());
            let session = session.clone();
            async move { session.update_brokers(brokers).await }
        },
    )
    .await;
}

async fn forward_one(tcp: TcpStream, session: Arc<Session>, service: Arc<str>, idle: Duration) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let stream = match session.open(&service).await {
        Ok(s) => {
            count_stream("ok");
            s
        }
        Err(OpenError::Denied(_)) => {
            count_stream("denied");
            tracing::warn!("access to {service} denied");
            return;
        }
        Err(e) => {
            count_stream(match e {
                OpenError::Unavailable(_) => "unavailable",
                OpenError::NoBroker(_) => "no_broker",
                _ => "error",
            });
            tracing::warn!(error = %e, "cannot open a stream to {service}");
            return;
        }
    };
    let counters = Counters::default();
    match umbra_link::relay_tcp(tcp, stream, idle, &counters).await {
        Ok(()) => tracing::debug!(
            up = counters.up.load(std::sync::atomic::Ordering::Relaxed),
            down = counters.down.load(std::sync::atomic::Ordering::Relaxed),
            "connection closed"
        ),
        Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
    }
}

/// `umbra_agent_streams_total{result}`: local connections by how their stream open ended
/// (`ok`, `denied`, `unavailable`, `no_broker`, `error`). Bytes and links are counted by
/// `umbra-link` (`umbra_relay_bytes_total`, `umbra_links`).
fn count_stream(result: &'static str) {
    metrics::counter!("umbra_agent_streams_total", "result" => result).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_listen_on_loopback_unless_remote_clients_are_allowed() {
        let loopback = [
            "127.0.0.1:0",
            "127.0.0.2:8080",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
        ];
        let remote = [
            "0.0.0.0:8080",
            "[::]:0",
            "10.0.0.5:0",
            "192.168.1.2:22",
            "[::ffff:10.0.0.1]:0",
            "[::ffff:0.0.0.0]:0",
            "[fe80::1]:0",
        ];
        for a in loopback {
            let a: SocketAddr = a.parse().unwrap();
            assert!(listen_allowed(a, false), "{a}");
            assert!(listen_allowed(a, true), "{a}");
        }
        for a in remote {
            let a: SocketAddr = a.parse().unwrap();
            assert!(!listen_allowed(a, false), "{a}");
            assert!(listen_allowed(a, true), "{a}");
        }
    }
}
