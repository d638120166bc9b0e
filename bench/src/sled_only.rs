//! The sled-only ceiling: exactly the store operations one durable request needs, on sled
//! 0.34.7 directly, with totpd's group commit (one flusher thread: the queued audit batch,
//! `Db::flush`, then a real `fdatasync` of sled's log) — no HTTP, no service, no crypto beyond
//! what the store itself does (decoding and encoding records).
//!
//! It answers the question a missed durable-endpoint target raises: is the gap totpd's, or is
//! it sled's? If these operations alone, at the same concurrency, on the same machine, in the
//! same run, stay below half the bare warp POST, the target is out of sled's reach; the gap
//! between this and the endpoint is what totpd adds on top.
//!
//! The data is prepared by the same seeder as the endpoint scenarios, in a data dir of its own;
//! the sled config is the server's (its default cache size).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use totpd::clock::{Clock, SystemClock};
use totpd::domain::audit::{AuditEvent, EventKind};
use totpd::domain::secrets;
use totpd::domain::user::Digest;
use totpd::domain::user::{LoginKey, PendingTotp, StoredSecret, User};
use totpd::store::codec::{decode, encode};
use totpd::store::group_commit::GroupCommit;

use crate::load::{Outcome, Timing};
use crate::seed::{self, MainData};

/// The request whose store operations are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    /// verify with a valid code: temp-token index get, user get, user compare-and-swap (the
    /// token consumed, the step advanced), a new login key inserted, one audit event; flush.
    VerifyValid,
    /// verify with a wrong code: index get, user get, user compare-and-swap (one attempt and
    /// one failure counted), one audit event; flush.
    VerifyWrong,
    /// logout: key get and user get (authentication), key removed, one audit event; flush.
    Logout,
    /// setup: key get and user get (authentication), user compare-and-swap (a pending secret
    /// added), one audit event; flush.
    Setup,
}

impl Ops {
    pub const ALL: [Ops; 4] = [Ops::VerifyValid, Ops::VerifyWrong, Ops::Logout, Ops::Setup];

    pub fn name(self) -> &'static str {
        match self {
            Ops::VerifyValid => "verify_valid",
            Ops::VerifyWrong => "verify_wrong",
            Ops::Logout => "logout",
            Ops::Setup => "setup",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Ops::VerifyValid => "index get, user get, user CAS, key insert, 1 event, flush",
            Ops::VerifyWrong => "index get, user get, user CAS, 1 event, flush",
            Ops::Logout => "key get, user get, key remove, 1 event, flush",
            Ops::Setup => "key get, user get, user CAS, 1 event, flush",
        }
    }
}

struct Db {
    users: sled::Tree,
    keys: sled::Tree,
    temp_tokens: sled::Tree,
    db: sled::Db,
    audit_queue: Arc<Mutex<sled::Batch>>,
    commit: GroupCommit,
}

/// Opens the prepared data dir's sled database as the server does and starts a flusher.
fn open(data_dir: &Path, cache_capacity: u64) -> Result<Db, String> {
    let path = data_dir.join("db");
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(cache_capacity)
        .open()
        .map_err(|e| e.to_string())?;
    let tree = |name: &str| db.open_tree(name).map_err(|e| e.to_string());
    let (users, keys, temp_tokens, audit) = (
        tree("users")?,
        tree("keys")?,
        tree("temp_tokens")?,
        tree("audit")?,
    );
    let log = std::fs::File::open(path.join("db")).map_err(|e| e.to_string())?;
    let audit_queue = Arc::new(Mutex::new(sled::Batch::default()));
    let (queue, flusher) = (Arc::clone(&audit_queue), db.clone());
    let commit = GroupCommit::start(move || {
        let batch = std::mem::take(&mut *queue.lock().unwrap_or_else(PoisonError::into_inner));
        audit.apply_batch(batch).map_err(|e| e.to_string())?;
        flusher.flush().map_err(|e| e.to_string())?;
        log.sync_data().map_err(|e| e.to_string())
    })
    .map_err(|e| e.to_string())?;
    Ok(Db {
        users,
        keys,
        temp_tokens,
        db,
        audit_queue,
        commit,
    })
}

