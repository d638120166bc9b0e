//! The two steps of a login, as changes of the user's record:
//!
//! - the password step issues a login key, or a temp token when TOTP is active — and only if
//!   the password hash it checked is still the user's (a password change in between wins);
//! - a temp token lives `ttl` seconds and takes at most `attempts` answers, whatever they are
//!   (wrong, replayed, or refused unchecked while locked); a user holds at most
//!   `MAX_TEMP_TOKENS`, the oldest evicted first;
//! - the code step consumes the temp token together with the code (see `second_factor`).

use crate::clock::UnixTime;
use crate::domain::lockout::LockPolicy;
use crate::domain::second_factor::{self, Accepted, Proof, Refusal};
use crate::domain::user::{Digest, PendingLogin, StoredSecret, User};

/// Outstanding temp tokens kept per user; a newer login evicts the oldest.
pub const MAX_TEMP_TOKENS: usize = 32;

/// What the password step hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordStep {
    /// No TOTP: a login key, issued at this key epoch.
    Key { epoch: u64 },
    /// TOTP active: the temp token was recorded.
    TotpRequired,
}

/// The password checked is no longer the user's: the login is refused as if it were wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordChanged;

/// The password step, after `checked_hash` verified the password. `temp_token` is recorded when
/// TOTP is active now — decided on the current record, not on the one read before hashing.
/// `rehashed`, the same password hashed with the current settings, replaces the stored hash.
pub fn pass_password(
    user: &mut User,
    checked_hash: &str,
    rehashed: Option<&str>,
    temp_token: PendingLogin,
    now: UnixTime,
) -> Result<PasswordStep, PasswordChanged> {
    if user.password_hash != checked_hash {
        return Err(PasswordChanged);
    }
    if let Some(hash) = rehashed {
        user.password_hash = hash.to_owned();
    }
    if user.totp.is_some() {
        user.temp_tokens.retain(|t| t.is_live(now));
        if user.temp_tokens.len() >= MAX_TEMP_TOKENS {
            user.temp_tokens.remove(0);
        }
        user.temp_tokens.push(temp_token);
        return Ok(PasswordStep::TotpRequired);
    }
    user.last_login = Some(now);
    Ok(PasswordStep::Key {
        epoch: user.key_epoch,
    })
}

/// Whether `digest` is one of the user's temp tokens, usable at `now` (only while TOTP is active).
pub fn temp_token_is_live(user: &User, digest: &Digest, now: UnixTime) -> bool {
    user.totp.is_some()
        && user
            .temp_tokens
            .iter()
            .any(|t| t.digest == *digest && t.is_live(now))
}

/// Why the code step did not log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeStepRefusal {
    /// Unknown, expired, used up, or issued for a secret that is no longer the active one.
    InvalidTempToken,
    /// The code was refused; the temp token lost one attempt.
    Refused(Refusal),
}

/// A completed login: the key to issue is at this epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedIn {
    pub accepted: Accepted,
    pub key_epoch: u64,
    pub recovery_codes_remaining: usize,
}

