//! Two-factor authentication: see its state, enrol (setup, activate), the code step of a login
//! (verify), turn it off (deactivate), and get fresh recovery codes. Codes are checked against
//! the opened secret here; what a code does to the account is decided in `domain`.

use super::core::{Ctx, Service, Session, event, locked, refusal_error, refusal_events};
use super::input::{TotpVerify, VerifyCode};
use crate::clock::UnixTime;
use crate::domain::audit::EventKind;
use crate::domain::enrolment::{self, EnrolmentRefusal, RecoveryHashes};
use crate::domain::keys;
use crate::domain::login::{self, CodeStepRefusal};
use crate::domain::second_factor::{Proof, Refusal, Rejection};
use crate::domain::secrets;
use crate::domain::totp::{self, Code, Located, Secret};
use crate::domain::user::{PendingTotp, StoredSecret, User};
use crate::error::{Error, FieldError};
use crate::metrics::VerifyOutcome;
use crate::store::Writes;

pub struct TotpStatus {
    pub active: bool,
    pub pending: bool,
    pub recovery_codes_remaining: usize,
}

impl TotpStatus {
    /// What `user`'s second factor looks like from outside.
    pub fn of(user: &User) -> Self {
        TotpStatus {
            active: user.totp.is_some(),
            pending: user.totp.is_none() && user.pending.is_some(),
            recovery_codes_remaining: user.recovery_codes_remaining(),
        }
    }
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

impl Service {
    /// What the session's user has: TOTP on, a setup pending, recovery codes left.
    pub fn totp_status(&self, session: &Session) -> TotpStatus {
        TotpStatus::of(&session.user)
    }

    /// Starts enrolment: a fresh 20-byte secret from the OS CSPRNG, sealed, pending until
    /// activated; a second setup replaces the first.
    pub async fn set_up_totp(&self, session: &Session, ctx: &Ctx) -> Result<TotpSetup, Error> {
        let user = &session.user;
        if user.totp.is_some() {
            return Err(Error::TotpAlreadyActive);
        }
        let secret = Secret::from_bytes(secrets::random_bytes::<{ totp::SECRET_LEN }>()?.to_vec());
        let pending = PendingTotp {
            secret: self.keyring.seal(user.id, &secret)?,
            created_at: ctx.now,
            burned_steps: Vec::new(),
        };
        let kind = EventKind::Setup;
        self.guarded_change(session, kind, ctx, Error::TotpAlreadyActive, |user| {
            enrolment::begin_setup(user, pending.clone())
        })
        .await?;
        Ok(TotpSetup {
            secret_key: secret.to_base32(),
            provisioning_uri: totp::provisioning_uri(&self.policy.issuer, &user.username, &secret),
        })
    }

    /// A TOTP code as a proof against `stored`: not even checked while the user is locked (so
    /// a lock reveals nothing); the domain then refuses it as locked. A code a few steps off
    /// (a device's clock) is a `Skewed` proof, which the domain refuses with its step.
    fn totp_proof(
        &self,
        user: &User,
        stored: &StoredSecret,
        code: &Code,
        now: UnixTime,
    ) -> Result<Proof, Error> {
        if user.failures.locked_until(now).is_some() {
            return Ok(Proof::Unchecked);
        }
        let secret = self.keyring.open(user.id, stored)?;
        Ok(
            match totp::locate(&secret, code, now, self.policy.totp_skew) {
                Located::InWindow(step) => Proof::Step(step),
                Located::Drifted(step) => Proof::Skewed { step },
                Located::Nowhere => Proof::Wrong,
            },
        )
    }

    /// A TOTP code (against the active secret) or a recovery code as a proof.
    fn any_proof(
        &self,
        user: &User,
        active: &StoredSecret,
        code: &VerifyCode,
        now: UnixTime,
    ) -> Result<Proof, Error> {
        match code {
            VerifyCode::Recovery(code) => Ok(Proof::Recovery(code.clone())),
            VerifyCode::Totp(code) => self.totp_proof(user, active, code, now),
        }
    }

