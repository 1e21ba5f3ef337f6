//! Statements for the CA, admin and enrollment tokens, enrolled peers (devices, connectors,
//! brokers), the certificates issued to them, and the audit trail.

use std::collections::BTreeMap;

use sqlx::sqlite::SqliteRow;
use sqlx::{FromRow, Row, SqliteConnection};
use umbra_proto::Role;
use umbra_proto::api::{AuditEntry, AuditRecord, BrokerInfo};

use super::{to_i64, to_u64};

// ---------------------------------------------------------------------------------------------
// CA and admin tokens

/// `(cert_pem, sealed_key)` of the organisation's CA, if created.
pub(crate) async fn ca_load(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT cert_pem, sealed_key FROM ca WHERE org = $1")
        .bind(org)
        .fetch_optional(c)
        .await
}

pub(crate) async fn ca_insert(
    c: &mut SqliteConnection,
    org: &str,
    cert_pem: &str,
    sealed_key: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO ca (org, cert_pem, sealed_key, created_at) VALUES ($1, $2, $3, $4)")
        .bind(org)
        .bind(cert_pem)
        .bind(sealed_key)
        .bind(now)
        .execute(c)
        .await?;
    Ok(())
}

pub(crate) async fn admin_token_hashes(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT hash FROM admin_tokens WHERE org = $1")
        .bind(org)
        .fetch_all(c)
        .await
}

/// Deletes every admin token of `org`; returns how many there were.
pub(crate) async fn admin_tokens_delete(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query("DELETE FROM admin_tokens WHERE org = $1")
        .bind(org)
        .execute(c)
        .await?;
    Ok(r.rows_affected())
}

pub(crate) async fn admin_token_insert(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    hash: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO admin_tokens (org, id, hash, created_at) VALUES ($1, $2, $3, $4)")
        .bind(org)
        .bind(id)
        .bind(hash)
        .bind(now)
        .execute(c)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Enrollment tokens

/// A stored enrollment token (its secret is not stored, only `hash`).
#[derive(Debug, Clone)]
pub(crate) struct TokenRow {
    pub(crate) id: String,
    pub(crate) hash: String,
    pub(crate) role: String,
    pub(crate) user_id: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) used_at: Option<i64>,
    pub(crate) used_by: Option<String>,
}

pub(crate) async fn token_insert(
    c: &mut SqliteConnection,
    org: &str,
    t: &TokenRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO enroll_tokens (org, id, hash, role, user_id, name, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(org)
    .bind(&t.id)
    .bind(&t.hash)
    .bind(&t.role)
    .bind(&t.user_id)
    .bind(&t.name)
    .bind(t.created_at)
    .bind(t.expires_at)
    .execute(c)
    .await?;
    Ok(())
}

/// Deletes the enrollment tokens used, or expired, before `before` (Unix seconds), and returns
/// how many: their use is in the audit log, and a token list that only grows would hide the
/// ones still pending.
pub(crate) async fn tokens_forget_before(
    c: &mut SqliteConnection,
    org: &str,
    before: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM enroll_tokens WHERE org = $1 AND (used_at < $2 OR expires_at < $2)",
    )
    .bind(org)
    .bind(before)
    .execute(c)
    .await?;
    Ok(done.rows_affected())
}

pub(crate) async fn token_list(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<TokenRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, hash, role, user_id, name, created_at, expires_at, used_at, used_by \
         FROM enroll_tokens WHERE org = $1 ORDER BY created_at, id",
    )
    .bind(org)
    .fetch_all(c)
    .await
}

pub(crate) async fn token_by_hash(
    c: &mut SqliteConnection,
    org: &str,
    hash: &str,
) -> Result<Option<TokenRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, hash, role, user_id, name, created_at, expires_at, used_at, used_by \
         FROM enroll_tokens WHERE org = $1 AND hash = $2",
    )
    .bind(org)
    .bind(hash)
    .fetch_optional(c)
    .await
}