/// The code step: `proof` was computed against `checked_secret`, which must still be the active
/// secret (recovery codes do not depend on it).
pub fn pass_code(
    user: &mut User,
    temp: &Digest,
    proof: &Proof,
    checked_secret: &StoredSecret,
    policy: &LockPolicy,
    now: UnixTime,
) -> Result<LoggedIn, CodeStepRefusal> {
    let same_secret = matches!(proof, Proof::Recovery(_))
        || user.totp.as_ref().map(|t| &t.secret) == Some(checked_secret);
    if !temp_token_is_live(user, temp, now) || !same_secret {
        return Err(CodeStepRefusal::InvalidTempToken);
    }
    match second_factor::judge(user, proof, policy, now) {
        Ok(accepted) => {
            user.temp_tokens
                .retain(|t| t.digest != *temp && t.is_live(now));
            user.last_login = Some(now);
            Ok(LoggedIn {
                accepted,
                key_epoch: user.key_epoch,
                recovery_codes_remaining: user.recovery_codes_remaining(),
            })
        }
        Err(refusal) => {
            if let Some(token) = user.temp_tokens.iter_mut().find(|t| t.digest == *temp) {
                token.attempts_left = token.attempts_left.saturating_sub(1);
            }
            user.temp_tokens.retain(|t| t.is_live(now));
            Err(CodeStepRefusal::Refused(refusal))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::second_factor::tests::{P, active_user, code};

    fn token(digest: u8, attempts: u32) -> PendingLogin {
        PendingLogin {
            digest: [digest; 32],
            expires_at: 300,
            attempts_left: attempts,
        }
    }

    fn secret(user: &User) -> StoredSecret {
        user.totp.as_ref().expect("active").secret.clone()
    }

    #[test]
    fn the_password_step_refuses_a_hash_that_changed_meanwhile() {
        let mut u = User::new(1, "u".into(), "new-hash".into(), 0);
        assert_eq!(
            pass_password(&mut u, "old-hash", None, token(1, 5), 0),
            Err(PasswordChanged)
        );
        assert_eq!(
            pass_password(&mut u, "new-hash", Some("newer"), token(1, 5), 7),
            Ok(PasswordStep::Key { epoch: 0 })
        );
        assert_eq!(u.last_login, Some(7));
        assert_eq!(
            u.password_hash, "newer",
            "a rehash replaces the checked hash"
        );
        assert!(u.temp_tokens.is_empty());
    }

    #[test]
    fn the_password_step_asks_for_a_code_when_totp_became_active_meanwhile() {
        let mut u = active_user(&[]);
        assert_eq!(
            pass_password(&mut u, "", None, token(1, 5), 0),
            Ok(PasswordStep::TotpRequired)
        );
        assert!(temp_token_is_live(&u, &[1; 32], 0));
        assert!(!temp_token_is_live(&u, &[1; 32], 300));
        assert_eq!(u.last_login, None);
    }

    #[test]
    fn a_user_holds_at_most_max_temp_tokens_and_the_oldest_goes() {
        let mut u = active_user(&[]);
        for i in 0..=MAX_TEMP_TOKENS as u8 {
            pass_password(&mut u, "", None, token(i, 5), 0).expect("issued");
        }
        assert_eq!(u.temp_tokens.len(), MAX_TEMP_TOKENS);
        assert!(!temp_token_is_live(&u, &[0; 32], 0));
        assert!(temp_token_is_live(&u, &[MAX_TEMP_TOKENS as u8; 32], 0));
    }

    #[test]
    fn a_temp_token_takes_at_most_its_attempts_even_while_locked() {
        let mut u = active_user(&[]);
        u.temp_tokens.push(token(1, 5));
        let s = secret(&u);
        // Locked by failures elsewhere: every answer is refused unchecked, and still spent.
        u.failures.locked_until = 10_000;
        for _ in 0..5 {
            assert!(matches!(
                pass_code(&mut u, &[1; 32], &Proof::Unchecked, &s, &P, 0),
                Err(CodeStepRefusal::Refused(Refusal::Locked { .. }))
            ));
        }
        let wrong_recovery = Proof::Recovery(code("ffff-ffff-ffff-ffff"));
        assert_eq!(
            pass_code(&mut u, &[1; 32], &wrong_recovery, &s, &P, 0),
            Err(CodeStepRefusal::InvalidTempToken)
        );
        assert!(u.temp_tokens.is_empty());
    }

    #[test]
    fn a_good_code_consumes_the_token_and_a_second_use_is_refused() {
        let mut u = active_user(&[]);
        u.temp_tokens.push(token(1, 5));
        let s = secret(&u);
        let done = pass_code(&mut u, &[1; 32], &Proof::Step(101), &s, &P, 5).expect("logged in");
        assert_eq!(done.key_epoch, 0);
        assert_eq!(u.last_login, Some(5));
        assert_eq!(
            pass_code(&mut u, &[1; 32], &Proof::Step(102), &s, &P, 5),
            Err(CodeStepRefusal::InvalidTempToken)
        );
    }

    #[test]
    fn a_code_for_a_replaced_secret_does_not_count() {
        let mut u = active_user(&[]);
        u.temp_tokens.push(token(1, 5));
        let stale = StoredSecret::Plain(vec![9; 20]);
        assert_eq!(
            pass_code(&mut u, &[1; 32], &Proof::Step(101), &stale, &P, 0),
            Err(CodeStepRefusal::InvalidTempToken)
        );
        assert_eq!(u.failures.consecutive, 0);
    }
}
