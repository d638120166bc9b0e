//! The use cases: register, login, logout, status, the spec's setup, activate, verify and
//! deactivate, and the additions (recovery codes, password change, logout everywhere). Each takes
//! typed input and a `Ctx` (the time and the client's address), applies the rules, calls the
//! store's atomic operations, records security events, and waits for durability before it
//! returns success.

use std::net::IpAddr;
use std::sync::Arc;

use crate::attempt::{HARD_LOCK, LockPolicy, Proof};
use crate::clock::UnixTime;
use crate::error::{Error, FieldError};
use crate::input::{Credentials, PasswordChange, TotpVerify, VerifyCode};
use crate::limits::Buckets;
use crate::metrics::{Metrics, VerifyOutcome};
use crate::models::{
    ActiveTotp, AuditEvent, Digest, EventKind, PendingLogin, PendingTotp, StoredSecret, User,
};
use crate::password::{HashError, PasswordHasher};
use crate::sealing::{Keyring, SealError};
use crate::secrets::{self, RngError};
use crate::store::{Guarded, KeyLifetime, LoginOutcome, Refusal, SetupOutcome, Store, StoreError};
use crate::totp::{self, Code, Secret};

/// The rules the service applies, taken from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub issuer: String,
    pub allow_registration: bool,
    pub temp_token_ttl: u64,
    pub temp_token_attempts: u32,
    pub totp_skew: u64,
    pub require_code_to_deactivate: bool,
    pub lockout: LockPolicy,
    pub key_lifetime: KeyLifetime,
}

/// Who asks, and when.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now: UnixTime,
    pub ip: Option<IpAddr>,
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
    /// The URI as an SVG QR code in a data URI.
    pub qr_code: Option<String>,
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

impl From<SealError> for Error {
    fn from(e: SealError) -> Self {
        tracing::error!(error = %e, "sealed secret failure");
        Error::Internal
    }
}

/// The 429 for a lock that ends at `until`.
fn locked(until: UnixTime, now: UnixTime) -> Error {
    Error::Locked {
        retry_after: (until != HARD_LOCK).then(|| until.saturating_sub(now).max(1)),
    }
}

/// The answer to a refused code: 400 for a wrong or replayed one, 429 while locked.
fn refusal_error(refusal: Refusal, now: UnixTime) -> Error {
    match refusal {
        Refusal::Rejected { .. } => Error::InvalidCode,
        Refusal::Locked { until } => locked(until, now),
    }
}

pub struct Service {
    store: Arc<Store>,
    hasher: PasswordHasher,
    keyring: Keyring,
    policy: Policy,
    login_failures: Buckets<String>,
    metrics: Arc<Metrics>,
}

