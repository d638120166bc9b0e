//! The port itself: the [`Store`] trait, what its methods take and give, and its errors.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::clock::UnixTime;
use crate::domain::audit::AuditEvent;
use crate::domain::keys::KeyLifetime;
use crate::domain::user::{Digest, LoginKey, StoredSecret, User, UserId};

/// The layout this binary reads and writes. 2: user records may be at format version 2
/// (`codec`), which a totpd of schema 1 cannot read; opening a schema-1 store raises it, so that
/// an older totpd then refuses the data dir instead of failing on some users' records.
pub const SCHEMA_VERSION: u64 = 2;

/// A storage failure: the request answers 503 (or 500 for a corrupt record).
#[derive(Debug)]
pub enum StoreError {
    /// The backend failed (I/O, disk full, connection lost).
    Backend(String),
    /// A record could not be decoded.
    Corrupt(String),
    /// A flush (the durability step) failed.
    Flush(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Backend(e) => write!(f, "store: {e}"),
            StoreError::Corrupt(e) => write!(f, "corrupt record: {e}"),
            StoreError::Flush(e) => write!(f, "flush failed: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<super::codec::DecodeError> for StoreError {
    fn from(e: super::codec::DecodeError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// Why a store did not open; each has a message an operator can act on.
#[derive(Debug)]
pub enum OpenError {
    /// Another process (a running server) holds the data dir.
    Locked(PathBuf),
    NewerSchema {
        found: u64,
        path: PathBuf,
    },
    Io {
        path: PathBuf,
        cause: String,
    },
    /// The database refused or could not be reached (the message names no password).
    Database(String),
    /// The database's schema was migrated by a newer totpd.
    NewerDatabaseSchema {
        found: u64,
        supported: u64,
    },
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Locked(path) => write!(
                f,
                "the data dir {} is in use by another totpd process (a running server?)",
                path.display()
            ),
            OpenError::NewerSchema { found, path } => write!(
                f,
                "the data dir {} has schema version {found}, newer than this totpd understands \
                 ({SCHEMA_VERSION}); use a newer totpd",
                path.display()
            ),
            OpenError::Io { path, cause } => {
                write!(f, "cannot open the data dir {}: {cause}", path.display())
            }
            OpenError::Database(cause) => write!(f, "database: {cause}"),
            OpenError::NewerDatabaseSchema { found, supported } => write!(
                f,
                "the database has schema version {found}, newer than this totpd understands \
                 ({supported}); use a newer totpd (every instance on one database must be as new \
                 as the newest)"
            ),
        }
    }
}

impl std::error::Error for OpenError {}

/// What creating a user gave: the new user, or nothing because the name is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    User(Box<User>),
    NameTaken,
}

impl Created {
    /// The new user, if one was created.
    pub fn user(self) -> Option<User> {
        match self {
            Created::User(user) => Some(*user),
            Created::NameTaken => None,
        }
    }
}

/// The refusal of a restore whose source did not confirm every record it sent (a checksum
/// that failed after the records, a copy whose source failed): nothing is restored.
pub const NOT_VERIFIED: &str =
    "the source was not verified to the end (checksum or read failed): nothing was restored";

/// What a change of a user writes besides the user, in the same durable step.
#[derive(Debug, Default)]
pub struct Writes {
    /// A login key to store.
    pub key: Option<(Digest, LoginKey)>,
    /// A temp token to index (digest, expiry); its state lives in the user.
    pub temp_token: Option<(Digest, UnixTime)>,
    /// Audit events describing the change.
    pub events: Vec<AuditEvent>,
}

/// A change of one user: a pure function, re-run on a fresh copy after a conflict. It mutates
/// the user and says what else to write (a change that changes nothing and writes nothing
/// writes nothing; PostgreSQL writes an unchanged record back when there are other writes, as
/// the compare that makes them atomic with it).
pub type UserChange<'a> = dyn FnMut(&mut User) -> Writes + Send + 'a;

/// One record of a backup: `kind` is `users`, `keys`, `audit` or `meta` (the names of the
/// backup file format, see `ops::backup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRecord {
    pub kind: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Figures for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// (users, users with TOTP active), once counted after start.
    pub counts: Option<(u64, u64)>,
    pub bytes_on_disk: u64,
    pub flushes: u64,
    pub acknowledged_writes: u64,
    /// The connection pool, for a store that has one.
    pub pool: Option<PoolStats>,
}

