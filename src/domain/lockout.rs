//! Per-user lockout (NIST SP 800-63B §5.2.2): failed code checks are counted per user, across
//! every temp token and route; every `threshold` consecutive failures start a lock of
//! `base_seconds`, doubling per lock up to `max_seconds`; at `hard_limit` consecutive failures
//! the lock has no end until a recovery code or an administrator ends it. Any success resets it.

use crate::clock::UnixTime;
use crate::domain::user::FailureState;

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

impl FailureState {
    /// The end of the lock in force at `now`, if any.
    pub fn locked_until(&self, now: UnixTime) -> Option<UnixTime> {
        (self.locked_until > now).then_some(self.locked_until)
    }

    /// Counts one failure; returns the end of the lock it started, if it started one.
    pub fn record_failure(&mut self, policy: &LockPolicy, now: UnixTime) -> Option<UnixTime> {
        self.consecutive = self.consecutive.saturating_add(1);
        if self.consecutive >= policy.hard_limit {
            self.locked_until = HARD_LOCK;
            Some(HARD_LOCK)
        } else if self.consecutive % policy.threshold.max(1) == 0 {
            let doublings = self.locks.min(32);
            let seconds = policy
                .base_seconds
                .saturating_mul(1u64 << doublings)
                .min(policy.max_seconds);
            self.locks += 1;
            self.locked_until = now.saturating_add(seconds);
            Some(self.locked_until)
        } else {
            None
        }
    }

    /// A success, or an administrator's unlock: no failures, no lock, no doubling.
    pub fn reset(&mut self) {
        *self = FailureState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: LockPolicy = LockPolicy {
        threshold: 10,
        base_seconds: 900,
        max_seconds: 86_400,
        hard_limit: 100,
    };

    #[test]
    fn ten_failures_lock_for_15_minutes_doubling_up_to_a_day() {
        let mut f = FailureState::default();
        let mut now = 1_000;
        let mut expected = 900;
        for lock in 0..8 {
            for i in 1..=10 {
                let started = f.record_failure(&P, now);
                let want = (i == 10).then_some(now + expected);
                assert_eq!(started, want, "lock {lock} try {i}");
            }
            assert_eq!(f.locked_until(now + expected - 1), Some(now + expected));
            assert_eq!(f.locked_until(now + expected), None);
            now += expected;
            expected = (expected * 2).min(86_400);
        }
        assert_eq!(f.locks, 8);
    }

    #[test]
    fn the_hundredth_failure_locks_without_end_and_reset_clears_everything() {
        let mut f = FailureState::default();
        let mut now = 0;
        let mut last = None;
        for _ in 0..100 {
            if let Some(until) = f.locked_until(now) {
                now = until;
            }
            last = f.record_failure(&P, now);
        }
        assert_eq!(last, Some(HARD_LOCK));
        assert_eq!(f.locked_until(now + 10 * 365 * 86_400), Some(HARD_LOCK));
        f.reset();
        assert_eq!(f, FailureState::default());
    }
}
