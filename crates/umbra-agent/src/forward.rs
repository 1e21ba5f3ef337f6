//! Local port forwarding: every TCP connection accepted on a local address becomes one stream
//! to a service through the broker fabric. One [`Forwarder`] serves any number of
//! services, each on its own address, over one session.
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

/// Running local forwards: one or more services, each on its own local address, over one
/// session (one link to the nearest broker, one certificate renewal, one broker-list
/// follower), however many there are.
pub struct Forwarder {
    forwards: Vec<(String, SocketAddr)>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// Set to the expiry time once the certificate expired without a renewal.
    expired: tokio::sync::watch::Receiver<Option<SystemTime>>,
}

impl Forwarder {
    /// Binds `listen`, picks the nearest broker and starts accepting connections for
    /// `service`. Brokers are not required to be reachable yet: each connection tries them.
    pub async fn start(
        cfg: AgentConfig,
        service: &str,
        listen: SocketAddr,
    ) -> Result<Forwarder, AgentError> {
        Self::start_many(cfg, &[(service.to_owned(), listen)]).await
    }

    /// [`Forwarder::start`] for several `(service, listen)` pairs at once, sharing one
    /// session. Every pair is checked and every address bound before anything starts: one
    /// bad pair fails the whole call.
    pub async fn start_many(
        cfg: AgentConfig,
        forwards: &[(String, SocketAddr)],
    ) -> Result<Forwarder, AgentError> {
        cfg.validate()?;
        if forwards.is_empty() {
            return Err(AgentError::NoForward);
        }
        for (service, listen) in forwards {
            if !umbra_proto::valid_name(service) {
                return Err(AgentError::ServiceName(service.clone()));
            }
            if !listen_allowed(*listen, cfg.allow_remote_clients) {
                return Err(AgentError::RemoteListen(*listen));
            }
        }
        // An expired certificate renews (within the controller's grace) before anything
        // binds; a valid one is the background renewal's from here.
        let (id, cref, _) =
            identity::load_usable(&cfg, SystemTime::now(), identity::RenewWhen::Expired).await?;
        let mut listeners = Vec::with_capacity(forwards.len());
        for (service, listen) in forwards {
            let listener = TcpListener::bind(listen)
                .await
                .map_err(|e| AgentError::Listen(*listen, e))?;
            let local = listener
                .local_addr()
                .map_err(|e| AgentError::Listen(*listen, e))?;
            if !listen_allowed(local, false) {
                tracing::warn!(
                    %service,
                    listen = %local,
                    "forward open to other hosts (allow_remote_clients): they reach the service as this device's user"
                );
            }
            listeners.push((service.clone(), local, listener));
        }

        let id = Arc::new(id);
        let cref = identity::refresh_brokers(&cfg, &id, cref).await;
        let identity_rx = spawn_renewal(cfg.identity_dir.clone(), id);
        let session = Arc::new(
            Session::connect(cfg.clone(), identity_rx.clone(), cref.brokers.clone()).await,
        );

        let cancel = CancellationToken::new();
        let bound: Vec<(String, SocketAddr)> = listeners
            .iter()
            .map(|(service, local, _)| (service.clone(), *local))
            .collect();
        let accepting = listeners
            .into_iter()
            .map(|(service, local, listener)| {
                tracing::info!(%service, listen = %local, "forwarding");
                let span = tracing::info_span!("forward", %service, listen = %local);
                tokio::spawn(
                    accept(
                        listener,
                        session.clone(),
                        Arc::from(service),
                        cfg.idle_timeout(),
                        cancel.clone(),
                    )
                    .instrument(span),
                )
            })
            .collect();
        let (expired_tx, expired) = tokio::sync::watch::channel(None);
        tokio::spawn(watch_expiry(
            identity_rx.clone(),
            expired_tx,
            cancel.clone(),
        ));
        let services: Vec<&str> = bound.iter().map(|(s, _)| s.as_str()).collect();
        let span = tracing::info_span!("forwards", services = %services.join(","));
        let task = tokio::spawn(
            run(accepting, session, cfg, identity_rx, cref, cancel.clone()).instrument(span),
        );
        Ok(Forwarder {
            forwards: bound,
            cancel,
            task: Some(task),
            expired,
        })
    }

    /// Waits until the forwards stop by themselves: the certificate expired without a
    /// renewal (a suspend past its expiry, a controller away too long). Then nothing can be
    /// forwarded any more; the error says to enroll again.
    pub async fn failed(&mut self) -> AgentError {
        let at = match self.expired.wait_for(Option::is_some).await {
            Ok(at) => *at,
            // The watcher is gone only once the forwarder is shutting down.
            Err(_) => None,
        };
        match at {
            Some(at) => AgentError::Expired(umbra_pki::rfc3339(at)),
            None => std::future::pending().await,
        }
    }