    /// Finishes enrolment: the code proves the app holds the pending secret; its time step is
    /// consumed, and ten recovery codes are returned, once.
    pub async fn activate_totp(
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
        let proof = self.totp_proof(user, &pending.secret, code, ctx.now)?;
        let codes = secrets::new_recovery_codes()?;
        let recovery = RecoveryHashes {
            key: codes.key,
            hashes: codes.hashes,
        };
        let policy = &self.policy.lockout;
        self.guarded_change(
            session,
            EventKind::Activate,
            ctx,
            Error::TotpNotPending,
            |user| {
                enrolment::activate(
                    user,
                    &pending.secret,
                    &proof,
                    recovery.clone(),
                    policy,
                    ctx.now,
                )
            },
        )
        .await?;
        Ok(codes.shown)
    }

    /// The code step of a login: a current code (a step later than the last one used) or an
    /// unused recovery code turns the temp token into a login key. The token's user is found
    /// and changed in one store operation, and the code is judged on the record as it is
    /// changed (so a lock or a time step taken meanwhile by another request counts).
    pub async fn verify_totp(&self, input: TotpVerify, ctx: &Ctx) -> Result<Verified, Error> {
        let temp = secrets::token_digest(&input.temp_token);
        let (key, key_digest) = secrets::new_login_key()?;
        let policy = &self.policy.lockout;
        let outcome = self
            .change_by_temp_token(&temp, |user| {
                let live = login::temp_token_is_live(user, &temp, ctx.now);
                // Only the secret is cloned (the user is changed below).
                let Some(secret) = user
                    .totp
                    .as_ref()
                    .filter(|_| live)
                    .map(|t| t.secret.clone())
                else {
                    return (
                        Ok(Err(CodeStepRefusal::InvalidTempToken)),
                        Writes::default(),
                    );
                };
                let proof = match self.any_proof(user, &secret, &input.token, ctx.now) {
                    Ok(proof) => proof,
                    Err(e) => return (Err(e), Writes::default()),
                };
                let outcome = login::pass_code(user, &temp, &proof, &secret, policy, ctx.now);
                let mut writes = Writes::default();
                match &outcome {
                    Ok(done) => {
                        writes.key =
                            Some((key_digest, keys::new_key(user, done.key_epoch, ctx.now)));
                        writes
                            .events
                            .push(event(ctx, EventKind::Verify, Some(user), "ok"));
                        if done.accepted.recovery_code_used {
                            let left = format!("{}_left", done.recovery_codes_remaining);
                            writes.events.push(event(
                                ctx,
                                EventKind::RecoveryCodeUsed,
                                Some(user),
                                &left,
                            ));
                        }
                    }
                    Err(CodeStepRefusal::Refused(refusal)) => {
                        writes.events = refusal_events(ctx, EventKind::Verify, user, *refusal);
                    }
                    Err(CodeStepRefusal::InvalidTempToken) => {}
                }
                (Ok(outcome), writes)
            })
            .await?;
        match outcome.transpose()? {
            Some(Ok(done)) => {
                self.metrics.record_verify(VerifyOutcome::Ok);
                Ok(Verified {
                    key,
                    recovery_code_used: done.accepted.recovery_code_used,
                    recovery_codes_remaining: done.recovery_codes_remaining,
                })
            }
            Some(Err(CodeStepRefusal::Refused(refusal))) => {
                self.record_refusal(refusal);
                Err(refusal_error(refusal, ctx.now))
            }
            None | Some(Err(CodeStepRefusal::InvalidTempToken)) => {
                self.metrics.record_verify(VerifyOutcome::InvalidTempToken);
                Err(Error::InvalidTempToken)
            }
        }
    }