/// Marks the token used if, and only if, it is unused and unexpired. The single conditional
/// `UPDATE` is what makes redemption atomic: of concurrent redeemers exactly one sees `true`.
pub(crate) async fn token_redeem(
    c: &mut SqliteConnection,
    org: &str,
    hash: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE enroll_tokens SET used_at = $1 \
         WHERE hash = $2 AND org = $3 AND used_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(hash)
    .bind(org)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub(crate) async fn token_set_used_by(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    used_by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE enroll_tokens SET used_by = $1 WHERE org = $2 AND id = $3")
        .bind(used_by)
        .bind(org)
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

pub(crate) async fn token_delete(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM enroll_tokens WHERE org = $1 AND id = $2")
        .bind(org)
        .bind(id)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Whether an unused, unexpired token of `role` will create a peer called `name`.
pub(crate) async fn name_reserved_by_token(
    c: &mut SqliteConnection,
    org: &str,
    role: Role,
    name: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let v: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM enroll_tokens WHERE org = $1 AND role = $2 AND name = $3 \
         AND used_at IS NULL AND expires_at > $4 LIMIT 1",
    )
    .bind(org)
    .bind(role.as_str())
    .bind(name)
    .bind(now)
    .fetch_optional(c)
    .await?;
    Ok(v.is_some())
}

impl<'r> FromRow<'r, SqliteRow> for TokenRow {
    fn from_row(row: &'r SqliteRow) -> Result<Self, sqlx::Error> {
        Ok(TokenRow {
            id: row.try_get("id")?,
            hash: row.try_get("hash")?,
            role: row.try_get("role")?,
            user_id: row.try_get("user_id")?,
            name: row.try_get("name")?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            used_at: row.try_get("used_at")?,
            used_by: row.try_get("used_by")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Enrolled peers

/// The three kinds of enrolled peer, each with its own table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Device,
    Connector,
    Broker,
}

impl Kind {
    pub(crate) fn from_role(role: Role) -> Option<Kind> {
        match role {
            Role::Agent => Some(Kind::Device),
            Role::Connector => Some(Kind::Connector),
            Role::Broker => Some(Kind::Broker),
            Role::Controller => None,
        }
    }

    pub(crate) fn role(self) -> Role {
        match self {
            Kind::Device => Role::Agent,
            Kind::Connector => Role::Connector,
            Kind::Broker => Role::Broker,
        }
    }

    /// What an error message calls one.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Connector => "connector",
            Kind::Broker => "broker",
        }
    }

    /// Prefix of generated ids (`d-…`, `c-…`, `b-…`).
    pub(crate) fn id_prefix(self) -> &'static str {
        match self {
            Kind::Device => "d",
            Kind::Connector => "c",
            Kind::Broker => "b",
        }
    }
}

/// A stored peer of any kind. `owner` is the user (devices) or the name (connectors, brokers).
#[derive(Debug, Clone)]
pub(crate) struct PeerRow {
    pub(crate) id: String,
    pub(crate) owner: String,
    pub(crate) created_at: i64,
    pub(crate) revoked_at: Option<i64>,
}

impl<'r> FromRow<'r, SqliteRow> for PeerRow {
    fn from_row(row: &'r SqliteRow) -> Result<Self, sqlx::Error> {
        Ok(PeerRow {
            id: row.try_get("id")?,
            owner: row.try_get("owner")?,
            created_at: row.try_get("created_at")?,
            revoked_at: row.try_get("revoked_at")?,
        })
    }
}

pub(crate) async fn device_insert(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    user: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO devices (org, id, user_id, created_at) VALUES ($1, $2, $3, $4)")
        .bind(org)
        .bind(id)
        .bind(user)
        .bind(now)
        .execute(c)
        .await?;
    Ok(())
}

pub(crate) async fn connector_insert(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    name: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO connectors (org, id, name, created_at) VALUES ($1, $2, $3, $4)")
        .bind(org)
        .bind(id)
        .bind(name)
        .bind(now)
        .execute(c)
        .await?;
    Ok(())
}

pub(crate) async fn broker_insert(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    name: &str,
    server_name: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO brokers (org, id, name, created_at, server_name) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(org)
    .bind(id)
    .bind(name)
    .bind(now)
    .bind(server_name)
    .execute(c)
    .await?;
    Ok(())
}

pub(crate) async fn peer_get(
    c: &mut SqliteConnection,
    org: &str,
    kind: Kind,
    id: &str,
) -> Result<Option<PeerRow>, sqlx::Error> {
    let sql = match kind {
        Kind::Device => {
            "SELECT id, user_id AS owner, created_at, revoked_at FROM devices WHERE org = $1 AND id = $2"
        }
        Kind::Connector => {
            "SELECT id, name AS owner, created_at, revoked_at FROM connectors WHERE org = $1 AND id = $2"
        }
        Kind::Broker => {
            "SELECT id, name AS owner, created_at, revoked_at FROM brokers WHERE org = $1 AND id = $2"
        }
    };
    sqlx::query_as(sql)
        .bind(org)
        .bind(id)
        .fetch_optional(c)
        .await
}

/// Which peers a listing returns: all of one owner (a device's user, a connector's name), and a
/// page of them, in enrollment order, after the peer `after`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PeerPage<'a> {
    pub(crate) owner: Option<&'a str>,
    pub(crate) after: Option<&'a str>,
    pub(crate) limit: Option<i64>,
}

impl PeerPage<'_> {
    /// Every peer of the kind.
    pub(crate) const ALL: PeerPage<'static> = PeerPage {
        owner: None,
        after: None,
        limit: None,
    };
}

