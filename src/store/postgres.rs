//! The shared backend: PostgreSQL, so several totpd instances serve one user base.
//!
//! Every write is one transaction (a user change with everything it writes — key, temp token,
//! events, the kept key moved to a new epoch — one statement), and `synchronous_commit` is
//! forced on for our sessions, so a method returns only once PostgreSQL's commit made its
//! writes durable. [`Store::update_user`] reads the user's record, runs the pure change
//! on it, and has the result written with its [`Writes`] by a compare-and-swap on the record
//! (optimistic, as on sled): when a second request or instance changed the same user first,
//! the change runs again on its result, so a temp token, a time step or a recovery code has
//! exactly one winner across instances. The changes of concurrent requests are written
//! together, one statement and one commit per batch ([`batch`]).
//!
//! Records are the codec's bytes (see [`codec`](super::codec)): one format for sled, PostgreSQL
//! and the backup file, so an export of either store restores into the other. Columns beside
//! the record are only what queries look up by (name, expiry, key times).
//!
//! Why `tokio-postgres` with `deadpool-postgres` rather than `sqlx`: we run a dozen fixed
//! statements on opaque `bytea` records, so sqlx's compile-time checked queries (which need a
//! database, or a checked-in query cache, at build time) and its macros buy nothing; the pair is
//! smaller, builds faster, and uses the rustls (with `ring`) the server already has.
//!
//! Pool: a bounded wait for a connection (`database_timeout`), so a database that is down
//! answers `StoreError::Backend` (503) quickly instead of piling requests up; connections that
//! broke are dropped when next taken, so service resumes by itself when the database returns.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::{StreamExt, pin_mut};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls};

mod batch;

use super::codec::{decode, encode};
use super::counts::UserCounts;
use super::port::{
    BackupRecord, Created, NOT_VERIFIED, OpenError, PoolStats, Store, StoreError, StoreStats,
    UserChange, Writes,
};
use crate::clock::UnixTime;
use crate::domain::audit::AuditEvent;
use crate::domain::keys::KeyLifetime;
use crate::domain::user::{Digest, LoginKey, StoredSecret, User, UserId};

/// A database URL: it may carry the password, so it prints (`Display`, `Debug`) with the
/// password replaced by `***`; only [`DatabaseUrl::expose`] gives it whole, to the driver.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the connection only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// How to reach a PostgreSQL store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    pub url: DatabaseUrl,
    /// Connections per instance.
    pub pool_size: usize,
    /// The longest wait for a connection (and to connect): past it a request answers 503.
    pub timeout: std::time::Duration,
    /// A PEM file of CA certificates trusted for the database's TLS, besides the system's.
    pub ca_file: Option<PathBuf>,
}

/// The names of backup `meta` records, as the sled store writes them.
const KEY_CHECK_KEY: &[u8] = b"master_key_check";
const NEXT_ID_KEY: &[u8] = b"next_user_id";
/// The `meta` row of the master-key check.
const KEY_CHECK_NAME: &str = "master_key_check";

/// The key of the advisory lock that serializes migrations between instances starting at once
/// (an arbitrary constant: "totpd" in ASCII).
const MIGRATION_LOCK: i64 = 0x0074_6f74_7064;

/// One schema change, embedded in the binary.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order; the last one's version is the schema this binary writes.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_init",
    sql: include_str!("postgres/migrations/0001_init.sql"),
}];

/// The schema version this binary knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (\
     version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
     applied_at TIMESTAMPTZ NOT NULL DEFAULT now())";

struct Inner {
    pool: Pool,
    counts: UserCounts,
    /// The group commit of user changes.
    batcher: batch::Batcher,
    /// Requests (and batches) that found no connection within the pool wait.
    timeouts: Arc<AtomicU64>,
    /// Operations that failed in the database or the connection.
    errors: AtomicU64,
}

/// The PostgreSQL backend; clones share one pool.
#[derive(Clone)]
pub struct PostgresStore(Arc<Inner>);

/// A database error as a store error (the text names no password: tokio-postgres does not
/// put its configuration into errors).
fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(describe(&e))
}

