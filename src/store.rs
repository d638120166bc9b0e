//! All state, in sled, under `<data dir>/db`. The public API is made of domain-named operations,
//! each atomic (one sled transaction or compare-and-swap), so a second backend can implement the
//! same list: create a user, issue a key, consume a temp token together with a time step or a
//! recovery code, and so on. Nothing here is durable until `persist()` resolves; callers await it
//! before acknowledging a change.
//!
//! Trees: `users` (id → User), `usernames` (name → id), `keys` (digest → LoginKey),
//! `temp_tokens` (digest → TempToken), `audit` (time ‖ sequence → AuditEvent); the default tree
//! holds the schema version and the master-key check record.

use std::path::{Path, PathBuf};

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};

use crate::attempt::{Judgement, LockPolicy, Proof, judge};
use crate::clock::UnixTime;
use crate::group_commit::{FlushError, GroupCommit};
use crate::models::{
    ActiveTotp, AuditEvent, DecodeError, Digest, LoginKey, PendingTotp, StoredSecret, TempToken,
    User, UserId, decode, encode,
};

/// The layout of trees and keys this binary reads and writes.
pub const SCHEMA_VERSION: u64 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";
/// Counters in the `meta` tree, kept in the same transactions as the changes they count.
const USERS_COUNTER: &[u8] = b"users";
const ACTIVE_COUNTER: &[u8] = b"totp_active";
const KEY_CHECK_KEY: &[u8] = b"master_key_check";
/// `last_used_at` of a key is rewritten at most this often (the idle timeout's precision).
const KEY_TOUCH_INTERVAL: u64 = 60;

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

type TxResult<T> = ConflictableTransactionResult<T, StoreError>;

fn corrupt(e: DecodeError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e.into())
}

/// The trees of one transaction, with typed access.
struct Tx<'a> {
    users: &'a TransactionalTree,
    usernames: &'a TransactionalTree,
    keys: &'a TransactionalTree,
    temp_tokens: &'a TransactionalTree,
    meta: &'a TransactionalTree,
}

impl Tx<'_> {
    /// Adds `delta` to a counter in `meta`.
    fn bump(&self, counter: &[u8], delta: i64) -> TxResult<()> {
        let current = self
            .meta
            .get(counter)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let next = current.saturating_add_signed(delta);
        self.meta.insert(counter, &next.to_be_bytes())?;
        Ok(())
    }

    fn user(&self, id: UserId) -> TxResult<Option<User>> {
        match self.users.get(id.to_be_bytes())? {
            Some(bytes) => decode(&bytes).map(Some).map_err(corrupt),
            None => Ok(None),
        }
    }

    fn put_user(&self, user: &User) -> TxResult<()> {
        self.users.insert(&user.id.to_be_bytes(), encode(user))?;
        Ok(())
    }

    fn temp_token(&self, digest: &Digest) -> TxResult<Option<TempToken>> {
        match self.temp_tokens.get(digest)? {
            Some(bytes) => decode(&bytes).map(Some).map_err(corrupt),
            None => Ok(None),
        }
    }

    /// The temp token and its user, if the token may still be used at `now`.
    fn live_temp_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> TxResult<Option<(TempToken, User)>> {
        let Some(token) = self.temp_token(digest)? else {
            return Ok(None);
        };
        let Some(user) = self.user(token.user_id)? else {
            return Ok(None);
        };
        Ok(temp_token_is_live(&token, &user, now).then_some((token, user)))
    }

    /// Counts one wrong code against the token; the last allowed one deletes it.
    fn spend_attempt(&self, digest: &Digest, mut token: TempToken) -> TxResult<()> {
        token.attempts_left = token.attempts_left.saturating_sub(1);
        if token.attempts_left == 0 {
            self.temp_tokens.remove(digest)?;
        } else {
            self.temp_tokens.insert(digest, encode(&token))?;
        }
        Ok(())
    }

    fn insert_key(&self, digest: &Digest, user: &User, now: UnixTime) -> TxResult<()> {
        let key = LoginKey {
            user_id: user.id,
            epoch: user.key_epoch,
            created_at: now,
            last_used_at: now,
        };
        self.keys.insert(digest, encode(&key))?;
        Ok(())
    }
}

