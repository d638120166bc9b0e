//! Accounts and sessions: create an account, log in with a password, present a login key, log
//! out (here or everywhere), change the password.

use super::core::{Ctx, Service, Session, event, named_event};
use super::input::{Credentials, PasswordChange};
use crate::domain::audit::EventKind;
use crate::domain::keys::{self, KeyCheck};
use crate::domain::login::{self, PasswordChanged, PasswordStep};
use crate::domain::secrets;
use crate::domain::user::{PendingLogin, User};
use crate::error::{Error, FieldError};
use crate::store::Writes;

/// What the password step answers.
pub enum LoginResult {
    /// No TOTP: the login key.
    Key(String),
    /// TOTP active: the temp token for verify.
    TotpRequired { temp_token: String, expires_in: u64 },
}

/// How one round of the password step ended.
enum PasswordRound {
    /// A key, or a temp token for the code step.
    Issued(LoginResult),
    /// The hash checked was replaced meanwhile (a rehash, or a new password): check again.
    HashReplaced,
    /// A wrong password, or no such user (any more).
    Refused,
}

fn username_taken() -> Error {
    Error::Fields(vec![FieldError::new(
        "username",
        "A user with that username already exists.",
        "unique",
    )])
}

impl Service {
    /// Creates an account; `username` and `password` have passed `input`'s checks. `how` is
    /// the audit outcome (`ok` for registration, `cli` for an administrator).
    pub async fn create_user(
        &self,
        username: &str,
        password: String,
        how: &str,
        ctx: &Ctx,
    ) -> Result<User, Error> {
        if self.store.user_by_name(username).await?.is_some() {
            return Err(username_taken());
        }
        let hash = self.hasher.hash(password).await?;
        let created = named_event(ctx, EventKind::UserCreated, None, Some(username), how);
        self.store
            .create_user(username, &hash, ctx.now, created)
            .await?
            .user()
            .ok_or_else(username_taken)
    }

    /// Self-service sign-up, when the configuration allows it.
    pub async fn register(&self, input: Credentials, ctx: &Ctx) -> Result<User, Error> {
        if !self.policy.allow_registration {
            return Err(Error::RegistrationDisabled);
        }
        self.create_user(&input.username, input.password, "ok", ctx)
            .await
    }

    /// The password step of a login. One Argon2 run whether or not the user exists; each
    /// attempt takes a token of the username's failure budget before hashing (given back on
    /// success), so parallel guesses cannot outrun the limit.
    pub async fn log_in(&self, input: Credentials, ctx: &Ctx) -> Result<LoginResult, Error> {
        if let Err(wait) = self.login_failures.take(&input.username, ctx.now) {
            let throttled = named_event(
                ctx,
                EventKind::Login,
                None,
                Some(&input.username),
                "throttled",
            );
            self.store.record_events(vec![throttled]).await?;
            return Err(Error::Throttled { wait });
        }
        // A second round only when the stored hash changed while the first was checking the
        // password: a rehash (same password, still right) or a password change (then wrong).
        for _round in 0..2 {
            match self
                .check_password_and_issue(&input.username, &input.password, ctx)
                .await?
            {
                PasswordRound::Issued(result) => {
                    self.login_failures.give_back(&input.username);
                    return Ok(result);
                }
                PasswordRound::HashReplaced => continue,
                PasswordRound::Refused => break,
            }
        }
        let failed = named_event(ctx, EventKind::Login, None, Some(&input.username), "failed");
        self.store.record_events(vec![failed]).await?;
        Err(Error::InvalidCredentials)
    }

    /// One round of the password step.
    async fn check_password_and_issue(
        &self,
        username: &str,
        password: &str,
        ctx: &Ctx,
    ) -> Result<PasswordRound, Error> {
        let user = self.store.user_by_name(username).await?;
        let checked = user.as_ref().map(|u| u.password_hash.clone());
        let valid = self
            .hasher
            .verify(password.to_owned(), checked.clone())
            .await?;
        let (Some(user), Some(checked), true) = (user, checked, valid) else {
            return Ok(PasswordRound::Refused);
        };
        let rehashed = match self.hasher.needs_rehash(&checked) {
            true => Some(self.hasher.hash(password.to_owned()).await?),
            false => None,
        };
        let (temp_token, temp_digest) = secrets::new_temp_token()?;
        let (key, key_digest) = secrets::new_login_key()?;
        let pending = PendingLogin {
            digest: temp_digest,
            expires_at: ctx.now + self.policy.temp_token_ttl,
            attempts_left: self.policy.temp_token_attempts,
        };
        let step = self
            .change(user.id, |user| {
                let step = login::pass_password(
                    user,
                    &checked,
                    rehashed.as_deref(),
                    pending.clone(),
                    ctx.now,
                );
                let mut writes = Writes::default();
                match step {
                    Ok(PasswordStep::TotpRequired) => {
                        writes.temp_token = Some((temp_digest, pending.expires_at));
                        writes.events = vec![
                            event(ctx, EventKind::Login, Some(user), "ok"),
                            event(ctx, EventKind::TempTokenIssued, Some(user), "ok"),
                        ];
                    }
                    Ok(PasswordStep::Key { epoch }) => {
                        writes.key = Some((key_digest, keys::new_key(user, epoch, ctx.now)));
                        writes.events = vec![event(ctx, EventKind::Login, Some(user), "ok")];
                    }
                    Err(PasswordChanged) => {}
                }
                (step, writes)
            })
            .await?;
        Ok(match step {
            Some(Ok(PasswordStep::TotpRequired)) => {
                PasswordRound::Issued(LoginResult::TotpRequired {
                    temp_token,
                    expires_in: self.policy.temp_token_ttl,
                })
            }
            Some(Ok(PasswordStep::Key { .. })) => PasswordRound::Issued(LoginResult::Key(key)),
            Some(Err(PasswordChanged)) => PasswordRound::HashReplaced,
            // Deleted meanwhile.
            None => PasswordRound::Refused,
        })
    }

