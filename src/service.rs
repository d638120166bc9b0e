//! The use cases: register, login, logout, status, and the spec's setup, activate, verify and
//! deactivate. Each takes typed input and `now`, applies the rules, calls the store's atomic
//! operations and waits for durability before it returns success.

use std::sync::Arc;

use crate::clock::UnixTime;
use crate::error::{Error, FieldError};
use crate::input::{Credentials, TotpVerify, VerifyCode};
use crate::models::{ActiveTotp, Digest, PendingTotp, StoredSecret, TempToken, User};
use crate::password::{HashError, PasswordHasher};
use crate::secrets::{self, RngError};
use crate::store::{ActivateOutcome, LoginOutcome, SetupOutcome, Store, StoreError};
use crate::totp::{self, Code, Secret};

/// The rules the service applies, taken from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub issuer: String,
    pub allow_registration: bool,
    pub temp_token_ttl: u64,
    pub temp_token_attempts: u32,
    pub totp_skew: u64,
}

/// Who a valid login key belongs to.
pub struct Session {
    pub user: User,
    pub key_digest: Digest,
}

pub enum LoginResult {
    /// No TOTP: the login key.
    Key(String),
    /// TOTP active: the temp token for verify.
    TotpRequired { temp_token: String, expires_in: u64 },
}

pub struct TotpStatus {
    pub active: bool,
    pub pending: bool,
    pub recovery_codes_remaining: usize,
}

pub struct TotpSetup {
    pub secret_key: String,
    pub provisioning_uri: String,
}

pub struct Verified {
    pub key: String,
    pub recovery_code_used: bool,
    pub recovery_codes_remaining: usize,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        match e {
            StoreError::Corrupt(_) => Error::Internal,
            StoreError::Sled(_) | StoreError::Flush(_) => Error::Unavailable,
        }
    }
}

impl From<RngError> for Error {
    fn from(e: RngError) -> Self {
        tracing::error!(error = %e, "random number generator failure");
        Error::Internal
    }
}

impl From<HashError> for Error {
    fn from(e: HashError) -> Self {
        tracing::error!(error = %e, "password hashing failure");
        Error::Internal
    }
}

pub struct Service {
    store: Arc<Store>,
    hasher: PasswordHasher,
    policy: Policy,
}

/// The plain secret bytes of a stored secret.
fn open_secret(stored: &StoredSecret) -> Secret {
    match stored {
        StoredSecret::Plain(bytes) => Secret::from_bytes(bytes.clone()),
    }
}