/// What went wrong, for the log and the metrics: the server's message and SQLSTATE (not its
/// detail, which may quote row values), or the client error with its causes (tokio-postgres's
/// own text is only its kind, such as "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Unix times and ids as PostgreSQL's `BIGINT`.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uint(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Replaces the password of a `postgres://user:password@host/db` URL, or of a `password=…`
/// key-value pair, with `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            return redact_pairs(&format!("{scheme}://{masked}@{host}{tail}"));
        }
        return redact_pairs(url);
    }
    redact_pairs(url)
}

/// `password=…` anywhere (a query string or a key-value string) becomes `password=***`.
fn redact_pairs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("password=") {
        let (before, after) = rest.split_at(at + "password=".len());
        out.push_str(before);
        out.push_str("***");
        let end = after.find(['&', ' ']).unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The parsed connection settings, with `synchronous_commit` forced on (durability is the
/// commit), generic plans for our prepared statements (they look rows up by a key or scan a
/// range of an index, so a plan made once serves every execution; PostgreSQL's default
/// re-plans each of them for its first five executions per connection, and then keeps
/// re-planning the ones whose generic plan it estimates dearer), and the connect timeout
/// bounded.
fn pg_config(config: &PostgresConfig) -> Result<tokio_postgres::Config, OpenError> {
    let mut pg = tokio_postgres::Config::from_str(config.url.expose()).map_err(|e| {
        OpenError::Database(format!(
            "database_url {} is not a valid PostgreSQL URL: {e}",
            config.url
        ))
    })?;
    const OPTIONS: &str = "-c synchronous_commit=on -c plan_cache_mode=force_generic_plan";
    let options = match pg.get_options() {
        Some(given) => format!("{given} {OPTIONS}"),
        None => OPTIONS.to_owned(),
    };
    pg.options(&options);
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(config.timeout);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("totpd");
    }
    pg.keepalives(true).keepalives_idle(Duration::from_secs(30));
    Ok(pg)
}

/// TLS to the database: rustls (with `ring`) when the URL says `sslmode=require`, trusting the
/// system's roots and `database_ca_file`; the certificate and name are always verified.
/// Without `sslmode=require` the connection is plain (a `prefer` that silently fell back to
/// plain text would hide a misconfiguration).
fn tls(
    config: &PostgresConfig,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, OpenError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pg = tokio_postgres::Config::from_str(config.url.expose())
        .map_err(|e| OpenError::Database(e.to_string()))?;
    if pg.get_ssl_mode() != SslMode::Require {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &config.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                OpenError::Database(format!("database_ca_file {}: {e}", path.display()))
            })?;
        for cert in certs {
            roots.add(cert).map_err(|e| {
                OpenError::Database(format!("database_ca_file {}: {e}", path.display()))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OpenError::Database(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(client)))
}

/// A pool on `config`, not yet connected.
fn pool(config: &PostgresConfig) -> Result<Pool, OpenError> {
    let mut pg = pg_config(config)?;
    // A request that waits for a row lock longer than the pool wait (a transaction left open
    // by someone else) gets its 503 and rolls back, instead of hanging with every later change
    // of that user. Not on the migration connection: an instance starting beside another one
    // waits for its migrations as long as they take.
    let options = format!(
        "{} -c lock_timeout={}",
        pg.get_options().unwrap_or_default(),
        config.timeout.as_millis().max(1)
    );
    pg.options(&options);
    // Fast: a connection whose socket closed is replaced when taken; one that broke silently
    // fails one request (503) and is then dropped.
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls(config)? {
        Some(tls) => Manager::from_config(pg, tls, manager_config),
        None => Manager::from_config(pg, NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(config.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.timeout))
        .create_timeout(Some(config.timeout))
        .recycle_timeout(Some(config.timeout))
        .build()
        .map_err(|e| OpenError::Database(e.to_string()))
}

/// Brings the schema up to date in one transaction, under an advisory lock so that instances
/// starting together apply each migration once; refuses a schema newer than this binary.
/// Returns the migrations applied (or, with `dry_run`, that would be: nothing is written).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    dry_run: bool,
) -> Result<Vec<&'static Migration>, OpenError> {
    let db = |e: tokio_postgres::Error| OpenError::Database(format!("migration failed: {e}"));
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute(VERSION_TABLE).await.map_err(db)?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(db)?
        .get(0);
    if found > latest_version() {
        return Err(OpenError::NewerDatabaseSchema {
            found: found as u64,
            supported: latest_version() as u64,
        });
    }
    let pending: Vec<&Migration> = MIGRATIONS.iter().filter(|m| m.version > found).collect();
    if dry_run {
        tx.rollback().await.map_err(db)?;
        return Ok(pending);
    }
    for migration in &pending {
        tx.batch_execute(migration.sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(pending)
}

/// Connects once, outside any pool (migrations, `totpd migrate`).
pub async fn connect(config: &PostgresConfig) -> Result<tokio_postgres::Client, OpenError> {
    let pg = pg_config(config)?;
    let unreachable = |e: tokio_postgres::Error| {
        OpenError::Database(format!("cannot connect to {}: {e}", config.url))
    };
    let client = match tls(config)? {
        Some(tls) => {
            let (client, connection) = pg.connect(tls).await.map_err(unreachable)?;
            tokio::spawn(connection);
            client
        }
        None => {
            let (client, connection) = pg.connect(NoTls).await.map_err(unreachable)?;
            tokio::spawn(connection);
            client
        }
    };
    Ok(client)
}

impl PostgresStore {
    /// Connects, applies the pending migrations and opens the pool.
    pub async fn open(config: &PostgresConfig) -> Result<Self, OpenError> {
        let mut client = connect(config).await?;
        let applied = migrate(&mut client, false).await?;
        for migration in applied {
            tracing::info!(migration = migration.name, "database schema migrated");
        }
        drop(client);
        let pool = pool(config)?;
        let timeouts = Arc::new(AtomicU64::new(0));
        Ok(Self(Arc::new(Inner {
            batcher: batch::Batcher::start(pool.clone(), Arc::clone(&timeouts)),
            pool,
            counts: UserCounts::default(),
            timeouts,
            errors: AtomicU64::new(0),
        })))
    }

    /// A pooled connection, waiting at most the configured timeout.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.0.pool.get().await.map_err(|e| {
            if matches!(e, deadpool_postgres::PoolError::Timeout(_)) {
                self.0.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            StoreError::Backend(format!("no database connection: {e}"))
        })
    }

    /// Counts a failed operation for `/metrics`.
    fn failed(&self, e: StoreError) -> StoreError {
        if matches!(e, StoreError::Backend(_) | StoreError::Flush(_)) {
            self.0.errors.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    async fn read_user(
        client: &impl deadpool_postgres::GenericClient,
        sql: &str,
        param: &(dyn ToSql + Sync),
    ) -> Result<Option<User>, StoreError> {
        let statement = client.prepare_cached(sql).await.map_err(backend)?;
        match client
            .query_opt(&statement, &[param])
            .await
            .map_err(backend)?
        {
            Some(row) => Ok(Some(decode(row.get::<_, &[u8]>(0))?)),
            None => Ok(None),
        }
    }

    /// Reads the user that `find` (a `SELECT record` with one parameter) finds, runs `change`
    /// on it, and has the result written with its [`Writes`] by the group commit (see
    /// [`batch`]), only if the user's record is still the one read (a compare-and-swap on the
    /// record); if another change came first, runs again on its result. No lock is held
    /// between the read and the write, so no client that goes away mid-request can leave a row
    /// locked. Two instances changing one user are serialized by the row's update: the second
    /// one's compare fails once the first committed, and it runs again on the new record (so a
    /// temp token, a time step or a recovery code has exactly one winner across instances).
    async fn update_found(
        &self,
        find: &str,
        param: &(dyn ToSql + Sync),
        change: &mut UserChange<'_>,
    ) -> Result<Option<User>, StoreError> {
        loop {
            let client = self.client().await?;
            let find = client.prepare_cached(find).await.map_err(backend)?;
            let Some(row) = client.query_opt(&find, &[param]).await.map_err(backend)? else {
                return Ok(None);
            };
            let read: Vec<u8> = row.get(0);
            let before: User = decode(&read)?;
            let mut user = before.clone();
            let writes = change(&mut user);
            let changed = user != before;
            if !changed && writes_nothing(&writes) {
                // Nothing to write; what was read was committed, so it is durable.
                return Ok(Some(user));
            }
            let carried = match &user.kept_key {
                Some(kept) if changed && user.key_epoch > before.key_epoch => {
                    carried_key(&client, kept, user.id, user.key_epoch).await?
                }
                _ => None,
            };
            // The connection goes back to the pool before the write waits for its batch,
            // whose writer takes one from the same pool.
            drop(client);
            let written = batch::Change::new(&user, read, &writes, carried);
            if !self.0.batcher.write(written).await? {
                continue;
            }
            if changed {
                let _ = self.0.counts.changed(&before, &user);
            }
            return Ok(Some(user));
        }
    }

    async fn create_user_now(
        &self,
        username: &str,
        password_hash: &str,
        now: UnixTime,
        mut event: AuditEvent,
    ) -> Result<Created, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        // The id comes from a sequence, which never gives a number twice (even when this
        // transaction rolls back); the name is claimed by the insert itself, so two instances
        // creating one name at once get one success and one `NameTaken`.
        let id: i64 = tx
            .query_one("SELECT nextval('user_ids')", &[])
            .await
            .map_err(backend)?
            .get(0);
        let user = User::new(uint(id), username.to_owned(), password_hash.to_owned(), now);
        let inserted = tx
            .execute(
                "INSERT INTO users (id, username, totp_active, record) VALUES ($1, $2, false, $3) \
                 ON CONFLICT (username) DO NOTHING",
                &[&id, &username, &encode(&user)],
            )
            .await
            .map_err(backend)?;
        if inserted == 0 {
            tx.rollback().await.map_err(backend)?;
            return Ok(Created::NameTaken);
        }
        event.user_id = Some(user.id);
        event.username = Some(user.username.clone());
        insert_events(&tx, std::slice::from_ref(&event)).await?;
        tx.commit().await.map_err(backend)?;
        self.0.counts.created();
        Ok(Created::User(Box::new(user)))
    }

    async fn remove_user_now(
        &self,
        id: UserId,
        events: &[AuditEvent],
    ) -> Result<Option<User>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let row = tx
            .query_opt(
                "DELETE FROM users WHERE id = $1 RETURNING record",
                &[&int(id)],
            )
            .await
            .map_err(backend)?;
        let removed: Option<User> = match row {
            Some(row) => Some(decode(row.get::<_, &[u8]>(0))?),
            None => None,
        };
        if removed.is_some() {
            // Unlike sled (where they stop resolving and are swept), they go at once.
            tx.execute("DELETE FROM login_keys WHERE user_id = $1", &[&int(id)])
                .await
                .map_err(backend)?;
            tx.execute("DELETE FROM temp_tokens WHERE user_id = $1", &[&int(id)])
                .await
                .map_err(backend)?;
        }
        insert_events(&tx, events).await?;
        tx.commit().await.map_err(backend)?;
        if let Some(user) = &removed {
            self.0.counts.removed(user);
        }
        Ok(removed)
    }

    async fn export_now(
        &self,
        sink: &tokio::sync::mpsc::Sender<BackupRecord>,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        // One snapshot for every table: what one instance wrote meanwhile is wholly in or out.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(backend)?;
        let mut count = 0u64;
        let send = |kind: &str, key: Vec<u8>, value: Vec<u8>| {
            let record = BackupRecord {
                kind: kind.to_owned(),
                key,
                value,
            };
            async move {
                sink.send(record)
                    .await
                    .map_err(|_| StoreError::Backend("the backup writer stopped".into()))
            }
        };
        if let Some(row) = tx
            .query_opt("SELECT value FROM meta WHERE name = $1", &[&KEY_CHECK_NAME])
            .await
            .map_err(backend)?
        {
            send("meta", KEY_CHECK_KEY.to_vec(), row.get(0)).await?;
            count += 1;
        }
        // A sequence is outside the snapshot: this may be ahead of the users exported, never
        // behind, so a restored store still never gives an id twice.
        let next: i64 = tx
            .query_one(
                "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM user_ids",
                &[],
            )
            .await
            .map_err(backend)?
            .get(0);
        send(
            "meta",
            NEXT_ID_KEY.to_vec(),
            uint(next).to_be_bytes().to_vec(),
        )
        .await?;
        count += 1;
        let tables: [(&str, &str); 3] = [
            ("users", "SELECT id, record FROM users ORDER BY id"),
            (
                "keys",
                "SELECT digest, record FROM login_keys ORDER BY digest",
            ),
            (
                "audit",
                "SELECT time, seq, record FROM audit_events ORDER BY time, seq",
            ),
        ];
        for (kind, sql) in tables {
            let rows = tx
                .query_raw(sql, std::iter::empty::<&(dyn ToSql + Sync)>())
                .await
                .map_err(backend)?;
            pin_mut!(rows);
            while let Some(row) = rows.next().await {
                let row = row.map_err(backend)?;
                let (key, value) = match kind {
                    "users" => (
                        uint(row.get::<_, i64>(0)).to_be_bytes().to_vec(),
                        row.get(1),
                    ),
                    "keys" => (row.get(0), row.get(1)),
                    _ => {
                        let mut key = uint(row.get::<_, i64>(0)).to_be_bytes().to_vec();
                        key.extend_from_slice(&uint(row.get::<_, i64>(1)).to_be_bytes());
                        (key, row.get(2))
                    }
                };
                send(kind, key, value).await?;
                count += 1;
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(count)
    }

    async fn recount_now(&self) -> Result<(), StoreError> {
        // PostgreSQL keeps no counts across starts, so whether this one is exact is moot.
        let before = self.0.counts.moves();
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE totp_active) FROM users",
                &[],
            )
            .await
            .map_err(backend)?;
        let counts = &self.0.counts;
        counts.set(row.get(0), row.get(1), before);
        Ok(())
    }

    async fn sweep_now(
        &self,
        now: UnixTime,
        lifetime: KeyLifetime,
        audit_cutoff: UnixTime,
    ) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let tokens = tx
            .execute(
                "DELETE FROM temp_tokens WHERE expires_at <= $1",
                &[&int(now)],
            )
            .await
            .map_err(backend)?;
        // `KeyLifetime::alive` in SQL: dead from created + absolute, or last use + idle, on.
        // Keys revoked by an epoch fail, and are deleted, at their next use (as with sled).
        let keys = tx
            .execute(
                "DELETE FROM login_keys WHERE $1 >= created_at + $2 OR $1 >= last_used_at + $3",
                &[&int(now), &int(lifetime.absolute), &int(lifetime.idle)],
            )
            .await
            .map_err(backend)?;
        let events = tx
            .execute(
                "DELETE FROM audit_events WHERE time < $1",
                &[&int(audit_cutoff)],
            )
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok((tokens + keys + events) as usize)
    }

    /// Whether the store holds no record at all (a restore or a copy needs an empty target).
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM login_keys) \
                 + (SELECT count(*) FROM audit_events) + (SELECT count(*) FROM meta)",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(row.get::<_, i64>(0) == 0)
    }

    /// Imports every record in one transaction, all or nothing: the store must be empty, and
    /// nothing is committed unless all `expected` records arrived.
    pub async fn restore(
        &self,
        mut records: tokio::sync::mpsc::Receiver<BackupRecord>,
        expected: u64,
        verified: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<u64, String> {
        if !self.is_empty().await.map_err(|e| e.to_string())? {
            return Err("the database already holds totpd data: restore needs an empty one".into());
        }
        let mut client = self.client().await.map_err(|e| e.to_string())?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        let mut count = 0;
        while let Some(record) = records.recv().await {
            import_into(&tx, &record).await.map_err(|e| e.to_string())?;
            count += 1;
        }
        if count != expected {
            return Err(format!(
                "restore incomplete: {count} of {expected} records arrived; nothing was restored"
            ));
        }
        verified.await.map_err(|_| NOT_VERIFIED.to_owned())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        Ok(count)
    }
}

