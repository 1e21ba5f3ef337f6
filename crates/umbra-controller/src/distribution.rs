//! Snapshot building and distribution to brokers and connectors.
//!
//! The snapshot version is a counter in the database, bumped in the same transaction as every
//! change that can alter what a broker decides. After the commit, the new version is published
//! on a `watch` channel; long-polling requests (`GET /v1/snapshot?after=N`,
//! `GET /v1/connector/config?after=N`, and `GET /v1/brokers?have=TAG`, which looks again at
//! every version) wait on it and answer as soon as the version passes `N`, or with 204 when
//! their wait ends. A request whose `N` is above the store's version (the store was
//! restored from a backup) is answered at once with the store's state ([`follow_store`] also
//! reads the stored version back every second, so that a change committed by a request
//! dropped before it announced it is not missed). One peer identity may have at most
//! [`MAX_WAITING_PER_PEER`] of them waiting. Snapshots are built from one read transaction,
//! so a snapshot is always a consistent view at its version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqliteConnection;
use tokio::sync::watch;
use umbra_proto::api::{ConnectorConfig, PublishedTarget};
use umbra_proto::snapshot::{
    ConnectorFacts, DeviceFacts, PolicyText, ServiceFacts, Snapshot, UserFacts,
};

use crate::store::peers::{self, Kind};
use crate::store::{self, SNAPSHOT_VERSION, admin};
use umbra_link::quota::{Place, Quota};

/// Publishes committed snapshot versions to waiting requests.
pub(crate) struct Distribution {
    tx: watch::Sender<u64>,
    /// Long polls waiting now, per peer identity.
    waiting: Arc<Quota>,
}

/// Long polls one peer identity may have waiting at once. Each holds a task and a connection
/// on the controller for up to 25 s; an agent runs one per `umbra agent forward` process
/// (which forwards any number of services), a connector two, a broker one, so this leaves
/// room for many forwards on one device while bounding what one stolen or misbehaving
/// identity can hold.
pub(crate) const MAX_WAITING_PER_PEER: usize = 16;

impl Distribution {
    pub(crate) fn new(version: u64) -> Self {
        metrics::gauge!("umbra_snapshot_version").set(version as f64);
        Distribution {
            tx: watch::Sender::new(version),
            waiting: Quota::new(MAX_WAITING_PER_PEER),
        }
    }

    /// A place for one more long poll of `peer` (its identity URI), or `None` when it already
    /// has [`MAX_WAITING_PER_PEER`] waiting. Hold it for as long as the request waits.
    pub(crate) fn wait_slot(&self, peer: &str) -> Option<Place> {
        self.waiting.take(peer)
    }

    /// Announces `version` (ignored if not newer than the one announced).
    pub(crate) fn publish(&self, version: u64) {
        let changed = self.tx.send_if_modified(|cur| {
            if version > *cur {
                *cur = version;
                true
            } else {
                false
            }
        });
        if changed {
            metrics::gauge!("umbra_snapshot_version").set(version as f64);
        }
    }

    pub(crate) fn current(&self) -> u64 {
        *self.tx.borrow()
    }

    /// Requests in [`Distribution::wait_newer`] now (each subscribed: a publish wakes it).
    pub(crate) fn waiting_now(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Waits until the published version exceeds `after`, at most `wait`, or until shutdown.
    /// Returns the version, or `None` if the wait ended first.
    pub(crate) async fn wait_newer(
        &self,
        after: u64,
        wait: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<u64> {
        let mut rx = self.tx.subscribe();
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            let v = *rx.borrow_and_update();
            if v > after {
                return Some(v);
            }
            if *shutdown.borrow() {
                return None;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return None },
                _ = &mut deadline => return None,
                r = shutdown.changed() => if r.is_err() { return None },
            }
        }
    }
}

/// Builds the organisation's snapshot from the store (call within one read transaction).
pub(crate) async fn build_snapshot(
    c: &mut SqliteConnection,
    org: &str,
    now_secs: i64,
) -> Result<Snapshot, sqlx::Error> {
    let version = store::counter(c, org, SNAPSHOT_VERSION).await?;
    let users = admin::list_users(c, org)
        .await?
        .into_iter()
        .map(|u| UserFacts {
            id: u.id,
            groups: u.groups,
            disabled: u.disabled,
        })
        .collect();
    let groups = admin::group_names(c, org).await?;
    let devices = peers::peer_list(c, org, Kind::Device, &peers::PeerPage::ALL)
        .await?
        .into_iter()
        .map(|d| DeviceFacts {
            id: d.id,
            user: d.owner,
            revoked: d.revoked_at.is_some(),
        })
        .collect();
    let connector_rows = peers::peer_list(c, org, Kind::Connector, &peers::PeerPage::ALL).await?;
    // name -> ids of the live connectors carrying it (several instances may share a name).
    let mut live_by_name: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in connector_rows.iter().filter(|r| r.revoked_at.is_none()) {
        live_by_name.entry(&r.owner).or_default().push(r.id.clone());
    }
    let service_conns = admin::service_connector_names(c, org).await?;
    let services = admin::list_services(c, org)
        .await?
        .into_iter()
        .map(|s| {
            let mut ids: Vec<String> = service_conns
                .get(&s.name)
                .into_iter()
                .flatten()
                .flat_map(|n| live_by_name.get(n.as_str()).cloned().unwrap_or_default())
                .collect();
            ids.sort();
            ids.dedup();
            ServiceFacts {
                name: s.name,
                target: s.target,
                connectors: ids,
            }
        })
        .collect();
    let connectors = connector_rows
        .iter()
        .map(|r| ConnectorFacts {
            id: r.id.clone(),
            name: r.owner.clone(),
            revoked: r.revoked_at.is_some(),
        })
        .collect();
    let brokers = peers::broker_infos(c, org).await?;
    let policies = admin::list_policies(c, org)
        .await?
        .into_iter()
        .map(|p| PolicyText {
            id: p.name,
            text: p.text,
        })
        .collect();
    let revoked_serials = peers::revoked_serials(c, org, now_secs).await?;
    Ok(Snapshot {
        version,
        org: org.to_owned(),
        issued_at: store::to_u64(now_secs),
        users,
        groups,
        devices,
        connectors,
        brokers,
        services,
        policies,
        revoked_serials,
        token_keys: Vec::new(),
    })
}