impl Service {
    pub fn new(
        store: Arc<Store>,
        hasher: PasswordHasher,
        keyring: Keyring,
        policy: Policy,
        login_failures: Buckets<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            hasher,
            keyring,
            policy,
            login_failures,
            metrics,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends a security event to the audit trail (flushed with the change it describes) and
    /// to the log. Never given a code, key, token, password or secret.
    fn audit(
        &self,
        ctx: &Ctx,
        kind: EventKind,
        user: Option<&User>,
        outcome: &str,
    ) -> Result<(), Error> {
        self.audit_name(
            ctx,
            kind,
            user.map(|u| u.id),
            user.map(|u| u.username.as_str()),
            outcome,
        )
    }

    fn audit_name(
        &self,
        ctx: &Ctx,
        kind: EventKind,
        user_id: Option<u64>,
        username: Option<&str>,
        outcome: &str,
    ) -> Result<(), Error> {
        // Debug formatting escapes control characters: a username cannot forge log lines.
        tracing::info!(
            target: "totpd::audit",
            event = kind.name(),
            user = ?username.unwrap_or("-"),
            ip = %ctx.ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
            outcome,
        );
        self.store.record_event(&AuditEvent {
            time: ctx.now,
            kind,
            user_id,
            username: username.map(str::to_owned),
            ip: ctx.ip,
            outcome: outcome.to_owned(),
        })?;
        Ok(())
    }

    /// Records a refused code: the failure, a replay, and a lock it started.
    fn audit_refusal(
        &self,
        ctx: &Ctx,
        kind: EventKind,
        user: &User,
        refusal: Refusal,
    ) -> Result<(), Error> {
        match refusal {
            Refusal::Locked { .. } => self.audit(ctx, kind, Some(user), "locked"),
            Refusal::Rejected {
                replay,
                lock_started,
            } => {
                if replay {
                    self.audit(ctx, EventKind::ReplayRefused, Some(user), "refused")?;
                }
                self.audit(
                    ctx,
                    kind,
                    Some(user),
                    if replay { "replay" } else { "wrong_code" },
                )?;
                if lock_started.is_some() {
                    self.metrics.record_lockout();
                }
                match lock_started {
                    Some(HARD_LOCK) => self.audit(
                        ctx,
                        EventKind::LockStarted,
                        Some(user),
                        "until_recovery_code",
                    )?,
                    Some(until) => self.audit(
                        ctx,
                        EventKind::LockStarted,
                        Some(user),
                        &format!("for_{}s", until.saturating_sub(ctx.now)),
                    )?,
                    None => {}
                }
                Ok(())
            }
        }
    }

    /// Records the outcome of a code-guarded action and makes it durable. True when the action
    /// was done; a refused code is the error to answer; false on a conflict (the caller says which).
    async fn settle(
        &self,
        ctx: &Ctx,
        kind: EventKind,
        user: &User,
        outcome: Guarded,
    ) -> Result<bool, Error> {
        match outcome {
            Guarded::Done { .. } => {
                self.audit(ctx, kind, Some(user), "ok")?;
                self.store.persist().await?;
                Ok(true)
            }
            Guarded::Refused(refusal) => {
                self.audit_refusal(ctx, kind, user, refusal)?;
                // The failure count (and any lock it started) must survive a crash too.
                self.store.persist().await?;
                Err(refusal_error(refusal, ctx.now))
            }
            Guarded::Conflict => Ok(false),
        }
    }

    fn open_secret(&self, user: &User, stored: &StoredSecret) -> Result<Secret, Error> {
        Ok(self.keyring.open(user.id, stored)?)
    }

    /// Turns a typed code into a proof against `secret`, refusing TOTP codes outright while the
    /// user is locked (they are not even checked, so a lock reveals nothing).
    fn proof_for<'a>(
        &self,
        user: &User,
        secret: &StoredSecret,
        code: &Code,
        now: UnixTime,
    ) -> Result<Proof<'a>, Error> {
        if let Some(until) = user.failures.locked_until(now) {
            return Err(locked(until, now));
        }
        let secret = self.open_secret(user, secret)?;
        Ok(
            match totp::verify(&secret, code, now, self.policy.totp_skew) {
                Some(step) => Proof::Step(step),
                None => Proof::Wrong,
            },
        )
    }

    /// Creates an account; `username` and `password` must already have passed `input`'s checks.
    pub async fn create_user(
        &self,
        username: &str,
        password: String,
        ctx: &Ctx,
    ) -> Result<User, Error> {
        if self.store.user_by_name(username)?.is_some() {
            return Err(username_taken());
        }
        let hash = self.hasher.hash(password).await?;
        let user = self
            .store
            .create_user(username, &hash, ctx.now)?
            .map_err(|_| username_taken())?;
        self.audit(ctx, EventKind::UserCreated, Some(&user), "ok")?;
        self.store.persist().await?;
        Ok(user)
    }

    /// POST /api/v1/auth/register/
    pub async fn register(&self, input: Credentials, ctx: &Ctx) -> Result<User, Error> {
        if !self.policy.allow_registration {
            return Err(Error::RegistrationDisabled);
        }
        self.create_user(&input.username, input.password, ctx).await
    }

    /// POST /api/v1/auth/login/ — one Argon2 run whether or not the user exists; failures are
    /// throttled per username (existing or not, so the throttle reveals nothing).
    pub async fn login(&self, input: Credentials, ctx: &Ctx) -> Result<LoginResult, Error> {
        if let Err(wait) = self.login_failures.check(&input.username, ctx.now) {
            self.audit_name(
                ctx,
                EventKind::Login,
                None,
                Some(&input.username),
                "throttled",
            )?;
            return Err(Error::Throttled { wait });
        }
        let user = self.store.user_by_name(&input.username)?;
        let phc = user.as_ref().map(|u| u.password_hash.clone());
        let valid = self.hasher.verify(input.password, phc).await?;
        let Some(user) = user.filter(|_| valid) else {
            let _ = self.login_failures.take(&input.username, ctx.now);
            self.audit_name(ctx, EventKind::Login, None, Some(&input.username), "failed")?;
            self.store.persist().await?;
            return Err(Error::InvalidCredentials);
        };
        self.audit(ctx, EventKind::Login, Some(&user), "ok")?;
        if user.totp.is_some() {
            let (temp_token, digest) = secrets::new_temp_token()?;
            let token = PendingLogin {
                digest,
                expires_at: ctx.now + self.policy.temp_token_ttl,
                attempts_left: self.policy.temp_token_attempts,
            };
            if !self.store.issue_temp_token(user.id, token, ctx.now)? {
                return Err(Error::InvalidCredentials); // deleted meanwhile
            }
            self.audit(ctx, EventKind::TempTokenIssued, Some(&user), "ok")?;
            self.store.persist().await?;
            return Ok(LoginResult::TotpRequired {
                temp_token,
                expires_in: self.policy.temp_token_ttl,
            });
        }
        let (key, digest) = secrets::new_login_key()?;
        if !self.store.issue_key(user.id, &digest, ctx.now)? {
            return Err(Error::InvalidCredentials); // deleted meanwhile
        }
        self.store.persist().await?;
        Ok(LoginResult::Key(key))
    }

    /// Resolves `Authorization: Token <key>` to a session, or the 403 to answer. Keys past
    /// `key_ttl` or idle past `key_idle_ttl` are refused (and deleted).
    pub fn authenticate(&self, key: &str, now: UnixTime) -> Result<Session, Error> {
        let key_digest = secrets::token_digest(key);
        match self
            .store
            .authenticate_key(&key_digest, self.policy.key_lifetime, now)?
        {
            Some((_, user)) => Ok(Session { user, key_digest }),
            None => Err(Error::AuthenticationFailed("Invalid token.")),
        }
    }

    /// POST /api/v1/auth/logout/
    pub async fn logout(&self, session: &Session, ctx: &Ctx) -> Result<(), Error> {
        self.store.revoke_key(&session.key_digest)?;
        self.audit(ctx, EventKind::KeyRevoked, Some(&session.user), "logout")?;
        self.store.persist().await?;
        Ok(())
    }

    /// POST /api/v1/auth/logout-all/ — every key of the user, this one included.
    pub async fn logout_all(&self, session: &Session, ctx: &Ctx) -> Result<(), Error> {
        self.store.revoke_keys(session.user.id, None, ctx.now)?;
        self.audit(
            ctx,
            EventKind::KeyRevoked,
            Some(&session.user),
            "logout_all",
        )?;
        self.store.persist().await?;
        Ok(())
    }

    /// POST /api/v1/auth/password/ — needs the current password; revokes every other key and
    /// outstanding temp tokens.
    pub async fn change_password(
        &self,
        session: &Session,
        input: PasswordChange,
        ctx: &Ctx,
    ) -> Result<(), Error> {
        let user = &session.user;
        if let Err(wait) = self.login_failures.check(&user.username, ctx.now) {
            return Err(Error::Throttled { wait });
        }
        let valid = self
            .hasher
            .verify(input.current_password, Some(user.password_hash.clone()))
            .await?;
        if !valid {
            let _ = self.login_failures.take(&user.username, ctx.now);
            self.audit(
                ctx,
                EventKind::PasswordChanged,
                Some(user),
                "wrong_password",
            )?;
            self.store.persist().await?;
            return Err(Error::Fields(vec![FieldError::new(
                "current_password",
                "Wrong password.",
                "invalid",
            )]));
        }
        let hash = self.hasher.hash(input.new_password).await?;
        self.store
            .change_password(user.id, &hash, Some(&session.key_digest), ctx.now)?;
        self.audit(ctx, EventKind::PasswordChanged, Some(user), "ok")?;
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

    /// POST /api/v1/auth/totp/setup/ — a fresh 20-byte secret from the OS CSPRNG, sealed, pending
    /// until activated; a second setup replaces the first.
    pub async fn setup(&self, session: &Session, ctx: &Ctx) -> Result<TotpSetup, Error> {
        let user = &session.user;
        if user.totp.is_some() {
            return Err(Error::TotpAlreadyActive);
        }
        let secret = Secret::from_bytes(secrets::random_bytes::<{ totp::SECRET_LEN }>()?.to_vec());
        let pending = PendingTotp {
            secret: self.keyring.seal(user.id, &secret)?,
            created_at: ctx.now,
        };
        match self.store.begin_setup(user.id, &pending)? {
            SetupOutcome::Started => {}
            SetupOutcome::AlreadyActive => return Err(Error::TotpAlreadyActive),
        }
        self.audit(ctx, EventKind::Setup, Some(user), "ok")?;
        self.store.persist().await?;
        let provisioning_uri = totp::provisioning_uri(&self.policy.issuer, &user.username, &secret);
        Ok(TotpSetup {
            secret_key: secret.to_base32(),
            qr_code: crate::qr::svg_data_uri(&provisioning_uri),
            provisioning_uri,
        })
    }

    /// POST /api/v1/auth/totp/activate/ — the code proves the app holds the pending secret; its
    /// time step is consumed, and ten recovery codes are returned, once.
    pub async fn activate(
        &self,
        session: &Session,
        code: &Code,
        ctx: &Ctx,
    ) -> Result<Vec<String>, Error> {
        let user = &session.user;
        if user.totp.is_some() {
            return Err(Error::TotpAlreadyActive);
        }
        let Some(pending) = &user.pending else {
            return Err(Error::TotpNotPending);
        };
        let proof = self.proof_for(user, &pending.secret, code, ctx.now)?;
        let codes = secrets::new_recovery_codes()?;
        let active = ActiveTotp {
            secret: pending.secret.clone(),
            last_step: match proof {
                Proof::Step(step) => step,
                _ => 0,
            },
            activated_at: ctx.now,
            recovery_key: codes.key,
            recovery_hashes: codes.hashes,
        };
        let outcome = self.store.activate(
            user.id,
            &pending.secret,
            &proof,
            &active,
            &self.policy.lockout,
            ctx.now,
        )?;
        if self.settle(ctx, EventKind::Activate, user, outcome).await? {
            return Ok(codes.shown);
        }
        Err(match self.store.user(user.id)? {
            Some(now) if now.totp.is_some() => Error::TotpAlreadyActive,
            Some(now) if now.pending.is_none() => Error::TotpNotPending,
            _ => Error::InvalidCode, // a newer setup replaced the secret the code was for
        })
    }

    /// A proof for a code that may be a TOTP code (against the active secret) or a recovery code.
    fn proof_for_any<'a>(
        &self,
        user: &User,
        code: &'a VerifyCode,
        hash: &'a (dyn Fn(&Digest) -> Digest + Sync),
        now: UnixTime,
    ) -> Result<Proof<'a>, Error> {
        match code {
            VerifyCode::Recovery(_) => Ok(Proof::Recovery(hash)),
            VerifyCode::Totp(code) => {
                let active = user.totp.as_ref().ok_or(Error::TotpNotActive)?;
                self.proof_for(user, &active.secret, code, now)
            }
        }
    }

    /// POST /api/v1/auth/totp/verify/ — the second step: a current code (a step later than the
    /// last one used) or an unused recovery code turns the temp token into a login key.
    pub async fn verify(&self, input: TotpVerify, ctx: &Ctx) -> Result<Verified, Error> {
        let temp = secrets::token_digest(&input.temp_token);
        let live = self.store.live_temp_token(&temp, ctx.now)?;
        let Some((user, active)) = live.and_then(|u| u.totp.clone().map(|t| (u, t))) else {
            self.metrics.record_verify(VerifyOutcome::InvalidTempToken);
            return Err(Error::InvalidTempToken);
        };
        let hash = recovery_hasher(&input.token);
        let proof = match self.proof_for_any(&user, &input.token, &hash, ctx.now) {
            Ok(proof) => proof,
            Err(e) => {
                self.metrics.record_verify(VerifyOutcome::Locked);
                self.audit(ctx, EventKind::Verify, Some(&user), "locked")?;
                return Err(e);
            }
        };
        let (key, key_digest) = secrets::new_login_key()?;
        let outcome = self.store.complete_login(
            user.id,
            &temp,
            &proof,
            &active.secret,
            &key_digest,
            &self.policy.lockout,
            ctx.now,
        )?;
        match outcome {
            LoginOutcome::LoggedIn {
                recovery_code_used,
                recovery_codes_remaining,
            } => {
                self.metrics.record_verify(VerifyOutcome::Ok);
                self.audit(ctx, EventKind::Verify, Some(&user), "ok")?;
                if recovery_code_used {
                    self.audit(
                        ctx,
                        EventKind::RecoveryCodeUsed,
                        Some(&user),
                        &format!("{recovery_codes_remaining}_left"),
                    )?;
                }
                self.store.persist().await?;
                Ok(Verified {
                    key,
                    recovery_code_used,
                    recovery_codes_remaining,
                })
            }
            LoginOutcome::Refused(refusal) => {
                self.metrics.record_verify(match refusal {
                    Refusal::Rejected { replay: true, .. } => VerifyOutcome::Replay,
                    Refusal::Rejected { .. } => VerifyOutcome::WrongCode,
                    Refusal::Locked { .. } => VerifyOutcome::Locked,
                });
                self.audit_refusal(ctx, EventKind::Verify, &user, refusal)?;
                // The spent attempt and the failure count must survive a crash too.
                self.store.persist().await?;
                Err(refusal_error(refusal, ctx.now))
            }
            LoginOutcome::InvalidTempToken => {
                self.metrics.record_verify(VerifyOutcome::InvalidTempToken);
                Err(Error::InvalidTempToken)
            }
        }
    }

    /// POST /api/v1/auth/totp/deactivate/ — removes the secret and the recovery codes, and
    /// revokes every other key. With a `token` (or when `totp.require_code_to_deactivate`), the
    /// code must be valid first.
    pub async fn deactivate(
        &self,
        session: &Session,
        token: Option<VerifyCode>,
        ctx: &Ctx,
    ) -> Result<(), Error> {
        let user = &session.user;
        let Some(active) = &user.totp else {
            return Err(Error::TotpNotActive);
        };
        if token.is_none() && self.policy.require_code_to_deactivate {
            return Err(Error::Fields(vec![FieldError::required("token")]));
        }
        let hash = token.as_ref().map(recovery_hasher);
        let proof = match (&token, &hash) {
            (Some(code), Some(hash)) => Some(self.proof_for_any(user, code, hash, ctx.now)?),
            _ => None,
        };
        let outcome = self.store.deactivate(
            user.id,
            proof.as_ref().map(|p| (p, &active.secret)),
            &self.policy.lockout,
            &session.key_digest,
            ctx.now,
        )?;
        if self
            .settle(ctx, EventKind::Deactivate, user, outcome)
            .await?
        {
            return Ok(());
        }
        Err(Error::TotpNotActive)
    }

    /// POST /api/v1/auth/totp/recovery-codes/ — a fresh set for a current code or a recovery
    /// code; the old set stops working.
    pub async fn regenerate_recovery_codes(
        &self,
        session: &Session,
        token: VerifyCode,
        ctx: &Ctx,
    ) -> Result<Vec<String>, Error> {
        let user = &session.user;
        let Some(active) = &user.totp else {
            return Err(Error::TotpNotActive);
        };
        let hash = recovery_hasher(&token);
        let proof = self.proof_for_any(user, &token, &hash, ctx.now)?;
        let codes = secrets::new_recovery_codes()?;
        let outcome = self.store.regenerate_recovery_codes(
            user.id,
            &proof,
            &active.secret,
            (&codes.key, &codes.hashes),
            &self.policy.lockout,
            ctx.now,
        )?;
        if self
            .settle(ctx, EventKind::RecoveryCodesRegenerated, user, outcome)
            .await?
        {
            return Ok(codes.shown);
        }
        Err(Error::TotpNotActive)
    }
}

/// The keyed hash of a recovery code (or, for a TOTP code, a function never called).
fn recovery_hasher(code: &VerifyCode) -> impl Fn(&Digest) -> Digest + Sync + use<> {
    let code = match code {
        VerifyCode::Recovery(code) => Some(code.clone()),
        VerifyCode::Totp(_) => None,
    };
    move |user_key: &Digest| code.as_ref().map_or([0; 32], |c| c.digest(user_key))
}

fn username_taken() -> Error {
    Error::Fields(vec![FieldError::new(
        "username",
        "A user with that username already exists.",
        "unique",
    )])
}
