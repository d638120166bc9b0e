//! All state, in sled, under `<data dir>/db`. The public API is made of domain-named operations,
//! each atomic, so a second backend can implement the same list: create a user, issue a key,
//! consume a temp token together with a time step or a recovery code, and so on. Nothing here is
//! durable until `persist()` resolves; callers await it before acknowledging a change.
//!
//! Everything that must change together lives in one record — the user's: the secret, the last
//! used time step, the recovery-code hashes, the failure count and lock, and the outstanding temp
//! tokens — so each operation is a single compare-and-swap of that record (`update_user`), retried
//! on a conflict. Why not sled's multi-tree transactions: measured here at 188 µs each against
//! 26 µs for a get and a CAS, and a global lock under concurrency.
//!
//! Trees: `users` (id → User), `usernames` (name → id), `keys` (digest → LoginKey),
//! `temp_tokens` (digest → user id and expiry: only an index, the state is in the user),
//! `audit` (time ‖ sequence → AuditEvent); the default tree holds the schema version and the
//! master-key check record.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sled::Transactional;
use sled::transaction::TransactionError;

use crate::attempt::{Judgement, LockPolicy, Proof, judge};
use crate::clock::UnixTime;
use crate::group_commit::{FlushError, GroupCommit};
use crate::models::{
    ActiveTotp, AuditEvent, DecodeError, Digest, LoginKey, PendingLogin, PendingTotp, StoredSecret,
    User, UserId, decode, encode,
};

/// The layout of trees and keys this binary reads and writes.
pub const SCHEMA_VERSION: u64 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";
const KEY_CHECK_KEY: &[u8] = b"master_key_check";
/// `last_used_at` of a key is rewritten at most this often (the idle timeout's precision).
const KEY_TOUCH_INTERVAL: u64 = 60;
/// Outstanding temp tokens kept per user; a newer login evicts the oldest.
pub const MAX_TEMP_TOKENS: usize = 32;

#[derive(Debug)]
pub enum StoreError {
    Sled(sled::Error),
    Corrupt(String),
    Flush(FlushError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Sled(e) => write!(f, "sled: {e}"),
            StoreError::Corrupt(e) => write!(f, "corrupt record: {e}"),
            StoreError::Flush(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e)
    }
}

impl From<DecodeError> for StoreError {
    fn from(e: DecodeError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// Why the store did not open; each has a message an operator can act on.
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
        }
    }
}

impl std::error::Error for OpenError {}

#[derive(Debug, PartialEq, Eq)]
pub struct UsernameTaken;

#[derive(Debug, PartialEq, Eq)]
pub enum SetupOutcome {
    Started,
    AlreadyActive,
}

/// A second-factor check that did not succeed, as the user's failure count saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong, replayed or unknown code; counted. `lock_started`: a lock this failure began.
    Rejected {
        replay: bool,
        lock_started: Option<UnixTime>,
    },
    /// Not checked: the user is locked until then.
    Locked { until: UnixTime },
}

/// The result of an action guarded by a code (activate, deactivate, regenerate recovery codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    Done {
        recovery_code_used: bool,
    },
    Refused(Refusal),
    /// The state changed under the caller: already active, nothing pending, not active, or a
    /// different secret than the one the code was checked against.
    Conflict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// The temp token was consumed and the key stored.
    LoggedIn {
        recovery_code_used: bool,
        recovery_codes_remaining: usize,
    },
    /// The temp token is unknown, expired, used up, or outdated.
    InvalidTempToken,
    /// The code was refused; a rejection also spent one attempt of the temp token.
    Refused(Refusal),
}

fn refusal(judgement: Judgement) -> Option<Refusal> {
    match judgement {
        Judgement::Accepted { .. } => None,
        Judgement::Rejected {
            replay,
            lock_started,
        } => Some(Refusal::Rejected {
            replay,
            lock_started,
        }),
        Judgement::Locked { until } => Some(Refusal::Locked { until }),
    }
}