/// Peers of one kind in enrollment order (`created_at`, then id), as `page` selects. A page
/// after a peer that does not exist is empty (ids are never deleted, so the caller checks).
pub(crate) async fn peer_list(
    c: &mut SqliteConnection,
    org: &str,
    kind: Kind,
    page: &PeerPage<'_>,
) -> Result<Vec<PeerRow>, sqlx::Error> {
    let (table, owner) = match kind {
        Kind::Device => ("devices", "user_id"),
        Kind::Connector => ("connectors", "name"),
        Kind::Broker => ("brokers", "name"),
    };
    // Table and column names are the constants above; every value is bound, numbered in the
    // order it is bound.
    let mut sql =
        format!("SELECT id, {owner} AS owner, created_at, revoked_at FROM {table} WHERE org = $1");
    let mut n = 1;
    if page.owner.is_some() {
        n += 1;
        sql.push_str(&format!(" AND {owner} = ${n}"));
    }
    if page.after.is_some() {
        n += 1;
        sql.push_str(&format!(
            " AND (created_at, id) > (SELECT created_at, id FROM {table} WHERE org = $1 AND id = ${n})"
        ));
    }
    sql.push_str(" ORDER BY created_at, id");
    if page.limit.is_some() {
        n += 1;
        sql.push_str(&format!(" LIMIT ${n}"));
    }
    let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(org);
    if let Some(owner) = page.owner {
        q = q.bind(owner);
    }
    if let Some(after) = page.after {
        q = q.bind(after);
    }
    if let Some(limit) = page.limit {
        q = q.bind(limit);
    }
    q.fetch_all(c).await
}

/// Device id -> owner, for the devices among `ids` that are enrolled (any revocation state).
/// Looked up by key, a few hundred at a time: a broker's heartbeat names the devices of its
/// live streams, and must not cost a scan of every device ever enrolled.
pub(crate) async fn device_owners(
    c: &mut SqliteConnection,
    org: &str,
    ids: &std::collections::BTreeSet<&str>,
) -> Result<std::collections::HashMap<String, String>, sqlx::Error> {
    const CHUNK: usize = 256;
    let ids: Vec<&str> = ids.iter().copied().collect();
    let mut owners = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT id, user_id FROM devices WHERE org = $1 AND id IN ({})",
            marks.join(", ")
        );
        let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql)).bind(org);
        for id in chunk {
            q = q.bind(*id);
        }
        owners.extend(q.fetch_all(&mut *c).await?);
    }
    Ok(owners)
}

/// Connectors or brokers called `name` (any revocation state).
pub(crate) async fn peers_named(
    c: &mut SqliteConnection,
    org: &str,
    kind: Kind,
    name: &str,
) -> Result<Vec<PeerRow>, sqlx::Error> {
    let sql = match kind {
        Kind::Device => return Ok(Vec::new()),
        Kind::Connector => {
            "SELECT id, name AS owner, created_at, revoked_at FROM connectors WHERE org = $1 AND name = $2 ORDER BY created_at, id"
        }
        Kind::Broker => {
            "SELECT id, name AS owner, created_at, revoked_at FROM brokers WHERE org = $1 AND name = $2 ORDER BY created_at, id"
        }
    };
    sqlx::query_as(sql).bind(org).bind(name).fetch_all(c).await
}

/// Ids of the devices bound to `user`.
pub(crate) async fn devices_of_user(
    c: &mut SqliteConnection,
    org: &str,
    user: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM devices WHERE org = $1 AND user_id = $2 AND revoked_at IS NULL",
    )
    .bind(org)
    .bind(user)
    .fetch_all(c)
    .await
}

