//! How one second-factor attempt changes a user — the only place these rules live:
//!
//! - a TOTP code must match a time step later than the last one accepted (replay, RFC 6238
//!   §5.2), and an accepted step becomes the last one;
//! - a TOTP code that matches a step a few steps outside the window (a device whose clock is
//!   off, see `totp::locate`) is refused and counted like a wrong code, and its step is spent
//!   as if it had been accepted (see [`Proof::Skewed`]);
//! - a recovery code is single-use: accepted once if the user still has it, then gone;
//! - every refusal is counted by `lockout`; while locked, TOTP codes are refused unchecked;
//!   recovery codes (80 bits) are still checked, and a correct one ends any lock;
//! - any success resets the failure count.

use crate::clock::UnixTime;
use crate::domain::lockout::LockPolicy;
use crate::domain::secrets::RecoveryCode;
use crate::domain::totp::{self, MAX_SKEW};
use crate::domain::user::User;

/// What the caller established about a code before the change (the TOTP maths need the opened
/// secret, which the domain never holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// A TOTP code that matched this time step of the user's secret, within the window.
    Step(u64),
    /// A TOTP code that matched no step in the window but this one, a few steps from now
    /// (`totp::Located::Drifted`): most likely a device whose clock is off. It is refused and
    /// counted like a wrong code — it is not the code of now — and the refusal says how far off
    /// the clock seems.
    ///
    /// Its step is spent all the same: the code was shown, typed and sent, so whoever saw it go
    /// must not be able to use it later. A step *ahead* of now would become valid when the
    /// server's time reaches it; raising `last_step` to it would also refuse the good codes of
    /// the steps in between, so it goes into the secret's short list of burned steps instead. A
    /// step *behind* the window never becomes valid again (time only moves on), so nothing is
    /// stored for it.
    Skewed { step: u64 },
    /// A TOTP code that matched no step near now.
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

/// Why a checked code was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// It matched nothing: a wrong TOTP code, an unknown or used recovery code.
    Wrong,
    /// The code of a step already spent: at or before the last accepted one, or burned.
    Replay,
    /// The code of `step`, outside the window by a few steps: the device's clock seems off.
    ClockSkew { step: u64 },
}

/// A code that was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Checked and refused; counted. `lock_started`: the end of a lock this failure began.
    Rejected {
        why: Rejection,
        lock_started: Option<UnixTime>,
    },
    /// Not checked: the user is locked until then.
    Locked { until: UnixTime },
}

/// The most burned steps a secret keeps. Only steps ahead of now are burned, at most
/// `totp::DRIFT_STEPS` ahead, and each is dropped once it is more than `MAX_SKEW` steps in the
/// past; so a server whose clock moves forward never holds more than 13. The cap only bounds a
/// record whose server clock was set back.
pub const MAX_BURNED_STEPS: usize = 16;

/// Applies `proof` to `user`, whose TOTP is active (or, for `Step` and `Skewed` at activation,
/// pending: the step is then recorded by `enrolment::activate`).
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
        Proof::Step(step) => {
            if used(user, *step) || burned(user, *step) {
                return Err(fail(user, policy, now, Rejection::Replay));
            }
            if let Some(totp) = user.totp.as_mut() {
                totp.last_step = *step;
                prune(&mut totp.burned_steps, Some(*step), now);
            }
            Some(false)
        }
        Proof::Skewed { step } => {
            if used(user, *step) {
                return Err(fail(user, policy, now, Rejection::Replay));
            }
            burn(user, *step, now);
            let why = Rejection::ClockSkew { step: *step };
            return Err(fail(user, policy, now, why));
        }
        // Not checked because the user was locked when it arrived, and the lock has ended since
        // (an administrator, a recovery code): refused as locked a moment ago, never counted as
        // a wrong code — it may have been right.
        Proof::Unchecked => return Err(Refusal::Locked { until: now }),
        Proof::Wrong => None,
    };
    match (accepted, locked) {
        (Some(recovery_code_used), _) => {
            user.failures.reset();
            Ok(Accepted { recovery_code_used })
        }
        (None, Some(until)) => Err(Refusal::Locked { until }),
        (None, None) => Err(fail(user, policy, now, Rejection::Wrong)),
    }
}

fn fail(user: &mut User, policy: &LockPolicy, now: UnixTime, why: Rejection) -> Refusal {
    Refusal::Rejected {
        why,
        lock_started: user.failures.record_failure(policy, now),
    }
}

