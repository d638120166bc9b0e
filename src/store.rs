//! All state, in sled, under `<data dir>/db`. The public API is made of domain-named operations,
//! each atomic (one sled transaction or compare-and-swap), so a second backend can implement the
//! same list: create a user, issue a key, consume a temp token together with a time step or a
//! recovery code, and so on. Nothing here is durable until `persist()` resolves; callers await it
//! before acknowledging a change.
//!
//! Trees: `users` (id → User), `usernames` (name → id), `keys` (digest → LoginKey),
//! `temp_tokens` (digest → TempToken); the default tree holds the schema version.

use std::path::{Path, PathBuf};

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};

use crate::clock::UnixTime;
use crate::group_commit::{FlushError, GroupCommit};
use crate::models::{
    ActiveTotp, DecodeError, Digest, LoginKey, PendingTotp, StoredSecret, TempToken, User, UserId,
    decode, encode,
};

/// The layout of trees and keys this binary reads and writes.
pub const SCHEMA_VERSION: u64 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";

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
}

impl Tx<'_> {
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

#[derive(Debug, PartialEq, Eq)]
pub enum ActivateOutcome {
    Activated,
    AlreadyActive,
    /// No pending secret, or not the one the code was checked against (a newer setup won).
    NotPending,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    /// The temp token was consumed and the key stored.
    LoggedIn { recovery_codes_remaining: usize },
    /// The temp token is unknown, expired, used up, or outdated.
    InvalidTempToken,
    /// The code's step was already used (or the recovery code was): one attempt spent.
    CodeRejected,
}