/// Marks the peer and every certificate issued to it revoked. Returns whether the peer was
/// not revoked before.
pub(crate) async fn peer_revoke(
    c: &mut SqliteConnection,
    org: &str,
    kind: Kind,
    id: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let sql = match kind {
        Kind::Device => {
            "UPDATE devices SET revoked_at = $1 WHERE org = $2 AND id = $3 AND revoked_at IS NULL"
        }
        Kind::Connector => {
            "UPDATE connectors SET revoked_at = $1 WHERE org = $2 AND id = $3 AND revoked_at IS NULL"
        }
        Kind::Broker => {
            "UPDATE brokers SET revoked_at = $1 WHERE org = $2 AND id = $3 AND revoked_at IS NULL"
        }
    };
    let r = sqlx::query(sql)
        .bind(now)
        .bind(org)
        .bind(id)
        .execute(&mut *c)
        .await?;
    sqlx::query(
        "UPDATE certificates SET revoked_at = $1 \
         WHERE org = $2 AND role = $3 AND subject = $4 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(org)
    .bind(kind.role().as_str())
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

// ---------------------------------------------------------------------------------------------
// Brokers

/// A broker as the admin API shows it.
#[derive(Debug, Clone)]
pub(crate) struct BrokerRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) server_name: String,
    pub(crate) quic_addr: Option<String>,
    pub(crate) tcp_addr: Option<String>,
    pub(crate) snapshot_version: i64,
    pub(crate) last_seen: i64,
    pub(crate) streams: String,
    /// Live streams it left out of `streams` (more than one heartbeat carries).
    pub(crate) streams_omitted: i64,
    /// The version it last announced.
    pub(crate) version: Option<String>,
}

/// The columns a [`BrokerRow`] is read from, as one literal for `concat!`.
macro_rules! broker_columns {
    () => {
        "id, name, server_name, quic_addr, tcp_addr, snapshot_version, last_seen, streams, \
         streams_omitted, version"
    };
}

impl<'r> FromRow<'r, SqliteRow> for BrokerRow {
    fn from_row(row: &'r SqliteRow) -> Result<Self, sqlx::Error> {
        Ok(BrokerRow {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            server_name: row.try_get("server_name")?,
            quic_addr: row.try_get("quic_addr")?,
            tcp_addr: row.try_get("tcp_addr")?,
            snapshot_version: row.try_get("snapshot_version")?,
            last_seen: row.try_get("last_seen")?,
            streams: row.try_get("streams")?,
            streams_omitted: row.try_get("streams_omitted")?,
            version: row.try_get("version")?,
        })
    }
}

/// What each broker (not revoked) last reported in force: id, name, snapshot version and
/// last heartbeat, by name. Without the stream lists, which a rollout does not need and a
/// waiting one would read every 250 ms.
pub(crate) async fn broker_versions(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<(String, String, i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, snapshot_version, last_seen FROM brokers \
         WHERE org = $1 AND revoked_at IS NULL ORDER BY name, id",
    )
    .bind(org)
    .fetch_all(c)
    .await
}

pub(crate) async fn brokers_active(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<BrokerRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        broker_columns!(),
        " FROM brokers WHERE org = $1 AND revoked_at IS NULL ORDER BY name, id"
    ))
    .bind(org)
    .fetch_all(c)
    .await
}

/// One broker by id, revoked or not.
pub(crate) async fn broker_get(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
) -> Result<Option<BrokerRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        broker_columns!(),
        " FROM brokers WHERE org = $1 AND id = $2"
    ))
    .bind(org)
    .bind(id)
    .fetch_optional(c)
    .await
}

/// Brokers that agents and connectors can dial: not revoked, with at least one address.
pub(crate) async fn broker_infos(
    c: &mut SqliteConnection,
    org: &str,
) -> Result<Vec<BrokerInfo>, sqlx::Error> {
    Ok(brokers_active(c, org)
        .await?
        .into_iter()
        .filter(|b| b.quic_addr.is_some() || b.tcp_addr.is_some())
        .map(|b| BrokerInfo {
            id: b.id,
            name: b.name,
            quic_addr: b.quic_addr,
            tcp_addr: b.tcp_addr,
            server_name: b.server_name,
        })
        .collect())
}

