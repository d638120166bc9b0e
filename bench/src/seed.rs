//! Preparing data dirs before a server starts on them: users are built as the domain builds
//! them (enrolled, with keys and temp tokens) and written into the store with its backup
//! import, which takes microseconds per record instead of an Argon2 run and a durable HTTP
//! round trip each. The harness keeps the plain keys, secrets, temp tokens and recovery codes
//! so its requests are real ones.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use totpd::clock::{Clock, SystemClock, UnixTime};
use totpd::config::Config;
use totpd::domain::audit::{AuditEvent, EventKind};
use totpd::domain::enrolment::{self, RecoveryHashes};
use totpd::domain::keys;
use totpd::domain::lockout::LockPolicy;
use totpd::domain::second_factor::Proof;
use totpd::domain::secrets::{self, RecoveryCodes};
use totpd::domain::totp::{SECRET_LEN, Secret};
use totpd::domain::user::{PendingLogin, PendingTotp, StoredSecret, User, UserId};
use totpd::service::password::{Argon2Settings, PasswordHasher};
use totpd::service::sealing::{self, Keyring};
use totpd::store::codec::encode;
use totpd::store::{BackupRecord, DatabaseUrl, PostgresConfig, Store, StoreConfig};

/// The password of every bench user.
pub const PASSWORD: &str = "bench password 1";
/// Wrong codes sent with one temp token: all it allows by default, and fewer than the failures
/// that lock a user (the server keeps its default lockout).
pub fn wrong_per_token() -> u32 {
    let defaults = Config::default();
    defaults
        .temp_token_attempts
        .min(defaults.lockout.threshold.saturating_sub(1))
        .max(1)
}
/// How long prepared temp tokens live: longer than any run.
const TOKEN_LIFETIME: u64 = 3600;
/// sled page cache while seeding; the servers use the default.
const SEED_CACHE: u64 = 256 * 1024 * 1024;

/// The PHC string stored for every bench user: Argon2id with the server's default cost, so a
/// login costs what it costs in production. Computed once and shared (one salt for all users,
/// which changes nothing about the cost).
pub fn password_hash(settings: Argon2Settings) -> Result<String, String> {
    PasswordHasher::new(settings, 1)
        .and_then(|h| h.hash_now(PASSWORD))
        .map_err(|e| e.to_string())
}

/// A user who can verify with valid codes: `last_step` is 0, so every step in the window is
/// fresh, and each prepared temp token is good for one verify.
pub struct ValidUser {
    pub secret: Secret,
    pub tokens: Vec<String>,
    /// The last step this harness sent for the user.
    pub last_step: u64,
}

/// A user with unused recovery codes and as many temp tokens.
pub struct RecoveryUser {
    pub tokens: Vec<String>,
    pub codes: Vec<String>,
}

/// A temp token to send wrong codes with.
pub struct WrongToken {
    pub token: String,
    pub secret: Secret,
}

/// A user with a pending setup and a login key, ready to activate once.
pub struct PendingUser {
    pub key: String,
    pub secret: Secret,
}

/// Prepared data that requests use up; workers take from it as they go.
pub type Pool<T> = Arc<Mutex<Vec<T>>>;

pub fn pool<T>(items: Vec<T>) -> Pool<T> {
    Arc::new(Mutex::new(items))
}

pub fn take<T>(pool: &Pool<T>) -> Option<T> {
    pool.lock().unwrap_or_else(PoisonError::into_inner).pop()
}

/// How much of each kind the main data dir gets (nothing of a kind left out of a literal).
#[derive(Default)]
pub struct MainPlan {
    /// Users to log in as, and login keys for status: one per worker.
    pub per_worker: usize,
    /// Users without TOTP, with a login key: one setup each.
    pub setup: usize,
    pub activate: usize,
    pub valid_users: usize,
    pub valid_per_user: usize,
    pub recovery_users: usize,
    pub wrong_tokens: usize,
    /// Login keys to log out, one request each (32 per user).
    pub logout: usize,
}

/// Everything the endpoint scenarios need.
pub struct MainData {
    pub login: Vec<String>,
    pub status_keys: Vec<String>,
    pub setup_keys: Pool<String>,
    pub activate: Pool<PendingUser>,
    pub valid: Pool<ValidUser>,
    pub recovery: Pool<RecoveryUser>,
    pub wrong: Pool<WrongToken>,
    pub logout_keys: Pool<String>,
}