/// Whether `proof` was computed against the user's current active secret (`expected`); recovery
/// codes do not depend on the secret.
fn same_secret(user: &User, proof: &Proof<'_>, expected: &StoredSecret) -> bool {
    matches!(proof, Proof::Recovery(_)) || user.totp.as_ref().map(|t| &t.secret) == Some(expected)
}

/// The user's temp token `digest`, if it may be used at `now` (only while TOTP is active).
fn live_token<'a>(
    user: &'a mut User,
    digest: &Digest,
    now: UnixTime,
) -> Option<&'a mut PendingLogin> {
    user.totp.as_ref()?;
    user.temp_tokens
        .iter_mut()
        .find(|t| t.digest == *digest && t.is_live(now))
}

/// Lifetimes of login keys, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLifetime {
    pub absolute: u64,
    pub idle: u64,
}

impl KeyLifetime {
    fn alive(&self, key: &LoginKey, now: UnixTime) -> bool {
        now < key.created_at.saturating_add(self.absolute)
            && now < key.last_used_at.saturating_add(self.idle)
    }
}

/// How many users there are, and how many have TOTP active: counted once in the background
/// after start (a scan would delay start-up) and kept up to date by the operations.
#[derive(Default)]
struct Counts {
    users: AtomicI64,
    active: AtomicI64,
    ready: std::sync::atomic::AtomicBool,
}

pub struct Store {
    db: sled::Db,
    users: sled::Tree,
    usernames: sled::Tree,
    keys: sled::Tree,
    temp_tokens: sled::Tree,
    audit: sled::Tree,
    /// Audit events waiting for the next flush, which writes them in one batch first.
    audit_queue: Arc<Mutex<sled::Batch>>,
    counts: Counts,
    commit: GroupCommit,
}

