//! Password hashing with Argon2id (PHC strings, a random salt per user), always off the async
//! executor: each hash runs on one of `hash_threads` threads of the hasher's own (by default
//! one fewer than the cores), so a flood of logins queues for CPU instead of starving the
//! threads that answer verify. Those threads run at a lower scheduling priority (nice 10 on
//! Linux): when a request's work and a hash want the same core, the request goes first, so
//! the code step of a login stays quick while password checks saturate their threads.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::oneshot;

use crate::domain::secrets::{RngError, random_bytes};

/// Passwords longer than this are refused before hashing (hashing cost is linear in length).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The shortest password `user add` and registration accept.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// The dummy hash for the default parameters, made once with `hash_now` (any password): with
/// it, starting the server runs no Argon2 (19 MiB and tens of milliseconds saved at start).
const DEFAULT_DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$f7UJhsj1iYlnwixM5CWlQg$2bpj95BrCBxCne5MbQRBawCpxwnv12PZi5orCWO6OS4";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Settings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Settings {
    /// OWASP's Password Storage Cheat Sheet row m=19456 KiB, t=2, p=1.
    fn default() -> Self {
        Self {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

#[derive(Debug)]
pub enum HashError {
    Rng(RngError),
    Argon2(String),
    Cancelled,
}

impl std::fmt::Display for HashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashError::Rng(e) => e.fmt(f),
            HashError::Argon2(e) => write!(f, "argon2: {e}"),
            HashError::Cancelled => f.write_str("the hashing task was cancelled"),
        }
    }
}

impl std::error::Error for HashError {}

/// A hash to run, and where its result goes.
type HashJob = Box<dyn FnOnce() + Send>;

/// Hashes and checks passwords on a fixed number of threads of its own.
#[derive(Clone)]
pub struct PasswordHasher {
    argon2: Argon2<'static>,
    /// The queue to the hashing threads, which end when every clone is dropped.
    jobs: mpsc::Sender<HashJob>,
    /// Checked when the user does not exist, so that case costs the same as a wrong password.
    dummy_hash: Arc<String>,
}

impl PasswordHasher {
    /// Builds the hasher and starts its `threads` threads. Its dummy hash is built in for the
    /// default parameters; for others it is computed here (one Argon2 run, on the calling
    /// thread).
    pub fn new(settings: Argon2Settings, threads: usize) -> Result<Self, HashError> {
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|e| HashError::Argon2(e.to_string()))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let dummy_hash = Arc::new(if settings == Argon2Settings::default() {
            DEFAULT_DUMMY_HASH.to_owned()
        } else {
            hash_with(&argon2, "totpd dummy password")?
        });
        Ok(Self {
            argon2,
            jobs: start_threads(threads.max(1))?,
            dummy_hash,
        })
    }

    /// A PHC string for `password`, computed on a hashing thread.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        let argon2 = self.argon2.clone();
        self.run_hashing(move || hash_with(&argon2, &password))
            .await?
    }

    /// Checks `password` against `phc`, or against the dummy hash when there is no user, so both
    /// cases take one Argon2 run. Returns false for the dummy.
    pub async fn verify(&self, password: String, phc: Option<String>) -> Result<bool, HashError> {
        let argon2 = self.argon2.clone();
        let dummy = Arc::clone(&self.dummy_hash);
        self.run_hashing(move || {
            let real = phc.is_some();
            let target = phc.as_deref().unwrap_or(dummy.as_str());
            Ok(verify_with(&argon2, &password, target) && real)
        })
        .await?
    }

    /// Blocking variant for the CLI, which has no runtime.
    pub fn hash_now(&self, password: &str) -> Result<String, HashError> {
        hash_with(&self.argon2, password)
    }

    /// Whether `phc` was made with other settings than the current ones (or is not Argon2id):
    /// such a hash is replaced at the next successful login, so real hashes and the dummy one
    /// cost the same and a raised cost reaches every account.
    pub fn needs_rehash(&self, phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(phc) else {
            return true;
        };
        let current = self.argon2.params();
        let same = parsed.algorithm == argon2::ARGON2ID_IDENT
            && Params::try_from(&parsed).is_ok_and(|p| {
                (p.m_cost(), p.t_cost(), p.p_cost())
                    == (current.m_cost(), current.t_cost(), current.p_cost())
            });
        !same
    }

    /// Runs `job` on a hashing thread. A job whose request went away (its client hung up)
    /// while it was queued is skipped, so abandoned logins cost no hash; one already running
    /// runs to its end, on one of the fixed threads, so abandoned requests never run more
    /// hashes at once than there are threads.
    async fn run_hashing<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let (done, result) = oneshot::channel();
        let job: HashJob = Box::new(move || {
            if !done.is_closed() {
                let _ = done.send(job());
            }
        });
        self.jobs.send(job).map_err(|_| HashError::Cancelled)?;
        result.await.map_err(|_| HashError::Cancelled)
    }
}

