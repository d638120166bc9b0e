//! How many users there are and how many have TOTP active, for `/metrics`: counted by a full
//! scan in the background (the server does so after start, unless the store kept the counts
//! of its last clean close, and hourly) and kept up to date by the operations of this process
//! meanwhile.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use crate::domain::user::User;

#[derive(Debug, Default)]
pub struct UserCounts {
    users: AtomicI64,
    active: AtomicI64,
    ready: AtomicBool,
}

impl UserCounts {
    pub fn created(&self) {
        self.users.fetch_add(1, Ordering::Relaxed);
    }

    pub fn removed(&self, user: &User) {
        self.users.fetch_sub(1, Ordering::Relaxed);
        if user.totp.is_some() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A user changed from `before` to `after`.
    pub fn changed(&self, before: &User, after: &User) {
        match (before.totp.is_some(), after.totp.is_some()) {
            (false, true) => self.active.fetch_add(1, Ordering::Relaxed),
            (true, false) => self.active.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// The result of a full count.
    pub fn set(&self, users: i64, active: i64) {
        self.users.store(users, Ordering::Relaxed);
        self.active.store(active, Ordering::Relaxed);
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Not known any more: records were written around the operations that keep the counts
    /// (an import), so only a full count gives them again.
    pub fn forget(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// (users, users with TOTP active), once counted.
    pub fn get(&self) -> Option<(u64, u64)> {
        let read = |n: &AtomicI64| n.load(Ordering::Relaxed).max(0) as u64;
        self.ready
            .load(Ordering::Relaxed)
            .then(|| (read(&self.users), read(&self.active)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_operations_once_counted() {
        let counts = UserCounts::default();
        assert_eq!(counts.get(), None, "not counted yet");
        counts.set(2, 1);
        let mut user = User::new(1, "u".into(), String::new(), 0);
        counts.created();
        let before = user.clone();
        user.totp = crate::domain::second_factor::tests::active_user(&[]).totp;
        counts.changed(&before, &user);
        assert_eq!(counts.get(), Some((3, 2)));
        counts.removed(&user);
        assert_eq!(counts.get(), Some((2, 1)));
        counts.forget();
        assert_eq!(counts.get(), None, "forgotten until counted again");
    }
}