impl Store {
    /// Opens (or creates) the store in `<data_dir>/db`. `cache_capacity` is sled's page cache in
    /// bytes (its own default is 1 GiB, far too much for an edge box).
    pub fn open(data_dir: &Path, cache_capacity: u64) -> Result<Self, OpenError> {
        let path = data_dir.join("db");
        let io = |cause: String| OpenError::Io {
            path: data_dir.to_path_buf(),
            cause,
        };
        create_private_dir(data_dir).map_err(|e| io(e.to_string()))?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_capacity)
            .open()
            .map_err(|e| match e {
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
        let audit_queue = Arc::new(Mutex::new(sled::Batch::default()));
        let (flusher, queue, audit_tree) = (db.clone(), Arc::clone(&audit_queue), audit.clone());
        let commit = GroupCommit::start(move || {
            write_queued_events(&queue, &audit_tree).map_err(|e| e.to_string())?;
            flusher.flush().map(|_| ()).map_err(|e| e.to_string())
        })
        .map_err(|e| io(e.to_string()))?;
        Ok(Self {
            db,
            users,
            usernames,
            keys,
            temp_tokens,
            audit,
            audit_queue,
            counts: Counts::default(),
            commit,
        })
    }

    /// Resolves once every write made before the call — audit events included — is on disk
    /// (one flush is shared by every caller waiting at the time).
    pub async fn persist(&self) -> Result<(), StoreError> {
        self.commit.persist().await.map_err(StoreError::Flush)
    }

    /// Writes queued audit events and flushes, synchronously (shutdown, CLI).
    pub fn flush_now(&self) -> Result<(), StoreError> {
        write_queued_events(&self.audit_queue, &self.audit)?;
        self.db.flush()?;
        Ok(())
    }

    /// (flushes done, writes acknowledged) by the group commit.
    pub fn commit_stats(&self) -> (u64, u64) {
        self.commit.stats()
    }

    /// Reads, changes and writes back one user with a compare-and-swap, re-reading and re-applying
    /// `change` if another writer got there first (so `change` must have no other effect).
    /// `change` returns the result and whether to write the user back. `None` if no such user.
    fn update_user<T>(
        &self,
        user_id: UserId,
        mut change: impl FnMut(&mut User) -> (T, bool),
    ) -> Result<Option<T>, StoreError> {
        let key = user_id.to_be_bytes();
        loop {
            let Some(old) = self.users.get(key)? else {
                return Ok(None);
            };
            let mut user: User = decode(&old)?;
            let was_active = user.totp.is_some();
            let (result, write) = change(&mut user);
            if !write {
                return Ok(Some(result));
            }
            if self
                .users
                .compare_and_swap(key, Some(&old), Some(encode(&user)))?
                .is_ok()
            {
                match (was_active, user.totp.is_some()) {
                    (false, true) => self.counts.active.fetch_add(1, Ordering::Relaxed),
                    (true, false) => self.counts.active.fetch_sub(1, Ordering::Relaxed),
                    _ => 0,
                };
                return Ok(Some(result));
            }
        }
    }

    /// Counts users and users with TOTP active (a full scan: run it in the background).
    pub fn recount(&self) -> Result<(), StoreError> {
        let (mut users, mut active) = (0i64, 0i64);
        for user in self.users() {
            users += 1;
            active += i64::from(user?.totp.is_some());
        }
        self.counts.users.store(users, Ordering::Relaxed);
        self.counts.active.store(active, Ordering::Relaxed);
        self.counts.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// (users, users with TOTP active), once counted.
    pub fn counts(&self) -> Option<(u64, u64)> {
        let read = |n: &AtomicI64| n.load(Ordering::Relaxed).max(0) as u64;
        self.counts
            .ready
            .load(Ordering::Relaxed)
            .then(|| (read(&self.counts.users), read(&self.counts.active)))
    }

    /// Whether the store answers a read (health check).
    pub fn is_healthy(&self) -> bool {
        self.db.get(SCHEMA_KEY).is_ok_and(|v| v.is_some())
    }

    pub fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now: UnixTime,
    ) -> Result<Result<User, UsernameTaken>, StoreError> {
        let id = self.db.generate_id()?;
        let user = User {
            id,
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            created_at: now,
            key_epoch: 0,
            kept_key: None,
            totp: None,
            pending: None,
            failures: Default::default(),
            last_login: None,
            temp_tokens: Vec::new(),
        };
        // The name and the user are written together (a rare operation: a transaction is fine).
        let created = (&self.users, &self.usernames)
            .transaction(|(users, usernames)| {
                if usernames.get(username.as_bytes())?.is_some() {
                    return Ok(false);
                }
                usernames.insert(username.as_bytes(), &id.to_be_bytes())?;
                users.insert(&id.to_be_bytes(), encode(&user))?;
                Ok(true)
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Abort(()) => StoreError::Corrupt("aborted".into()),
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        if !created {
            return Ok(Err(UsernameTaken));
        }
        self.counts.users.fetch_add(1, Ordering::Relaxed);
        Ok(Ok(user))
    }

    pub fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        Ok(match self.users.get(id.to_be_bytes())? {
            Some(bytes) => Some(decode(&bytes)?),
            None => None,
        })
    }

    pub fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        match self.usernames.get(username.as_bytes())? {
            Some(id) => self.user(user_id_from(&id)?),
            None => Ok(None),
        }
    }

    /// Every user, in id order.
    pub fn users(&self) -> impl Iterator<Item = Result<User, StoreError>> + '_ {
        self.users
            .iter()
            .values()
            .map(|bytes| Ok(decode::<User>(&bytes?)?))
    }

    /// Stores a login key of `user_id` issued at key epoch `epoch`.
    fn insert_key(
        &self,
        digest: &Digest,
        user_id: UserId,
        epoch: u64,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        let key = LoginKey {
            user_id,
            epoch,
            created_at: now,
            last_used_at: now,
        };
        self.keys.insert(digest, encode(&key))?;
        Ok(())
    }