fn writes_nothing(writes: &Writes) -> bool {
    writes.key.is_none() && writes.temp_token.is_none() && writes.events.is_empty()
}

const INSERT_KEY: &str = "INSERT INTO login_keys (digest, user_id, created_at, last_used_at, record) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (digest) DO UPDATE SET \
     user_id = excluded.user_id, created_at = excluded.created_at, \
     last_used_at = excluded.last_used_at, record = excluded.record";
const INSERT_TEMP_TOKEN: &str = "INSERT INTO temp_tokens (digest, user_id, expires_at) \
     VALUES ($1, $2, $3) ON CONFLICT (digest) DO UPDATE SET user_id = excluded.user_id, \
     expires_at = excluded.expires_at";
const INSERT_EVENT: &str = "INSERT INTO audit_events (time, record) VALUES ($1, $2)";

/// The login key `digest` as stored (the bytes, for a compare-and-swap) and decoded.
async fn login_key_record(
    client: &tokio_postgres::Client,
    digest: &Digest,
) -> Result<Option<(Vec<u8>, LoginKey)>, StoreError> {
    let Some(row) = client
        .query_opt(
            "SELECT record FROM login_keys WHERE digest = $1",
            &[&digest.as_slice()],
        )
        .await
        .map_err(backend)?
    else {
        return Ok(None);
    };
    let record: Vec<u8> = row.get(0);
    let key = decode(&record)?;
    Ok(Some((record, key)))
}

