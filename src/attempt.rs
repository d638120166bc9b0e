//! How one second-factor attempt changes a user — the rules in one pure function, applied by the
//! store inside the transaction that also consumes the temp token or performs the action:
//!
//! - a TOTP code must match a step later than the last one accepted (replay, RFC 6238 §5.2);
//! - a recovery code is consumed if the user still has it;
//! - failures are counted per user, across all temp tokens and routes; every `threshold`
//!   consecutive failures start a lock of `base` seconds, doubling per lock up to `max`; at
//!   `hard_limit` consecutive failures (NIST SP 800-63B §5.2.2: at most 100) the lock has no end;
//! - while locked, TOTP codes are refused without being checked; recovery codes (80 bits) are
//!   still checked, and a correct one ends any lock;
//! - any success resets the count.

use crate::clock::UnixTime;
use crate::models::{Digest, FailureState, User};

/// `locked_until` of a lock that only a recovery code or an administrator ends.
pub const HARD_LOCK: UnixTime = UnixTime::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockPolicy {
    pub threshold: u32,
    pub base_seconds: u64,
    pub max_seconds: u64,
    pub hard_limit: u32,
}

impl Default for LockPolicy {
    fn default() -> Self {
        Self {
            threshold: 10,
            base_seconds: 15 * 60,
            max_seconds: 24 * 60 * 60,
            hard_limit: 100,
        }
    }
}

/// What the caller established outside the transaction.
pub enum Proof<'a> {
    /// A TOTP code that matched this time step of the user's secret.
    Step(u64),
    /// A recovery code, given as its keyed hash function (the key is per user).
    Recovery(&'a (dyn Fn(&Digest) -> Digest + Sync)),
    /// A TOTP code that matched no step in the window.
    Wrong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    Accepted {
        recovery_code_used: bool,
    },
    /// Wrong, replayed or unknown; counted. `lock_started` is the end of a lock this failure began.
    Rejected {
        replay: bool,
        lock_started: Option<UnixTime>,
    },
    /// Refused unchecked: the user is locked until then.
    Locked {
        until: UnixTime,
    },
}

impl FailureState {
    /// The end of the lock in force at `now`, if any.
    pub fn locked_until(&self, now: UnixTime) -> Option<UnixTime> {
        (self.locked_until > now).then_some(self.locked_until)
    }
}

