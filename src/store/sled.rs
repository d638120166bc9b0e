//! The embedded backend: sled, under `<data dir>/db`.
//!
//! Everything that must change together lives in one record — the user's: the secret, the last
//! used time step, the recovery-code hashes, the failure count and lock, and the outstanding
//! temp tokens — so `update_user` is one compare-and-swap of that record, retried on a
//! conflict. Why not sled's multi-tree transactions: measured here at 188 µs each against 26 µs
//! for a get and a CAS, and a global lock under concurrency.
//!
//! Trees: `users` (id → User), `usernames` (name → id), `keys` (digest → LoginKey),
//! `temp_tokens` (digest → user id ‖ expiry: only an index, the state is in the user), `audit`
//! (time ‖ sequence → AuditEvent); the default tree holds the schema version, the master-key
//! check record and the next user id (kept in the data, so a backup carries it), and, between
//! a clean close and the next open, the user counts (see `COUNTS_KEY`).
//!
//! Durability: every mutating call awaits the group commit, whose flush ends with an
//! `fdatasync` of sled's log file — sled's own `flush()` on Linux stops at `sync_file_range`,
//! which reaches neither the file's metadata nor the disk's cache.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::codec::{decode, encode};
use super::counts::UserCounts;
use super::group_commit::GroupCommit;
use super::port::{
    BackupRecord, Created, OpenError, SCHEMA_VERSION, Store, StoreError, StoreStats, UserChange,
    Writes,
};
use crate::clock::UnixTime;
use crate::domain::audit::AuditEvent;
use crate::domain::keys::KeyLifetime;
use crate::domain::user::{Digest, LoginKey, StoredSecret, User, UserId};

const SCHEMA_KEY: &[u8] = b"schema_version";
const KEY_CHECK_KEY: &[u8] = b"master_key_check";
const NEXT_ID_KEY: &[u8] = b"next_user_id";
/// The user counts (users, users with TOTP active: two big-endian u64), written by a clean
/// close and taken out, durably, by the next open: a store that opens with them needs no full
/// scan to count its users (at a million users the scan took seconds of CPU and most of the
/// memory a fresh server used). A crash leaves no counts behind, so the next start counts.
const COUNTS_KEY: &[u8] = b"user_counts";
/// The database's folder inside the data dir, and the one a restore builds before moving it.
const DB_DIR: &str = "db";
const RESTORING_DIR: &str = "db.restoring";

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

struct Inner {
    db: sled::Db,
    users: sled::Tree,
    usernames: sled::Tree,
    keys: sled::Tree,
    temp_tokens: sled::Tree,
    audit: sled::Tree,
    /// Audit events waiting for the next flush, which writes them in one batch first.
    audit_queue: Arc<Mutex<sled::Batch>>,
    counts: UserCounts,
    /// Whether `COUNTS_KEY` holds the counts (a close wrote them): the next change that moves a
    /// count takes them out again, so a later crash cannot leave them stale.
    counts_kept: AtomicBool,
    /// Held by a full count or a sweep from before its thread starts until the thread has let
    /// go of the store: `close` waits for it (after asking it to stop), so that once `close`
    /// returns no scan holds the data dir or changes anything.
    scanning: Arc<tokio::sync::Mutex<()>>,
    /// Set by `close`: a full count or a sweep stops early, and none starts.
    closing: AtomicBool,
    /// Writers hold it shared while they write; an export holds it alone, so a backup is one
    /// consistent snapshot (sled has no snapshots of its own).
    /// An async lock: a writer waiting behind an export yields its worker thread instead of
    /// blocking it, so reads (status, health) go on being served meanwhile.
    gate: tokio::sync::RwLock<()>,
    /// sled's log file, for the `fdatasync` that ends every flush.
    log: Arc<std::fs::File>,
    /// The database's folder, recorded as released when this goes (see `released`).
    path: std::path::PathBuf,
    commit: GroupCommit,
}

/// Key-value pairs read from sled, from one tree or another.
type Records<'a> = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a>;

/// The sled backend; clones share one database.
#[derive(Clone)]
pub struct SledStore(Arc<Inner>);

impl SledStore {
    /// Opens (or creates) the store in `<data_dir>/db`.
    pub fn open(data_dir: &Path, cache_capacity: u64) -> Result<Self, OpenError> {
        create_private_dir(data_dir).map_err(|e| io_error(data_dir, e.to_string()))?;
        Self::open_at(data_dir, &data_dir.join(DB_DIR), cache_capacity)
    }