/// Connector id -> the version it last announced, for the connectors among `ids` that
/// announced one.
pub(crate) async fn connector_versions(
    c: &mut SqliteConnection,
    org: &str,
    ids: &[&str],
) -> Result<BTreeMap<String, String>, sqlx::Error> {
    const CHUNK: usize = 256;
    let mut out = BTreeMap::new();
    for chunk in ids.chunks(CHUNK) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT id, version FROM connectors WHERE org = $1 AND version IS NOT NULL \
             AND id IN ({})",
            marks.join(", ")
        );
        let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql)).bind(org);
        for id in chunk {
            q = q.bind(*id);
        }
        out.extend(q.fetch_all(&mut *c).await?);
    }
    Ok(out)
}

/// Records the version a connector announced.
pub(crate) async fn connector_set_version(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    version: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE connectors SET version = $3 WHERE org = $1 AND id = $2")
        .bind(org)
        .bind(id)
        .bind(version)
        .execute(c)
        .await
        .map(|_| ())
}

/// Records a heartbeat; `streams_json: None` keeps the stored live streams. Returns the
/// addresses stored before it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn broker_heartbeat(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    quic_addr: Option<&str>,
    tcp_addr: Option<&str>,
    snapshot_version: u64,
    streams: Option<(&str, u64)>,
    version: Option<&str>,
    now: i64,
) -> Result<(Option<String>, Option<String>), sqlx::Error> {
    let before: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT quic_addr, tcp_addr FROM brokers WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_one(&mut *c)
            .await?;
    sqlx::query(
        "UPDATE brokers SET quic_addr = $1, tcp_addr = $2, snapshot_version = $3, last_seen = $4, \
         streams = COALESCE($5, streams), streams_omitted = COALESCE($9, streams_omitted), \
         version = $8 WHERE org = $6 AND id = $7",
    )
    .bind(quic_addr)
    .bind(tcp_addr)
    .bind(to_i64(snapshot_version))
    .bind(now)
    .bind(streams.map(|s| s.0))
    .bind(org)
    .bind(id)
    .bind(version)
    .bind(streams.map(|s| to_i64(s.1)))
    .execute(c)
    .await?;
    Ok(before)
}

/// The last broker audit event stored: `(spool epoch, event number)`.
pub(crate) async fn broker_audit_mark(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
) -> Result<(u64, u64), sqlx::Error> {
    let (epoch, seq): (i64, i64) =
        sqlx::query_as("SELECT audit_epoch, audit_seq FROM brokers WHERE org = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_one(c)
            .await?;
    Ok((
        u64::try_from(epoch).unwrap_or(0),
        u64::try_from(seq).unwrap_or(0),
    ))
}

pub(crate) async fn broker_audit_set_mark(
    c: &mut SqliteConnection,
    org: &str,
    id: &str,
    (epoch, seq): (u64, u64),
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE brokers SET audit_epoch = $1, audit_seq = $2 WHERE org = $3 AND id = $4")
        .bind(to_i64(epoch))
        .bind(to_i64(seq))
        .bind(org)
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A certificate row as issued.
pub(crate) struct NewCert<'a> {
    pub(crate) serial: &'a str,
    pub(crate) role: Role,
    pub(crate) subject: &'a str,
    /// Unix seconds.
    pub(crate) issued_at: i64,
    pub(crate) not_after: i64,
    /// The serial of the certificate a renewal issued it for.
    pub(crate) renewed_from: Option<&'a str>,
}

pub(crate) async fn cert_insert(
    c: &mut SqliteConnection,
    org: &str,
    cert: &NewCert<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO certificates (org, serial, role, subject, issued_at, not_after, \
         renewed_from) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(org)
    .bind(cert.serial)
    .bind(cert.role.as_str())
    .bind(cert.subject)
    .bind(cert.issued_at)
    .bind(cert.not_after)
    .bind(cert.renewed_from)
    .execute(c)
    .await?;
    Ok(())
}

/// Forgets `role` `subject`'s certificates, other than `keep`, that expired by `now` (the
/// caller keeps those still within the renewal grace by passing a time that far back) and were
/// issued before `issued_before` (Unix seconds). A renewing identity adds a row per renewal;
/// without this the table, and every device listing that reads it, grows for as long as the
/// deployment runs. An expired certificate opens nothing and a revoked one past its expiry
/// is left out of snapshots already; `issued_before` keeps the rows a renewal-rate window
/// still counts.
pub(crate) async fn certs_forget_expired(
    c: &mut SqliteConnection,
    org: &str,
    role: Role,
    subject: &str,
    keep: &str,
    now: i64,
    issued_before: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM certificates WHERE org = $1 AND role = $2 AND subject = $3 \
         AND serial <> $4 AND not_after <= $5 AND issued_at < $6",
    )
    .bind(org)
    .bind(role.as_str())
    .bind(subject)
    .bind(keep)
    .bind(now)
    .bind(issued_before)
    .execute(c)
    .await?;
    Ok(done.rows_affected())
}