    /// Stores a login key for a user who passed the password step (no TOTP) and notes the login.
    pub fn issue_key(
        &self,
        user_id: UserId,
        digest: &Digest,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        let Some(epoch) = self.update_user(user_id, |user| {
            user.last_login = Some(now);
            (user.key_epoch, true)
        })?
        else {
            return Ok(false);
        };
        self.insert_key(digest, user_id, epoch, now)?;
        Ok(true)
    }

    /// The key's record and its user, if the key exists, was not revoked (its epoch is not below
    /// the user's) and has not outlived `lifetime`. Dead keys are deleted on the way; live ones
    /// get their last use noted (at most once a minute).
    pub fn authenticate_key(
        &self,
        digest: &Digest,
        lifetime: KeyLifetime,
        now: UnixTime,
    ) -> Result<Option<(LoginKey, User)>, StoreError> {
        let Some(bytes) = self.keys.get(digest)? else {
            return Ok(None);
        };
        let mut key: LoginKey = decode(&bytes)?;
        let user = self
            .user(key.user_id)?
            .filter(|user| user.key_valid(digest, key.epoch) && lifetime.alive(&key, now));
        let Some(user) = user else {
            self.keys
                .compare_and_swap(digest, Some(&bytes), None::<&[u8]>)?
                .ok();
            return Ok(None);
        };
        if now >= key.last_used_at.saturating_add(KEY_TOUCH_INTERVAL) {
            key.last_used_at = now;
            // Losing this race or this write only makes the idle timeout end sooner.
            self.keys
                .compare_and_swap(digest, Some(&bytes), Some(encode(&key)))?
                .ok();
        }
        Ok(Some((key, user)))
    }