    /// Turns two-factor authentication off: the secret and the recovery codes go, and every
    /// other key is revoked. With a code (or when `totp.require_code_to_deactivate`), the code
    /// must be valid first.
    pub async fn turn_off_totp(
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
        let proof = match &token {
            Some(code) => Some(self.any_proof(user, &active.secret, code, ctx.now)?),
            None => None,
        };
        let keep = session.key_digest;
        let policy = &self.policy.lockout;
        let kind = EventKind::Deactivate;
        self.guarded_change(session, kind, ctx, Error::TotpNotActive, |user| {
            let code = proof.as_ref().map(|p| (p, &active.secret));
            enrolment::deactivate(user, code, &keep, policy, ctx.now)
        })
        .await?;
        Ok(())
    }

    /// A fresh set of recovery codes, for a current code or a recovery code; the old set stops
    /// working.
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
        let proof = self.any_proof(user, &active.secret, &token, ctx.now)?;
        let codes = secrets::new_recovery_codes()?;
        let recovery = RecoveryHashes {
            key: codes.key,
            hashes: codes.hashes,
        };
        let policy = &self.policy.lockout;
        let kind = EventKind::RecoveryCodesRegenerated;
        self.guarded_change(session, kind, ctx, Error::TotpNotActive, |user| {
            enrolment::regenerate_recovery_codes(
                user,
                &proof,
                &active.secret,
                recovery.clone(),
                policy,
                ctx.now,
            )
        })
        .await?;
        Ok(codes.shown)
    }

    /// Applies a change of the TOTP state (`change`, a function of `enrolment`, most guarded by a code)
    /// with its audit events; a refusal becomes its answer, a vanished user `missing`.
    async fn guarded_change<T: Send>(
        &self,
        session: &Session,
        kind: EventKind,
        ctx: &Ctx,
        missing: Error,
        mut change: impl FnMut(&mut User) -> Result<T, EnrolmentRefusal> + Send,
    ) -> Result<T, Error> {
        let outcome = self
            .change_as(session, |user| {
                let outcome = change(user);
                let events = match &outcome {
                    Ok(_) => vec![event(ctx, kind, Some(user), "ok")],
                    Err(EnrolmentRefusal::Code(refusal)) => {
                        refusal_events(ctx, kind, user, *refusal)
                    }
                    Err(_) => Vec::new(),
                };
                (
                    outcome,
                    Writes {
                        events,
                        ..Writes::default()
                    },
                )
            })
            .await?;
        match outcome {
            Some(Ok(value)) => Ok(value),
            Some(Err(refusal)) => Err(self.enrolment_error(refusal, ctx.now)),
            None => Err(missing),
        }
    }

    fn record_refusal(&self, refusal: Refusal) {
        self.metrics.record_verify(match refusal {
            Refusal::Rejected { why, .. } => match why {
                Rejection::Wrong => VerifyOutcome::WrongCode,
                Rejection::Replay => VerifyOutcome::Replay,
                Rejection::ClockSkew { .. } => VerifyOutcome::ClockSkew,
            },
            Refusal::Locked { .. } => VerifyOutcome::Locked,
        });
        if matches!(
            refusal,
            Refusal::Rejected {
                lock_started: Some(_),
                ..
            }
        ) {
            self.metrics.record_lockout();
        }
    }

    fn enrolment_error(&self, refusal: EnrolmentRefusal, now: UnixTime) -> Error {
        match refusal {
            EnrolmentRefusal::AlreadyActive => Error::TotpAlreadyActive,
            EnrolmentRefusal::NotPending => Error::TotpNotPending,
            EnrolmentRefusal::NotActive => Error::TotpNotActive,
            // A newer setup replaced the secret the code was for.
            EnrolmentRefusal::SecretReplaced => Error::InvalidCode,
            EnrolmentRefusal::Code(refusal) => {
                if let Refusal::Rejected {
                    lock_started: Some(_),
                    ..
                } = refusal
                {
                    self.metrics.record_lockout();
                }
                match refusal {
                    Refusal::Locked { until } => locked(until, now),
                    other => refusal_error(other, now),
                }
            }
        }
    }
}