/// Certificates issued to `role` `subject` after `since` and no later than `now` (Unix
/// seconds). Those stamped after `now` were issued while the controller's clock was ahead:
/// counting them would hold the identity's renewals back for as long as the clock was off,
/// once it is set right.
pub(crate) async fn certs_issued_between(
    c: &mut SqliteConnection,
    org: &str,
    role: Role,
    subject: &str,
    since: i64,
    now: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM certificates WHERE org = $1 AND role = $2 AND subject = $3 \
         AND issued_at > $4 AND issued_at <= $5",
    )
    .bind(org)
    .bind(role.as_str())
    .bind(subject)
    .bind(since)
    .bind(now)
    .fetch_one(c)
    .await
}

/// Records that `serial` authenticated a request at `now`, the first time it did.
pub(crate) async fn cert_mark_seen(
    c: &mut SqliteConnection,
    org: &str,
    serial: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE certificates SET seen_at = $3 WHERE org = $1 AND serial = $2 \
         AND seen_at IS NULL",
    )
    .bind(org)
    .bind(serial)
    .bind(now)
    .execute(c)
    .await?;
    Ok(())
}

/// Whether a certificate of `role` `subject` renewed from `serial`, or issued after it, has
/// authenticated a request here. Any later one, not only its direct renewals: those could be
/// forgotten (expired past the grace) before `serial` itself, after a lifetime was cut.
pub(crate) async fn cert_successor_seen(
    c: &mut SqliteConnection,
    org: &str,
    role: Role,
    subject: &str,
    serial: &str,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM certificates WHERE org = $1 AND role = $3 AND subject = $4 \
         AND serial <> $2 AND seen_at IS NOT NULL AND (renewed_from = $2 OR issued_at > \
         (SELECT issued_at FROM certificates WHERE org = $1 AND serial = $2))",
    )
    .bind(org)
    .bind(serial)
    .bind(role.as_str())
    .bind(subject)
    .fetch_one(c)
    .await?;
    Ok(n > 0)
}

/// Serials of the certificates renewed from `serial` that never authenticated a request.
pub(crate) async fn cert_unseen_successors(
    c: &mut SqliteConnection,
    org: &str,
    serial: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT serial FROM certificates WHERE org = $1 AND renewed_from = $2 \
         AND seen_at IS NULL ORDER BY serial",
    )
    .bind(org)
    .bind(serial)
    .fetch_all(c)
    .await
}

/// `Some((revoked, seen))` for a certificate this controller issued: whether it was
/// revoked, and whether it has authenticated a request here before ([`cert_mark_seen`]).
pub(crate) async fn cert_revoked(
    c: &mut SqliteConnection,
    org: &str,
    serial: &str,
) -> Result<Option<(bool, bool)>, sqlx::Error> {
    let v: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT revoked_at, seen_at FROM certificates WHERE org = $1 AND serial = $2",
    )
    .bind(org)
    .bind(serial)
    .fetch_optional(c)
    .await?;
    Ok(v.map(|(r, s)| (r.is_some(), s.is_some())))
}

/// subject id -> (serial, not_after) of its most recent certificate of `role`.
pub(crate) async fn latest_certs(
    c: &mut SqliteConnection,
    org: &str,
    role: Role,
    subjects: &[&str],
) -> Result<BTreeMap<String, (String, u64)>, sqlx::Error> {
    // By subject, a few hundred at a time: a page of a listing reads its own rows' certificates,
    // not every certificate of the role.
    const CHUNK: usize = 256;
    let mut latest = BTreeMap::new();
    for chunk in subjects.chunks(CHUNK) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
        let sql = format!(
            "SELECT subject, serial, not_after FROM certificates WHERE org = $1 AND role = $2 \
             AND subject IN ({}) ORDER BY issued_at, not_after",
            marks.join(", ")
        );
        let mut q = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(sql))
            .bind(org)
            .bind(role.as_str());
        for s in chunk {
            q = q.bind(*s);
        }
        // Later rows win: ordered by issue time.
        latest.extend(
            q.fetch_all(&mut *c)
                .await?
                .into_iter()
                .map(|(s, serial, na)| (s, (serial, to_u64(na)))),
        );
    }
    Ok(latest)
}

