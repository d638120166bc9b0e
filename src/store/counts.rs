//! How many users there are and how many have TOTP active, for `/metrics`: counted by a full
//! scan in the background (the server does so after start, unless the store kept the counts
//! of its last clean close, and hourly) and kept up to date by the operations of this process
//! meanwhile.
//!
//! A scan runs while users keep changing, so a change can slip past it (made to a user the
//! scan has already read, then overwritten by the scan's result). Every change that moves a
//! count is therefore counted in `moves`: a scan during which none happened is exact, and
//! only exact counts are kept across a restart. Inexact ones still serve `/metrics` until the
//! next scan.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use crate::domain::user::User;

#[derive(Debug, Default)]
pub struct UserCounts {
    users: AtomicI64,
    active: AtomicI64,
    ready: AtomicBool,
    /// Whether the last full count saw no change while it ran (and nothing was forgotten since).
    exact: AtomicBool,
    /// Changes that moved a count, ever: a scan compares it before and after.
    moves: AtomicU64,
}

impl UserCounts {
    /// A user was created.
    pub fn created(&self) {
        self.users.fetch_add(1, Ordering::Relaxed);
        self.moved();
    }

    /// `user` was removed.
    pub fn removed(&self, user: &User) {
        self.users.fetch_sub(1, Ordering::Relaxed);
        if user.totp.is_some() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.moved();
    }

    /// A user changed from `before` to `after`. Whether a count moved.
    pub fn changed(&self, before: &User, after: &User) -> bool {
        let delta = match (before.totp.is_some(), after.totp.is_some()) {
            (false, true) => 1,
            (true, false) => -1,
            _ => return false,
        };
        self.active.fetch_add(delta, Ordering::Relaxed);
        self.moved();
        true
    }

    /// Not known any more: records were written around the operations that keep the counts
    /// (an import), so only a full count gives them again.
    pub fn forget(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.exact.store(false, Ordering::Relaxed);
        self.moved();
    }

    fn moved(&self) {
        self.moves.fetch_add(1, Ordering::SeqCst);
    }

    /// The changes so far: read before a full count, and passed to `set` after it.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::SeqCst)
    }

    /// The result of a full count that began when `moves()` was `moves_before`: exact if no
    /// change moved a count since.
    pub fn set(&self, users: i64, active: i64, moves_before: u64) {
        self.users.store(users, Ordering::Relaxed);
        self.active.store(active, Ordering::Relaxed);
        self.exact
            .store(self.moves() == moves_before, Ordering::Relaxed);
        self.ready.store(true, Ordering::Relaxed);
    }

    /// (users, users with TOTP active), once counted.
    pub fn get(&self) -> Option<(u64, u64)> {
        let read = |n: &AtomicI64| n.load(Ordering::Relaxed).max(0) as u64;
        self.ready
            .load(Ordering::Relaxed)
            .then(|| (read(&self.users), read(&self.active)))
    }

    /// The counts, if they may be kept for the next start: counted, and exactly.
    pub fn to_keep(&self) -> Option<(u64, u64)> {
        self.get().filter(|_| self.exact.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active() -> User {
        let mut user = User::new(1, "u".into(), String::new(), 0);
        user.totp = crate::domain::second_factor::tests::active_user(&[]).totp;
        user
    }

    #[test]
    fn counts_follow_the_operations_once_counted() {
        let counts = UserCounts::default();
        assert_eq!(counts.get(), None, "not counted yet");
        counts.set(2, 1, counts.moves());
        let user = User::new(1, "u".into(), String::new(), 0);
        counts.created();
        assert!(counts.changed(&user, &active()));
        assert!(!counts.changed(&user, &user), "no count moved");
        assert_eq!(counts.get(), Some((3, 2)));
        counts.removed(&active());
        assert_eq!(counts.get(), Some((2, 1)));
        assert_eq!(
            counts.to_keep(),
            Some((2, 1)),
            "an exact count, kept up to date"
        );
        counts.forget();
        assert_eq!(counts.get(), None, "forgotten until counted again");
        assert_eq!(counts.to_keep(), None);
    }

    /// A change during a count may have slipped past the scan: its result serves, but is not
    /// kept for the next start; a later count without changes is exact again.
    #[test]
    fn a_count_that_a_change_overlapped_is_not_kept() {
        let counts = UserCounts::default();
        let before = counts.moves();
        counts.created(); // during the scan
        counts.set(5, 0, before);
        assert_eq!(counts.get(), Some((5, 0)));
        assert_eq!(counts.to_keep(), None);
        let before = counts.moves();
        let user = User::new(1, "u".into(), String::new(), 0);
        assert!(
            !counts.changed(&user, &user),
            "a change that moves no count"
        );
        counts.set(6, 0, before);
        assert_eq!(counts.to_keep(), Some((6, 0)));
    }
}
