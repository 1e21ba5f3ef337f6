//! Persistent state: one SQL database, embedded migrations, portable queries.
//!
//! The store owns the schema (`crates/umbra-controller/migrations`, embedded at build time) and
//! every SQL statement. Statements use only portable SQL and `$n` placeholders so the schema
//! can move to PostgreSQL; this build links SQLite only. SQLite runs in WAL mode with
//! `synchronous=FULL`: a committed write survives `kill -9` and power loss.
//!
//! Writes go through [`Store::write`]: one transaction per logical change, serialised by an
//! in-process lock, and begun `IMMEDIATE` so that SQLite's own write lock is taken (waiting
//! through the busy timeout) before the first read: a transaction that reads before it writes
//! would otherwise be refused with `SQLITE_BUSY` when it comes to write while another
//! connection still holds that lock. A write transaction dropped without commit (a refusal,
//! a cancelled request) keeps the in-process lock until its rollback has run. Reads that must
//! be consistent across several tables ([`Store::read`]) use a transaction as a snapshot.
//!
//! It does not decide anything: validation and authorisation happen in the callers.

pub(crate) mod admin;
pub(crate) mod peers;

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqlSafeStr, SqliteConnection, SqlitePool, Transaction};
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

/// The database backend of this build.
pub(crate) type Db = sqlx::Sqlite;

/// Migrations, embedded in the binary. Append new files here; never edit an applied one
/// (the migrator refuses a changed checksum).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "broker_audit_seq",
        include_str!("../../migrations/0002_broker_audit_seq.sql"),
    ),
    (
        3,
        "audit_indexes",
        include_str!("../../migrations/0003_audit_indexes.sql"),
    ),
    (
        4,
        "peer_list_indexes",
        include_str!("../../migrations/0004_peer_list_indexes.sql"),
    ),
    (
        5,
        "certificate_renewals",
        include_str!("../../migrations/0005_certificate_renewals.sql"),
    ),
    (
        6,
        "peer_versions",
        include_str!("../../migrations/0006_peer_versions.sql"),
    ),
    (
        7,
        "audit_received",
        include_str!("../../migrations/0007_audit_received.sql"),
    ),
    (
        8,
        "broker_streams_omitted",
        include_str!("../../migrations/0008_broker_streams_omitted.sql"),
    ),
];

/// Counter holding the snapshot version.
pub(crate) const SNAPSHOT_VERSION: &str = "snapshot_version";
/// Counter holding the last audit sequence number.
pub(crate) const AUDIT_SEQ: &str = "audit_seq";

/// Where the database is.
#[derive(Debug, Clone)]
pub(crate) enum Database {
    /// A `sqlite:` URL.
    Url(String),
    /// A SQLite file (no URL quoting issues with unusual paths).
    File(std::path::PathBuf),
}

/// Handle to the database (clones share the pool and the write lock).
#[derive(Clone)]
pub(crate) struct Store {
    pool: SqlitePool,
    org: String,
    write_lock: Arc<Mutex<()>>,
}

/// A write transaction holding the store's write lock. Dropping it without
/// [`WriteTx::commit`] rolls back, and the lock is released once the rollback has run.
pub(crate) struct WriteTx {
    /// `Some` until [`WriteTx::commit`] or drop takes it.
    tx: Option<Transaction<'static, Db>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    /// The connection to run statements on.
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        match self.tx.as_mut() {
            Some(tx) => tx,
            // Only `commit` and `drop` take the transaction, and both consume the `WriteTx`.
            None => unreachable!("a WriteTx holds its transaction until commit or drop"),
        }
    }

    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        match self.tx.take() {
            // If this future is dropped mid-commit, the lock goes with it: the next writer's
            // `BEGIN IMMEDIATE` waits for SQLite's lock through the busy timeout.
            Some(tx) => tx.commit().await,
            None => Ok(()),
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let guard = self.guard.take();
        // sqlx only queues the rollback of a dropped transaction; the next writer must not
        // start before it has run, or its first write could meet this one's lock.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = tx.rollback().await {
                        tracing::warn!(error = %e, "rolling back a write transaction failed");
                    }
                    drop(guard);
                });
            }
            Err(_) => drop(tx),
        }
    }
}