/// A connection pool's state: gauges (`max_size`, `size`, `available`, `waiting`) and counters
/// since start (`timeouts`: no connection within the wait; `errors`: failed operations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub max_size: u64,
    pub size: u64,
    pub available: u64,
    pub waiting: u64,
    pub timeouts: u64,
    pub errors: u64,
}

#[async_trait]
pub trait Store: Send + Sync {
    async fn user(&self, id: UserId) -> Result<Option<User>, StoreError>;
    async fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError>;
    /// The login key `digest` and its user, if both exist (validity is the domain's question).
    async fn user_by_key(&self, digest: &Digest) -> Result<Option<(LoginKey, User)>, StoreError>;
    /// Up to `limit` users with ids above `after`, in id order.
    async fn users(&self, after: Option<UserId>, limit: usize) -> Result<Vec<User>, StoreError>;
    /// Audit events from `since` on, oldest first.
    async fn events(&self, since: UnixTime) -> Result<Vec<AuditEvent>, StoreError>;

    /// Creates a user with a fresh id that no user, past or present, has had. Never replaces a
    /// record. `event` is written with it (its user id and name are filled in).
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now: UnixTime,
        event: AuditEvent,
    ) -> Result<Created, StoreError>;
    /// Applies `change` to the user atomically; the user as written, or `None` if no such user.
    async fn update_user(
        &self,
        id: UserId,
        change: &mut UserChange<'_>,
    ) -> Result<Option<User>, StoreError>;
    /// Applies `change`, as [`Store::update_user`] does, to the user the temp token `digest` is
    /// indexed to; `None` if it is not indexed or its user is gone. The code step of a login
    /// finds and changes its user in one operation (the user read through the index is the
    /// one the change's compare-and-swap starts from) instead of a read and then a change.
    async fn update_user_by_temp_token(
        &self,
        digest: &Digest,
        change: &mut UserChange<'_>,
    ) -> Result<Option<User>, StoreError>;
    /// Deletes a user (their keys and temp tokens stop resolving and are swept later).
    async fn remove_user(
        &self,
        id: UserId,
        events: Vec<AuditEvent>,
    ) -> Result<Option<User>, StoreError>;
    /// Deletes a login key; false if it did not exist.
    async fn revoke_key(
        &self,
        digest: &Digest,
        events: Vec<AuditEvent>,
    ) -> Result<bool, StoreError>;
    /// Notes a key's last use (best effort: losing it only shortens the idle timeout).
    async fn touch_key(&self, digest: &Digest, now: UnixTime) -> Result<(), StoreError>;
    async fn record_events(&self, events: Vec<AuditEvent>) -> Result<(), StoreError>;
    /// Deletes expired temp-token index entries, keys past `lifetime`, and audit events older
    /// than `audit_cutoff`; returns how many records went.
    async fn sweep(
        &self,
        now: UnixTime,
        lifetime: KeyLifetime,
        audit_cutoff: UnixTime,
    ) -> Result<usize, StoreError>;

    /// The sealed record that proves which master key this store's secrets are sealed under.
    async fn master_key_check(&self) -> Result<Option<StoredSecret>, StoreError>;
    async fn set_master_key_check(&self, check: &StoredSecret) -> Result<(), StoreError>;

    /// Sends every record, as one consistent snapshot, to `sink`; returns how many.
    async fn export(
        &self,
        sink: tokio::sync::mpsc::Sender<BackupRecord>,
    ) -> Result<u64, StoreError>;
    /// Writes one backup record into this (empty) store; indexes are rebuilt from the records.
    async fn import(&self, record: BackupRecord) -> Result<(), StoreError>;

    /// Whether the store answers a read.
    async fn healthy(&self) -> bool;
    /// Counts users (a full scan: the server runs it in the background after start).
    async fn recount(&self) -> Result<(), StoreError>;
    fn stats(&self) -> StoreStats;
    /// Makes everything written so far durable (shutdown, the CLI).
    async fn close(&self) -> Result<(), StoreError>;
}
