//! Enrolment and its undoing: setup stores a pending secret; activate turns it into the active
//! one for a code of it (whose step is consumed); deactivate and an administrator's reset
//! remove it; recovery codes are replaced for a valid code. Each guarded change judges the code
//! through `second_factor`, so the replay, lockout and single-use rules hold here too.

use crate::clock::UnixTime;
use crate::domain::keys;
use crate::domain::lockout::LockPolicy;
use crate::domain::second_factor::{self, Accepted, Proof, Refusal};
use crate::domain::user::{ActiveTotp, Digest, PendingTotp, StoredSecret, User};

/// Why a change of the TOTP state did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrolmentRefusal {
    AlreadyActive,
    NotPending,
    NotActive,
    /// The secret the code was checked against was replaced meanwhile (a newer setup).
    SecretReplaced,
    /// The code was refused (and counted).
    Code(Refusal),
}

impl From<Refusal> for EnrolmentRefusal {
    fn from(refusal: Refusal) -> Self {
        EnrolmentRefusal::Code(refusal)
    }
}

/// Setup: `pending` replaces any earlier pending secret, unless TOTP is already active.
pub fn begin_setup(user: &mut User, pending: PendingTotp) -> Result<(), EnrolmentRefusal> {
    if user.totp.is_some() {
        return Err(EnrolmentRefusal::AlreadyActive);
    }
    user.pending = Some(pending);
    Ok(())
}

/// A fresh set of recovery codes: the per-user hash key and the hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryHashes {
    pub key: Digest,
    pub hashes: Vec<Digest>,
}

/// Activate: `proof` was computed against `checked`, which must still be the pending secret.
pub fn activate(
    user: &mut User,
    checked: &StoredSecret,
    proof: &Proof,
    recovery: RecoveryHashes,
    policy: &LockPolicy,
    now: UnixTime,
) -> Result<(), EnrolmentRefusal> {
    if user.totp.is_some() {
        return Err(EnrolmentRefusal::AlreadyActive);
    }
    let Some(pending) = &user.pending else {
        return Err(EnrolmentRefusal::NotPending);
    };
    if pending.secret != *checked {
        return Err(EnrolmentRefusal::SecretReplaced);
    }
    second_factor::judge(user, proof, policy, now)?;
    let step = match proof {
        Proof::Step(step) => *step,
        _ => 0,
    };
    // Steps of this secret burned by codes refused here stay burned once it is active.
    let mut burned_steps = user
        .pending
        .take()
        .map(|pending| pending.burned_steps)
        .unwrap_or_default();
    second_factor::prune(&mut burned_steps, Some(step), now);
    user.totp = Some(ActiveTotp {
        secret: checked.clone(),
        last_step: step,
        activated_at: now,
        recovery_key: recovery.key,
        recovery_hashes: recovery.hashes,
        burned_steps,
    });
    Ok(())
}

/// Checks a code against the active secret `checked` (which must still be the active one).
fn guard(
    user: &mut User,
    proof: &Proof,
    checked: &StoredSecret,
    policy: &LockPolicy,
    now: UnixTime,
) -> Result<Accepted, EnrolmentRefusal> {
    let Some(active) = &user.totp else {
        return Err(EnrolmentRefusal::NotActive);
    };
    if !matches!(proof, Proof::Recovery(_)) && active.secret != *checked {
        return Err(EnrolmentRefusal::SecretReplaced);
    }
    Ok(second_factor::judge(user, proof, policy, now)?)
}

/// Deactivate, guarded by a code when one is given: the secret, the recovery codes, a pending
/// setup and the outstanding temp tokens go, and every key but `keep` is revoked.
pub fn deactivate(
    user: &mut User,
    code: Option<(&Proof, &StoredSecret)>,
    keep: &Digest,
    policy: &LockPolicy,
    now: UnixTime,
) -> Result<Accepted, EnrolmentRefusal> {
    if user.totp.is_none() {
        return Err(EnrolmentRefusal::NotActive);
    }
    let accepted = match code {
        Some((proof, checked)) => guard(user, proof, checked, policy, now)?,
        None => Accepted {
            recovery_code_used: false,
        },
    };
    user.totp = None;
    user.pending = None;
    user.temp_tokens.clear();
    keys::revoke_all(user, Some(keep));
    Ok(accepted)
}

/// Replaces the recovery codes, for a valid code.
pub fn regenerate_recovery_codes(
    user: &mut User,
    proof: &Proof,
    checked: &StoredSecret,
    recovery: RecoveryHashes,
    policy: &LockPolicy,
    now: UnixTime,
) -> Result<Accepted, EnrolmentRefusal> {
    let accepted = guard(user, proof, checked, policy, now)?;
    if let Some(totp) = user.totp.as_mut() {
        totp.recovery_key = recovery.key;
        totp.recovery_hashes = recovery.hashes;
    }
    Ok(accepted)
}

/// An administrator's reset for a lost phone: secret, pending setup, recovery codes, lock and
/// temp tokens cleared, every key revoked.
pub fn reset(user: &mut User) {
    user.totp = None;
    user.pending = None;
    user.failures.reset();
    user.temp_tokens.clear();
    keys::revoke_all(user, None);
}

