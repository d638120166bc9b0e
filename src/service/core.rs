//! The service itself: its state, the context of a request, the session of a login key, and
//! what every use case shares (the atomic change of one user, audit events, error mapping).

use std::net::IpAddr;
use std::sync::Arc;

use super::password::{HashError, PasswordHasher};
use super::sealing::{Keyring, SealError};
use crate::clock::UnixTime;
use crate::domain::audit::{AuditEvent, EventKind};
use crate::domain::keys::{self, KeyLifetime};
use crate::domain::lockout::{HARD_LOCK, LockPolicy};
use crate::domain::second_factor::{Refusal, Rejection};
use crate::domain::secrets::RngError;
use crate::domain::totp;
use crate::domain::user::{Digest, User, UserId};
use crate::error::Error;
use crate::limits::Buckets;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, UserChange, Writes};

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
#[derive(Debug)]
pub struct Session {
    pub user: User,
    pub key_digest: Digest,
    /// The key epoch the key was issued at (or carried to).
    pub key_epoch: u64,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        match e {
            StoreError::Corrupt(_) => Error::Internal,
            StoreError::Backend(_) | StoreError::Flush(_) => Error::Unavailable,
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
pub(super) fn locked(until: UnixTime, now: UnixTime) -> Error {
    Error::Locked {
        retry_after: (until != HARD_LOCK).then(|| until.saturating_sub(now).max(1)),
    }
}

/// The answer to a refused code: 400 for a wrong or replayed one (one answer for both), 400
/// with the clock-drift hint for the code of a time a few steps away, 429 while locked.
pub(super) fn refusal_error(refusal: Refusal, now: UnixTime) -> Error {
    match refusal {
        Refusal::Rejected {
            why: Rejection::ClockSkew { step },
            ..
        } => Error::ClockSkew {
            drift_seconds: totp::drift_seconds(step, now),
        },
        Refusal::Rejected { .. } => Error::InvalidCode,
        Refusal::Locked { until } => locked(until, now),
    }
}

pub struct Service {
    pub(super) store: Arc<dyn Store>,
    pub(super) hasher: PasswordHasher,
    pub(super) keyring: Keyring,
    pub(super) policy: Policy,
    /// Failed password checks per username (existing or not, so it reveals nothing).
    pub(super) login_failures: Buckets<String>,
    pub(super) metrics: Arc<Metrics>,
}

impl Service {
    pub fn new(
        store: Arc<dyn Store>,
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

    /// Applies `change` on behalf of `session`: only if the session's key is still not revoked
    /// in the record the change sees (a key revoked while its request was in flight — by a
    /// logout everywhere, say — changes nothing: 403). Its result, or `None` without the user.
    pub(super) async fn change_as<T: Send>(
        &self,
        session: &Session,
        mut change: impl FnMut(&mut User) -> (T, Writes) + Send,
    ) -> Result<Option<T>, Error> {
        let (digest, epoch) = (session.key_digest, session.key_epoch);
        let outcome = self
            .change(session.user.id, |user| {
                if !keys::not_revoked(user, &digest, epoch) {
                    return (None, Writes::default());
                }
                let (value, writes) = change(user);
                (Some(value), writes)
            })
            .await?;
        match outcome {
            Some(Some(value)) => Ok(Some(value)),
            Some(None) => Err(Error::AuthenticationFailed("Invalid token.")),
            None => Ok(None),
        }
    }

    /// Applies `change` to user `id` atomically and durably (the store re-runs it on a
    /// conflict); its result, or `None` if there is no such user.
    pub(super) async fn change<T: Send>(
        &self,
        id: UserId,
        change: impl FnMut(&mut User) -> (T, Writes) + Send,
    ) -> Result<Option<T>, Error> {
        self.change_found(Found::ById(id), change).await
    }

    /// Applies `change`, as [`Service::change`] does, to the user the temp token `temp` was
    /// issued to: one store operation finds and changes them (`None` without such a token).
    pub(super) async fn change_by_temp_token<T: Send>(
        &self,
        temp: &Digest,
        change: impl FnMut(&mut User) -> (T, Writes) + Send,
    ) -> Result<Option<T>, Error> {
        self.change_found(Found::ByTempToken(temp), change).await
    }

    async fn change_found<T: Send>(
        &self,
        found: Found<'_>,
        mut change: impl FnMut(&mut User) -> (T, Writes) + Send,
    ) -> Result<Option<T>, Error> {
        let mut result = None;
        let mut run = |user: &mut User| {
            let (value, writes) = change(user);
            result = Some(value);
            writes
        };
        let run = &mut run as &mut UserChange<'_>;
        let written = match found {
            Found::ById(id) => self.store.update_user(id, run).await?,
            Found::ByTempToken(temp) => self.store.update_user_by_temp_token(temp, run).await?,
        };
        Ok(written.and(result))
    }
}

/// How a change finds its user.
enum Found<'a> {
    ById(UserId),
    ByTempToken(&'a Digest),
}

/// An audit event. Never given a code, key, token, password or secret; also logged, with the
/// username Debug-escaped so that it cannot forge log lines.
pub(super) fn event(ctx: &Ctx, kind: EventKind, user: Option<&User>, outcome: &str) -> AuditEvent {
    named_event(
        ctx,
        kind,
        user.map(|u| u.id),
        user.map(|u| u.username.as_str()),
        outcome,
    )
}

pub(super) fn named_event(
    ctx: &Ctx,
    kind: EventKind,
    user_id: Option<UserId>,
    username: Option<&str>,
    outcome: &str,
) -> AuditEvent {
    tracing::info!(
        target: "totpd::audit",
        event = kind.name(),
        user = ?username.unwrap_or("-"),
        ip = %ctx.ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        outcome,
    );
    AuditEvent {
        time: ctx.now,
        kind,
        user_id,
        username: username.map(str::to_owned),
        ip: ctx.ip,
        outcome: outcome.to_owned(),
    }
}

/// The audit events of a refused code: the failure (`wrong_code`, `replay` or `clock_skew`), a
/// replay, and a lock it started.
pub(super) fn refusal_events(
    ctx: &Ctx,
    kind: EventKind,
    user: &User,
    refusal: Refusal,
) -> Vec<AuditEvent> {
    match refusal {
        Refusal::Locked { .. } => vec![event(ctx, kind, Some(user), "locked")],
        Refusal::Rejected { why, lock_started } => {
            let mut events = Vec::with_capacity(3);
            if why == Rejection::Replay {
                events.push(event(ctx, EventKind::ReplayRefused, Some(user), "refused"));
            }
            let outcome = match why {
                Rejection::Wrong => "wrong_code",
                Rejection::Replay => "replay",
                Rejection::ClockSkew { .. } => "clock_skew",
            };
            events.push(event(ctx, kind, Some(user), outcome));
            match lock_started {
                Some(HARD_LOCK) => events.push(event(
                    ctx,
                    EventKind::LockStarted,
                    Some(user),
                    "until_recovery_code",
                )),
                Some(until) => events.push(event(
                    ctx,
                    EventKind::LockStarted,
                    Some(user),
                    &format!("for_{}s", until.saturating_sub(ctx.now)),
                )),
                None => {}
            }
            events
        }
    }
}