/// The kept key's record moved to the user's new epoch, to be written with the change that
/// moves the user there (it is valid meanwhile through `kept_key`); `None` if there is nothing
/// to move. Written without a compare: a touch of the key meanwhile only loses its newer
/// `last_used_at`, which makes the idle timeout end sooner.
async fn carried_key(
    client: &tokio_postgres::Client,
    keep: &Digest,
    user_id: UserId,
    epoch: u64,
) -> Result<Option<(Digest, Vec<u8>)>, StoreError> {
    let Some((_, mut key)) = login_key_record(client, keep).await? else {
        return Ok(None);
    };
    // Only the key valid at the epoch just left moves: never one revoked before it.
    if key.user_id != user_id || key.epoch + 1 != epoch {
        return Ok(None);
    }
    key.epoch = epoch;
    Ok(Some((*keep, encode(&key))))
}

async fn insert_key(
    client: &impl deadpool_postgres::GenericClient,
    digest: &[u8],
    key: &LoginKey,
    record: &[u8],
) -> Result<(), StoreError> {
    let statement = client.prepare_cached(INSERT_KEY).await.map_err(backend)?;
    client
        .execute(
            &statement,
            &[
                &digest,
                &int(key.user_id),
                &int(key.created_at),
                &int(key.last_used_at),
                &record,
            ],
        )
        .await
        .map_err(backend)?;
    Ok(())
}