    fn open_at(data_dir: &Path, path: &Path, cache_capacity: u64) -> Result<Self, OpenError> {
        let io = |cause: String| io_error(data_dir, cause);
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity);
        let db = released::open(path, || config.open()).map_err(|e| match e {
            sled::Error::Io(ref io_err)
                if io_err.to_string().contains("could not acquire lock") =>
            {
                OpenError::Locked(data_dir.to_path_buf())
            }
            other => io(other.to_string()),
        })?;
        check_schema(&db, data_dir)?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| io(e.to_string()));
        let (users, usernames, keys, temp_tokens, audit) = (
            tree("users")?,
            tree("usernames")?,
            tree("keys")?,
            tree("temp_tokens")?,
            tree("audit")?,
        );
        repair_next_id(&db, &users).map_err(|e| io(e.to_string()))?;
        let audit_queue = Arc::new(Mutex::new(sled::Batch::default()));
        // sled keeps its log in the file `db` of its folder.
        let log = Arc::new(std::fs::File::open(path.join("db")).map_err(|e| io(e.to_string()))?);
        let counts = take_counts(&db, &users, &log).map_err(|e| io(e.to_string()))?;
        let (flusher, queue, audit_tree) = (db.clone(), Arc::clone(&audit_queue), audit.clone());
        let flusher_log = Arc::clone(&log);
        let commit = GroupCommit::start(move || {
            write_queued_events(&queue, &audit_tree).map_err(|e| e.to_string())?;
            flusher.flush().map_err(|e| e.to_string())?;
            // The real barrier: sled's flush leaves the data in the disk's cache.
            flusher_log.sync_data().map_err(|e| e.to_string())
        })
        .map_err(|e| io(e.to_string()))?;
        Ok(Self(Arc::new(Inner {
            db,
            users,
            usernames,
            keys,
            temp_tokens,
            audit,
            audit_queue,
            counts,
            counts_kept: AtomicBool::new(false),
            scanning: Arc::new(tokio::sync::Mutex::new(())),
            closing: AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
            log,
            path: path.to_path_buf(),
            commit,
        })))
    }

    async fn persist(&self) -> Result<(), StoreError> {
        self.0
            .commit
            .persist()
            .await
            .map_err(|e| StoreError::Flush(e.0))
    }

    async fn write_gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.0.gate.read().await
    }

    fn queue_events(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut queue = self
            .0
            .audit_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for event in events {
            let mut key = event.time.to_be_bytes().to_vec();
            key.extend_from_slice(&self.0.db.generate_id()?.to_be_bytes());
            queue.insert(key, encode(event));
        }
        Ok(())
    }

    fn read_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        Ok(match self.0.users.get(id.to_be_bytes())? {
            Some(bytes) => Some(decode(&bytes)?),
            None => None,
        })
    }

    /// The compare-and-swap loop of `update_user`, without the flush: the user after the change
    /// and the change's other writes.
    fn apply_change(
        &self,
        id: UserId,
        change: &mut UserChange<'_>,
    ) -> Result<Option<(User, Writes)>, StoreError> {
        let key = id.to_be_bytes();
        let inner = &self.0;
        loop {
            let Some(old) = inner.users.get(key)? else {
                return Ok(None);
            };
            let before: User = decode(&old)?;
            let mut user = before.clone();
            let writes = change(&mut user);
            if user == before {
                return Ok(Some((user, writes)));
            }
            if inner
                .users
                .compare_and_swap(key, Some(&old), Some(encode(&user)))?
                .is_err()
            {
                continue;
            }
            if inner.counts.changed(&before, &user) {
                self.counts_moved()?;
            }
            if user.key_epoch > before.key_epoch {
                if let Some(kept) = user.kept_key {
                    self.carry_key_over(&kept, id, user.key_epoch)?;
                }
            }
            return Ok(Some((user, writes)));
        }
    }

    /// Moves the kept key to the user's new epoch (it is valid meanwhile through `kept_key`).
    fn carry_key_over(&self, keep: &Digest, user_id: UserId, epoch: u64) -> Result<(), StoreError> {
        loop {
            let Some(bytes) = self.0.keys.get(keep)? else {
                return Ok(());
            };
            let mut key: LoginKey = decode(&bytes)?;
            // Only the key valid at the epoch just left moves: never one revoked before it.
            if key.user_id != user_id || key.epoch + 1 != epoch {
                return Ok(());
            }
            key.epoch = epoch;
            if self
                .0
                .keys
                .compare_and_swap(keep, Some(&bytes), Some(encode(&key)))?
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    fn apply_writes(&self, user_id: UserId, writes: &Writes) -> Result<(), StoreError> {
        if let Some((digest, key)) = &writes.key {
            self.0.keys.insert(digest, encode(key))?;
        }
        if let Some((digest, expires_at)) = &writes.temp_token {
            let mut index = user_id.to_be_bytes().to_vec();
            index.extend_from_slice(&expires_at.to_be_bytes());
            self.0.temp_tokens.insert(digest, index)?;
        }
        self.queue_events(&writes.events)
    }

    fn create_user_now(
        &self,
        username: &str,
        password_hash: &str,
        now: UnixTime,
    ) -> Result<Created, StoreError> {
        let inner = &self.0;
        let default: &sled::Tree = &inner.db;
        // The id, the name and the user are written together (a rare operation: a transaction
        // is fine). The id comes from the data itself, never from sled's id generator, whose
        // counter a backup does not carry; an occupied id aborts instead of replacing.
        let result =
            (default, &inner.users, &inner.usernames).transaction(|(meta, users, usernames)| {
                if usernames.get(username.as_bytes())?.is_some() {
                    return Ok(Created::NameTaken);
                }
                let id = meta
                    .get(NEXT_ID_KEY)?
                    .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
                    .map_or(1, u64::from_be_bytes);
                if users.get(id.to_be_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(format!(
                        "user id {id} is taken: the id counter is behind"
                    )));
                }
                let user = User::new(id, username.to_owned(), password_hash.to_owned(), now);
                meta.insert(NEXT_ID_KEY, &(id + 1).to_be_bytes())?;
                usernames.insert(username.as_bytes(), &id.to_be_bytes())?;
                users.insert(&id.to_be_bytes(), encode(&user))?;
                Ok(Created::User(Box::new(user)))
            });
        let created = match result {
            Ok(created) => created,
            Err(TransactionError::Abort(why)) => {
                // Repair the counter from the data, then report; the caller may retry.
                repair_next_id(&inner.db, &inner.users)?;
                return Err(StoreError::Corrupt(why));
            }
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        if matches!(created, Created::User(_)) {
            inner.counts.created();
            self.counts_moved()?;
        }
        Ok(created)
    }

    fn remove_user_now(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let inner = &self.0;
        let removed = (&inner.users, &inner.usernames)
            .transaction(|(users, usernames)| {
                let Some(bytes) = users.get(id.to_be_bytes())? else {
                    return Ok(None);
                };
                let user: User = decode(&bytes)
                    .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
                users.remove(&id.to_be_bytes())?;
                usernames.remove(user.username.as_bytes())?;
                Ok(Some(user))
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => StoreError::Corrupt(e),
                TransactionError::Storage(e) => e.into(),
            })?;
        if let Some(user) = &removed {
            inner.counts.removed(user);
            self.counts_moved()?;
        }
        Ok(removed)
    }

    fn sweep_now(
        &self,
        now: UnixTime,
        lifetime: KeyLifetime,
        audit_cutoff: UnixTime,
    ) -> Result<usize, StoreError> {
        let inner = &self.0;
        let mut removed = 0;
        let mut pace = SweepPace::new(&inner.gate);
        for entry in inner.temp_tokens.iter() {
            if !pace.go_on(&inner.closing) {
                return Ok(removed);
            }
            let (digest, index) = entry?;
            let expired = index
                .get(8..16)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .is_none_or(|b| UnixTime::from_be_bytes(b) <= now);
            if expired
                && inner
                    .temp_tokens
                    .compare_and_swap(&digest, Some(&index), None::<&[u8]>)?
                    .is_ok()
            {
                removed += 1;
            }
        }
        // Keys revoked by an epoch are not looked for here (that would read every user): they
        // fail, and are deleted, at their next use, and expire like the others.
        for entry in inner.keys.iter() {
            if !pace.go_on(&inner.closing) {
                return Ok(removed);
            }
            let (digest, bytes) = entry?;
            let dead = decode::<LoginKey>(&bytes).map_or(true, |key| !lifetime.alive(&key, now));
            if dead
                && inner
                    .keys
                    .compare_and_swap(&digest, Some(&bytes), None::<&[u8]>)?
                    .is_ok()
            {
                removed += 1;
            }
        }
        for entry in inner.audit.range(..audit_cutoff.to_be_bytes()) {
            if !pace.go_on(&inner.closing) {
                return Ok(removed);
            }
            let (key, _) = entry?;
            inner.audit.remove(key)?;
            removed += 1;
        }
        Ok(removed)
    }

    fn export_now(
        &self,
        sink: &tokio::sync::mpsc::Sender<BackupRecord>,
    ) -> Result<u64, StoreError> {
        let inner = &self.0;
        // No writer may change anything while the snapshot is read.
        let _alone = inner.gate.blocking_write();
        write_queued_events(&inner.audit_queue, &inner.audit)?;
        let meta = [KEY_CHECK_KEY, NEXT_ID_KEY].into_iter().filter_map(|k| {
            inner
                .db
                .get(k)
                .transpose()
                .map(|v| v.map(|v| (k.into(), v)))
        });
        let trees: [(&str, Records<'_>); 4] = [
            ("meta", Box::new(meta)),
            ("users", Box::new(inner.users.iter())),
            ("keys", Box::new(inner.keys.iter())),
            ("audit", Box::new(inner.audit.iter())),
        ];
        let mut count = 0;
        for (kind, records) in trees {
            for entry in records {
                let (key, value) = entry?;
                let record = BackupRecord {
                    kind: kind.to_owned(),
                    key: key.to_vec(),
                    value: value.to_vec(),
                };
                sink.blocking_send(record)
                    .map_err(|_| StoreError::Backend("the backup writer stopped".into()))?;
                count += 1;
            }
        }
        Ok(count)
    }

    fn import_now(&self, record: &BackupRecord) -> Result<(), StoreError> {
        let inner = &self.0;
        if record.kind == "users" {
            // It may add or replace a user behind the counts' back.
            inner.counts.forget();
            self.counts_moved()?;
        }
        match record.kind.as_str() {
            "users" => {
                let user: User = decode(&record.value)?;
                inner
                    .usernames
                    .insert(user.username.as_bytes(), &user.id.to_be_bytes())?;
                for token in &user.temp_tokens {
                    let mut index = user.id.to_be_bytes().to_vec();
                    index.extend_from_slice(&token.expires_at.to_be_bytes());
                    inner.temp_tokens.insert(token.digest, index)?;
                }
                inner
                    .users
                    .insert(user.id.to_be_bytes(), record.value.as_slice())?;
                repair_next_id(&inner.db, &inner.users)?;
            }
            "keys" => {
                decode::<LoginKey>(&record.value)?;
                inner.keys.insert(&record.key, record.value.as_slice())?;
            }
            "audit" => {
                decode::<AuditEvent>(&record.value)?;
                inner.audit.insert(&record.key, record.value.as_slice())?;
            }
            // Indexes: rebuilt from the users (format-1 backups of totpd 0.1 carry them).
            "usernames" | "temp_tokens" => {}
            "meta" | "" if record.key == KEY_CHECK_KEY => {
                decode::<StoredSecret>(&record.value)?;
                inner.db.insert(KEY_CHECK_KEY, record.value.as_slice())?;
            }
            "meta" | "" if record.key == NEXT_ID_KEY => {
                let stored = inner
                    .db
                    .get(NEXT_ID_KEY)?
                    .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
                    .map_or(1, u64::from_be_bytes);
                let given = <[u8; 8]>::try_from(record.value.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        StoreError::Corrupt("a next user id of the wrong length".into())
                    })?;
                inner
                    .db
                    .insert(NEXT_ID_KEY, &stored.max(given).to_be_bytes())?;
            }
            "meta" | "" => {} // the schema version of the source, and sled's own records
            other => {
                return Err(StoreError::Corrupt(format!(
                    "the backup names an unknown record kind {other:?}"
                )));
            }
        }
        Ok(())
    }

    /// A change moved a count: counts kept for the next open are out of date, take them out
    /// (before the change is acknowledged: the group commit that makes it durable carries this
    /// too). The caller holds the write gate, as `close` does while it keeps them.
    fn counts_moved(&self) -> Result<(), StoreError> {
        if self.0.counts_kept.swap(false, Ordering::SeqCst) {
            self.0.db.remove(COUNTS_KEY)?;
        }
        Ok(())
    }

    /// Scans every user: (users, users with TOTP active), or `None` when `close` asked it to
    /// stop.
    fn count_users(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let (mut users, mut active) = (0i64, 0i64);
        for bytes in self.0.users.iter().values() {
            if users % 4096 == 0 && self.0.closing.load(Ordering::SeqCst) {
                return Ok(None);
            }
            users += 1;
            active += i64::from(decode::<User>(&bytes?)?.totp.is_some());
        }
        Ok(Some((users, active)))
    }

    /// A full count while writers go on. Its result is set with the write gate held alone, so
    /// that no change is half done (written, its count not yet moved) at that moment; a change
    /// during the scan makes the result inexact (see `UserCounts`).
    fn recount_now(&self) -> Result<(), StoreError> {
        let before = self.0.counts.moves();
        if let Some((users, active)) = self.count_users()? {
            let _alone = self.0.gate.blocking_write();
            self.0.counts.set(users, active, before);
        }
        Ok(())
    }

    /// Runs `scan` (a full count, a sweep) on a thread of its own at the background priority,
    /// so that requests never wait behind it for a core, as they would on the blocking pool.
    /// It holds `scanning` from before its thread starts until the thread has let go of the
    /// store, and does not run once `close` has begun (`if_closing` is then the answer): once
    /// `close` returns, no scan holds the data dir or changes anything.
    async fn scan_in_background<T: Send + 'static>(
        &self,
        name: &str,
        what: &'static str,
        if_closing: T,
        scan: impl FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        let running = Arc::clone(&self.0.scanning).lock_owned().await;
        crate::priority::run_in_background(name, what, move || {
            let result = if store.0.closing.load(Ordering::SeqCst) {
                Ok(if_closing)
            } else {
                scan(&store)
            };
            drop(store);
            drop(running);
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("the {what} failed: {e}")))?
    }

    /// Writes the counts for the next open, when they are known exactly. The caller holds the
    /// write gate alone (or nothing else runs: a restore).
    fn keep_counts_now(&self) -> Result<(), StoreError> {
        if let Some((users, active)) = self.0.counts.to_keep() {
            let mut value = users.to_be_bytes().to_vec();
            value.extend_from_slice(&active.to_be_bytes());
            self.0.db.insert(COUNTS_KEY, value)?;
            self.0.counts_kept.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn flush_now(&self) -> Result<(), StoreError> {
        write_queued_events(&self.0.audit_queue, &self.0.audit)?;
        self.0.db.flush()?;
        self.0.log.sync_data().map_err(io_store_error)
    }
}

fn io_store_error(e: std::io::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

#[async_trait]
impl Store for SledStore {
    async fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.read_user(id)
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        match self.0.usernames.get(username.as_bytes())? {
            Some(id) => self.read_user(user_id_from(&id)?),
            None => Ok(None),
        }
    }

    async fn user_by_key(&self, digest: &Digest) -> Result<Option<(LoginKey, User)>, StoreError> {
        let Some(bytes) = self.0.keys.get(digest)? else {
            return Ok(None);
        };
        let key: LoginKey = decode(&bytes)?;
        Ok(self.read_user(key.user_id)?.map(|user| (key, user)))
    }

    async fn users(&self, after: Option<UserId>, limit: usize) -> Result<Vec<User>, StoreError> {
        let start = after.map_or(0, |id| id.saturating_add(1));
        let mut users = Vec::new();
        for bytes in self
            .0
            .users
            .range(start.to_be_bytes()..)
            .values()
            .take(limit)
        {
            users.push(decode(&bytes?)?);
        }
        Ok(users)
    }

    async fn events(&self, since: UnixTime) -> Result<Vec<AuditEvent>, StoreError> {
        write_queued_events(&self.0.audit_queue, &self.0.audit)?;
        self.0
            .audit
            .range(since.to_be_bytes()..)
            .values()
            .map(|bytes| Ok(decode::<AuditEvent>(&bytes?)?))
            .collect()
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now: UnixTime,
        mut event: AuditEvent,
    ) -> Result<Created, StoreError> {
        let created = {
            let _writing = self.write_gate().await;
            let created = self.create_user_now(username, password_hash, now)?;
            if let Created::User(user) = &created {
                event.user_id = Some(user.id);
                event.username = Some(user.username.clone());
                self.queue_events(std::slice::from_ref(&event))?;
            }
            created
        };
        if matches!(created, Created::User(_)) {
            self.persist().await?;
        }
        Ok(created)
    }

    async fn update_user(
        &self,
        id: UserId,
        change: &mut UserChange<'_>,
    ) -> Result<Option<User>, StoreError> {
        let user = {
            let _writing = self.write_gate().await;
            let Some((user, writes)) = self.apply_change(id, change)? else {
                return Ok(None);
            };
            self.apply_writes(id, &writes)?;
            user
        };
        // Every change waits for the group commit, even one that wrote nothing: its outcome was
        // decided on what it read, which may be another request's write not yet on disk, and
        // the answer must not get ahead of that write. (This replaces a read of the record
        // before and after the change, two more sled operations per request, which covered
        // only part of that case.)
        self.persist().await?;
        Ok(Some(user))
    }

    async fn update_user_by_temp_token(
        &self,
        digest: &Digest,
        change: &mut UserChange<'_>,
    ) -> Result<Option<User>, StoreError> {
        let Some(index) = self.0.temp_tokens.get(digest)? else {
            return Ok(None);
        };
        let id = user_id_from(&index[..8.min(index.len())])?;
        self.update_user(id, change).await
    }

    async fn remove_user(
        &self,
        id: UserId,
        events: Vec<AuditEvent>,
    ) -> Result<Option<User>, StoreError> {
        let removed = {
            let _writing = self.write_gate().await;
            let removed = self.remove_user_now(id)?;
            self.queue_events(&events)?;
            removed
        };
        self.persist().await?;
        Ok(removed)
    }

    async fn revoke_key(
        &self,
        digest: &Digest,
        events: Vec<AuditEvent>,
    ) -> Result<bool, StoreError> {
        let existed = {
            let _writing = self.write_gate().await;
            let existed = self.0.keys.remove(digest)?.is_some();
            self.queue_events(&events)?;
            existed
        };
        self.persist().await?;
        Ok(existed)
    }

    async fn touch_key(&self, digest: &Digest, now: UnixTime) -> Result<(), StoreError> {
        let _writing = self.write_gate().await;
        let Some(bytes) = self.0.keys.get(digest)? else {
            return Ok(());
        };
        let mut key: LoginKey = decode(&bytes)?;
        key.last_used_at = key.last_used_at.max(now);
        // Losing this race only makes the idle timeout end sooner.
        let _ = self
            .0
            .keys
            .compare_and_swap(digest, Some(&bytes), Some(encode(&key)))?;
        Ok(())
    }

    async fn record_events(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        {
            let _writing = self.write_gate().await;
            self.queue_events(&events)?;
        }
        self.persist().await
    }

    async fn sweep(
        &self,
        now: UnixTime,
        lifetime: KeyLifetime,
        audit_cutoff: UnixTime,
    ) -> Result<usize, StoreError> {
        // A scan of every temp token and key: seconds of a core with a million users.
        let removed = self
            .scan_in_background("totpd-sweep", "sweep", 0, move |store| {
                store.sweep_now(now, lifetime, audit_cutoff)
            })
            .await?;
        if removed > 0 {
            self.persist().await?;
        }
        Ok(removed)
    }

    async fn master_key_check(&self) -> Result<Option<StoredSecret>, StoreError> {
        match self.0.db.get(KEY_CHECK_KEY)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    async fn set_master_key_check(&self, check: &StoredSecret) -> Result<(), StoreError> {
        {
            let _writing = self.write_gate().await;
            self.0.db.insert(KEY_CHECK_KEY, encode(check))?;
        }
        self.persist().await
    }

    async fn export(
        &self,
        sink: tokio::sync::mpsc::Sender<BackupRecord>,
    ) -> Result<u64, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.export_now(&sink))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    async fn import(&self, record: BackupRecord) -> Result<(), StoreError> {
        let _writing = self.write_gate().await;
        self.import_now(&record)
    }

    async fn healthy(&self) -> bool {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.0.db.get(SCHEMA_KEY).is_ok_and(|v| v.is_some()))
            .await
            .unwrap_or(false)
    }

    /// The scan reads every user.
    async fn recount(&self) -> Result<(), StoreError> {
        self.scan_in_background("totpd-count", "user count", (), SledStore::recount_now)
            .await
    }

    fn stats(&self) -> StoreStats {
        let (flushes, acknowledged_writes) = self.0.commit.stats();
        StoreStats {
            counts: self.0.counts.get(),
            bytes_on_disk: self.0.db.size_on_disk().unwrap_or(0),
            flushes,
            acknowledged_writes,
            pool: None,
        }
    }

    /// Stops a full count or a sweep that may be running (and waits for it), then, with the write gate
    /// held alone so that no change is half done, keeps the counts for the next open and makes
    /// everything durable.
    async fn close(&self) -> Result<(), StoreError> {
        self.0.closing.store(true, Ordering::SeqCst);
        drop(self.0.scanning.lock().await);
        let _alone = self.0.gate.write().await;
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            store.keep_counts_now()?;
            store.flush_now()
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

/// The sweep's pace: a short pause after every `SWEEP_CHUNK` records, so that the scan runs in
/// bursts of well under a millisecond. Even at the background priority, a scan that keeps its
/// core is preempted only at the scheduler's next tick (up to 4 ms on a 250 Hz kernel), and each
/// such wait lands on a request; measured beside saturating logins, an unpaced sweep of the
/// bench's records put the p99 of verify at 12–14 ms instead of 8. The write gate is held
/// (shared, as every writer holds it) for one chunk at a time and let go during the pause, so
/// whatever waits for the gate alone (an export, a count's result, `close`) waits for one chunk,
/// not the whole paced scan; each delete is a compare-and-swap, so nothing needs it longer.
struct SweepPace<'a> {
    seen: usize,
    gate: &'a tokio::sync::RwLock<()>,
    writing: Option<tokio::sync::RwLockReadGuard<'a, ()>>,
}

const SWEEP_CHUNK: usize = 256;
const SWEEP_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

impl<'a> SweepPace<'a> {
    fn new(gate: &'a tokio::sync::RwLock<()>) -> Self {
        Self {
            seen: 0,
            gate,
            writing: Some(gate.blocking_read()),
        }
    }

    /// Counts one record; false once the store is closing (the sweep stops: the next one
    /// finishes the job).
    fn go_on(&mut self, closing: &AtomicBool) -> bool {
        self.seen += 1;
        if self.seen % SWEEP_CHUNK == 0 {
            self.writing = None;
            if closing.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(SWEEP_PAUSE);
            self.writing = Some(self.gate.blocking_read());
        }
        true
    }
}

/// Lets this process open a database it has just let go of. sled releases its file lock only
/// when the last of its IO threads drops its handle, which can be after the last `Db` is gone
/// (a buffer still being written): an open right after (a restart in the same process, as
/// tests and embedding programs do) would find the database locked. A lock on a database this
/// process closed is waited out, briefly; one held by another process fails at once, as before.
mod released {
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, PoisonError};
    use std::time::{Duration, Instant};

    /// Databases this process has let go of.
    static RELEASED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    /// How long sled's IO threads get to let go of a released database.
    const WAIT: Duration = Duration::from_secs(2);

    fn was_released(path: &Path) -> bool {
        RELEASED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|p| p == path)
    }

    /// Opens with `open`, retrying a lock failure for a while if this process released `path`.
    pub fn open<T>(path: &Path, open: impl Fn() -> sled::Result<T>) -> sled::Result<T> {
        let started = Instant::now();
        loop {
            match open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && was_released(path)
                        && started.elapsed() < WAIT =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                result => {
                    if result.is_ok() {
                        RELEASED
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .retain(|p| p != path);
                    }
                    return result;
                }
            }
        }
    }

    /// `path`'s database is being let go of by this process.
    pub fn record(path: &Path) {
        let mut released = RELEASED.lock().unwrap_or_else(PoisonError::into_inner);
        if !released.iter().any(|p| p == path) {
            released.push(path.to_path_buf());
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        released::record(&self.path);
    }
}

