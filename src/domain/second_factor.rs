//! How one second-factor attempt changes a user — the only place these rules live:
//!
//! - a TOTP code must match a time step later than the last one accepted (replay, RFC 6238
//!   §5.2), and an accepted step becomes the last one;
//! - a recovery code is single-use: accepted once if the user still has it, then gone;
//! - every refusal is counted by `lockout`; while locked, TOTP codes are refused unchecked;
//!   recovery codes (80 bits) are still checked, and a correct one ends any lock;
//! - any success resets the failure count.

use crate::clock::UnixTime;
use crate::domain::lockout::LockPolicy;
use crate::domain::secrets::RecoveryCode;
use crate::domain::user::User;

/// What the caller established about a code before the change (the TOTP maths need the opened
/// secret, which the domain never holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// A TOTP code that matched this time step of the user's secret.
    Step(u64),
    /// A TOTP code that matched no step in the window.
    Wrong,
    /// A TOTP code not checked because the user was locked when it arrived.
    Unchecked,
    /// A recovery code, checked here against the user's hashes.
    Recovery(RecoveryCode),
}

/// A code that was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub recovery_code_used: bool,
}

/// A code that was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong, replayed or unknown; counted. `lock_started`: the end of a lock this failure began.
    Rejected {
        replay: bool,
        lock_started: Option<UnixTime>,
    },
    /// Not checked: the user is locked until then.
    Locked { until: UnixTime },
}

/// Applies `proof` to `user`, whose TOTP is active (or, for `Step` at activation, pending: the
/// step is then recorded by `enrolment::activate`).
pub fn judge(
    user: &mut User,
    proof: &Proof,
    policy: &LockPolicy,
    now: UnixTime,
) -> Result<Accepted, Refusal> {
    let locked = user.failures.locked_until(now);
    let accepted = match proof {
        Proof::Recovery(code) => user.totp.as_mut().and_then(|totp| {
            let digest = code.digest(&totp.recovery_key);
            let index = totp.recovery_hashes.iter().position(|h| *h == digest)?;
            totp.recovery_hashes.swap_remove(index);
            Some(true)
        }),
        _ if locked.is_some() => None,
        Proof::Step(step) => match user.totp.as_mut() {
            Some(totp) if *step > totp.last_step => {
                totp.last_step = *step;
                Some(false)
            }
            Some(_) => return Err(fail(user, policy, now, true)),
            None => Some(false),
        },
        Proof::Wrong | Proof::Unchecked => None,
    };
    match (accepted, locked) {
        (Some(recovery_code_used), _) => {
            user.failures.reset();
            Ok(Accepted { recovery_code_used })
        }
        (None, Some(until)) => Err(Refusal::Locked { until }),
        (None, None) => Err(fail(user, policy, now, false)),
    }
}

fn fail(user: &mut User, policy: &LockPolicy, now: UnixTime, replay: bool) -> Refusal {
    Refusal::Rejected {
        replay,
        lock_started: user.failures.record_failure(policy, now),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::lockout::HARD_LOCK;
    use crate::domain::user::{ActiveTotp, FailureState, StoredSecret};

    pub(crate) const P: LockPolicy = LockPolicy {
        threshold: 10,
        base_seconds: 900,
        max_seconds: 86_400,
        hard_limit: 100,
    };

    /// An active user whose recovery codes are `codes` (under key [1; 32]), last step 100.
    pub(crate) fn active_user(codes: &[RecoveryCode]) -> User {
        let mut user = User::new(1, "u".into(), String::new(), 0);
        user.totp = Some(ActiveTotp {
            secret: StoredSecret::Plain(vec![0; 20]),
            last_step: 100,
            activated_at: 0,
            recovery_key: [1; 32],
            recovery_hashes: codes.iter().map(|c| c.digest(&[1; 32])).collect(),
        });
        user
    }

    pub(crate) fn code(text: &str) -> RecoveryCode {
        RecoveryCode::parse(text).expect("a recovery code")
    }

    #[test]
    fn a_later_step_is_accepted_and_recorded_an_earlier_one_is_a_replay() {
        let mut u = active_user(&[]);
        assert_eq!(
            judge(&mut u, &Proof::Step(101), &P, 0),
            Ok(Accepted {
                recovery_code_used: false
            })
        );
        assert_eq!(u.totp.as_ref().map(|t| t.last_step), Some(101));
        for step in [101, 100, 50] {
            assert_eq!(
                judge(&mut u, &Proof::Step(step), &P, 0),
                Err(Refusal::Rejected {
                    replay: true,
                    lock_started: None
                })
            );
        }
        assert_eq!(u.failures.consecutive, 3);
    }

    #[test]
    fn a_recovery_code_is_consumed_once() {
        let (a, b) = (code("aaaa-aaaa-aaaa-aaaa"), code("bbbb-bbbb-bbbb-bbbb"));
        let mut u = active_user(&[a.clone(), b.clone()]);
        assert_eq!(
            judge(&mut u, &Proof::Recovery(b.clone()), &P, 0),
            Ok(Accepted {
                recovery_code_used: true
            })
        );
        assert_eq!(u.recovery_codes_remaining(), 1);
        assert_eq!(
            judge(&mut u, &Proof::Recovery(b), &P, 0),
            Err(Refusal::Rejected {
                replay: false,
                lock_started: None
            })
        );
        assert_eq!(u.recovery_codes_remaining(), 1);
    }

    #[test]
    fn while_locked_totp_codes_are_refused_uncounted_and_a_recovery_code_ends_the_lock() {
        let good = code("cccc-cccc-cccc-cccc");
        let mut u = active_user(std::slice::from_ref(&good));
        for _ in 0..10 {
            let _ = judge(&mut u, &Proof::Wrong, &P, 0);
        }
        let until = u.failures.locked_until(0).expect("locked");
        for proof in [Proof::Step(10_000), Proof::Wrong, Proof::Unchecked] {
            assert_eq!(judge(&mut u, &proof, &P, 1), Err(Refusal::Locked { until }));
        }
        assert_eq!(u.failures.consecutive, 10);
        assert_eq!(
            judge(&mut u, &Proof::Recovery(code("dddd-dddd-dddd-dddd")), &P, 1),
            Err(Refusal::Locked { until })
        );
        assert_eq!(
            judge(&mut u, &Proof::Recovery(good), &P, 1),
            Ok(Accepted {
                recovery_code_used: true
            })
        );
        assert_eq!(u.failures, FailureState::default());
    }

    #[test]
    fn a_hard_lock_outlasts_years_but_not_a_recovery_code() {
        let good = code("eeee-eeee-eeee-eeee");
        let mut u = active_user(std::slice::from_ref(&good));
        let mut now = 0;
        for _ in 0..100 {
            if let Some(until) = u.failures.locked_until(now) {
                now = until;
            }
            let _ = judge(&mut u, &Proof::Wrong, &P, now);
        }
        let later = now + 10 * 365 * 86_400;
        assert_eq!(
            judge(&mut u, &Proof::Step(1_000_000), &P, later),
            Err(Refusal::Locked { until: HARD_LOCK })
        );
        assert!(judge(&mut u, &Proof::Recovery(good), &P, later).is_ok());
    }
}