/// Serials of revoked certificates still within their validity at `now`.
pub(crate) async fn revoked_serials(
    c: &mut SqliteConnection,
    org: &str,
    now: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT serial FROM certificates WHERE org = $1 AND revoked_at IS NOT NULL \
         AND not_after > $2 ORDER BY serial",
    )
    .bind(org)
    .bind(now)
    .fetch_all(c)
    .await
}

// ---------------------------------------------------------------------------------------------
// Audit

/// Deletes at most `limit` audit records stored before `before_ms` (by the controller's clock,
/// `received_ms`, whatever time their source gave them; the oldest first), and returns how
/// many. A batch at a time, so that no write transaction holds the store's write
/// lock for long.
pub(crate) async fn audit_forget_before(
    c: &mut SqliteConnection,
    org: &str,
    before_ms: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM audit WHERE org = $1 AND seq IN \
         (SELECT seq FROM audit WHERE org = $1 AND received_ms < $2 ORDER BY received_ms LIMIT $3)",
    )
    .bind(org)
    .bind(before_ms)
    .bind(limit)
    .execute(c)
    .await?;
    Ok(done.rows_affected())
}

pub(crate) async fn audit_insert(
    c: &mut SqliteConnection,
    org: &str,
    seq: u64,
    rec: &AuditRecord,
    source: &str,
    received_ms: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit \
         (org, seq, at_ms, actor, action, target, result, detail, source, received_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(org)
    .bind(to_i64(seq))
    .bind(to_i64(rec.at_ms))
    .bind(&rec.actor)
    .bind(&rec.action)
    .bind(&rec.target)
    .bind(&rec.result)
    .bind(rec.detail.to_string())
    .bind(source)
    .bind(to_i64(received_ms))
    .execute(c)
    .await?;
    Ok(())
}

/// Which audit records [`audit_list`] returns: those after `after` that match every filter
/// given (exact match), at most `limit` of them, the oldest or (`newest`) the newest ones;
/// oldest first either way.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AuditQuery<'a> {
    pub(crate) after: i64,
    pub(crate) limit: i64,
    pub(crate) newest: bool,
    pub(crate) actor: Option<&'a str>,
    pub(crate) action: Option<&'a str>,
    pub(crate) target: Option<&'a str>,
    pub(crate) result: Option<&'a str>,
}

pub(crate) async fn audit_list(
    c: &mut SqliteConnection,
    org: &str,
    q: &AuditQuery<'_>,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    use std::fmt::Write as _;
    type Row = (
        i64,
        i64,
        String,
        String,
        String,
        String,
        String,
        String,
        i64,
    );
    let mut sql = String::from(
        "SELECT seq, at_ms, actor, action, target, result, detail, source, received_ms FROM audit \
         WHERE org = $1 AND seq > $2",
    );
    // Only fixed column names are written into the statement; every value is bound ($3...).
    let mut filters: Vec<&str> = Vec::new();
    for (column, value) in [
        ("actor", q.actor),
        ("action", q.action),
        ("target", q.target),
        ("result", q.result),
    ] {
        if let Some(value) = value {
            filters.push(value);
            let _ = write!(sql, " AND {column} = ${}", 2 + filters.len());
        }
    }
    let order = if q.newest { "DESC" } else { "ASC" };
    let _ = write!(sql, " ORDER BY seq {order} LIMIT ${}", 3 + filters.len());
    // Safe: built above from fixed text and fixed column names only.
    let mut query = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql))
        .bind(org)
        .bind(q.after);
    for f in filters {
        query = query.bind(f);
    }
    let mut rows: Vec<Row> = query.bind(q.limit).fetch_all(c).await?;
    if q.newest {
        rows.reverse();
    }
    Ok(rows
        .into_iter()
        .map(
            |(seq, at_ms, actor, action, target, result, detail, source, received_ms)| AuditEntry {
                seq,
                source,
                received_ms: to_u64(received_ms),
                record: AuditRecord {
                    at_ms: to_u64(at_ms),
                    actor,
                    action,
                    target,
                    result,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                },
            },
        )
        .collect())
}