    /// Deletes a key; false if it did not exist.
    pub fn revoke_key(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.keys.remove(digest)?.is_some())
    }

    /// Moves the kept key `keep` to the user's new `epoch` (it is valid meanwhile through the
    /// user's `kept_key`).
    fn carry_key_over(
        &self,
        keep: &Digest,
        user_id: UserId,
        epoch: u64,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        loop {
            let Some(bytes) = self.keys.get(keep)? else {
                return Ok(());
            };
            let mut key: LoginKey = decode(&bytes)?;
            if key.user_id != user_id || key.epoch >= epoch {
                return Ok(());
            }
            key.epoch = epoch;
            key.last_used_at = now;
            if self
                .keys
                .compare_and_swap(keep, Some(&bytes), Some(encode(&key)))?
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Runs `change` on the user, which returns (result, write, revoke): with `revoke`, every
    /// key but `keep` is revoked in the same write — the user's epoch rises and `keep` is
    /// recorded as kept — and then the kept key's record is moved to the new epoch.
    fn update_revoking_keys<T>(
        &self,
        user_id: UserId,
        keep: Option<&Digest>,
        now: UnixTime,
        mut change: impl FnMut(&mut User) -> (T, bool, bool),
    ) -> Result<Option<T>, StoreError> {
        let mut raised_to = None;
        let result = self.update_user(user_id, |user| {
            let (result, write, revoke) = change(user);
            raised_to = None;
            if write && revoke {
                user.key_epoch += 1;
                user.kept_key = keep.copied();
                raised_to = Some(user.key_epoch);
            }
            (result, write)
        })?;
        if let (Some(epoch), Some(keep)) = (raised_to, keep) {
            self.carry_key_over(keep, user_id, epoch, now)?;
        }
        Ok(result)
    }

    /// Revokes every key of the user except `keep`. False if there is no such user.
    pub fn revoke_keys(
        &self,
        user_id: UserId,
        keep: Option<&Digest>,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_revoking_keys(user_id, keep, now, |_| ((), true, true))?
            .is_some())
    }

    /// Replaces the password hash, kills outstanding temp tokens and revokes every key but `keep`.
    pub fn change_password(
        &self,
        user_id: UserId,
        password_hash: &str,
        keep: Option<&Digest>,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_revoking_keys(user_id, keep, now, |user| {
                user.password_hash = password_hash.to_owned();
                user.temp_tokens.clear();
                ((), true, true)
            })?
            .is_some())
    }

    /// Hands out a temp token: indexed by digest, kept (with its expiry and attempts) in the
    /// user's record, which holds at most `MAX_TEMP_TOKENS` (the oldest goes).
    pub fn issue_temp_token(
        &self,
        user_id: UserId,
        token: PendingLogin,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        let mut index = user_id.to_be_bytes().to_vec();
        index.extend_from_slice(&token.expires_at.to_be_bytes());
        self.temp_tokens.insert(token.digest, index)?;
        Ok(self
            .update_user(user_id, |user| {
                user.temp_tokens.retain(|t| t.is_live(now));
                if user.temp_tokens.len() >= MAX_TEMP_TOKENS {
                    user.temp_tokens.remove(0);
                }
                user.temp_tokens.push(token.clone());
                ((), true)
            })?
            .is_some())
    }

    /// The user a temp token was issued to, if it may still be used at `now`.
    pub fn live_temp_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> Result<Option<User>, StoreError> {
        let Some(index) = self.temp_tokens.get(digest)? else {
            return Ok(None);
        };
        let Some(mut user) = self.user(user_id_from(&index[..8.min(index.len())])?)? else {
            return Ok(None);
        };
        Ok(live_token(&mut user, digest, now).is_some().then_some(user))
    }

    /// Replaces the pending secret, unless TOTP is already active.
    pub fn begin_setup(
        &self,
        user_id: UserId,
        pending: &PendingTotp,
    ) -> Result<SetupOutcome, StoreError> {
        let outcome = self.update_user(user_id, |user| {
            if user.totp.is_some() {
                return (SetupOutcome::AlreadyActive, false);
            }
            user.pending = Some(pending.clone());
            (SetupOutcome::Started, true)
        })?;
        Ok(outcome.unwrap_or(SetupOutcome::AlreadyActive))
    }

    /// Activation: `proof` is the code's judgement against the pending secret `checked`. On
    /// success the pending secret becomes `active` (whose `last_step` is the code's step).
    pub fn activate(
        &self,
        user_id: UserId,
        checked: &StoredSecret,
        proof: &Proof<'_>,
        active: &ActiveTotp,
        policy: &LockPolicy,
        now: UnixTime,
    ) -> Result<Guarded, StoreError> {
        let outcome = self.update_user(user_id, |user| {
            if user.totp.is_some() || user.pending.as_ref().map(|p| &p.secret) != Some(checked) {
                return (Guarded::Conflict, false);
            }
            match refusal(judge(user, proof, policy, now)) {
                Some(refused) => (Guarded::Refused(refused), true),
                None => {
                    user.pending = None;
                    user.totp = Some(active.clone());
                    (
                        Guarded::Done {
                            recovery_code_used: false,
                        },
                        true,
                    )
                }
            }
        })?;
        Ok(outcome.unwrap_or(Guarded::Conflict))
    }

    /// Deactivation, optionally guarded by a code (`proof` judged against `expected`): removes
    /// the secret, the recovery codes, any pending setup and the outstanding temp tokens, and
    /// revokes every key but `keep`.
    pub fn deactivate(
        &self,
        user_id: UserId,
        guard: Option<(&Proof<'_>, &StoredSecret)>,
        policy: &LockPolicy,
        keep: &Digest,
        now: UnixTime,
    ) -> Result<Guarded, StoreError> {
        let outcome = self.update_revoking_keys(user_id, Some(keep), now, |user| {
            if user.totp.is_none() {
                return (Guarded::Conflict, false, false);
            }
            let mut recovery_code_used = false;
            if let Some((proof, expected)) = guard {
                if !same_secret(user, proof, expected) {
                    return (Guarded::Conflict, false, false);
                }
                match judge(user, proof, policy, now) {
                    Judgement::Accepted {
                        recovery_code_used: used,
                    } => recovery_code_used = used,
                    // Only the failure count is written: no key is revoked.
                    other => {
                        return (
                            Guarded::Refused(refusal(other).expect("refused")),
                            true,
                            false,
                        );
                    }
                }
            }
            user.totp = None;
            user.pending = None;
            user.temp_tokens.clear();
            (Guarded::Done { recovery_code_used }, true, true)
        })?;
        Ok(outcome.unwrap_or(Guarded::Conflict))
    }

    /// Replaces the recovery codes with `hashes` (keyed by `key`), guarded by a code.
    pub fn regenerate_recovery_codes(
        &self,
        user_id: UserId,
        proof: &Proof<'_>,
        expected: &StoredSecret,
        (key, hashes): (&Digest, &[Digest]),
        policy: &LockPolicy,
        now: UnixTime,
    ) -> Result<Guarded, StoreError> {
        let outcome = self.update_user(user_id, |user| {
            if user.totp.is_none() || !same_secret(user, proof, expected) {
                return (Guarded::Conflict, false);
            }
            match judge(user, proof, policy, now) {
                Judgement::Accepted { recovery_code_used } => {
                    if let Some(totp) = user.totp.as_mut() {
                        totp.recovery_key = *key;
                        totp.recovery_hashes = hashes.to_vec();
                    }
                    (Guarded::Done { recovery_code_used }, true)
                }
                other => (Guarded::Refused(refusal(other).expect("refused")), true),
            }
        })?;
        Ok(outcome.unwrap_or(Guarded::Conflict))
    }

    /// The second step of a login, in one compare-and-swap of the user: `proof` is judged
    /// (replay, recovery code consumption, failure count, lock); on success the temp token is
    /// consumed, and then the key stored (an orphan key, should that insert fail, is a secret
    /// nobody was told); a rejection spends one attempt of the temp token. `user_id` is the
    /// token's user as `live_temp_token` found it (the token must still be in that user's
    /// record), `expected` the secret a TOTP proof was computed against. The token's index entry
    /// is left for the sweeper: it no longer resolves.
    #[allow(clippy::too_many_arguments)]
    pub fn complete_login(
        &self,
        user_id: UserId,
        temp: &Digest,
        proof: &Proof<'_>,
        expected: &StoredSecret,
        key: &Digest,
        policy: &LockPolicy,
        now: UnixTime,
    ) -> Result<LoginOutcome, StoreError> {
        let mut key_epoch = 0;
        let outcome = self.update_user(user_id, |user| {
            key_epoch = user.key_epoch;
            if live_token(user, temp, now).is_none() || !same_secret(user, proof, expected) {
                return (LoginOutcome::InvalidTempToken, false);
            }
            let judgement = judge(user, proof, policy, now);
            match judgement {
                Judgement::Accepted { recovery_code_used } => {
                    user.temp_tokens
                        .retain(|t| t.digest != *temp && t.is_live(now));
                    user.last_login = Some(now);
                    let recovery_codes_remaining =
                        user.totp.as_ref().map_or(0, |t| t.recovery_hashes.len());
                    let outcome = LoginOutcome::LoggedIn {
                        recovery_code_used,
                        recovery_codes_remaining,
                    };
                    (outcome, true)
                }
                Judgement::Rejected { .. } => {
                    if let Some(token) = live_token(user, temp, now) {
                        token.attempts_left -= 1;
                    }
                    user.temp_tokens.retain(|t| t.is_live(now));
                    (
                        LoginOutcome::Refused(refusal(judgement).expect("refused")),
                        true,
                    )
                }
                Judgement::Locked { .. } => (
                    LoginOutcome::Refused(refusal(judgement).expect("refused")),
                    false,
                ),
            }
        })?;
        let Some(outcome) = outcome else {
            return Ok(LoginOutcome::InvalidTempToken);
        };
        if matches!(outcome, LoginOutcome::LoggedIn { .. }) {
            self.insert_key(key, user_id, key_epoch, now)?;
        }
        Ok(outcome)
    }

    /// Deletes a user. Their keys and temp tokens die with them (they no longer resolve) and are
    /// swept later. False if there was no such user.
    pub fn remove_user(&self, user_id: UserId) -> Result<bool, StoreError> {
        let removed = (&self.users, &self.usernames)
            .transaction(|(users, usernames)| {
                let Some(bytes) = users.get(user_id.to_be_bytes())? else {
                    return Ok(None);
                };
                let user: User = decode(&bytes).map_err(|e| {
                    sled::transaction::ConflictableTransactionError::Abort(StoreError::from(e))
                })?;
                users.remove(&user_id.to_be_bytes())?;
                usernames.remove(user.username.as_bytes())?;
                Ok(Some(user))
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        if let Some(user) = &removed {
            self.counts.users.fetch_sub(1, Ordering::Relaxed);
            if user.totp.is_some() {
                self.counts.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(removed.is_some())
    }

    /// For a lost phone: clears the secret, any pending setup, the recovery codes and the lock,
    /// and revokes every key and temp token of the user. False if no such user.
    pub fn reset_totp(&self, user_id: UserId, now: UnixTime) -> Result<bool, StoreError> {
        Ok(self
            .update_revoking_keys(user_id, None, now, |user| {
                user.totp = None;
                user.pending = None;
                user.failures = Default::default();
                user.temp_tokens.clear();
                ((), true, true)
            })?
            .is_some())
    }

    /// Clears a user's failure count and lock (administrator action). False if no such user.
    pub fn unlock(&self, user_id: UserId) -> Result<bool, StoreError> {
        Ok(self
            .update_user(user_id, |user| {
                user.failures = Default::default();
                ((), true)
            })?
            .is_some())
    }

    /// Re-seals every stored secret with `reseal`, which returns `None` for secrets already
    /// sealed under the current key. One compare-and-swap per user. Returns how many changed.
    pub fn reseal_all<E>(
        &self,
        reseal: impl Fn(UserId, &StoredSecret) -> Result<Option<StoredSecret>, E>,
    ) -> Result<Result<usize, E>, StoreError> {
        let mut changed = 0;
        for entry in self.users.iter().keys() {
            let id = user_id_from(&entry?)?;
            let result = self.update_user(id, |user| {
                let mut touched = false;
                if let Some(totp) = user.totp.as_mut() {
                    match reseal(id, &totp.secret) {
                        Ok(Some(sealed)) => {
                            totp.secret = sealed;
                            touched = true;
                        }
                        Ok(None) => {}
                        Err(e) => return (Err(e), false),
                    }
                }
                if let Some(pending) = user.pending.as_mut() {
                    match reseal(id, &pending.secret) {
                        Ok(Some(sealed)) => {
                            pending.secret = sealed;
                            touched = true;
                        }
                        Ok(None) => {}
                        Err(e) => return (Err(e), false),
                    }
                }
                (Ok(touched), touched)
            })?;
            match result {
                Some(Ok(true)) => changed += 1,
                Some(Err(e)) => return Ok(Err(e)),
                _ => {}
            }
        }
        Ok(Ok(changed))
    }

    /// The sealed record that proves which master key this data dir uses.
    pub fn master_key_check(&self) -> Result<Option<StoredSecret>, StoreError> {
        match self.db.get(KEY_CHECK_KEY)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn set_master_key_check(&self, check: &StoredSecret) -> Result<(), StoreError> {
        self.db.insert(KEY_CHECK_KEY, encode(check))?;
        Ok(())
    }

    /// Queues an event for the audit trail; the next flush (`persist`, `flush_now`) writes it
    /// first, so it is durable with the change it describes.
    pub fn record_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let mut key = event.time.to_be_bytes().to_vec();
        key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        self.audit_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, encode(event));
        Ok(())
    }

    /// Events from `since` on, oldest first (those written by a flush so far).
    pub fn events(
        &self,
        since: UnixTime,
    ) -> impl Iterator<Item = Result<AuditEvent, StoreError>> + '_ {
        self.audit
            .range(since.to_be_bytes()..)
            .values()
            .map(|bytes| Ok(decode::<AuditEvent>(&bytes?)?))
    }

    /// Deletes what has outlived its use: expired temp-token index entries, keys past their
    /// lifetime, and audit events older than `audit_cutoff`. Returns how many records went.
    /// Keys revoked by an epoch are not looked for here (that would read every user): they
    /// fail, and are deleted, at their next use, and expire like the others.
    pub fn sweep(
        &self,
        now: UnixTime,
        lifetime: KeyLifetime,
        audit_cutoff: UnixTime,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.temp_tokens.iter() {
            let (digest, index) = entry?;
            let expired = index
                .get(8..16)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .is_none_or(|b| UnixTime::from_be_bytes(b) <= now);
            if expired
                && self
                    .temp_tokens
                    .compare_and_swap(&digest, Some(&index), None::<&[u8]>)?
                    .is_ok()
            {
                removed += 1;
            }
        }
        for entry in self.keys.iter() {
            let (digest, bytes) = entry?;
            let dead = decode::<LoginKey>(&bytes).map_or(true, |key| !lifetime.alive(&key, now));
            if dead
                && self
                    .keys
                    .compare_and_swap(&digest, Some(&bytes), None::<&[u8]>)?
                    .is_ok()
            {
                removed += 1;
            }
        }
        for entry in self.audit.range(..audit_cutoff.to_be_bytes()) {
            let (key, _) = entry?;
            self.audit.remove(key)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Every record of every tree, tree by tree, for a backup. Each record is read atomically;
    /// the whole is not one snapshot (sled has none), but every change acknowledged before the
    /// call began is in it.
    pub fn for_each_record(
        &self,
        mut f: impl FnMut(&str, &[u8], &[u8]) -> std::io::Result<()>,
    ) -> Result<std::io::Result<u64>, StoreError> {
        write_queued_events(&self.audit_queue, &self.audit)?;
        let mut count = 0;
        for (name, tree) in self.named_trees() {
            for entry in tree.iter() {
                let (key, value) = entry?;
                if let Err(e) = f(name, &key, &value) {
                    return Ok(Err(e));
                }
                count += 1;
            }
        }
        Ok(Ok(count))
    }

    /// Writes one record of a backup into this (new) store.
    pub fn restore_record(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        match self
            .named_trees()
            .into_iter()
            .find(|(name, _)| *name == tree)
        {
            Some((_, tree)) => {
                tree.insert(key, value)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn named_trees(&self) -> [(&'static str, &sled::Tree); 6] {
        [
            ("", &self.db),
            ("users", &self.users),
            ("usernames", &self.usernames),
            ("keys", &self.keys),
            ("temp_tokens", &self.temp_tokens),
            ("audit", &self.audit),
        ]
    }

    /// Bytes the data dir's sled files take.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
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

/// Writes the schema version into a new store; refuses one written by a newer totpd.
fn check_schema(db: &sled::Db, data_dir: &Path) -> Result<(), OpenError> {
    let io = |cause: String| OpenError::Io {
        path: data_dir.to_path_buf(),
        cause,
    };
    match db.get(SCHEMA_KEY).map_err(|e| io(e.to_string()))? {
        None => {
            db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                .map_err(|e| io(e.to_string()))?;
            Ok(())
        }
        Some(bytes) => {
            let found = <[u8; 8]>::try_from(bytes.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| io("the schema version record is corrupt".into()))?;
            if found > SCHEMA_VERSION {
                Err(OpenError::NewerSchema {
                    found,
                    path: data_dir.to_path_buf(),
                })
            } else {
                Ok(())
            }
        }
    }
}