/// A new password hash: outstanding temp tokens die and every key but `keep` is revoked.
pub fn change_password(user: &mut User, password_hash: String, keep: Option<&Digest>) {
    user.password_hash = password_hash;
    user.temp_tokens.clear();
    keys::revoke_all(user, keep);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::second_factor::Rejection;
    use crate::domain::second_factor::tests::{P, active_user, code};

    fn hashes() -> RecoveryHashes {
        RecoveryHashes {
            key: [7; 32],
            hashes: vec![[8; 32]],
        }
    }

    fn pending(user: &mut User, byte: u8) -> StoredSecret {
        let secret = StoredSecret::Plain(vec![byte; 20]);
        begin_setup(
            user,
            PendingTotp {
                secret: secret.clone(),
                created_at: 0,
                burned_steps: Vec::new(),
            },
        )
        .expect("setup");
        secret
    }

    #[test]
    fn activate_needs_the_pending_secret_and_records_the_step() {
        let mut u = User::new(1, "u".into(), String::new(), 0);
        assert_eq!(
            activate(
                &mut u,
                &StoredSecret::Plain(vec![]),
                &Proof::Step(5),
                hashes(),
                &P,
                0
            ),
            Err(EnrolmentRefusal::NotPending)
        );
        let old = pending(&mut u, 1);
        let new = pending(&mut u, 2);
        assert_eq!(
            activate(&mut u, &old, &Proof::Step(5), hashes(), &P, 0),
            Err(EnrolmentRefusal::SecretReplaced)
        );
        assert!(matches!(
            activate(&mut u, &new, &Proof::Wrong, hashes(), &P, 0),
            Err(EnrolmentRefusal::Code(Refusal::Rejected { .. }))
        ));
        assert_eq!(u.failures.consecutive, 1);
        assert_eq!(
            activate(&mut u, &new, &Proof::Step(5), hashes(), &P, 0),
            Ok(())
        );
        assert_eq!(u.totp.as_ref().map(|t| t.last_step), Some(5));
        assert_eq!(u.failures.consecutive, 0);
        assert_eq!(
            begin_setup(
                &mut u,
                PendingTotp {
                    secret: new,
                    created_at: 0,
                    burned_steps: Vec::new(),
                }
            ),
            Err(EnrolmentRefusal::AlreadyActive)
        );
    }

    #[test]
    fn deactivate_with_a_code_judges_it_and_revokes_other_keys() {
        let good = code("gggg-gggg-gggg-gggg");
        let mut u = active_user(std::slice::from_ref(&good));
        let secret = u.totp.as_ref().expect("active").secret.clone();
        assert!(matches!(
            deactivate(&mut u, Some((&Proof::Step(100), &secret)), &[1; 32], &P, 0),
            Err(EnrolmentRefusal::Code(Refusal::Rejected {
                why: Rejection::Replay,
                ..
            }))
        ));
        assert!(u.totp.is_some());
        assert_eq!(u.key_epoch, 0);
        let proof = Proof::Recovery(good);
        assert_eq!(
            deactivate(&mut u, Some((&proof, &secret)), &[1; 32], &P, 0),
            Ok(Accepted {
                recovery_code_used: true
            })
        );
        assert!(u.totp.is_none());
        assert_eq!((u.key_epoch, u.kept_key), (1, Some([1; 32])));
        assert_eq!(
            deactivate(&mut u, None, &[1; 32], &P, 0),
            Err(EnrolmentRefusal::NotActive)
        );
    }

    #[test]
    fn regenerating_replaces_the_codes_and_reset_clears_everything() {
        let mut u = active_user(&[code("hhhh-hhhh-hhhh-hhhh")]);
        let secret = u.totp.as_ref().expect("active").secret.clone();
        regenerate_recovery_codes(&mut u, &Proof::Step(101), &secret, hashes(), &P, 0)
            .expect("regenerated");
        assert_eq!(u.totp.as_ref().map(|t| t.recovery_key), Some([7; 32]));
        u.failures.locked_until = 99;
        reset(&mut u);
        assert!(u.totp.is_none() && u.pending.is_none());
        assert_eq!(u.failures.locked_until(0), None);
        assert_eq!(u.key_epoch, 1);
        change_password(&mut u, "h2".into(), None);
        assert_eq!((u.password_hash.as_str(), u.key_epoch), ("h2", 2));
    }

    #[test]
    fn steps_burned_before_activation_stay_burned_after_it() {
        let mut u = User::new(1, "u".into(), String::new(), 0);
        let secret = pending(&mut u, 1);
        let now = 100 * 30 + 15;
        // A phone 5 steps fast, then (its clock fixed) the code of now.
        assert!(matches!(
            activate(
                &mut u,
                &secret,
                &Proof::Skewed { step: 105 },
                hashes(),
                &P,
                now
            ),
            Err(EnrolmentRefusal::Code(Refusal::Rejected {
                why: Rejection::ClockSkew { step: 105 },
                ..
            }))
        ));
        assert_eq!(u.failures.consecutive, 1);
        assert_eq!(
            activate(&mut u, &secret, &Proof::Step(100), hashes(), &P, now),
            Ok(())
        );
        let active = u.totp.as_ref().expect("active");
        assert_eq!(
            (active.last_step, active.burned_steps.clone()),
            (100, vec![105])
        );
        // The fast code is refused when its time comes; the steps before it are good.
        let step = |u: &mut User, step: u64, at: UnixTime| {
            regenerate_recovery_codes(u, &Proof::Step(step), &secret, hashes(), &P, at)
        };
        assert!(step(&mut u, 102, now + 60).is_ok());
        assert!(matches!(
            step(&mut u, 105, now + 150),
            Err(EnrolmentRefusal::Code(Refusal::Rejected {
                why: Rejection::Replay,
                ..
            }))
        ));
    }
}
