//! What an administrator does, from the command line or the admin socket: list, remove and
//! unlock users, set a password, reset a lost phone, read the audit trail, take a backup, and
//! re-seal secrets under a new master key. Every change is recorded in the audit trail.

use super::core::{Ctx, Service, event};
use crate::clock::UnixTime;
use crate::domain::audit::{AuditEvent, EventKind};
use crate::domain::enrolment;
use crate::domain::user::{User, UserId};
use crate::error::Error;
use crate::store::{BackupRecord, Writes};

/// How far a user got with two-factor authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserTotpState {
    Off,
    SetupPending,
    On,
}

/// One row of `user list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    pub username: String,
    pub totp: UserTotpState,
    /// The end of the lock in force, if any (`HARD_LOCK` for one without end).
    pub locked_until: Option<UnixTime>,
    pub last_login: Option<UnixTime>,
}

impl Service {
    async fn existing(&self, username: &str) -> Result<User, Error> {
        self.store
            .user_by_name(username)
            .await?
            .ok_or(Error::NotFound)
    }

    /// Applies an administrator's `change` to the user named `username`, with an audit event.
    async fn administer(
        &self,
        username: &str,
        outcome: &str,
        ctx: &Ctx,
        change: impl Fn(&mut User) + Send + Sync,
    ) -> Result<User, Error> {
        let user = self.existing(username).await?;
        self.change(user.id, |user| {
            change(user);
            let done = event(ctx, EventKind::AdminAction, Some(user), outcome);
            (
                user.clone(),
                Writes {
                    events: vec![done],
                    ..Writes::default()
                },
            )
        })
        .await?
        .ok_or(Error::NotFound)
    }

    /// Every user, in the order they were created, a page at a time.
    pub async fn list_users(&self, now: UnixTime) -> Result<Vec<UserSummary>, Error> {
        let mut rows = Vec::new();
        let mut after: Option<UserId> = None;
        loop {
            let page = self.store.users(after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            rows.extend(page.iter().map(|user| UserSummary {
                username: user.username.clone(),
                totp: match (&user.totp, &user.pending) {
                    (Some(_), _) => UserTotpState::On,
                    (None, Some(_)) => UserTotpState::SetupPending,
                    (None, None) => UserTotpState::Off,
                },
                locked_until: user.failures.locked_until(now),
                last_login: user.last_login,
            }));
        }
        Ok(rows)
    }

    /// Deletes a user; their keys and temp tokens stop working at once.
    pub async fn remove_user(&self, username: &str, ctx: &Ctx) -> Result<User, Error> {
        let user = self.existing(username).await?;
        let removed = event(ctx, EventKind::AdminAction, Some(&user), "user_removed");
        self.store
            .remove_user(user.id, vec![removed])
            .await?
            .ok_or(Error::NotFound)
    }

    /// Sets a user's password (already checked by `input`); every key and temp token dies.
    pub async fn set_password(
        &self,
        username: &str,
        password: String,
        ctx: &Ctx,
    ) -> Result<User, Error> {
        self.existing(username).await?;
        let hash = self.hasher.hash(password).await?;
        self.administer(username, "password_set", ctx, |user| {
            enrolment::change_password(user, hash.clone(), None);
        })
        .await
    }

    /// For a lost phone: clears the secret, the recovery codes and the lock; revokes every key.
    pub async fn reset_totp(&self, username: &str, ctx: &Ctx) -> Result<User, Error> {
        self.administer(username, "totp_reset", ctx, enrolment::reset)
            .await
    }

    /// Ends a lock after too many failed codes.
    pub async fn unlock(&self, username: &str, ctx: &Ctx) -> Result<User, Error> {
        self.administer(username, "unlocked", ctx, |user| user.failures.reset())
            .await
    }

    /// The audit trail from `since` on, oldest first, of one user or all.
    pub async fn audit_trail(
        &self,
        since: UnixTime,
        username: Option<&str>,
    ) -> Result<Vec<AuditEvent>, Error> {
        let mut events = self.store.events(since).await?;
        if let Some(name) = username {
            events.retain(|e| e.username.as_deref() == Some(name));
        }
        Ok(events)
    }

    /// Streams a consistent snapshot of every record to `sink`; returns how many.
    pub async fn export(
        &self,
        sink: tokio::sync::mpsc::Sender<BackupRecord>,
    ) -> Result<u64, Error> {
        Ok(self.store.export(sink).await?)
    }

    /// Re-seals every secret not sealed under the current master key; returns how many users
    /// changed. One atomic change per user, so an interrupted run can simply be run again.
    pub async fn reseal_secrets(&self) -> Result<usize, Error> {
        let mut changed = 0;
        let mut after: Option<UserId> = None;
        loop {
            let page = self.store.users(after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for user in page {
                let ring = &self.keyring;
                let resealed = self
                    .change(user.id, |user| {
                        let id = user.id;
                        let mut result = Ok(false);
                        let secrets = user
                            .totp
                            .iter_mut()
                            .map(|t| &mut t.secret)
                            .chain(user.pending.iter_mut().map(|p| &mut p.secret));
                        for stored in secrets {
                            if ring.is_current(stored) {
                                continue;
                            }
                            match ring.open(id, stored).and_then(|s| ring.seal(id, &s)) {
                                Ok(sealed) => {
                                    *stored = sealed;
                                    result = Ok(true);
                                }
                                Err(e) => {
                                    result = Err(e);
                                    break;
                                }
                            }
                        }
                        (result, Writes::default())
                    })
                    .await?;
                match resealed {
                    Some(Ok(true)) => changed += 1,
                    Some(Err(e)) => return Err(e.into()),
                    _ => {}
                }
            }
        }
        Ok(changed)
    }
}

impl Service {
    /// Whether the store answers (health check).
    pub async fn healthy(&self) -> bool {
        self.store.healthy().await
    }

    /// The store's figures for `/metrics`.
    pub fn store_stats(&self) -> crate::store::StoreStats {
        self.store.stats()
    }

    /// Counts users for the gauges (a full scan).
    pub async fn recount(&self) -> Result<(), Error> {
        Ok(self.store.recount().await?)
    }

    /// Deletes what outlived its use: expired temp tokens and keys, and audit events older
    /// than `audit_retention` seconds. Returns how many records went.
    pub async fn sweep(&self, now: UnixTime, audit_retention: u64) -> Result<usize, Error> {
        let cutoff = now.saturating_sub(audit_retention);
        Ok(self
            .store
            .sweep(now, self.policy.key_lifetime, cutoff)
            .await?)
    }

    /// Makes everything durable before the process ends.
    pub async fn close(&self) -> Result<(), Error> {
        Ok(self.store.close().await?)
    }
}

impl Service {
    /// Records which master key seals this store (after a rotation).
    pub async fn write_key_check(&self) -> Result<(), String> {
        super::sealing::write_check(&self.keyring, self.store.as_ref()).await
    }
}