/// Makes the database file (created empty if missing, which SQLite takes for a new database)
/// and its WAL files readable by the owner only, whatever the umask and the directory: they
/// hold the audit log, the inventory, token hashes and the sealed CA key. SQLite gives the WAL
/// files the database file's mode when it creates them.
fn private_db_files(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    let name = path.as_os_str().to_owned();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = name.clone();
        p.push(suffix);
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub(crate) async fn open(db: &Database, org: &str) -> Result<Store, StoreOpenError> {
        Store::open_checked(db, org).await.map_err(|e| e.at(db))
    }

    async fn open_checked(db: &Database, org: &str) -> Result<Store, OpenFailure> {
        let opts = match db {
            Database::Url(url) => {
                let opts = SqliteConnectOptions::from_str(url).map_err(OpenFailure::Connect)?;
                let file = opts.get_filename();
                if file != std::path::Path::new(":memory:") {
                    private_db_files(file).map_err(|e| OpenFailure::Connect(sqlx::Error::Io(e)))?;
                }
                opts
            }
            Database::File(path) => {
                private_db_files(path).map_err(|e| OpenFailure::Connect(sqlx::Error::Io(e)))?;
                SqliteConnectOptions::new().filename(path)
            }
        };
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // A transaction whose COMMIT failed (a full disk: SQLite may have rolled it back
            // itself, so the ROLLBACK that follows fails too) leaves sqlx counting it as open
            // on its connection. Taken again, that connection refuses every `BEGIN IMMEDIATE`,
            // and a read on it could run inside what is left of the old transaction: stale
            // reads, an older snapshot for the brokers. Such a connection is closed, not
            // reused. The ping first lets the connection's rollbacks queued on drop run.
            .after_release(|conn, _| {
                Box::pin(async move {
                    conn.ping().await?;
                    Ok(!conn.is_in_transaction())
                })
            })
            .connect_with(opts)
            .await
            .map_err(OpenFailure::Connect)?;
        // Damage that SQLite finds only when a query reaches it would otherwise let the
        // controller start and fail the requests that touch it (a policy table among them).
        // `quick_check` reads every page once: milliseconds for a small store, seconds for a
        // large audit log, once per start.
        let problems: Vec<String> = sqlx::query_scalar("PRAGMA quick_check(5)")
            .fetch_all(&pool)
            .await
            .map_err(OpenFailure::Connect)?;
        if problems.iter().any(|p| p != "ok") {
            pool.close().await;
            return Err(OpenFailure::Damaged(problems.join("; ")));
        }
        migrator().run(&pool).await.map_err(OpenFailure::Migrate)?;
        let store = Store {
            pool,
            org: org.to_owned(),
            write_lock: Arc::new(Mutex::new(())),
        };
        let mut w = store.write().await.map_err(OpenFailure::Connect)?;
        for name in [SNAPSHOT_VERSION, AUDIT_SEQ] {
            sqlx::query(
                "INSERT INTO counters (org, name, value) VALUES ($1, $2, 0) \
                 ON CONFLICT (org, name) DO NOTHING",
            )
            .bind(org)
            .bind(name)
            .execute(w.conn())
            .await
            .map_err(OpenFailure::Connect)?;
        }
        w.commit().await.map_err(OpenFailure::Connect)?;
        Ok(store)
    }

    pub(crate) fn org(&self) -> &str {
        &self.org
    }

    /// Starts a write transaction (waits for the write lock). It borrows nothing from the
    /// store, so that a commit can be finished by a task of its own (see
    /// `audit::commit_detached`).
    pub(crate) async fn write(&self) -> Result<WriteTx, sqlx::Error> {
        let guard = self.write_lock.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx {
            tx: Some(tx),
            guard: Some(guard),
        })
    }

    /// Starts a read-only transaction: a consistent view across statements.
    pub(crate) async fn read(&self) -> Result<Transaction<'static, Db>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Closes every connection (checkpointing the WAL).
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}

/// Why the database could not be opened; each names the database ([`Database`]'s file or
/// URL).
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error("cannot open the database {db}: {source}")]
    Connect {
        db: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate the database {db}: {source}")]
    Migrate {
        db: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// SQLite's `quick_check` found damage: the controller does not run on it.
    #[error(
        "the database {db} is damaged ({problems}); the controller does not run on a damaged \
         store: stop every controller using it and restore its data directory from a backup"
    )]
    Damaged { db: String, problems: String },
}