impl Db {
    fn queue_event(&self, user: &User, kind: EventKind, outcome: &str) -> Result<(), String> {
        let now = SystemClock.now();
        let event = AuditEvent {
            time: now,
            kind,
            user_id: Some(user.id),
            username: Some(user.username.clone()),
            ip: Some(std::net::IpAddr::from([127, 0, 0, 1])),
            outcome: outcome.into(),
        };
        let mut key = now.to_be_bytes().to_vec();
        key.extend_from_slice(
            &self
                .db
                .generate_id()
                .map_err(|e| e.to_string())?
                .to_be_bytes(),
        );
        self.audit_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, encode(&event));
        Ok(())
    }

    /// verify: the user of a temp token, changed by one compare-and-swap (retried on a
    /// conflict, as the store does).
    fn verify(&self, temp: &Digest, valid: bool) -> Result<(), String> {
        let e = |e: sled::Error| e.to_string();
        let index = self
            .temp_tokens
            .get(temp)
            .map_err(e)?
            .ok_or("no such temp token")?;
        let id: [u8; 8] = index[..8].try_into().map_err(|_| "bad index")?;
        loop {
            let old = self.users.get(id).map_err(e)?.ok_or("no such user")?;
            let mut user: User = decode(&old).map_err(|e| format!("{e:?}"))?;
            let now = SystemClock.now();
            if valid {
                user.temp_tokens.retain(|t| &t.digest != temp);
                if let Some(totp) = &mut user.totp {
                    totp.last_step += 1;
                }
                user.failures.consecutive = 0;
                user.last_login = Some(now);
            } else {
                if let Some(t) = user.temp_tokens.iter_mut().find(|t| &t.digest == temp) {
                    t.attempts_left = t.attempts_left.saturating_sub(1);
                }
                user.failures.consecutive += 1;
            }
            if self
                .users
                .compare_and_swap(id, Some(&old), Some(encode(&user)))
                .map_err(e)?
                .is_err()
            {
                continue;
            }
            if valid {
                let (_, digest) = secrets::new_login_key().map_err(|e| e.to_string())?;
                let key = LoginKey {
                    user_id: user.id,
                    epoch: user.key_epoch,
                    created_at: now,
                    last_used_at: now,
                };
                self.keys.insert(digest, encode(&key)).map_err(e)?;
                self.queue_event(&user, EventKind::Verify, "ok")?;
            } else {
                self.queue_event(&user, EventKind::Verify, "wrong_code")?;
            }
            return Ok(());
        }
    }

    /// logout: authenticate the key (key and user read), then remove it.
    fn logout(&self, digest: &Digest) -> Result<(), String> {
        let e = |e: sled::Error| e.to_string();
        let bytes = self.keys.get(digest).map_err(e)?.ok_or("no such key")?;
        let key: LoginKey = decode(&bytes).map_err(|e| format!("{e:?}"))?;
        let user = self
            .users
            .get(key.user_id.to_be_bytes())
            .map_err(e)?
            .ok_or("no such user")?;
        let user: User = decode(&user).map_err(|e| format!("{e:?}"))?;
        self.keys.remove(digest).map_err(e)?;
        self.queue_event(&user, EventKind::KeyRevoked, "logout")
    }

    /// setup: authenticate the key, then add a pending secret to the user (a sealed secret's
    /// size: 24-byte nonce, 20-byte secret, 16-byte tag).
    fn setup(&self, digest: &Digest) -> Result<(), String> {
        let e = |e: sled::Error| e.to_string();
        let bytes = self.keys.get(digest).map_err(e)?.ok_or("no such key")?;
        let key: LoginKey = decode(&bytes).map_err(|e| format!("{e:?}"))?;
        let id = key.user_id.to_be_bytes();
        loop {
            let old = self.users.get(id).map_err(e)?.ok_or("no such user")?;
            let mut user: User = decode(&old).map_err(|e| format!("{e:?}"))?;
            user.pending = Some(PendingTotp {
                secret: StoredSecret::Plain(vec![7; 60]),
                created_at: SystemClock.now(),
                burned_steps: Vec::new(),
            });
            if self
                .users
                .compare_and_swap(id, Some(&old), Some(encode(&user)))
                .map_err(e)?
                .is_ok()
            {
                return self.queue_event(&user, EventKind::Setup, "ok");
            }
        }
    }
}