    /// The address actually bound for the first forward (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.forwards[0].1
    }

    /// The service of the first forward.
    pub fn service(&self) -> &str {
        &self.forwards[0].0
    }

    /// Every forward: the service and the address actually bound, in the order given.
    pub fn forwards(&self) -> &[(String, SocketAddr)] {
        &self.forwards
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

/// Waits for the certificate in use to expire without a renewal; then says so, stops every
/// forward (a connection it accepted could only be refused) and reports the expiry.
async fn watch_expiry(
    identity: tokio::sync::watch::Receiver<Arc<umbra_pki::TlsIdentity>>,
    expired: tokio::sync::watch::Sender<Option<SystemTime>>,
    cancel: CancellationToken,
) {
    let at = tokio::select! {
        () = cancel.cancelled() => return,
        at = umbra_link::enroll::until_expired(identity) => at,
    };
    let e = AgentError::Expired(umbra_pki::rfc3339(at));
    tracing::error!(error = %e, "certificate expired without a renewal; forwards stopped");
    let _ = expired.send(Some(at));
    cancel.cancel();
}

/// Follows the broker list for the session until `cancel`, then waits for the accept loops
/// and closes the session.
async fn run(
    accepting: Vec<JoinHandle<()>>,
    session: Arc<Session>,
    cfg: AgentConfig,
    identity_rx: tokio::sync::watch::Receiver<Arc<umbra_pki::TlsIdentity>>,
    cref: umbra_link::enroll::ControllerRef,
    cancel: CancellationToken,
) {
    let reprobing = tokio::spawn(reprobe(session.clone(), cfg.reprobe(), cancel.clone()));
    refresh_brokers(session.clone(), cfg, identity_rx, cref, cancel).await;
    let _ = reprobing.await;
    for a in accepting {
        let _ = a.await;
    }
    session.close().await;
}

/// Measures the brokers again while the forwards run: every `every` while new streams are not
/// going to the nearest broker (after a failover, or a network change that broke the link),
/// and every ten times that otherwise (distances change when the device moves).
async fn reprobe(session: Arc<Session>, every: Duration, cancel: CancellationToken) {
    let mut ticks: u32 = 0;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(10) || session.off_nearest().await {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = session.reprobe() => {}
            }
        }
    }
}

/// Accepts local connections for one service until `cancel`; each is relayed over its own
/// stream.
async fn accept(
    listener: TcpListener,
    session: Arc<Session>,
    service: Arc<str>,
    idle: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let span = tracing::debug_span!("conn", %peer);
                    tokio::spawn(
                        forward_one(tcp, session.clone(), service.clone(), idle).instrument(span),
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
}

/// Follows the broker list (a long poll on the controller, see
/// [`umbra_link::follow_broker_list`]); a changed list is remembered in `controller.json` and
/// goes to the session, which stops using (and closes its links to) a broker no longer
/// listed. Retries wait at most `broker_retry_max_secs`.
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
        cfg.broker_retry_max(),
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
    // The hold keeps the link this connection rides from being closed as idle.
    let (stream, _hold) = match session.open(&service).await {
        Ok(s) => {
            count_stream("ok");
            s
        }
        Err(OpenError::Denied(_)) => {
            count_stream("denied");
            tracing::warn!("access to {service} denied");
            umbra_link::reset_tcp(tcp);
            return;
        }
        Err(e) => {
            count_stream(match e {
                OpenError::Unavailable(_) => "unavailable",
                OpenError::NoBroker(_) => "no_broker",
                OpenError::RateLimited(_) => "rate_limited",
                _ => "error",
            });
            tracing::warn!(error = %e, "cannot open a stream to {service}");
            umbra_link::reset_tcp(tcp);
            return;
        }
    };
    let counters = Counters::default();
    match umbra_link::relay_tcp(tcp, stream, umbra_link::TcpEnd::Client, idle, &counters).await {
        Ok(()) => tracing::debug!(
            up = counters.up.load(std::sync::atomic::Ordering::Relaxed),
            down = counters.down.load(std::sync::atomic::Ordering::Relaxed),
            "connection closed"
        ),
        Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
    }
}

/// `umbra_agent_streams_total{result}`: local connections by how their stream open ended
/// (`ok`, `denied`, `unavailable`, `no_broker`, `rate_limited`, `error`). Bytes and links are counted by
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