pub struct Seeder {
    store: Arc<dyn Store>,
    runtime: tokio::runtime::Runtime,
    keyring: Keyring,
    now: UnixTime,
    hash: String,
    next_id: AtomicU64,
    next_event: AtomicU64,
    /// PostgreSQL: records not yet imported.
    batch: Option<Mutex<Vec<BackupRecord>>>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn random_secret() -> Result<Vec<u8>, String> {
    Ok(secrets::random_bytes::<SECRET_LEN>().map_err(err)?.to_vec())
}

/// The secret of scale user `index`: derived, so a million of them need not be kept in memory.
pub fn scale_secret(index: u64) -> Vec<u8> {
    let digest = blake3::hash(format!("totpd-bench scale user {index}").as_bytes());
    digest.as_bytes()[..SECRET_LEN].to_vec()
}

/// Recovery code hashes of scale user `index`: never used, so derived (the operating system's
/// random source and the code formatting cost more than the rest of an enrolment).
fn scale_recovery_codes(index: u64) -> RecoveryCodes {
    let derive =
        |n: u64| *blake3::hash(format!("totpd-bench recovery {index} {n}").as_bytes()).as_bytes();
    RecoveryCodes {
        key: derive(u64::MAX),
        shown: Vec::new(),
        hashes: (0..secrets::RECOVERY_CODE_COUNT as u64)
            .map(derive)
            .collect(),
    }
}

pub fn scale_name(index: u64) -> String {
    format!("scale-{index:07}")
}

/// The id of scale user `index` (a scale data dir holds only scale users).
fn scale_id(index: u64) -> UserId {
    index + 1
}

/// Where the seeder writes.
pub enum SeedTarget<'a> {
    /// A sled data dir (the master key file goes into it, where the server finds it).
    Sled(&'a Path),
    /// A PostgreSQL database, and the master key file every server on it is given.
    Postgres { url: &'a str, master_key: &'a Path },
}

/// PostgreSQL: records are imported this many at a time, each in its own transaction (the
/// store's `import`), from `IMPORT_TASKS` tasks at once so that the commits share WAL flushes.
const IMPORT_BATCH: usize = 8192;
const IMPORT_TASKS: usize = 16;

impl Seeder {
    pub fn open(target: &SeedTarget<'_>, hash: &str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(err)?;
        let (store_config, key_path, batch) = match target {
            SeedTarget::Sled(data_dir) => {
                // The master key file the server will find in the data dir (created on first
                // open).
                let config = Config {
                    data_dir: data_dir.to_path_buf(),
                    ..Config::default()
                };
                let store = StoreConfig::Sled {
                    data_dir: data_dir.to_path_buf(),
                    cache_capacity: SEED_CACHE,
                };
                (store, config.master_key_path(), None)
            }
            SeedTarget::Postgres { url, master_key } => {
                let store = StoreConfig::Postgres(PostgresConfig {
                    url: DatabaseUrl::new(*url),
                    pool_size: IMPORT_TASKS,
                    timeout: std::time::Duration::from_secs(30),
                    ca_file: None,
                });
                (
                    store,
                    master_key.to_path_buf(),
                    Some(Mutex::new(Vec::new())),
                )
            }
        };
        let store = runtime
            .block_on(totpd::store::open(&store_config))
            .map_err(err)?;
        let (keyring, _) = runtime.block_on(sealing::establish(None, &key_path, store.as_ref()))?;
        Ok(Self {
            store,
            runtime,
            keyring,
            now: SystemClock.now(),
            hash: hash.to_owned(),
            next_id: AtomicU64::new(1),
            next_event: AtomicU64::new(1),
            batch,
        })
    }

    fn import(&self, kind: &str, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        let record = BackupRecord {
            kind: kind.to_owned(),
            key,
            value,
        };
        if let Some(batch) = &self.batch {
            let full = {
                let mut pending = batch.lock().unwrap_or_else(PoisonError::into_inner);
                pending.push(record);
                pending.len() >= IMPORT_BATCH
            };
            return if full { self.flush() } else { Ok(()) };
        }
        self.runtime
            .block_on(self.store.import(record))
            .map_err(err)
    }

    /// PostgreSQL: imports the records gathered so far, from `IMPORT_TASKS` tasks at once.
    fn flush(&self) -> Result<(), String> {
        let Some(batch) = &self.batch else {
            return Ok(());
        };
        let records = std::mem::take(&mut *batch.lock().unwrap_or_else(PoisonError::into_inner));
        if records.is_empty() {
            return Ok(());
        }
        let per_task = records.len().div_ceil(IMPORT_TASKS);
        let mut records = records.into_iter();
        let mut tasks = tokio::task::JoinSet::new();
        let _guard = self.runtime.enter();
        loop {
            let chunk: Vec<BackupRecord> = records.by_ref().take(per_task).collect();
            if chunk.is_empty() {
                break;
            }
            let store = Arc::clone(&self.store);
            tasks.spawn(async move {
                for record in chunk {
                    store.import(record).await.map_err(err)?;
                }
                Ok::<(), String>(())
            });
        }
        self.runtime.block_on(async {
            while let Some(done) = tasks.join_next().await {
                done.map_err(err)??;
            }
            Ok(())
        })
    }