pub struct Store {
    db: sled::Db,
    users: sled::Tree,
    usernames: sled::Tree,
    keys: sled::Tree,
    temp_tokens: sled::Tree,
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
        let (users, usernames, keys, temp_tokens) = (
            tree("users")?,
            tree("usernames")?,
            tree("keys")?,
            tree("temp_tokens")?,
        );
        let flusher = db.clone();
        let commit =
            GroupCommit::start(move || flusher.flush().map(|_| ()).map_err(|e| e.to_string()))
                .map_err(|e| io(e.to_string()))?;
        Ok(Self {
            db,
            users,
            usernames,
            keys,
            temp_tokens,
            commit,
        })
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
        (&self.users, &self.usernames, &self.keys, &self.temp_tokens)
            .transaction(|(users, usernames, keys, temp_tokens)| {
                f(&Tx {
                    users,
                    usernames,
                    keys,
                    temp_tokens,
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
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

    /// Stores a login key for a user who passed the password step (no TOTP) and notes the login.
    pub fn issue_key(
        &self,
        user_id: UserId,
        digest: &Digest,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        self.transact(|tx| {
            let Some(mut user) = tx.user(user_id)? else {
                return Ok(false);
            };
            tx.insert_key(digest, &user, now)?;
            user.last_login = Some(now);
            tx.put_user(&user)?;
            Ok(true)
        })
    }

    /// The key's record and its user, if the key exists and was not revoked by a newer epoch.
    pub fn authenticate_key(
        &self,
        digest: &Digest,
    ) -> Result<Option<(LoginKey, User)>, StoreError> {
        let Some(bytes) = self.keys.get(digest)? else {
            return Ok(None);
        };
        let key: LoginKey = decode(&bytes)?;
        Ok(self
            .user(key.user_id)?
            .filter(|user| user.key_epoch == key.epoch)
            .map(|user| (key, user)))
    }

    /// Deletes a key; false if it did not exist.
    pub fn revoke_key(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.keys.remove(digest)?.is_some())
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

    /// Deletes temp tokens that have expired; returns how many.
    pub fn sweep_temp_tokens(&self, now: UnixTime) -> Result<usize, StoreError> {
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
        Ok(removed)
    }

    /// Replaces the pending secret, unless TOTP is already active.
    pub fn begin_setup(
        &self,
        user_id: UserId,
        pending: &PendingTotp,
    ) -> Result<SetupOutcome, StoreError> {
        self.transact(|tx| {
            let Some(mut user) = tx.user(user_id)? else {
                return Ok(SetupOutcome::AlreadyActive);
            };
            if user.totp.is_some() {
                return Ok(SetupOutcome::AlreadyActive);
            }
            user.pending = Some(pending.clone());
            tx.put_user(&user)?;
            Ok(SetupOutcome::Started)
        })
    }

    /// Promotes the pending secret `checked` (the one the code was verified against) to active,
    /// with `active.last_step` as the consumed step of the activating code.
    pub fn activate(
        &self,
        user_id: UserId,
        checked: &StoredSecret,
        active: &ActiveTotp,
    ) -> Result<ActivateOutcome, StoreError> {
        self.transact(|tx| {
            let Some(mut user) = tx.user(user_id)? else {
                return Ok(ActivateOutcome::NotPending);
            };
            if user.totp.is_some() {
                return Ok(ActivateOutcome::AlreadyActive);
            }
            if user.pending.as_ref().map(|p| &p.secret) != Some(checked) {
                return Ok(ActivateOutcome::NotPending);
            }
            user.pending = None;
            user.totp = Some(active.clone());
            tx.put_user(&user)?;
            Ok(ActivateOutcome::Activated)
        })
    }

    /// Removes the secret, the recovery codes and any pending setup, and kills outstanding temp
    /// tokens. False if TOTP was not active.
    pub fn deactivate(&self, user_id: UserId) -> Result<bool, StoreError> {
        self.transact(|tx| {
            let Some(mut user) = tx.user(user_id)? else {
                return Ok(false);
            };
            if user.totp.is_none() {
                return Ok(false);
            }
            user.totp = None;
            user.pending = None;
            user.stamp += 1;
            tx.put_user(&user)?;
            Ok(true)
        })
    }

    /// Second step of a login with a TOTP code whose matched step is `step`: in one transaction,
    /// the temp token is consumed, the user's last step advances to `step` (only if it is later),
    /// and the key is stored. A replayed step spends one attempt of the token instead.
    pub fn complete_login_with_step(
        &self,
        temp: &Digest,
        step: u64,
        key: &Digest,
        now: UnixTime,
    ) -> Result<LoginOutcome, StoreError> {
        self.transact(|tx| {
            let Some((token, mut user)) = tx.live_temp_token(temp, now)? else {
                return Ok(LoginOutcome::InvalidTempToken);
            };
            let Some(totp) = user.totp.as_mut() else {
                return Ok(LoginOutcome::InvalidTempToken);
            };
            if step <= totp.last_step {
                tx.spend_attempt(temp, token)?;
                return Ok(LoginOutcome::CodeRejected);
            }
            totp.last_step = step;
            let recovery_codes_remaining = totp.recovery_hashes.len();
            tx.temp_tokens.remove(temp)?;
            tx.insert_key(key, &user, now)?;
            user.last_login = Some(now);
            tx.put_user(&user)?;
            Ok(LoginOutcome::LoggedIn {
                recovery_codes_remaining,
            })
        })
    }

    /// Second step of a login with a recovery code: consumes the temp token and the code (if the
    /// user still has it) and stores the key, in one transaction. An unknown or used code spends
    /// one attempt of the token.
    pub fn complete_login_with_recovery_code(
        &self,
        temp: &Digest,
        code_hash: impl Fn(&Digest) -> Digest,
        key: &Digest,
        now: UnixTime,
    ) -> Result<LoginOutcome, StoreError> {
        self.transact(|tx| {
            let Some((token, mut user)) = tx.live_temp_token(temp, now)? else {
                return Ok(LoginOutcome::InvalidTempToken);
            };
            let Some(totp) = user.totp.as_mut() else {
                return Ok(LoginOutcome::InvalidTempToken);
            };
            let hash = code_hash(&totp.recovery_key);
            let Some(index) = totp.recovery_hashes.iter().position(|h| *h == hash) else {
                tx.spend_attempt(temp, token)?;
                return Ok(LoginOutcome::CodeRejected);
            };
            totp.recovery_hashes.swap_remove(index);
            let recovery_codes_remaining = totp.recovery_hashes.len();
            tx.temp_tokens.remove(temp)?;
            tx.insert_key(key, &user, now)?;
            user.last_login = Some(now);
            tx.put_user(&user)?;
            Ok(LoginOutcome::LoggedIn {
                recovery_codes_remaining,
            })
        })
    }

    /// A wrong code at verify: spends one attempt of the temp token. False if it was not live.
    pub fn record_wrong_code(&self, temp: &Digest, now: UnixTime) -> Result<bool, StoreError> {
        self.transact(|tx| match tx.live_temp_token(temp, now)? {
            Some((token, _)) => {
                tx.spend_attempt(temp, token)?;
                Ok(true)
            }
            None => Ok(false),
        })
    }

    /// Bytes the data dir's sled files take.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
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