impl Service {
    pub fn new(store: Arc<Store>, hasher: PasswordHasher, policy: Policy) -> Self {
        Self {
            store,
            hasher,
            policy,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Creates an account; `username` and `password` must already have passed `input`'s checks.
    pub async fn create_user(
        &self,
        username: &str,
        password: String,
        now: UnixTime,
    ) -> Result<User, Error> {
        if self.store.user_by_name(username)?.is_some() {
            return Err(username_taken());
        }
        let hash = self.hasher.hash(password).await?;
        let user = self
            .store
            .create_user(username, &hash, now)?
            .map_err(|_| username_taken())?;
        self.store.persist().await?;
        Ok(user)
    }

    /// POST /api/v1/auth/register/
    pub async fn register(&self, input: Credentials, now: UnixTime) -> Result<User, Error> {
        if !self.policy.allow_registration {
            return Err(Error::RegistrationDisabled);
        }
        self.create_user(&input.username, input.password, now).await
    }

    /// POST /api/v1/auth/login/ — one Argon2 run whether or not the user exists.
    pub async fn login(&self, input: Credentials, now: UnixTime) -> Result<LoginResult, Error> {
        let user = self.store.user_by_name(&input.username)?;
        let phc = user.as_ref().map(|u| u.password_hash.clone());
        let valid = self.hasher.verify(input.password, phc).await?;
        let Some(user) = user.filter(|_| valid) else {
            return Err(Error::InvalidCredentials);
        };
        if user.totp.is_some() {
            let (temp_token, digest) = secrets::new_temp_token()?;
            let record = TempToken {
                user_id: user.id,
                stamp: user.stamp,
                expires_at: now + self.policy.temp_token_ttl,
                attempts_left: self.policy.temp_token_attempts,
            };
            self.store.issue_temp_token(&digest, &record)?;
            self.store.persist().await?;
            return Ok(LoginResult::TotpRequired {
                temp_token,
                expires_in: self.policy.temp_token_ttl,
            });
        }
        let (key, digest) = secrets::new_login_key()?;
        if !self.store.issue_key(user.id, &digest, now)? {
            return Err(Error::InvalidCredentials); // deleted meanwhile
        }
        self.store.persist().await?;
        Ok(LoginResult::Key(key))
    }

    /// Resolves `Authorization: Token <key>` to a session, or the 403 to answer.
    pub fn authenticate(&self, key: &str) -> Result<Session, Error> {
        let key_digest = secrets::token_digest(key);
        match self.store.authenticate_key(&key_digest)? {
            Some((_, user)) => Ok(Session { user, key_digest }),
            None => Err(Error::AuthenticationFailed("Invalid token.")),
        }
    }

    /// POST /api/v1/auth/logout/
    pub async fn logout(&self, session: &Session) -> Result<(), Error> {
        self.store.revoke_key(&session.key_digest)?;
        self.store.persist().await?;
        Ok(())
    }

    /// GET /api/v1/auth/totp/
    pub fn status(&self, session: &Session) -> TotpStatus {
        let user = &session.user;
        TotpStatus {
            active: user.totp.is_some(),
            pending: user.totp.is_none() && user.pending.is_some(),
            recovery_codes_remaining: user.totp.as_ref().map_or(0, |t| t.recovery_hashes.len()),
        }
    }

    /// POST /api/v1/auth/totp/setup/ — a fresh 20-byte secret from the OS CSPRNG, pending until
    /// activated; a second setup replaces the first.
    pub async fn setup(&self, session: &Session, now: UnixTime) -> Result<TotpSetup, Error> {
        if session.user.totp.is_some() {
            return Err(Error::TotpAlreadyActive);
        }
        let bytes = secrets::random_bytes::<{ totp::SECRET_LEN }>()?.to_vec();
        let secret = Secret::from_bytes(bytes.clone());
        let pending = PendingTotp {
            secret: StoredSecret::Plain(bytes),
            created_at: now,
        };
        match self.store.begin_setup(session.user.id, &pending)? {
            SetupOutcome::Started => {}
            SetupOutcome::AlreadyActive => return Err(Error::TotpAlreadyActive),
        }
        self.store.persist().await?;
        Ok(TotpSetup {
            secret_key: secret.to_base32(),
            provisioning_uri: totp::provisioning_uri(
                &self.policy.issuer,
                &session.user.username,
                &secret,
            ),
        })
    }

    /// POST /api/v1/auth/totp/activate/ — the code proves the app holds the pending secret; its
    /// time step is consumed, and ten recovery codes are returned, once.
    pub async fn activate(
        &self,
        session: &Session,
        code: &Code,
        now: UnixTime,
    ) -> Result<Vec<String>, Error> {
        let user = &session.user;
        if user.totp.is_some() {
            return Err(Error::TotpAlreadyActive);
        }
        let Some(pending) = &user.pending else {
            return Err(Error::TotpNotPending);
        };
        let secret = open_secret(&pending.secret);
        let Some(step) = totp::verify(&secret, code, now, self.policy.totp_skew) else {
            return Err(Error::InvalidCode);
        };
        let codes = secrets::new_recovery_codes()?;
        let active = ActiveTotp {
            secret: pending.secret.clone(),
            last_step: step,
            activated_at: now,
            recovery_key: codes.key,
            recovery_hashes: codes.hashes,
        };
        match self.store.activate(user.id, &pending.secret, &active)? {
            ActivateOutcome::Activated => {}
            ActivateOutcome::AlreadyActive => return Err(Error::TotpAlreadyActive),
            ActivateOutcome::NotPending => return Err(Error::InvalidCode),
        }
        self.store.persist().await?;
        Ok(codes.shown)
    }

    /// POST /api/v1/auth/totp/verify/ — the second step: a current code (a step later than the
    /// last one used) or an unused recovery code turns the temp token into a login key.
    pub async fn verify(&self, input: TotpVerify, now: UnixTime) -> Result<Verified, Error> {
        let temp = secrets::token_digest(&input.temp_token);
        let Some((_, user)) = self.store.live_temp_token(&temp, now)? else {
            return Err(Error::InvalidTempToken);
        };
        let Some(active) = &user.totp else {
            return Err(Error::InvalidTempToken);
        };
        let (key, key_digest) = secrets::new_login_key()?;
        let recovery_code_used = matches!(input.token, VerifyCode::Recovery(_));
        let outcome = match &input.token {
            VerifyCode::Totp(code) => {
                let secret = open_secret(&active.secret);
                match totp::verify(&secret, code, now, self.policy.totp_skew) {
                    Some(step) => {
                        self.store
                            .complete_login_with_step(&temp, step, &key_digest, now)?
                    }
                    None if self.store.record_wrong_code(&temp, now)? => LoginOutcome::CodeRejected,
                    None => LoginOutcome::InvalidTempToken,
                }
            }
            VerifyCode::Recovery(code) => self.store.complete_login_with_recovery_code(
                &temp,
                |user_key| code.digest(user_key),
                &key_digest,
                now,
            )?,
        };
        match outcome {
            LoginOutcome::LoggedIn {
                recovery_codes_remaining,
            } => {
                self.store.persist().await?;
                Ok(Verified {
                    key,
                    recovery_code_used,
                    recovery_codes_remaining,
                })
            }
            LoginOutcome::CodeRejected => {
                // The spent attempt must survive a crash too.
                self.store.persist().await?;
                Err(Error::InvalidCode)
            }
            LoginOutcome::InvalidTempToken => Err(Error::InvalidTempToken),
        }
    }

    /// POST /api/v1/auth/totp/deactivate/ — removes the secret and the recovery codes.
    pub async fn deactivate(&self, session: &Session) -> Result<(), Error> {
        if !self.store.deactivate(session.user.id)? {
            return Err(Error::TotpNotActive);
        }
        self.store.persist().await?;
        Ok(())
    }
}

fn username_taken() -> Error {
    Error::Fields(vec![FieldError::new(
        "username",
        "A user with that username already exists.",
        "unique",
    )])
}