    /// Writes `user` as it now is (a new user, or a new state of one).
    fn save(&self, user: &User) -> Result<(), String> {
        self.import("users", user.id.to_be_bytes().to_vec(), encode(user))
    }

    /// A new user (not written until `save`).
    pub fn user(&self, name: &str) -> User {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        User::new(id, name.to_owned(), self.hash.clone(), self.now)
    }

    /// A new user, written.
    fn saved_user(&self, name: &str) -> Result<User, String> {
        let user = self.user(name);
        self.save(&user)?;
        Ok(user)
    }

    pub fn find(&self, name: &str) -> Result<User, String> {
        self.flush()?;
        self.runtime
            .block_on(self.store.user_by_name(name))
            .map_err(err)?
            .ok_or_else(|| format!("no user {name}"))
    }

    /// Notes an event in the audit trail, as the service does for each action.
    fn audit(&self, kind: EventKind, user: &User) -> Result<(), String> {
        let event = AuditEvent {
            time: self.now,
            kind,
            user_id: Some(user.id),
            username: Some(user.username.clone()),
            ip: Some([127, 0, 0, 1].into()),
            outcome: "ok".into(),
        };
        let mut key = self.now.to_be_bytes().to_vec();
        key.extend_from_slice(
            &self
                .next_event
                .fetch_add(1, Ordering::Relaxed)
                .to_be_bytes(),
        );
        self.import("audit", key, encode(&event))
    }

    /// A pending secret, sealed under the master key like the service seals it.
    fn begin_setup(
        &self,
        user: &mut User,
        secret: &[u8],
        audit: bool,
    ) -> Result<StoredSecret, String> {
        let stored = self
            .keyring
            .seal(user.id, &Secret::from_bytes(secret.to_vec()))
            .map_err(err)?;
        let pending = PendingTotp {
            secret: stored.clone(),
            created_at: self.now,
            burned_steps: Vec::new(),
        };
        enrolment::begin_setup(user, pending).map_err(|e| format!("{e:?}"))?;
        if audit {
            self.audit(EventKind::Setup, user)?;
        }
        Ok(stored)
    }

    /// Setup then activation through the domain, as the service does them (audit events
    /// included); no step consumed yet (`last_step` 0). Returns the recovery codes.
    pub fn enrol(&self, user: &mut User, secret: &[u8]) -> Result<Vec<String>, String> {
        let codes = secrets::new_recovery_codes().map_err(err)?;
        self.enrol_with(user, secret, codes, true)
    }

    fn enrol_with(
        &self,
        user: &mut User,
        secret: &[u8],
        codes: RecoveryCodes,
        audit: bool,
    ) -> Result<Vec<String>, String> {
        let stored = self.begin_setup(user, secret, audit)?;
        let recovery = RecoveryHashes {
            key: codes.key,
            hashes: codes.hashes,
        };
        enrolment::activate(
            user,
            &stored,
            &Proof::Step(0),
            recovery,
            &LockPolicy::default(),
            self.now,
        )
        .map_err(|e| format!("activating {}: {e:?}", user.username))?;
        if audit {
            self.audit(EventKind::Activate, user)?;
        }
        Ok(codes.shown)
    }

    /// A pending setup with a fresh secret, returned.
    pub fn pending(&self, user: &mut User) -> Result<Secret, String> {
        let secret = random_secret()?;
        self.begin_setup(user, &secret, true)?;
        Ok(Secret::from_bytes(secret))
    }

    /// A login key for `user`.
    pub fn key(&self, user: &User) -> Result<String, String> {
        let (key, digest) = secrets::new_login_key().map_err(err)?;
        let record = keys::new_key(user, user.key_epoch, self.now);
        self.import("keys", digest.to_vec(), encode(&record))?;
        Ok(key)
    }

    /// A temp token as login issues it after the password step, good for `attempts` codes
    /// (recorded in `user`, written with it).
    pub fn temp_token(&self, user: &mut User, attempts: u32) -> Result<String, String> {
        let (token, digest) = secrets::new_temp_token().map_err(err)?;
        user.temp_tokens.push(PendingLogin {
            digest,
            expires_at: self.now + TOKEN_LIFETIME,
            attempts_left: attempts,
        });
        Ok(token)
    }

    /// Imports what is still gathered, counts the users (as a restore does: the prepared
    /// records were imported, so the store no longer knows its counts), flushes and closes the
    /// store (a server can then open the data dir).
    pub fn finish(self) -> Result<(), String> {
        self.flush()?;
        self.runtime.block_on(self.store.recount()).map_err(err)?;
        self.runtime.block_on(self.store.close()).map_err(err)
    }