/// The digests one kind of request uses up, one per request.
fn digests(ops: Ops, data: &MainData) -> Vec<Digest> {
    fn drain<T>(pool: &seed::Pool<T>) -> Vec<T> {
        std::mem::take(&mut *pool.lock().unwrap_or_else(PoisonError::into_inner))
    }
    match ops {
        Ops::VerifyValid => drain(&data.valid)
            .into_iter()
            .flat_map(|u: seed::ValidUser| u.tokens)
            .map(|t| secrets::token_digest(&t))
            .collect(),
        Ops::VerifyWrong => drain(&data.wrong)
            .into_iter()
            .flat_map(|w: seed::WrongToken| {
                let d = secrets::token_digest(&w.token);
                std::iter::repeat_n(d, seed::wrong_per_token() as usize)
            })
            .collect(),
        Ops::Logout => drain(&data.logout_keys)
            .into_iter()
            .map(|k: String| secrets::token_digest(&k))
            .collect(),
        Ops::Setup => drain(&data.setup_keys)
            .into_iter()
            .map(|k: String| secrets::token_digest(&k))
            .collect(),
    }
}

/// Runs `ops` at `concurrency` on a runtime shaped like the server's (one worker per core),
/// for the warm-up and window of `timing`. The outcome's CPU and bytes-written columns are this
/// process's (the harness does nothing else meanwhile).
pub fn run(
    data_dir: &Path,
    cache_capacity: u64,
    data: &MainData,
    plan: &[(Ops, usize)],
    timing: Timing,
) -> Result<Vec<(Ops, usize, Outcome)>, String> {
    let pools = Ops::ALL
        .iter()
        .map(|&ops| (ops, digests(ops, data)))
        .collect();
    run_digests(data_dir, cache_capacity, pools, plan, timing, None)
}

/// Password checks kept running beside the sled-only verifies: `concurrency` tasks each
/// awaiting one Argon2 run after another on the server's own hasher (its default parameters
/// and thread count, its threads at the server's background priority), as logins that
/// saturate the hash pool do.
pub struct Hashing {
    pub hasher: totpd::service::password::PasswordHasher,
    pub concurrency: usize,
}

/// verify's store operations at `concurrency` while `hashing` saturates the hash pool: the
/// ceiling of the verify-beside-logins target, with no HTTP and no login's store write. The
/// second value is the Argon2 runs per second completed meanwhile.
pub fn verify_beside_hashing(
    data_dir: &Path,
    cache_capacity: u64,
    data: &MainData,
    concurrency: usize,
    hashing: &Hashing,
    timing: Timing,
) -> Result<(Outcome, f64), String> {
    let pools = vec![(Ops::VerifyValid, digests(Ops::VerifyValid, data))];
    let plan = [(Ops::VerifyValid, concurrency)];
    let hashes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let outcome = run_digests(
        data_dir,
        cache_capacity,
        pools,
        &plan,
        timing,
        Some((hashing, Arc::clone(&hashes))),
    )?
    .pop()
    .map(|(_, _, outcome)| outcome)
    .ok_or("no sled-only outcome")?;
    let per_second = if outcome.seconds > 0.0 {
        hashes.load(std::sync::atomic::Ordering::Relaxed) as f64 / outcome.seconds
    } else {
        0.0
    };
    Ok((outcome, per_second))
}

/// The verifies of a scale point on sled alone: one per temp token of `users` (the server's
/// scale scenario, its tokens prepared the same way), at `concurrency`, on a freshly opened
/// database as the server's was, so the cache starts as cold.
pub fn scale_verify(
    data_dir: &Path,
    cache_capacity: u64,
    users: Vec<seed::ValidUser>,
    concurrency: usize,
    timing: Timing,
) -> Result<Outcome, String> {
    let digests = users
        .into_iter()
        .flat_map(|u| u.tokens)
        .map(|t| secrets::token_digest(&t))
        .collect();
    let plan = [(Ops::VerifyValid, concurrency)];
    run_digests(
        data_dir,
        cache_capacity,
        vec![(Ops::VerifyValid, digests)],
        &plan,
        timing,
        None,
    )?
    .pop()
    .map(|(_, _, outcome)| outcome)
    .ok_or_else(|| "no sled-only outcome".into())
}

