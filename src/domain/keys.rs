//! Login keys: a key is valid while it is younger than its absolute lifetime, was used within
//! its idle lifetime, and was issued at the user's current key epoch. Raising the epoch revokes
//! every key at once (logout everywhere, password change, deactivation); the caller's own key
//! can be kept through the raise.

use crate::clock::UnixTime;
use crate::domain::user::{Digest, LoginKey, User};

/// `last_used_at` of a key is rewritten at most this often (the idle timeout's precision).
pub const TOUCH_INTERVAL: u64 = 60;

/// Lifetimes of login keys, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLifetime {
    pub absolute: u64,
    pub idle: u64,
}

impl KeyLifetime {
    /// Whether `key` has outlived neither lifetime at `now`.
    pub fn alive(&self, key: &LoginKey, now: UnixTime) -> bool {
        now < key.created_at.saturating_add(self.absolute)
            && now < key.last_used_at.saturating_add(self.idle)
    }
}

/// What a presented key is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// Valid; `touch` when its last use should be noted now.
    Valid { touch: bool },
    /// Revoked or expired: refuse it, and delete it.
    Dead,
}

/// Whether a key issued at `epoch` has not been revoked by a raise of the user's key epoch
/// (the kept key of the last raise is valid at the epoch before). Checked again inside every
/// change a session makes, so a request authenticated before a revocation changes nothing.
pub fn not_revoked(user: &User, digest: &Digest, epoch: u64) -> bool {
    epoch >= user.key_epoch
        || (user.kept_key.as_ref() == Some(digest) && epoch + 1 == user.key_epoch)
}

/// Judges the key `digest` (record `key`) of `user` at `now`.
pub fn check(
    user: &User,
    digest: &Digest,
    key: &LoginKey,
    lifetime: KeyLifetime,
    now: UnixTime,
) -> KeyCheck {
    if key.user_id == user.id && not_revoked(user, digest, key.epoch) && lifetime.alive(key, now) {
        KeyCheck::Valid {
            touch: now >= key.last_used_at.saturating_add(TOUCH_INTERVAL),
        }
    } else {
        KeyCheck::Dead
    }
}

/// A new key's record, for a login that reached key epoch `epoch`.
pub fn new_key(user: &User, epoch: u64, now: UnixTime) -> LoginKey {
    LoginKey {
        user_id: user.id,
        epoch,
        created_at: now,
        last_used_at: now,
    }
}

/// Revokes every key of the user but `keep`: the epoch rises and `keep` is recorded as kept
/// in the same write, so it never looks revoked; the store then moves `keep`'s own record to
/// the new epoch.
pub fn revoke_all(user: &mut User, keep: Option<&Digest>) {
    user.key_epoch += 1;
    user.kept_key = keep.copied();
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFE: KeyLifetime = KeyLifetime {
        absolute: 1_000,
        idle: 100,
    };

    #[test]
    fn a_session_from_before_a_revocation_is_revoked_even_if_it_was_kept_before() {
        let mut u = User::new(1, "u".into(), String::new(), 0);
        let mine = [1; 32];
        assert!(not_revoked(&u, &mine, 0));
        revoke_all(&mut u, Some(&mine)); // its own deactivation: kept
        assert!(not_revoked(&u, &mine, 0));
        revoke_all(&mut u, None); // then logout-all elsewhere
        assert!(!not_revoked(&u, &mine, 0));
        assert!(!not_revoked(&u, &mine, 1));
        assert!(not_revoked(&u, &[2; 32], 2));
    }

    #[test]
    fn a_key_dies_with_its_epoch_unless_kept_and_with_its_lifetimes() {
        let mut u = User::new(1, "u".into(), String::new(), 0);
        let key = new_key(&u, 0, 0);
        let (mine, other) = ([1; 32], [2; 32]);
        assert_eq!(
            check(&u, &mine, &key, LIFE, 0),
            KeyCheck::Valid { touch: false }
        );
        assert_eq!(
            check(&u, &mine, &key, LIFE, 60),
            KeyCheck::Valid { touch: true }
        );
        revoke_all(&mut u, Some(&mine));
        assert!(matches!(
            check(&u, &mine, &key, LIFE, 0),
            KeyCheck::Valid { .. }
        ));
        assert_eq!(check(&u, &other, &key, LIFE, 0), KeyCheck::Dead);
        revoke_all(&mut u, None);
        assert_eq!(check(&u, &mine, &key, LIFE, 0), KeyCheck::Dead);
        let fresh = new_key(&u, u.key_epoch, 0);
        assert_eq!(check(&u, &other, &fresh, LIFE, 100), KeyCheck::Dead); // idle
        let used = LoginKey {
            last_used_at: 990,
            ..fresh
        };
        assert_eq!(check(&u, &other, &used, LIFE, 1_000), KeyCheck::Dead); // absolute
        let foreign = LoginKey {
            user_id: 2,
            ..fresh
        };
        assert_eq!(check(&u, &other, &foreign, LIFE, 0), KeyCheck::Dead);
    }
}