/// The counts a clean close left, taken out of the database before anything else is written
/// (made durable at once, so that no later change can be on disk while they still are): a
/// crash from here on leaves none behind. A database created just now has no users: (0, 0),
/// with no scan.
fn take_counts(
    db: &sled::Db,
    users: &sled::Tree,
    log: &std::fs::File,
) -> Result<UserCounts, String> {
    let counts = UserCounts::default();
    if !db.was_recovered() && users.is_empty() {
        counts.set(0, 0, counts.moves());
    }
    if let Some(value) = db.remove(COUNTS_KEY).map_err(|e| e.to_string())? {
        // Anything but two u64 is ignored: the start then counts.
        let number = |bytes: &[u8]| {
            <[u8; 8]>::try_from(bytes)
                .map(|b| i64::try_from(u64::from_be_bytes(b)).unwrap_or(i64::MAX))
        };
        if let Some((users, active)) = value.split_at_checked(8) {
            if let (Ok(users), Ok(active)) = (number(users), number(active)) {
                counts.set(users, active, counts.moves());
            }
        }
        db.flush().map_err(|e| e.to_string())?;
        log.sync_data().map_err(|e| e.to_string())?;
    }
    Ok(counts)
}

/// Writes the queued audit events in one batch.
fn write_queued_events(queue: &Mutex<sled::Batch>, audit: &sled::Tree) -> Result<(), sled::Error> {
    let batch = std::mem::take(&mut *queue.lock().unwrap_or_else(PoisonError::into_inner));
    audit.apply_batch(batch)
}