/// Whether `step` is at or before the last step the active secret accepted.
fn used(user: &User, step: u64) -> bool {
    user.totp.as_ref().is_some_and(|t| step <= t.last_step)
}

/// Whether `step` is burned for the secret being judged: the active one, or else the pending
/// one (activation).
fn burned(user: &User, step: u64) -> bool {
    match (&user.totp, &user.pending) {
        (Some(active), _) => active.burned_steps.contains(&step),
        (None, Some(pending)) => pending.burned_steps.contains(&step),
        (None, None) => false,
    }
}

/// Burns `step` if it is ahead of now (see [`Proof::Skewed`]); drops the burned steps no code
/// can reach any more.
fn burn(user: &mut User, step: u64, now: UnixTime) {
    let (steps, last_step) = match (user.totp.as_mut(), user.pending.as_mut()) {
        (Some(active), _) => (&mut active.burned_steps, Some(active.last_step)),
        (None, Some(pending)) => (&mut pending.burned_steps, None),
        (None, None) => return,
    };
    if step > totp::step_at(now) && !steps.contains(&step) {
        steps.push(step);
    }
    prune(steps, last_step, now);
}

/// Keeps the burned steps that could still be accepted: after `last_step` (replay refuses the
/// others) and not yet out of every window (`MAX_SKEW` is the widest); sorted, at most
/// [`MAX_BURNED_STEPS`] (the nearest).
pub fn prune(steps: &mut Vec<u64>, last_step: Option<u64>, now: UnixTime) {
    let oldest_reachable = totp::step_at(now).saturating_sub(MAX_SKEW);
    steps.retain(|&s| s >= oldest_reachable && last_step.is_none_or(|last| s > last));
    steps.sort_unstable();
    steps.truncate(MAX_BURNED_STEPS);
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
            burned_steps: Vec::new(),
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
                    why: Rejection::Replay,
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
                why: Rejection::Wrong,
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
        for proof in [
            Proof::Step(10_000),
            Proof::Skewed { step: 10_005 },
            Proof::Wrong,
            Proof::Unchecked,
        ] {
            assert_eq!(judge(&mut u, &proof, &P, 1), Err(Refusal::Locked { until }));
        }
        assert_eq!(u.failures.consecutive, 10);
        assert_eq!(
            burned_steps(&u),
            Vec::<u64>::new(),
            "refused unchecked: nothing burned"
        );
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
    fn a_code_unchecked_under_a_lock_that_ended_meanwhile_is_not_counted() {
        let mut u = active_user(&[]);
        assert_eq!(
            judge(&mut u, &Proof::Unchecked, &P, 50),
            Err(Refusal::Locked { until: 50 })
        );
        assert_eq!(u.failures.consecutive, 0);
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

    /// Mid-step 100, the active user's last accepted step: the tests below start here.
    const NOW: UnixTime = 100 * 30 + 15;
    const STEP: u64 = 100;

    fn burned_steps(user: &User) -> Vec<u64> {
        user.totp
            .as_ref()
            .map(|t| t.burned_steps.clone())
            .unwrap_or_default()
    }

    fn refused(why: Rejection) -> Result<Accepted, Refusal> {
        Err(Refusal::Rejected {
            why,
            lock_started: None,
        })
    }

    const OK: Result<Accepted, Refusal> = Ok(Accepted {
        recovery_code_used: false,
    });

    #[test]
    fn a_code_from_a_fast_clock_is_refused_counted_and_its_step_burned_but_not_those_before() {
        let mut u = active_user(&[]);
        let ahead = STEP + 3;
        assert_eq!(
            judge(&mut u, &Proof::Skewed { step: ahead }, &P, NOW),
            refused(Rejection::ClockSkew { step: ahead })
        );
        assert_eq!(u.failures.consecutive, 1);
        assert_eq!(
            u.totp.as_ref().map(|t| t.last_step),
            Some(STEP),
            "not accepted"
        );
        assert_eq!(burned_steps(&u), vec![ahead]);
        // Sent again before its time: the same hint, the same single burned step.
        assert_eq!(
            judge(&mut u, &Proof::Skewed { step: ahead }, &P, NOW),
            refused(Rejection::ClockSkew { step: ahead })
        );
        assert_eq!(burned_steps(&u), vec![ahead]);
        // The steps before it stay good; when time reaches it, its code is a replay.
        assert_eq!(judge(&mut u, &Proof::Step(STEP + 1), &P, NOW + 30), OK);
        assert_eq!(burned_steps(&u), vec![ahead]);
        assert_eq!(
            judge(&mut u, &Proof::Step(ahead), &P, NOW + 90),
            refused(Rejection::Replay)
        );
        assert_eq!(u.failures.consecutive, 1);
        // The step after it is good, and the burned step, now behind, is dropped.
        assert_eq!(judge(&mut u, &Proof::Step(ahead + 1), &P, NOW + 120), OK);
        assert_eq!(burned_steps(&u), Vec::<u64>::new());
    }

    #[test]
    fn a_code_from_a_slow_clock_is_refused_and_counted_with_nothing_to_store() {
        let mut u = active_user(&[]);
        u.totp.as_mut().expect("active").last_step = 90;
        assert_eq!(
            judge(&mut u, &Proof::Skewed { step: STEP - 4 }, &P, NOW),
            refused(Rejection::ClockSkew { step: STEP - 4 })
        );
        assert_eq!(u.failures.consecutive, 1);
        assert_eq!(burned_steps(&u), Vec::<u64>::new());
        assert_eq!(u.totp.as_ref().map(|t| t.last_step), Some(90));
        // At or before the last accepted step it is a replay, which says nothing more.
        assert_eq!(
            judge(&mut u, &Proof::Skewed { step: 90 }, &P, NOW),
            refused(Rejection::Replay)
        );
        assert_eq!(u.failures.consecutive, 2);
    }

    #[test]
    fn codes_from_a_skewed_clock_count_towards_the_lock() {
        let mut u = active_user(&[]);
        u.totp.as_mut().expect("active").last_step = 90;
        for i in 1..10 {
            let step = if i % 2 == 0 { STEP + 2 } else { STEP - 2 };
            assert_eq!(
                judge(&mut u, &Proof::Skewed { step }, &P, NOW),
                refused(Rejection::ClockSkew { step })
            );
        }
        assert_eq!(
            judge(&mut u, &Proof::Skewed { step: STEP + 10 }, &P, NOW),
            Err(Refusal::Rejected {
                why: Rejection::ClockSkew { step: STEP + 10 },
                lock_started: Some(NOW + 900)
            })
        );
        assert_eq!(
            judge(&mut u, &Proof::Step(STEP + 1), &P, NOW),
            Err(Refusal::Locked { until: NOW + 900 })
        );
    }

    #[test]
    fn burned_steps_are_pruned_once_unreachable_and_bounded() {
        let mut u = active_user(&[]);
        for step in STEP + 2..=STEP + 10 {
            let _ = judge(&mut u, &Proof::Skewed { step }, &P, NOW);
        }
        assert_eq!(burned_steps(&u), (STEP + 2..=STEP + 10).collect::<Vec<_>>());
        // Five steps on, the steps more than MAX_SKEW behind now are gone.
        let later = NOW + 5 * 30;
        let _ = judge(&mut u, &Proof::Skewed { step: STEP + 15 }, &P, later);
        assert_eq!(
            burned_steps(&u),
            (STEP + 3..=STEP + 10)
                .chain([STEP + 15])
                .collect::<Vec<_>>()
        );
        // A server clock set back far can pile up more; the list still stays bounded.
        u.totp.as_mut().expect("active").last_step = 0;
        for back in 0..40 {
            u.failures.reset(); // (no lock in the way)
            let now = NOW - back * 30;
            let _ = judge(
                &mut u,
                &Proof::Skewed {
                    step: STEP + 10 - back,
                },
                &P,
                now,
            );
        }
        assert_eq!(burned_steps(&u).len(), MAX_BURNED_STEPS);
    }

    #[test]
    fn a_skewed_code_at_activation_burns_its_step_of_the_pending_secret() {
        let mut u = User::new(1, "u".into(), String::new(), 0);
        u.pending = Some(crate::domain::user::PendingTotp {
            secret: crate::domain::user::StoredSecret::Plain(vec![2; 20]),
            created_at: 0,
            burned_steps: Vec::new(),
        });
        assert_eq!(
            judge(&mut u, &Proof::Skewed { step: STEP + 4 }, &P, NOW),
            refused(Rejection::ClockSkew { step: STEP + 4 })
        );
        assert_eq!(
            u.pending.as_ref().map(|p| p.burned_steps.clone()),
            Some(vec![STEP + 4])
        );
        assert_eq!(
            judge(&mut u, &Proof::Step(STEP + 4), &P, NOW + 4 * 30),
            refused(Rejection::Replay)
        );
        assert_eq!(judge(&mut u, &Proof::Step(STEP), &P, NOW), OK);
    }
}