/// The targets published to connector `id` (named by services that list its name).
pub(crate) async fn connector_config(
    c: &mut SqliteConnection,
    org: &str,
    connector_id: &str,
    connector_name: &str,
) -> Result<ConnectorConfig, sqlx::Error> {
    let version = store::counter(c, org, SNAPSHOT_VERSION).await?;
    let conns = admin::service_connector_names(c, org).await?;
    let targets = admin::list_services(c, org)
        .await?
        .into_iter()
        .filter(|s| {
            conns
                .get(&s.name)
                .is_some_and(|names| names.iter().any(|n| n == connector_name))
        })
        .map(|s| PublishedTarget {
            service: s.name,
            target: s.target,
        })
        .collect();
    Ok(ConnectorConfig {
        connector_id: connector_id.to_owned(),
        version,
        targets,
    })
}

/// How often the committed version is read back from the store (see [`follow_store`]).
pub(crate) const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Publishes the store's committed version every `every`, until shutdown. A change is
/// normally published right after its commit; but a request dropped between the two (its
/// client reset the stream while the commit was in flight: the commit stands, the publish
/// never runs) would leave brokers confirming the older snapshot as current until some
/// unrelated change. This bounds that to `every`. A read that fails is retried next time.
pub(crate) async fn follow_store(
    store: &store::Store,
    org: &str,
    dist: &Distribution,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
        }
        let read = async {
            let mut r = store.read().await?;
            store::counter(&mut r, org, SNAPSHOT_VERSION).await
        };
        match read.await {
            Ok(v) => dist.publish(v),
            Err(e) => tracing::debug!(error = %e, "cannot read the snapshot version"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version committed without being published (the request was dropped in between)
    /// reaches long polls anyway; shutdown ends the follower.
    #[tokio::test]
    async fn a_committed_version_is_published_even_if_its_request_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = store::Store::open(&store::Database::File(dir.path().join("t.db")), "t")
            .await
            .unwrap();
        let dist = Distribution::new(0);
        let (stop, shutdown) = watch::channel(false);
        let follower = follow_store(&s, "t", &dist, Duration::from_millis(20), shutdown.clone());
        let changed = async {
            let mut w = s.write().await.unwrap();
            let v = store::bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap();
            w.commit().await.unwrap();
            // No publish: the request that made the change is gone.
            dist.wait_newer(0, Duration::from_secs(5), shutdown.clone())
                .await
                .map(|seen| (v, seen))
        };
        tokio::pin!(follower);
        let got = tokio::select! {
            got = changed => got,
            () = &mut follower => panic!("the follower stopped"),
        };
        assert_eq!(got, Some((1, 1)));
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), follower)
            .await
            .expect("the follower ends at shutdown");
    }

    #[tokio::test]
    async fn wait_newer_wakes_on_publish_and_times_out() {
        let d = std::sync::Arc::new(Distribution::new(3));
        let (_tx, rx) = watch::channel(false);
        assert_eq!(
            d.wait_newer(2, Duration::from_secs(25), rx.clone()).await,
            Some(3)
        );
        assert_eq!(
            d.wait_newer(3, Duration::from_millis(20), rx.clone()).await,
            None
        );
        let d2 = d.clone();
        let rx2 = rx.clone();
        let waiter =
            tokio::spawn(async move { d2.wait_newer(3, Duration::from_secs(25), rx2).await });
        tokio::task::yield_now().await;
        d.publish(4);
        assert_eq!(waiter.await.unwrap(), Some(4));
        d.publish(2);
        assert_eq!(d.current(), 4);
    }

    #[tokio::test]
    async fn wait_newer_ends_on_shutdown() {
        let d = Distribution::new(1);
        let (tx, rx) = watch::channel(false);
        let w = d.wait_newer(1, Duration::from_secs(25), rx);
        tokio::pin!(w);
        tokio::select! {
            _ = &mut w => panic!("returned early"),
            _ = tokio::task::yield_now() => {}
        }
        tx.send(true).unwrap();
        assert_eq!(w.await, None);
    }
}