/// A temp token works until it expires, runs out of attempts, or the user's stamp moves on
/// (TOTP deactivated) — and only while the user has TOTP active.
fn temp_token_is_live(token: &TempToken, user: &User, now: UnixTime) -> bool {
    now < token.expires_at
        && token.attempts_left > 0
        && token.stamp == user.stamp
        && user.totp.is_some()
}

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

pub struct Store {
    db: sled::Db,
    users: sled::Tree,
    usernames: sled::Tree,
    keys: sled::Tree,
    temp_tokens: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
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
        let (users, usernames, keys, temp_tokens, audit, meta) = (
            tree("users")?,
            tree("usernames")?,
            tree("keys")?,
            tree("temp_tokens")?,
            tree("audit")?,
            tree("meta")?,
        );
        let flusher = db.clone();
        let commit =
            GroupCommit::start(move || flusher.flush().map(|_| ()).map_err(|e| e.to_string()))
                .map_err(|e| io(e.to_string()))?;
        let store = Self {
            db,
            users,
            usernames,
            keys,
            temp_tokens,
            audit,
            meta,
            commit,
        };
        if store
            .meta
            .get(USERS_COUNTER)
            .map_err(|e| io(e.to_string()))?
            .is_none()
        {
            store.recount().map_err(|e| io(e.to_string()))?;
        }
        Ok(store)
    }

    /// Rebuilds the user counters from the users themselves.
    fn recount(&self) -> Result<(), StoreError> {
        let (mut users, mut active) = (0u64, 0u64);
        for user in self.users() {
            users += 1;
            active += u64::from(user?.totp.is_some());
        }
        self.meta.insert(USERS_COUNTER, &users.to_be_bytes())?;
        self.meta.insert(ACTIVE_COUNTER, &active.to_be_bytes())?;
        Ok(())
    }

    /// (users, users with TOTP active), from counters kept transactionally.
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        let read = |name: &[u8]| -> Result<u64, StoreError> {
            Ok(self
                .meta
                .get(name)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes))
        };
        Ok((read(USERS_COUNTER)?, read(ACTIVE_COUNTER)?))
    }

    /// Whether the store answers a read (health check).
    pub fn is_healthy(&self) -> bool {
        self.db.get(SCHEMA_KEY).is_ok_and(|v| v.is_some())
    }

    /// Resolves once every write made before the call is on disk (shared with concurrent callers).
    pub async fn persist(&self) -> Result<(), StoreError> {
        self.commit.persist().await.map_err(StoreError::Flush)
    }

    /// Flushes synchronously (shutdown, CLI).
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// (flushes done, writes acknowledged) by the group commit.
    pub fn commit_stats(&self) -> (u64, u64) {
        self.commit.stats()
    }

    fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        (
            &self.users,
            &self.usernames,
            &self.keys,
            &self.temp_tokens,
            &self.meta,
        )
            .transaction(|(users, usernames, keys, temp_tokens, meta)| {
                f(&Tx {
                    users,
                    usernames,
                    keys,
                    temp_tokens,
                    meta,
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
            })
    }

    /// Reads, changes and writes back one user atomically; `None` if there is no such user.
    /// `change` returns the result and whether to write the user back. The count of users with
    /// TOTP active follows along.
    fn update_user<T>(
        &self,
        user_id: UserId,
        change: impl Fn(&Tx<'_>, &mut User) -> TxResult<(T, bool)>,
    ) -> Result<Option<T>, StoreError> {
        self.transact(|tx| {
            let Some(mut user) = tx.user(user_id)? else {
                return Ok(None);
            };
            let was_active = user.totp.is_some();
            let (result, write) = change(tx, &mut user)?;
            if write {
                tx.put_user(&user)?;
                match (was_active, user.totp.is_some()) {
                    (false, true) => tx.bump(ACTIVE_COUNTER, 1)?,
                    (true, false) => tx.bump(ACTIVE_COUNTER, -1)?,
                    _ => {}
                }
            }
            Ok(Some(result))
        })
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
            stamp: 0,
            key_epoch: 0,
            totp: None,
            pending: None,
            failures: Default::default(),
            last_login: None,
        };
        self.transact(|tx| {
            if tx.usernames.get(username.as_bytes())?.is_some() {
                return Ok(Err(UsernameTaken));
            }
            tx.usernames
                .insert(username.as_bytes(), &id.to_be_bytes())?;
            tx.put_user(&user)?;
            tx.bump(USERS_COUNTER, 1)?;
            Ok(Ok(user.clone()))
        })
    }

    pub fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        Ok(match self.users.get(id.to_be_bytes())? {
            Some(bytes) => Some(decode(&bytes)?),
            None => None,
        })
    }

    pub fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        match self.usernames.get(username.as_bytes())? {
            Some(id) => {
                let id: [u8; 8] = id
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("username index entry".into()))?;
                self.user(UserId::from_be_bytes(id))
            }
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

    /// Stores a login key for a user who passed the password step (no TOTP) and notes the login.
    pub fn issue_key(
        &self,
        user_id: UserId,
        digest: &Digest,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_user(user_id, |tx, user| {
                tx.insert_key(digest, user, now)?;
                user.last_login = Some(now);
                Ok(((), true))
            })?
            .is_some())
    }

    /// The key's record and its user, if the key exists, was not revoked by a newer epoch and
    /// has not outlived `lifetime`. Dead keys are deleted on the way; live ones get their
    /// last use noted (at most once a minute).
    pub fn authenticate_key(
        &self,
        digest: &Digest,
        lifetime: KeyLifetime,
        now: UnixTime,
    ) -> Result<Option<(LoginKey, User)>, StoreError> {
        // The key and its user are read in one transaction: an epoch change that re-issues this
        // very key (deactivation, password change) must not be seen half-way.
        let found = self.transact(|tx| {
            let Some(bytes) = tx.keys.get(digest)? else {
                return Ok(None);
            };
            let key: LoginKey = decode(&bytes).map_err(corrupt)?;
            let user = tx.user(key.user_id)?;
            Ok(Some((bytes, key, user)))
        })?;
        let Some((bytes, mut key, user)) = found else {
            return Ok(None);
        };
        let user = user.filter(|user| user.key_epoch == key.epoch);
        let Some(user) = user.filter(|_| lifetime.alive(&key, now)) else {
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

    /// Revokes every key of the user (their records die lazily: the epoch no longer matches),
    /// except `keep`, which is re-issued under the new epoch. False if there is no such user.
    pub fn revoke_keys(
        &self,
        user_id: UserId,
        keep: Option<&Digest>,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_user(user_id, |tx, user| {
                revoke_keys_in(tx, user, keep, now)?;
                Ok(((), true))
            })?
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
            .update_user(user_id, |tx, user| {
                user.password_hash = password_hash.to_owned();
                user.stamp += 1;
                revoke_keys_in(tx, user, keep, now)?;
                Ok(((), true))
            })?
            .is_some())
    }

    pub fn issue_temp_token(&self, digest: &Digest, token: &TempToken) -> Result<(), StoreError> {
        self.temp_tokens.insert(digest, encode(token))?;
        Ok(())
    }

    /// The temp token and its user if the token may still be used at `now`.
    pub fn live_temp_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> Result<Option<(TempToken, User)>, StoreError> {
        self.transact(|tx| tx.live_temp_token(digest, now))
    }

    /// Replaces the pending secret, unless TOTP is already active.
    pub fn begin_setup(
        &self,
        user_id: UserId,
        pending: &PendingTotp,
    ) -> Result<SetupOutcome, StoreError> {
        let outcome = self.update_user(user_id, |_, user| {
            if user.totp.is_some() {
                return Ok((SetupOutcome::AlreadyActive, false));
            }
            user.pending = Some(pending.clone());
            Ok((SetupOutcome::Started, true))
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
        let outcome = self.update_user(user_id, |_, user| {
            if user.totp.is_some() || user.pending.as_ref().map(|p| &p.secret) != Some(checked) {
                return Ok((Guarded::Conflict, false));
            }
            match refusal(judge(user, proof, policy, now)) {
                Some(refused) => Ok((Guarded::Refused(refused), true)),
                None => {
                    user.pending = None;
                    user.totp = Some(active.clone());
                    Ok((
                        Guarded::Done {
                            recovery_code_used: false,
                        },
                        true,
                    ))
                }
            }
        })?;
        Ok(outcome.unwrap_or(Guarded::Conflict))
    }

    /// Deactivation, optionally guarded by a code (`proof` judged against `expected`): removes
    /// the secret, the recovery codes and any pending setup, kills outstanding temp tokens and
    /// revokes every key but `keep`.
    pub fn deactivate(
        &self,
        user_id: UserId,
        guard: Option<(&Proof<'_>, &StoredSecret)>,
        policy: &LockPolicy,
        keep: &Digest,
        now: UnixTime,
    ) -> Result<Guarded, StoreError> {
        let outcome = self.update_user(user_id, |tx, user| {
            if user.totp.is_none() {
                return Ok((Guarded::Conflict, false));
            }
            let mut recovery_code_used = false;
            if let Some((proof, expected)) = guard {
                if !same_secret(user, proof, expected) {
                    return Ok((Guarded::Conflict, false));
                }
                match judge(user, proof, policy, now) {
                    Judgement::Accepted {
                        recovery_code_used: r,
                    } => recovery_code_used = r,
                    other => return Ok((Guarded::Refused(refusal(other).expect("refused")), true)),
                }
            }
            user.totp = None;
            user.pending = None;
            user.stamp += 1;
            revoke_keys_in(tx, user, Some(keep), now)?;
            Ok((Guarded::Done { recovery_code_used }, true))
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
        let outcome = self.update_user(user_id, |_, user| {
            if user.totp.is_none() || !same_secret(user, proof, expected) {
                return Ok((Guarded::Conflict, false));
            }
            match judge(user, proof, policy, now) {
                Judgement::Accepted { recovery_code_used } => {
                    if let Some(totp) = user.totp.as_mut() {
                        totp.recovery_key = *key;
                        totp.recovery_hashes = hashes.to_vec();
                    }
                    Ok((Guarded::Done { recovery_code_used }, true))
                }
                other => Ok((Guarded::Refused(refusal(other).expect("refused")), true)),
            }
        })?;
        Ok(outcome.unwrap_or(Guarded::Conflict))
    }

    /// The second step of a login, in one transaction: `proof` is judged (replay, recovery code
    /// consumption, failure count, lock); on success the temp token is consumed and the key
    /// stored; a rejection spends one attempt of the temp token. `expected` is the secret a
    /// TOTP proof was computed against.
    pub fn complete_login(
        &self,
        temp: &Digest,
        proof: &Proof<'_>,
        expected: &StoredSecret,
        key: &Digest,
        policy: &LockPolicy,
        now: UnixTime,
    ) -> Result<LoginOutcome, StoreError> {
        self.transact(|tx| {
            let Some((token, mut user)) = tx.live_temp_token(temp, now)? else {
                return Ok(LoginOutcome::InvalidTempToken);
            };
            if !same_secret(&user, proof, expected) {
                return Ok(LoginOutcome::InvalidTempToken);
            }
            let judgement = judge(&mut user, proof, policy, now);
            let outcome = match judgement {
                Judgement::Accepted { recovery_code_used } => {
                    tx.temp_tokens.remove(temp)?;
                    tx.insert_key(key, &user, now)?;
                    user.last_login = Some(now);
                    LoginOutcome::LoggedIn {
                        recovery_code_used,
                        recovery_codes_remaining: user
                            .totp
                            .as_ref()
                            .map_or(0, |t| t.recovery_hashes.len()),
                    }
                }
                Judgement::Rejected { .. } => {
                    tx.spend_attempt(temp, token)?;
                    LoginOutcome::Refused(refusal(judgement).expect("refused"))
                }
                Judgement::Locked { .. } => {
                    return Ok(LoginOutcome::Refused(refusal(judgement).expect("refused")));
                }
            };
            tx.put_user(&user)?;
            Ok(outcome)
        })
    }

    /// Deletes a user. Their keys and temp tokens die with them (they no longer resolve) and are
    /// swept later. False if there was no such user.
    pub fn remove_user(&self, user_id: UserId) -> Result<bool, StoreError> {
        self.transact(|tx| {
            let Some(user) = tx.user(user_id)? else {
                return Ok(false);
            };
            tx.users.remove(&user_id.to_be_bytes())?;
            tx.usernames.remove(user.username.as_bytes())?;
            tx.bump(USERS_COUNTER, -1)?;
            if user.totp.is_some() {
                tx.bump(ACTIVE_COUNTER, -1)?;
            }
            Ok(true)
        })
    }

    /// For a lost phone: clears the secret, any pending setup, the recovery codes and the lock,
    /// and revokes every key and temp token of the user. False if no such user.
    pub fn reset_totp(&self, user_id: UserId, now: UnixTime) -> Result<bool, StoreError> {
        Ok(self
            .update_user(user_id, |tx, user| {
                user.totp = None;
                user.pending = None;
                user.failures = Default::default();
                user.stamp += 1;
                revoke_keys_in(tx, user, None, now)?;
                Ok(((), true))
            })?
            .is_some())
    }

    /// Clears a user's failure count and lock (administrator action). False if no such user.
    pub fn unlock(&self, user_id: UserId) -> Result<bool, StoreError> {
        Ok(self
            .update_user(user_id, |_, user| {
                user.failures = Default::default();
                Ok(((), true))
            })?
            .is_some())
    }

    /// Re-seals every stored secret with `reseal`, which returns `None` for secrets already
    /// sealed under the current key. One transaction per user. Returns how many changed.
    pub fn reseal_all<E>(
        &self,
        reseal: impl Fn(UserId, &StoredSecret) -> Result<Option<StoredSecret>, E>,
    ) -> Result<Result<usize, E>, StoreError> {
        let mut changed = 0;
        for entry in self.users.iter().keys() {
            let id = UserId::from_be_bytes(
                entry?
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("user key".into()))?,
            );
            let result = self.update_user(id, |_, user| {
                let mut touched = false;
                if let Some(totp) = user.totp.as_mut() {
                    match reseal(id, &totp.secret) {
                        Ok(Some(sealed)) => {
                            totp.secret = sealed;
                            touched = true;
                        }
                        Ok(None) => {}
                        Err(e) => return Ok((Err(e), false)),
                    }
                }
                if let Some(pending) = user.pending.as_mut() {
                    match reseal(id, &pending.secret) {
                        Ok(Some(sealed)) => {
                            pending.secret = sealed;
                            touched = true;
                        }
                        Ok(None) => {}
                        Err(e) => return Ok((Err(e), false)),
                    }
                }
                Ok((Ok(touched), touched))
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

    /// Appends an event to the audit trail (durable with the next `persist`).
    pub fn record_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let mut key = event.time.to_be_bytes().to_vec();
        key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        self.audit.insert(key, encode(event))?;
        Ok(())
    }

    /// Events from `since` on, oldest first.
    pub fn events(
        &self,
        since: UnixTime,
    ) -> impl Iterator<Item = Result<AuditEvent, StoreError>> + '_ {
        self.audit
            .range(since.to_be_bytes()..)
            .values()
            .map(|bytes| Ok(decode::<AuditEvent>(&bytes?)?))
    }

    /// Deletes what has outlived its use: expired temp tokens, dead keys, and audit events
    /// older than `audit_cutoff`. Returns how many records went.
    pub fn sweep(
        &self,
        now: UnixTime,
        lifetime: KeyLifetime,
        audit_cutoff: UnixTime,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.temp_tokens.iter() {
            let (digest, bytes) = entry?;
            let expired = decode::<TempToken>(&bytes).map_or(true, |t| t.expires_at <= now);
            if expired
                && self
                    .temp_tokens
                    .compare_and_swap(&digest, Some(&bytes), None::<&[u8]>)?
                    .is_ok()
            {
                removed += 1;
            }
        }
        for entry in self.keys.iter() {
            let (digest, bytes) = entry?;
            let dead = match decode::<LoginKey>(&bytes) {
                Ok(key) => {
                    !lifetime.alive(&key, now)
                        || self
                            .user(key.user_id)?
                            .is_none_or(|u| u.key_epoch != key.epoch)
                }
                Err(_) => true,
            };
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

    /// Whether the store holds no user (a restore needs an empty one).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    fn named_trees(&self) -> [(&'static str, &sled::Tree); 7] {
        [
            ("", &self.db),
            ("meta", &self.meta),
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

/// Moves the user to a new key epoch (every key issued before stops working) and re-issues
/// `keep` under it.
fn revoke_keys_in(
    tx: &Tx<'_>,
    user: &mut User,
    keep: Option<&Digest>,
    now: UnixTime,
) -> TxResult<()> {
    user.key_epoch += 1;
    if let Some(digest) = keep {
        if let Some(bytes) = tx.keys.get(digest)? {
            let mut key: LoginKey = decode(&bytes).map_err(corrupt)?;
            if key.user_id == user.id {
                key.epoch = user.key_epoch;
                key.last_used_at = now;
                tx.keys.insert(digest, encode(&key))?;
            }
        }
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
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