/// Applies `proof` to `user` (whose TOTP must be active for `Step` and `Recovery` to count).
/// Mutates the user; the caller writes it back in the same transaction.
pub fn judge(user: &mut User, proof: &Proof<'_>, policy: &LockPolicy, now: UnixTime) -> Judgement {
    let locked = user.failures.locked_until(now);
    let accepted = match proof {
        Proof::Recovery(hash) => user.totp.as_mut().and_then(|totp| {
            let digest = hash(&totp.recovery_key);
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
            Some(_) => {
                return fail(user, policy, now, true);
            }
            // Activation: no active secret yet, the step is recorded by the caller.
            None => Some(false),
        },
        Proof::Wrong => None,
    };
    match (accepted, locked) {
        (Some(recovery_code_used), _) => {
            user.failures = FailureState::default();
            Judgement::Accepted { recovery_code_used }
        }
        (None, Some(until)) => Judgement::Locked { until },
        (None, None) => fail(user, policy, now, false),
    }
}

fn fail(user: &mut User, policy: &LockPolicy, now: UnixTime, replay: bool) -> Judgement {
    let failures = &mut user.failures;
    failures.consecutive = failures.consecutive.saturating_add(1);
    let lock_started = if failures.consecutive >= policy.hard_limit {
        failures.locked_until = HARD_LOCK;
        Some(HARD_LOCK)
    } else if failures.consecutive % policy.threshold.max(1) == 0 {
        let doublings = failures.locks.min(32);
        let seconds = policy
            .base_seconds
            .saturating_mul(1u64 << doublings)
            .min(policy.max_seconds);
        failures.locks += 1;
        failures.locked_until = now.saturating_add(seconds);
        Some(failures.locked_until)
    } else {
        None
    };
    Judgement::Rejected {
        replay,
        lock_started,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ActiveTotp, StoredSecret};

    fn user() -> User {
        User {
            id: 1,
            username: "u".into(),
            password_hash: String::new(),
            created_at: 0,
            key_epoch: 0,
            kept_key: None,
            totp: Some(ActiveTotp {
                secret: StoredSecret::Plain(vec![0; 20]),
                last_step: 100,
                activated_at: 0,
                recovery_key: [1; 32],
                recovery_hashes: vec![[5; 32], [6; 32]],
            }),
            pending: None,
            failures: FailureState::default(),
            last_login: None,
            temp_tokens: Vec::new(),
        }
    }

    const P: LockPolicy = LockPolicy {
        threshold: 10,
        base_seconds: 900,
        max_seconds: 86_400,
        hard_limit: 100,
    };

    #[test]
    fn a_later_step_is_accepted_and_recorded_an_earlier_one_is_a_replay() {
        let mut u = user();
        assert_eq!(
            judge(&mut u, &Proof::Step(101), &P, 0),
            Judgement::Accepted {
                recovery_code_used: false
            }
        );
        assert_eq!(u.totp.as_ref().map(|t| t.last_step), Some(101));
        for step in [101, 100, 50] {
            assert_eq!(
                judge(&mut u, &Proof::Step(step), &P, 0),
                Judgement::Rejected {
                    replay: true,
                    lock_started: None
                }
            );
        }
        assert_eq!(u.failures.consecutive, 3);
    }

    #[test]
    fn a_recovery_code_is_consumed_once() {
        let mut u = user();
        let hash = |_: &Digest| [6u8; 32];
        assert_eq!(
            judge(&mut u, &Proof::Recovery(&hash), &P, 0),
            Judgement::Accepted {
                recovery_code_used: true
            }
        );
        assert_eq!(
            u.totp.as_ref().map(|t| t.recovery_hashes.clone()),
            Some(vec![[5; 32]])
        );
        assert!(matches!(
            judge(&mut u, &Proof::Recovery(&hash), &P, 0),
            Judgement::Rejected { replay: false, .. }
        ));
    }

    #[test]
    fn ten_failures_lock_for_15_minutes_doubling_up_to_a_day() {
        let mut u = user();
        let mut now = 1_000;
        let mut expected = 900;
        for lock in 0..8 {
            for i in 1..=10 {
                let j = judge(&mut u, &Proof::Wrong, &P, now);
                if i < 10 {
                    assert_eq!(
                        j,
                        Judgement::Rejected {
                            replay: false,
                            lock_started: None
                        },
                        "lock {lock} try {i}"
                    );
                } else {
                    assert_eq!(
                        j,
                        Judgement::Rejected {
                            replay: false,
                            lock_started: Some(now + expected)
                        }
                    );
                }
            }
            // Locked: even a correct step is refused unchecked and not counted.
            let before = u.failures.consecutive;
            assert_eq!(
                judge(&mut u, &Proof::Step(10_000 + lock), &P, now + expected - 1),
                Judgement::Locked {
                    until: now + expected
                }
            );
            assert_eq!(u.failures.consecutive, before);
            now += expected;
            expected = (expected * 2).min(86_400);
        }
        assert_eq!(u.failures.locks, 8);
    }

    #[test]
    fn a_success_resets_the_count_and_the_doubling() {
        let mut u = user();
        for _ in 0..10 {
            judge(&mut u, &Proof::Wrong, &P, 0);
        }
        assert!(u.failures.locked_until(0).is_some());
        assert_eq!(
            judge(&mut u, &Proof::Step(200), &P, 900),
            Judgement::Accepted {
                recovery_code_used: false
            }
        );
        assert_eq!(u.failures, FailureState::default());
    }

    #[test]
    fn one_hundred_failures_lock_until_a_recovery_code() {
        let mut u = user();
        let mut now = 0;
        let mut last = None;
        for _ in 0..100 {
            if let Some(until) = u.failures.locked_until(now) {
                now = until;
            }
            last = Some(judge(&mut u, &Proof::Wrong, &P, now));
        }
        assert_eq!(
            last,
            Some(Judgement::Rejected {
                replay: false,
                lock_started: Some(HARD_LOCK)
            })
        );
        let years_later = now + 10 * 365 * 86_400;
        assert_eq!(
            judge(&mut u, &Proof::Step(1_000_000), &P, years_later),
            Judgement::Locked { until: HARD_LOCK }
        );
        let wrong = |_: &Digest| [9u8; 32];
        assert_eq!(
            judge(&mut u, &Proof::Recovery(&wrong), &P, years_later),
            Judgement::Locked { until: HARD_LOCK }
        );
        let right = |_: &Digest| [5u8; 32];
        assert_eq!(
            judge(&mut u, &Proof::Recovery(&right), &P, years_later),
            Judgement::Accepted {
                recovery_code_used: true
            }
        );
        assert_eq!(u.failures, FailureState::default());
    }
}