/// Runs `plan` with the digests each kind of request uses up, taken in their given order;
/// with `hashing`, its password checks run beside each scenario and the ones completed inside
/// the window are counted in the counter given with it.
fn run_digests(
    data_dir: &Path,
    cache_capacity: u64,
    digests: Vec<(Ops, Vec<Digest>)>,
    plan: &[(Ops, usize)],
    timing: Timing,
    hashing: Option<(&Hashing, Arc<std::sync::atomic::AtomicU64>)>,
) -> Result<Vec<(Ops, usize, Outcome)>, String> {
    let db = Arc::new(open(data_dir, cache_capacity)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    let mut pools: Vec<(Ops, seed::Pool<Digest>)> = digests
        .into_iter()
        .map(|(ops, mut d)| {
            d.reverse();
            (ops, seed::pool(d))
        })
        .collect();
    for &(ops, concurrency) in plan {
        let pool = pools
            .iter_mut()
            .find(|(o, _)| *o == ops)
            .map(|(_, p)| Arc::clone(p))
            .ok_or("no data")?;
        let cpu_before = crate::load::cpu_seconds(std::process::id());
        let written_before = crate::load::write_bytes(std::process::id());
        let start = Instant::now();
        let window_start = start + timing.warmup;
        let deadline = window_start + timing.measure;
        let outcome = runtime.block_on(async {
            let hashers: Vec<_> = hashing
                .iter()
                .flat_map(|(h, counter)| {
                    (0..h.concurrency).map(|_| {
                        let (hasher, counter) = (h.hasher.clone(), Arc::clone(counter));
                        tokio::spawn(async move {
                            while Instant::now() < deadline {
                                let _ = hasher.verify("a password".into(), None).await;
                                let now = Instant::now();
                                if now > window_start && now <= deadline {
                                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        })
                    })
                })
                .collect();
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (db, pool) = (Arc::clone(&db), Arc::clone(&pool));
                    tokio::spawn(
                        async move { worker(&db, ops, &pool, window_start, deadline).await },
                    )
                })
                .collect();
            let mut all = crate::load::empty_outcome();
            let mut last_end = window_start;
            for task in tasks {
                let Ok((requests, answered, errors, exhausted, latency, ended)) = task.await else {
                    all.io_errors += 1;
                    continue;
                };
                all.requests += requests;
                all.answered += answered;
                all.unexpected += errors;
                all.exhausted |= exhausted;
                let _ = all.latency.add(&latency);
                last_end = last_end.max(ended);
            }
            for hasher in hashers {
                let _ = hasher.await;
            }
            all.seconds = last_end
                .saturating_duration_since(window_start)
                .as_secs_f64();
            all
        });
        let mut outcome = outcome;
        if let (Some(before), Some(after)) =
            (cpu_before, crate::load::cpu_seconds(std::process::id()))
        {
            if outcome.answered > 0 {
                outcome.server_cpu_us = Some((after - before) * 1e6 / outcome.answered as f64);
            }
        }
        if let (Some(before), Some(after)) =
            (written_before, crate::load::write_bytes(std::process::id()))
        {
            if outcome.answered > 0 {
                outcome.server_write_bytes =
                    Some(after.saturating_sub(before) as f64 / outcome.answered as f64);
            }
        }
        results.push((ops, concurrency, outcome));
    }
    drop(runtime);
    if let Ok(db) = Arc::try_unwrap(db) {
        drop(db.commit);
        db.db.flush().map_err(|e| e.to_string())?;
    }
    Ok(results)
}

type WorkerResult = (u64, u64, u64, bool, Histogram<u64>, Instant);

async fn worker(
    db: &Db,
    ops: Ops,
    pool: &seed::Pool<Digest>,
    window_start: Instant,
    deadline: Instant,
) -> WorkerResult {
    let mut latency = crate::load::histogram();
    let (mut requests, mut answered, mut errors, mut exhausted) = (0, 0, 0, false);
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let Some(digest) = seed::take(pool) else {
            exhausted = true;
            break;
        };
        let began = Instant::now();
        let done = match ops {
            Ops::VerifyValid => db.verify(&digest, true),
            Ops::VerifyWrong => db.verify(&digest, false),
            Ops::Logout => db.logout(&digest),
            Ops::Setup => db.setup(&digest),
        };
        let flushed = db.commit.persist().await;
        let ended = Instant::now();
        answered += 1;
        if done.is_err() || flushed.is_err() {
            errors += 1;
        }
        if began >= window_start && ended <= deadline {
            requests += 1;
            let nanos = u64::try_from(ended.duration_since(began).as_nanos()).unwrap_or(u64::MAX);
            let _ = latency.record(nanos.max(1_000));
        }
    }
    let ended = Instant::now().min(deadline);
    (
        requests,
        answered,
        errors,
        exhausted,
        latency,
        if exhausted { ended } else { deadline },
    )
}

/// How long one scenario of the sled-only bench runs: as the endpoints'.
pub fn timing(endpoint: Timing) -> Timing {
    Timing {
        warmup: endpoint.warmup,
        measure: endpoint.measure.max(Duration::from_secs(1)),
    }
}