/// Starts `count` hashing threads taking jobs from one queue, at
/// [`crate::priority::BACKGROUND_NICE`].
fn start_threads(count: usize) -> Result<mpsc::Sender<HashJob>, HashError> {
    let (jobs, queue) = mpsc::channel::<HashJob>();
    let queue = Arc::new(Mutex::new(queue));
    for i in 0..count {
        let queue = Arc::clone(&queue);
        std::thread::Builder::new()
            .name(format!("totpd-argon2-{i}"))
            .spawn(move || {
                crate::priority::lower_this_thread("hashing");
                loop {
                    // The lock is held only to take a job, not while it runs.
                    let next = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    match next {
                        // A job that panics loses its own result (its request gets an
                        // error), not the thread.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| HashError::Argon2(format!("cannot start a hashing thread: {e}")))?;
    }
    Ok(jobs)
}

fn hash_with(argon2: &Argon2<'_>, password: &str) -> Result<String, HashError> {
    let salt = random_bytes::<16>().map_err(HashError::Rng)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError::Argon2(e.to_string()))?;
    argon2
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Argon2(e.to_string()))
}

/// The parameters come from the PHC string, so hashes made under older settings still verify.
fn verify_with(argon2: &Argon2<'_>, password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|parsed| argon2.verify_password(password.as_bytes(), &parsed).is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_with_other_settings_needs_a_rehash() {
        let cheap = cheap();
        let hash = cheap.hash_now("password").expect("hash");
        assert!(!cheap.needs_rehash(&hash));
        let other = PasswordHasher::new(
            Argon2Settings {
                memory_kib: 128,
                iterations: 1,
                parallelism: 1,
            },
            1,
        )
        .expect("hasher");
        assert!(other.needs_rehash(&hash));
        assert!(other.needs_rehash("not a hash"));
    }

    fn cheap() -> PasswordHasher {
        let settings = Argon2Settings {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        PasswordHasher::new(settings, 2).expect("valid parameters")
    }

    #[tokio::test]
    async fn hashes_are_salted_argon2id_phc_strings_that_verify() {
        let hasher = cheap();
        let a = hasher.hash("correct horse".into()).await.expect("hash");
        let b = hasher.hash("correct horse".into()).await.expect("hash");
        assert!(a.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{a}");
        assert_ne!(a, b, "salts differ");
        assert!(
            hasher
                .verify("correct horse".into(), Some(a.clone()))
                .await
                .expect("ran")
        );
        assert!(
            !hasher
                .verify("wrong horse".into(), Some(a))
                .await
                .expect("ran")
        );
    }

    #[tokio::test]
    async fn an_unknown_user_checks_the_dummy_and_fails_even_with_its_password() {
        let hasher = cheap();
        assert!(
            !hasher
                .verify("totpd dummy password".into(), None)
                .await
                .expect("ran")
        );
        assert!(
            !hasher
                .verify("x".into(), Some("not a phc".into()))
                .await
                .expect("ran")
        );
    }

    /// The built-in dummy is a real hash with the default parameters, so checking it costs what
    /// checking a real user's password costs.
    #[test]
    fn the_built_in_dummy_is_a_valid_default_cost_hash() {
        let parsed = PasswordHash::new(DEFAULT_DUMMY_HASH).expect("a PHC string");
        let params = Params::try_from(&parsed).expect("parameters");
        let default = Argon2Settings::default();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (default.memory_kib, default.iterations, default.parallelism)
        );
        let argon2 = Argon2::default();
        assert!(
            argon2
                .verify_password(b"totpd dummy password", &parsed)
                .is_ok()
        );
    }

    #[test]
    fn default_parameters_meet_owasp_minimum() {
        let hasher = PasswordHasher::new(Argon2Settings::default(), 1).expect("valid");
        assert!(
            hasher
                .dummy_hash
                .starts_with("$argon2id$v=19$m=19456,t=2,p=1$")
        );
    }
}