fn user_id_from(bytes: &[u8]) -> Result<UserId, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(UserId::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("a user id of the wrong length".into()))
}

fn io_error(data_dir: &Path, cause: String) -> OpenError {
    OpenError::Io {
        path: data_dir.to_path_buf(),
        cause,
    }
}

/// Makes the next user id larger than every stored id (a data dir of totpd 0.1 has none, and
/// one restored by it may have one that is behind).
fn repair_next_id(db: &sled::Db, users: &sled::Tree) -> Result<(), sled::Error> {
    let after_last = match users.last()? {
        Some((key, _)) => <[u8; 8]>::try_from(key.as_ref())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
            .saturating_add(1),
        None => 1,
    };
    let stored = db
        .get(NEXT_ID_KEY)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    if stored < after_last {
        db.insert(NEXT_ID_KEY, &after_last.to_be_bytes())?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // An existing dir keeps its mode through create: a 0755 one would let every local user
        // read the database. Ours is tightened; another user's is refused rather than changed
        // behind its owner's back (even when we are root and could).
        let meta = std::fs::metadata(dir)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            let own = rustix::process::geteuid().as_raw();
            if meta.uid() != own {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "it is mode {mode:04o} and owned by uid {}, not by this user (uid {own}), \
                         so it cannot be made private: have its owner chmod 700 it, or use \
                         another data dir",
                        meta.uid()
                    ),
                ));
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Writes the schema version into a new store, and over an older one (this binary reads it,
/// and will write records only its own version can read); refuses one written by a newer totpd.
fn check_schema(db: &sled::Db, data_dir: &Path) -> Result<(), OpenError> {
    let io = |cause: String| io_error(data_dir, cause);
    let found = match db.get(SCHEMA_KEY).map_err(|e| io(e.to_string()))? {
        None => None,
        Some(bytes) => Some(
            <[u8; 8]>::try_from(bytes.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| io("the schema version record is corrupt".into()))?,
        ),
    };
    match found {
        Some(found) if found > SCHEMA_VERSION => Err(OpenError::NewerSchema {
            found,
            path: data_dir.to_path_buf(),
        }),
        Some(SCHEMA_VERSION) => Ok(()),
        _ => {
            db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                .map_err(|e| io(e.to_string()))?;
            Ok(())
        }
    }
}

/// Whether `data_dir` already holds a database.
pub fn exists(data_dir: &Path) -> bool {
    data_dir.join(DB_DIR).exists()
}

/// Builds the store in `<data_dir>/db.restoring` from `records`, flushes it, and only then
/// renames it to `<data_dir>/db`: an interrupted restore leaves no database behind, and a rerun
/// starts the half-built one afresh.
pub async fn restore(
    data_dir: &Path,
    cache_capacity: u64,
    mut records: tokio::sync::mpsc::Receiver<BackupRecord>,
    expected: u64,
    verified: tokio::sync::oneshot::Receiver<()>,
) -> Result<u64, String> {
    if exists(data_dir) {
        return Err(format!(
            "{} already holds a database: restore needs an empty data dir",
            data_dir.display()
        ));
    }
    create_private_dir(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let building = data_dir.join(RESTORING_DIR);
    if building.exists() {
        std::fs::remove_dir_all(&building)
            .map_err(|e| format!("cannot remove {}: {e}", building.display()))?;
    }
    let count = {
        let store =
            SledStore::open_at(data_dir, &building, cache_capacity).map_err(|e| e.to_string())?;
        let mut count = 0;
        while let Some(record) = records.recv().await {
            store.import_now(&record).map_err(|e| e.to_string())?;
            count += 1;
        }
        if count != expected {
            return Err(format!(
                "restore incomplete: {count} of {expected} records arrived; nothing was restored"
            ));
        }
        verified
            .await
            .map_err(|_| super::port::NOT_VERIFIED.to_owned())?;
        // Counted once here (nothing else writes meanwhile), so the first start on the restored
        // data needs no scan; the scan and the flush's fsync off the executor.
        tokio::task::spawn_blocking(move || {
            store.recount_now()?;
            store.keep_counts_now()?;
            store.flush_now()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        count
    };
    std::fs::rename(&building, data_dir.join(DB_DIR))
        .map_err(|e| format!("cannot move the restored database into place: {e}"))?;
    // The same files under their new name: sled's IO threads may still hold them.
    released::record(&data_dir.join(DB_DIR));
    if let Ok(dir) = std::fs::File::open(data_dir) {
        let _ = dir.sync_all();
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(db: &sled::Db) -> Option<u64> {
        db.get(SCHEMA_KEY)
            .expect("read")
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
    }

    #[test]
    fn the_schema_version_is_written_raised_from_an_older_one_and_a_newer_one_refused() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let dir = Path::new("unused");
        check_schema(&db, dir).expect("a new store");
        assert_eq!(schema_of(&db), Some(SCHEMA_VERSION));
        db.insert(SCHEMA_KEY, &1u64.to_be_bytes()).expect("write");
        check_schema(&db, dir).expect("a schema-1 store opens");
        assert_eq!(schema_of(&db), Some(SCHEMA_VERSION), "raised");
        db.insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
            .expect("write");
        assert!(matches!(
            check_schema(&db, dir),
            Err(OpenError::NewerSchema { .. })
        ));
    }
}