    /// Resolves `Authorization: Token <key>` to a session, or the 403 to answer. Revoked keys
    /// and keys past `key_ttl` or idle past `key_idle_ttl` are refused (and deleted).
    pub async fn authenticate(&self, key: &str, ctx: &Ctx) -> Result<Session, Error> {
        let key_digest = secrets::token_digest(key);
        let invalid = || Error::AuthenticationFailed("Invalid token.");
        let Some((record, user)) = self.store.user_by_key(&key_digest).await? else {
            return Err(invalid());
        };
        match keys::check(
            &user,
            &key_digest,
            &record,
            self.policy.key_lifetime,
            ctx.now,
        ) {
            KeyCheck::Valid { touch } => {
                if touch {
                    self.store.touch_key(&key_digest, ctx.now).await?;
                }
                Ok(Session {
                    user,
                    key_digest,
                    key_epoch: record.epoch,
                })
            }
            KeyCheck::Dead => {
                self.store.revoke_key(&key_digest, Vec::new()).await?;
                Err(invalid())
            }
        }
    }

    /// Ends this session: its key stops working.
    pub async fn log_out(&self, session: &Session, ctx: &Ctx) -> Result<(), Error> {
        let revoked = event(ctx, EventKind::KeyRevoked, Some(&session.user), "logout");
        self.store
            .revoke_key(&session.key_digest, vec![revoked])
            .await?;
        Ok(())
    }

    /// Ends every session of the user, this one included.
    pub async fn log_out_everywhere(&self, session: &Session, ctx: &Ctx) -> Result<(), Error> {
        self.change_as(session, |user| {
            keys::revoke_all(user, None);
            let revoked = event(ctx, EventKind::KeyRevoked, Some(user), "logout_all");
            (
                (),
                Writes {
                    events: vec![revoked],
                    ..Writes::default()
                },
            )
        })
        .await?;
        Ok(())
    }

    /// A new password, for the current one; every other key and outstanding temp tokens die.
    pub async fn change_password(
        &self,
        session: &Session,
        input: PasswordChange,
        ctx: &Ctx,
    ) -> Result<(), Error> {
        let user = &session.user;
        if let Err(wait) = self.login_failures.take(&user.username, ctx.now) {
            return Err(Error::Throttled { wait });
        }
        let checked = user.password_hash.clone();
        let valid = self
            .hasher
            .verify(input.current_password, Some(checked.clone()))
            .await?;
        if !valid {
            let wrong = event(
                ctx,
                EventKind::PasswordChanged,
                Some(user),
                "wrong_password",
            );
            self.store.record_events(vec![wrong]).await?;
            return Err(Error::Fields(vec![FieldError::new(
                "current_password",
                "Wrong password.",
                "invalid",
            )]));
        }
        self.login_failures.give_back(&user.username);
        let hash = self.hasher.hash(input.new_password).await?;
        let keep = session.key_digest;
        let changed = self
            .change_as(session, |user| {
                // Another change won the race: the password checked is no longer the user's.
                if user.password_hash != checked {
                    return (false, Writes::default());
                }
                crate::domain::enrolment::change_password(user, hash.clone(), Some(&keep));
                let done = event(ctx, EventKind::PasswordChanged, Some(user), "ok");
                (
                    true,
                    Writes {
                        events: vec![done],
                        ..Writes::default()
                    },
                )
            })
            .await?;
        match changed {
            Some(true) => Ok(()),
            _ => Err(Error::Fields(vec![FieldError::new(
                "current_password",
                "Wrong password.",
                "invalid",
            )])),
        }
    }
}