/// [`StoreOpenError`] before the database is named.
enum OpenFailure {
    Connect(sqlx::Error),
    Migrate(sqlx::migrate::MigrateError),
    Damaged(String),
}

impl OpenFailure {
    fn at(self, db: &Database) -> StoreOpenError {
        let db = db.describe();
        match self {
            OpenFailure::Connect(source) => StoreOpenError::Connect { db, source },
            OpenFailure::Migrate(source) => StoreOpenError::Migrate { db, source },
            OpenFailure::Damaged(problems) => StoreOpenError::Damaged { db, problems },
        }
    }
}

impl Database {
    /// The file or URL, for messages.
    fn describe(&self) -> String {
        match self {
            Database::Url(u) => u.clone(),
            Database::File(p) => p.display().to_string(),
        }
    }
}

fn migrator() -> Migrator {
    migrator_upto(MIGRATIONS.len())
}

/// The first `n` migrations (tests build an older store with fewer).
fn migrator_upto(n: usize) -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS[..n]
            .iter()
            .map(|(version, desc, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*desc),
                    MigrationType::Simple,
                    (*sql).into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Increments a counter and returns its new value.
pub(crate) async fn bump(
    conn: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<u64, sqlx::Error> {
    bump_by(conn, org, name, 1).await
}

/// Adds `n` to a counter and returns its new value.
pub(crate) async fn bump_by(
    conn: &mut SqliteConnection,
    org: &str,
    name: &str,
    n: u64,
) -> Result<u64, sqlx::Error> {
    let v: i64 = sqlx::query_scalar(
        "UPDATE counters SET value = value + $1 WHERE org = $2 AND name = $3 RETURNING value",
    )
    .bind(to_i64(n))
    .bind(org)
    .bind(name)
    .fetch_one(conn)
    .await?;
    Ok(to_u64(v))
}

/// Raises a counter by one, or to `at_least` if that is more, and returns its new value.
pub(crate) async fn raise(
    conn: &mut SqliteConnection,
    org: &str,
    name: &str,
    at_least: u64,
) -> Result<u64, sqlx::Error> {
    let v: i64 = sqlx::query_scalar(
        "UPDATE counters SET value = CASE WHEN value + 1 > $1 THEN value + 1 ELSE $1 END \
         WHERE org = $2 AND name = $3 RETURNING value",
    )
    .bind(to_i64(at_least))
    .bind(org)
    .bind(name)
    .fetch_one(conn)
    .await?;
    Ok(to_u64(v))
}

/// Reads a counter.
pub(crate) async fn counter(
    conn: &mut SqliteConnection,
    org: &str,
    name: &str,
) -> Result<u64, sqlx::Error> {
    let v: Option<i64> =
        sqlx::query_scalar("SELECT value FROM counters WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(v.map(to_u64).unwrap_or(0))
}

/// Stored integers are never negative; clamp rather than wrap if one ever were.
pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Unix seconds and milliseconds as stored.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn mem() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&Database::File(dir.path().join("t.db")), "t")
            .await
            .unwrap();
        (dir, s)
    }

    /// The database and its WAL files are the owner's alone, in a directory anyone may
    /// read (systemd's StateDirectory= makes 0755) and whatever the umask; a database left
    /// readable by an older version is made private at the next start.
    #[tokio::test]
    async fn the_database_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("umbra.db");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let s = Store::open(&Database::File(path.clone()), "t")
            .await
            .unwrap();
        // A write, so that the WAL files exist.
        let mut w = s.write().await.unwrap();
        bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap();
        w.commit().await.unwrap();
        for f in ["umbra.db", "umbra.db-wal", "umbra.db-shm"] {
            assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
        }
        s.close().await;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = Store::open(&Database::File(path.clone()), "t")
            .await
            .unwrap();
        assert_eq!(mode(&path), 0o600);
        s.close().await;
        // The same when the database is given as a URL (`database_url`).
        let url_path = dir.path().join("by-url.db");
        let url = format!("sqlite://{}", url_path.display());
        let s = Store::open(&Database::Url(url), "t").await.unwrap();
        assert_eq!(mode(&url_path), 0o600);
        s.close().await;
    }

    #[tokio::test]
    async fn durable_settings() {
        let (_dir, s) = mem().await;
        let mut r = s.read().await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *r)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        // 2 = FULL: the WAL is synced at every commit.
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *r)
            .await
            .unwrap();
        assert_eq!(sync, 2);
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut *r)
            .await
            .unwrap();
        assert_eq!(fk, 1);
    }

    /// Audit records stored before the controller kept its time of storing them get their
    /// own time as that time (retention ages them as before); the open migrates the store.
    #[tokio::test]
    async fn older_audit_records_get_their_own_time_as_stored_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let opts = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new().connect_with(opts).await.unwrap();
            migrator_upto(6).run(&pool).await.unwrap();
            sqlx::query(
                "INSERT INTO audit (org, seq, at_ms, actor, action, target, result, detail, source) \
                 VALUES ('t', 1, 1234, 'a', 'stream.open', 'x', 'allow', '{}', 'b')",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let s = Store::open(&Database::File(path), "t").await.unwrap();
        let mut r = s.read().await.unwrap();
        let got: (i64, i64) = sqlx::query_as("SELECT at_ms, received_ms FROM audit WHERE seq = 1")
            .fetch_one(&mut *r)
            .await
            .unwrap();
        assert_eq!(got, (1234, 1234));
    }

    /// A connection left counting a transaction as open (its COMMIT and the ROLLBACK after it
    /// failed, as on a full disk) is not given out again: every later write and read
    /// succeeds and sees every committed write. The failure is made by ending the transaction
    /// behind sqlx's back, which leaves the connection in the state a full disk leaves it in.
    #[tokio::test]
    async fn a_connection_whose_commit_failed_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&Database::File(dir.path().join("t.db")), "t")
            .await
            .unwrap();
        for _ in 0..3 {
            let mut w = s.write().await.unwrap();
            sqlx::raw_sql("ROLLBACK").execute(w.conn()).await.unwrap();
            assert!(w.commit().await.is_err(), "COMMIT with no transaction");
        }
        // More rounds than the pool has connections: each would be met.
        for i in 1..=20 {
            let mut w = s.write().await.unwrap_or_else(|e| panic!("write {i}: {e}"));
            bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap();
            w.commit()
                .await
                .unwrap_or_else(|e| panic!("commit {i}: {e}"));
            let mut r = s.read().await.unwrap();
            assert_eq!(counter(&mut r, "t", SNAPSHOT_VERSION).await.unwrap(), i);
            r.commit().await.unwrap();
        }
    }

    /// A write refused for a full store says so to the administrator (507), and changes
    /// nothing. The store is made full with SQLite's own cap on its size in pages.
    #[tokio::test]
    async fn a_full_store_says_so_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&Database::File(dir.path().join("t.db")), "t")
            .await
            .unwrap();
        let mut w = s.write().await.unwrap();
        bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap();
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(w.conn())
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PRAGMA max_page_count = {pages}"
        )))
        .execute(w.conn())
        .await
        .unwrap();
        let big = "x".repeat(64 * 1024);
        let e = sqlx::query(
            "INSERT INTO audit (org, seq, at_ms, received_ms, actor, action, target, result, \
             detail, source) VALUES ('t', 1, 1, 1, 'a', 'x', 'y', 'allow', $1, 'c')",
        )
        .bind(&big)
        .execute(w.conn())
        .await
        .unwrap_err();
        drop(w);
        let f = crate::error::ApiFailure::from(e);
        assert_eq!(f.status, axum::http::StatusCode::INSUFFICIENT_STORAGE);
        assert!(
            f.error.contains("full") && f.error.contains("nothing was changed"),
            "{}",
            f.error
        );
        // Nothing changed: the bump went with the refused write.
        let mut r = s.read().await.unwrap();
        assert_eq!(counter(&mut r, "t", SNAPSHOT_VERSION).await.unwrap(), 0);
        // Any other database error stays a plain internal error (the cause is logged).
        let f = crate::error::ApiFailure::from(sqlx::Error::RowNotFound);
        assert_eq!(
            (f.status.as_u16(), f.error.as_str()),
            (500, "internal error")
        );
    }

    /// A damaged database file is refused at open, with its path and what to do, instead of
    /// a controller that starts and fails the requests that reach the damage. The twin: the
    /// same store opens before the damage.
    #[tokio::test]
    async fn a_damaged_store_is_refused_at_open_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = Database::File(path.clone());
        let s = Store::open(&db, "t").await.unwrap();
        let mut w = s.write().await.unwrap();
        for seq in 1..=300 {
            sqlx::query(
                "INSERT INTO audit (org, seq, at_ms, received_ms, actor, action, target, \
                 result, detail, source) VALUES ('t', $1, 1, 1, 'a', 'x', 'y', 'allow', $2, 'c')",
            )
            .bind(seq)
            .bind("d".repeat(1000))
            .execute(w.conn())
            .await
            .unwrap();
        }
        w.commit().await.unwrap();
        s.close().await;
        drop(s);
        Store::open(&db, "t").await.unwrap().close().await;
        // Garbage over a page in the middle of the file (the audit table's pages).
        let mut bytes = std::fs::read(&path).unwrap();
        let pages = bytes.len() / 4096;
        assert!(pages > 10, "{pages} pages");
        let at = pages / 2 * 4096;
        for (i, b) in bytes[at..at + 4096].iter_mut().enumerate() {
            *b = (i * 7 + 13) as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = match Store::open(&db, "t").await {
            Err(e) => e,
            Ok(_) => panic!("a damaged store was opened"),
        };
        assert!(matches!(e, StoreOpenError::Damaged { .. }), "{e:?}");
        let said = e.to_string();
        assert!(
            said.contains(&path.display().to_string()) && said.contains("backup"),
            "{said}"
        );
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_skips_applied_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::File(dir.path().join("t.db"));
        let s = Store::open(&db, "t").await.unwrap();
        let mut w = s.write().await.unwrap();
        bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap();
        w.commit().await.unwrap();
        s.close().await;
        let s = Store::open(&db, "t").await.unwrap();
        let mut r = s.read().await.unwrap();
        assert_eq!(counter(&mut r, "t", SNAPSHOT_VERSION).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn raise_goes_up_by_one_or_to_the_floor() {
        let (_dir, s) = mem().await;
        let mut w = s.write().await.unwrap();
        assert_eq!(
            raise(w.conn(), "t", SNAPSHOT_VERSION, 100).await.unwrap(),
            100
        );
        assert_eq!(
            raise(w.conn(), "t", SNAPSHOT_VERSION, 50).await.unwrap(),
            101
        );
        assert_eq!(
            raise(w.conn(), "t", SNAPSHOT_VERSION, 101).await.unwrap(),
            102
        );
        assert_eq!(bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap(), 103);
    }

    #[tokio::test]
    async fn migrates_and_counts() {
        let (_dir, s) = mem().await;
        let mut w = s.write().await.unwrap();
        assert_eq!(counter(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap(), 0);
        assert_eq!(bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap(), 1);
        assert_eq!(bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap(), 2);
        w.commit().await.unwrap();
        let mut r = s.read().await.unwrap();
        assert_eq!(counter(&mut r, "t", SNAPSHOT_VERSION).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn rollback_on_drop() {
        let (_dir, s) = mem().await;
        {
            let mut w = s.write().await.unwrap();
            bump(w.conn(), "t", SNAPSHOT_VERSION).await.unwrap();
        }
        let mut r = s.read().await.unwrap();
        assert_eq!(counter(&mut r, "t", SNAPSHOT_VERSION).await.unwrap(), 0);
    }

    /// Writers that wrote and then gave up (a refused request, a cancelled one), interleaved
    /// with writers that read first and commit, and with readers: every committed write is
    /// kept, every dropped one rolled back, and none fails. (The API test
    /// `refused_writes_never_fail_other_writers` drives the same through HTTP.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_writer_never_fails_the_next_one() {
        let (_dir, s) = mem().await;
        let s = Arc::new(s);
        let mut tasks = Vec::new();
        for t in 0..6 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..150 {
                    if t >= 4 {
                        // Readers keep other pooled connections busy, so writers take turns
                        // on different connections.
                        let mut r = s.read().await?;
                        counter(&mut r, "t", SNAPSHOT_VERSION).await?;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    if t % 2 == 0 {
                        // Writes, then is dropped without commit.
                        let mut w = s.write().await?;
                        for d in 0..20 {
                            peers::device_insert(w.conn(), "t", &format!("d{t}-{i}-{d}"), "u", 0)
                                .await?;
                        }
                    } else {
                        // Reads first, then writes and commits.
                        let mut w = s.write().await?;
                        counter(w.conn(), "t", SNAPSHOT_VERSION).await?;
                        bump(w.conn(), "t", SNAPSHOT_VERSION).await?;
                        w.commit().await?;
                    }
                }
                Ok::<_, sqlx::Error>(())
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let mut r = s.read().await.unwrap();
        assert_eq!(counter(&mut r, "t", SNAPSHOT_VERSION).await.unwrap(), 300);
        let devices: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices")
            .fetch_one(&mut *r)
            .await
            .unwrap();
        assert_eq!(devices, 0);
    }

    /// Owners are found for the enrolled devices among those named, however many (looked up
    /// a chunk at a time), and for no other.
    #[tokio::test]
    async fn device_owners_of_the_named_devices() {
        let (_dir, s) = mem().await;
        let mut w = s.write().await.unwrap();
        for i in 0..600 {
            peers::device_insert(w.conn(), "t", &format!("d{i}"), &format!("u{}", i % 7), 0)
                .await
                .unwrap();
        }
        peers::device_insert(w.conn(), "other", "d1", "x", 0)
            .await
            .unwrap();
        w.commit().await.unwrap();
        let ids: Vec<String> = (0..600)
            .step_by(2)
            .map(|i| format!("d{i}"))
            .chain(["nosuch".into()])
            .collect();
        let named: std::collections::BTreeSet<&str> =
            ids.iter().map(String::as_str).chain(["d1"]).collect();
        let mut r = s.read().await.unwrap();
        let owners = peers::device_owners(&mut r, "t", &named).await.unwrap();
        assert_eq!(owners.len(), 301);
        assert_eq!(owners["d1"], "u1");
        assert_eq!(owners["d598"], format!("u{}", 598 % 7));
        assert!(!owners.contains_key("nosuch") && !owners.contains_key("d3"));
    }

    /// A renewal forgets its identity's certificates that expired and left the renewal-rate
    /// window, and nothing else: not the one just issued, not one still valid, not one the
    /// window still counts, not another identity's or another role's.
    #[tokio::test]
    async fn renewals_forget_expired_certificates() {
        use umbra_proto::Role;
        let (_dir, s) = mem().await;
        let mut w = s.write().await.unwrap();
        let rows = [
            ("a1", Role::Agent, "d1", 0, 100), // expired, long ago: forgotten
            ("a2", Role::Agent, "d1", 4000, 4500), // expired, in the window: kept
            ("a3", Role::Agent, "d1", 100, 86_500), // still valid: kept
            ("a4", Role::Agent, "d2", 0, 100), // another device: kept
            ("a5", Role::Connector, "d1", 0, 100), // another role: kept
            ("a6", Role::Agent, "d1", 5000, 91_400), // just issued: kept
        ];
        for (serial, role, subject, issued, not_after) in rows {
            let cert = peers::NewCert {
                serial,
                role,
                subject,
                issued_at: issued,
                not_after,
                renewed_from: None,
            };
            peers::cert_insert(w.conn(), "t", &cert).await.unwrap();
        }
        let forgotten =
            peers::certs_forget_expired(w.conn(), "t", Role::Agent, "d1", "a6", 5000, 1400)
                .await
                .unwrap();
        assert_eq!(forgotten, 1);
        w.commit().await.unwrap();
        let mut r = s.read().await.unwrap();
        let left: Vec<String> =
            sqlx::query_scalar("SELECT serial FROM certificates ORDER BY serial")
                .fetch_all(&mut *r)
                .await
                .unwrap();
        assert_eq!(left, ["a2", "a3", "a4", "a5", "a6"]);
        // The newest certificate of each identity is still the one listings show.
        let latest = peers::latest_certs(&mut r, "t", Role::Agent, &["d1"])
            .await
            .unwrap();
        assert_eq!(latest["d1"].0, "a6");
    }
}