    /// The main data dir: every kind of user the endpoint scenarios need.
    pub fn main_data(&self, plan: &MainPlan) -> Result<MainData, String> {
        let mut login = Vec::new();
        let mut status_keys = Vec::new();
        for i in 0..plan.per_worker {
            let name = format!("login-{i:03}");
            self.saved_user(&name)?;
            login.push(name);
            status_keys.push(self.key(&self.saved_user(&format!("status-{i:03}"))?)?);
        }
        let setup_keys = (0..plan.setup)
            .map(|i| self.key(&self.saved_user(&format!("setup-{i:06}"))?))
            .collect::<Result<_, _>>()?;
        let mut logout_keys = Vec::with_capacity(plan.logout);
        for i in 0..plan.logout.div_ceil(32) {
            let user = self.saved_user(&format!("logout-{i:05}"))?;
            for _ in 0..32.min(plan.logout - logout_keys.len()) {
                logout_keys.push(self.key(&user)?);
            }
        }
        let mut activate = Vec::with_capacity(plan.activate);
        for i in 0..plan.activate {
            let mut user = self.user(&format!("activate-{i:06}"));
            let secret = self.pending(&mut user)?;
            self.save(&user)?;
            activate.push(PendingUser {
                key: self.key(&user)?,
                secret,
            });
        }
        let mut valid = Vec::with_capacity(plan.valid_users);
        for i in 0..plan.valid_users {
            let mut user = self.user(&format!("valid-{i:06}"));
            let secret = random_secret()?;
            self.enrol(&mut user, &secret)?;
            let tokens = (0..plan.valid_per_user)
                .map(|_| self.temp_token(&mut user, 1))
                .collect::<Result<_, _>>()?;
            self.save(&user)?;
            valid.push(ValidUser {
                secret: Secret::from_bytes(secret),
                tokens,
                last_step: 0,
            });
        }
        let mut recovery = Vec::with_capacity(plan.recovery_users);
        for i in 0..plan.recovery_users {
            let mut user = self.user(&format!("recovery-{i:06}"));
            let codes = self.enrol(&mut user, &random_secret()?)?;
            let tokens = codes
                .iter()
                .map(|_| self.temp_token(&mut user, 1))
                .collect::<Result<_, _>>()?;
            self.save(&user)?;
            recovery.push(RecoveryUser { tokens, codes });
        }
        let mut wrong = Vec::with_capacity(plan.wrong_tokens);
        for i in 0..plan.wrong_tokens {
            let mut user = self.user(&format!("wrong-{i:06}"));
            let secret = random_secret()?;
            self.enrol(&mut user, &secret)?;
            let token = self.temp_token(&mut user, wrong_per_token())?;
            self.save(&user)?;
            wrong.push(WrongToken {
                token,
                secret: Secret::from_bytes(secret),
            });
        }
        Ok(MainData {
            login,
            status_keys,
            setup_keys: pool(setup_keys),
            logout_keys: pool(logout_keys),
            activate: pool(activate),
            valid: pool(valid),
            recovery: pool(recovery),
            wrong: pool(wrong),
        })
    }

    /// Enrolled scale users `from..to`, created on `threads` threads.
    pub fn scale_users(&self, from: u64, to: u64, threads: u64) -> Result<(), String> {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    scope.spawn(move || -> Result<(), String> {
                        let mut index = from + t;
                        while index < to {
                            let mut user = User::new(
                                scale_id(index),
                                scale_name(index),
                                self.hash.clone(),
                                self.now,
                            );
                            let codes = scale_recovery_codes(index);
                            self.enrol_with(&mut user, &scale_secret(index), codes, false)?;
                            self.save(&user)?;
                            index += threads;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("a seeding thread panicked".into()))
            })
        })
    }

    /// Temp tokens for `sample` scale users drawn at random from the first `users`, `per_user`
    /// each.
    pub fn scale_tokens(
        &self,
        users: u64,
        sample: usize,
        per_user: usize,
    ) -> Result<Vec<ValidUser>, String> {
        let mut rng = rand::rng();
        let picked = rand::seq::index::sample(&mut rng, users as usize, sample);
        picked
            .into_iter()
            .map(|index| {
                let mut user = self.find(&scale_name(index as u64))?;
                let tokens = (0..per_user)
                    .map(|_| self.temp_token(&mut user, 1))
                    .collect::<Result<_, _>>()?;
                self.save(&user)?;
                // An earlier scale point may have used some of its steps.
                let last_step = user.totp.as_ref().map_or(0, |t| t.last_step);
                Ok(ValidUser {
                    secret: Secret::from_bytes(scale_secret(index as u64)),
                    tokens,
                    last_step,
                })
            })
            .collect()
    }
}