async fn insert_temp_token(
    client: &impl deadpool_postgres::GenericClient,
    digest: &[u8],
    user_id: UserId,
    expires_at: UnixTime,
) -> Result<(), StoreError> {
    let statement = client
        .prepare_cached(INSERT_TEMP_TOKEN)
        .await
        .map_err(backend)?;
    client
        .execute(&statement, &[&digest, &int(user_id), &int(expires_at)])
        .await
        .map_err(backend)?;
    Ok(())
}

async fn insert_events(
    client: &impl deadpool_postgres::GenericClient,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let statement = client.prepare_cached(INSERT_EVENT).await.map_err(backend)?;
    for event in events {
        client
            .execute(&statement, &[&int(event.time), &encode(event)])
            .await
            .map_err(backend)?;
    }
    Ok(())
}

/// Writes one backup record; indexes (names, temp tokens) are rebuilt from the users.
async fn import_into(
    tx: &deadpool_postgres::Transaction<'_>,
    record: &BackupRecord,
) -> Result<(), StoreError> {
    match record.kind.as_str() {
        "users" => {
            let user: User = decode(&record.value)?;
            tx.execute(
                "INSERT INTO users (id, username, totp_active, record) VALUES ($1, $2, $3, $4)",
                &[
                    &int(user.id),
                    &user.username,
                    &user.totp.is_some(),
                    &record.value,
                ],
            )
            .await
            .map_err(backend)?;
            for token in &user.temp_tokens {
                insert_temp_token(tx, &token.digest, user.id, token.expires_at).await?;
            }
            // The sequence stays ahead of every id present.
            tx.execute(
                "SELECT setval('user_ids', greatest($1, (SELECT last_value FROM user_ids)))",
                &[&int(user.id)],
            )
            .await
            .map_err(backend)?;
        }
        "keys" => {
            let key: LoginKey = decode(&record.value)?;
            insert_key(tx, &record.key, &key, &record.value).await?;
        }
        "audit" => {
            let event: AuditEvent = decode(&record.value)?;
            tx.execute(INSERT_EVENT, &[&int(event.time), &record.value])
                .await
                .map_err(backend)?;
        }
        "usernames" | "temp_tokens" => {}
        "meta" | "" if record.key == KEY_CHECK_KEY => {
            decode::<StoredSecret>(&record.value)?;
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&KEY_CHECK_NAME, &record.value],
            )
            .await
            .map_err(backend)?;
        }
        "meta" | "" if record.key == NEXT_ID_KEY => {
            let next = <[u8; 8]>::try_from(record.value.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("a next user id of the wrong length".into()))?;
            // `next` is the first id not yet given: the sequence's last given is one below.
            if next > 1 {
                tx.execute(
                    "SELECT setval('user_ids', greatest($1, (SELECT last_value FROM user_ids)))",
                    &[&int(next - 1)],
                )
                .await
                .map_err(backend)?;
            }
        }
        "meta" | "" => {}
        other => {
            return Err(StoreError::Corrupt(format!(
                "the backup names an unknown record kind {other:?}"
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let client = self.client().await?;
        Self::read_user(&client, "SELECT record FROM users WHERE id = $1", &int(id))
            .await
            .map_err(|e| self.failed(e))
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        let client = self.client().await?;
        Self::read_user(
            &client,
            "SELECT record FROM users WHERE username = $1",
            &username,
        )
        .await
        .map_err(|e| self.failed(e))
    }

    async fn user_by_key(&self, digest: &Digest) -> Result<Option<(LoginKey, User)>, StoreError> {
        let client = self.client().await?;
        let found = async {
            let statement = client
                .prepare_cached(
                    "SELECT k.record, u.record FROM login_keys k JOIN users u ON u.id = k.user_id \
                     WHERE k.digest = $1",
                )
                .await
                .map_err(backend)?;
            match client
                .query_opt(&statement, &[&digest.as_slice()])
                .await
                .map_err(backend)?
            {
                Some(row) => Ok(Some((
                    decode(row.get::<_, &[u8]>(0))?,
                    decode(row.get::<_, &[u8]>(1))?,
                ))),
                None => Ok(None),
            }
        };
        found.await.map_err(|e| self.failed(e))
    }

    async fn users(&self, after: Option<UserId>, limit: usize) -> Result<Vec<User>, StoreError> {
        let client = self.client().await?;
        let start = int(after.map_or(0, |id| id.saturating_add(1)));
        let rows = client
            .query(
                "SELECT record FROM users WHERE id >= $1 ORDER BY id LIMIT $2",
                &[&start, &int(limit as u64)],
            )
            .await
            .map_err(|e| self.failed(backend(e)))?;
        rows.iter()
            .map(|row| Ok(decode(row.get::<_, &[u8]>(0))?))
            .collect()
    }

    async fn events(&self, since: UnixTime) -> Result<Vec<AuditEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record FROM audit_events WHERE time >= $1 ORDER BY time, seq",
                &[&int(since)],
            )
            .await
            .map_err(|e| self.failed(backend(e)))?;
        rows.iter()
            .map(|row| Ok(decode(row.get::<_, &[u8]>(0))?))
            .collect()
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now: UnixTime,
        event: AuditEvent,
    ) -> Result<Created, StoreError> {
        self.create_user_now(username, password_hash, now, event)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn update_user(
        &self,
        id: UserId,
        change: &mut UserChange<'_>,
    ) -> Result<Option<User>, StoreError> {
        let find = "SELECT record FROM users WHERE id = $1";
        self.update_found(find, &int(id), change)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn update_user_by_temp_token(
        &self,
        digest: &Digest,
        change: &mut UserChange<'_>,
    ) -> Result<Option<User>, StoreError> {
        let find = "SELECT u.record FROM temp_tokens t JOIN users u ON u.id = t.user_id \
                    WHERE t.digest = $1";
        self.update_found(find, &digest.as_slice(), change)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn remove_user(
        &self,
        id: UserId,
        events: Vec<AuditEvent>,
    ) -> Result<Option<User>, StoreError> {
        self.remove_user_now(id, &events)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn revoke_key(
        &self,
        digest: &Digest,
        events: Vec<AuditEvent>,
    ) -> Result<bool, StoreError> {
        let revoke = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(backend)?;
            let deleted = tx
                .execute(
                    "DELETE FROM login_keys WHERE digest = $1",
                    &[&digest.as_slice()],
                )
                .await
                .map_err(backend)?;
            insert_events(&tx, &events).await?;
            tx.commit().await.map_err(backend)?;
            Ok(deleted > 0)
        };
        revoke.await.map_err(|e| self.failed(e))
    }

    async fn touch_key(&self, digest: &Digest, now: UnixTime) -> Result<(), StoreError> {
        let touch = async {
            let client = self.client().await?;
            let Some((old, mut key)) = login_key_record(&client, digest).await? else {
                return Ok(());
            };
            key.last_used_at = key.last_used_at.max(now);
            // A compare-and-swap on the record: losing a race with another touch or an epoch
            // carry-over only makes the idle timeout end sooner.
            client
                .execute(
                    "UPDATE login_keys SET record = $3, last_used_at = $4 \
                     WHERE digest = $1 AND record = $2",
                    &[
                        &digest.as_slice(),
                        &old,
                        &encode(&key),
                        &int(key.last_used_at),
                    ],
                )
                .await
                .map_err(backend)?;
            Ok(())
        };
        touch.await.map_err(|e| self.failed(e))
    }

    async fn record_events(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let record = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(backend)?;
            insert_events(&tx, &events).await?;
            tx.commit().await.map_err(backend)
        };
        record.await.map_err(|e| self.failed(e))
    }

    async fn sweep(
        &self,
        now: UnixTime,
        lifetime: KeyLifetime,
        audit_cutoff: UnixTime,
    ) -> Result<usize, StoreError> {
        self.sweep_now(now, lifetime, audit_cutoff)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn master_key_check(&self) -> Result<Option<StoredSecret>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT value FROM meta WHERE name = $1", &[&KEY_CHECK_NAME])
            .await
            .map_err(|e| self.failed(backend(e)))?;
        match row {
            Some(row) => Ok(Some(decode(row.get::<_, &[u8]>(0))?)),
            None => Ok(None),
        }
    }

    async fn set_master_key_check(&self, check: &StoredSecret) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&KEY_CHECK_NAME, &encode(check)],
            )
            .await
            .map_err(|e| self.failed(backend(e)))?;
        Ok(())
    }

    async fn export(
        &self,
        sink: tokio::sync::mpsc::Sender<BackupRecord>,
    ) -> Result<u64, StoreError> {
        self.export_now(&sink).await.map_err(|e| self.failed(e))
    }

    async fn import(&self, record: BackupRecord) -> Result<(), StoreError> {
        let import = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(backend)?;
            import_into(&tx, &record).await?;
            tx.commit().await.map_err(backend)
        };
        import.await.map_err(|e| self.failed(e))
    }

    async fn healthy(&self) -> bool {
        match self.client().await {
            Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    async fn recount(&self) -> Result<(), StoreError> {
        self.recount_now().await.map_err(|e| self.failed(e))
    }

    fn stats(&self) -> StoreStats {
        let status = self.0.pool.status();
        StoreStats {
            counts: self.0.counts.get(),
            pool: Some(PoolStats {
                max_size: status.max_size as u64,
                size: status.size as u64,
                available: status.available as u64,
                waiting: status.waiting as u64,
                timeouts: self.0.timeouts.load(Ordering::Relaxed),
                errors: self.0.errors.load(Ordering::Relaxed),
            }),
            ..StoreStats::default()
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every write was committed before it was acknowledged: nothing to flush.
        self.0.pool.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://totpd:s3cret@db.example:5432/totpd?sslmode=require"),
            "postgres://totpd:***@db.example:5432/totpd?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://u:p%40ss@h/db?password=other&x=1"),
            "postgresql://u:***@h/db?password=***&x=1"
        );
        assert_eq!(
            redact_url("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i as i32 + 1);
            assert!(
                migration
                    .name
                    .starts_with(&format!("{:04}_", migration.version))
            );
        }
    }
}
