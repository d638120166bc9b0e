//! A user's record: the account state every rule of `domain` reads and changes. A store keeps
//! it whole and changes it only through the pure functions of the sibling modules. The field
//! order is the stored encoding's (see `store::codec`): a change of these structs is a new
//! record format version there, with a frozen copy of the old structs to read the old one.

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;

pub type UserId = u64;

/// A BLAKE3 digest: how keys, temp tokens and recovery codes are stored and looked up.
pub type Digest = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub username: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    pub created_at: UnixTime,
    /// A login key is valid while its epoch is at least this: raising it revokes every key
    /// issued before (logout-all, password change, deactivation).
    pub key_epoch: u64,
    /// The key that survived the last raise of `key_epoch` (the caller of a deactivation or a
    /// password change): valid at the epoch before. Recorded in the same write as the raise,
    /// so the kept key never looks revoked, even before its own record is moved to the epoch.
    pub kept_key: Option<Digest>,
    pub totp: Option<ActiveTotp>,
    pub pending: Option<PendingTotp>,
    pub failures: FailureState,
    pub last_login: Option<UnixTime>,
    /// Temp tokens handed out by the password step and not yet used up. They live in the user's
    /// record so that one compare-and-swap of it consumes a token, advances the time step and
    /// counts a failure together (sled's multi-tree transactions cost ten times a CAS).
    pub temp_tokens: Vec<PendingLogin>,
}

/// An activated authenticator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveTotp {
    pub secret: StoredSecret,
    /// The last time step accepted; a code for this step or an earlier one is a replay.
    pub last_step: u64,
    pub activated_at: UnixTime,
    /// This user's key for the keyed BLAKE3 hashes of the recovery codes.
    pub recovery_key: Digest,
    /// Hashes of the recovery codes not used yet.
    pub recovery_hashes: Vec<Digest>,
    /// Steps after `last_step` that are spent all the same: the steps of codes refused as clock
    /// drift ahead of now (see `second_factor`). Short: pruned once time has passed them.
    pub burned_steps: Vec<u64>,
}

/// A secret handed out by setup and not yet confirmed by activate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTotp {
    pub secret: StoredSecret,
    pub created_at: UnixTime,
    /// As in [`ActiveTotp`]: steps of this secret spent by codes refused at activation as clock
    /// drift; activation carries them over.
    pub burned_steps: Vec<u64>,
}

/// How a TOTP secret is kept.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredSecret {
    /// Unsealed: written only by totpd 0.1 before sealing existed; `rotate-key` seals these.
    Plain(Vec<u8>),
    /// XChaCha20-Poly1305 under the master key `key_id`, with the user id as associated data.
    Sealed {
        key_id: [u8; 8],
        nonce: [u8; 24],
        ciphertext: Vec<u8>,
    },
}

impl StoredSecret {
    /// The master key this secret is sealed under, if it is sealed.
    pub fn key_id(&self) -> Option<[u8; 8]> {
        match self {
            StoredSecret::Plain(_) => None,
            StoredSecret::Sealed { key_id, .. } => Some(*key_id),
        }
    }
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredSecret(<redacted>)")
    }
}

/// Consecutive failed code checks of a user and the lock they led to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureState {
    pub consecutive: u32,
    pub locked_until: UnixTime,
    pub locks: u32,
}

/// A temp token between the password and the code, kept in its user's record by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLogin {
    pub digest: Digest,
    pub expires_at: UnixTime,
    pub attempts_left: u32,
}

impl User {
    /// A new account: no TOTP, no keys, no failures.
    pub fn new(id: UserId, username: String, password_hash: String, now: UnixTime) -> Self {
        Self {
            id,
            username,
            password_hash,
            created_at: now,
            key_epoch: 0,
            kept_key: None,
            totp: None,
            pending: None,
            failures: FailureState::default(),
            last_login: None,
            temp_tokens: Vec::new(),
        }
    }

    /// Recovery codes not used yet (0 without TOTP).
    pub fn recovery_codes_remaining(&self) -> usize {
        self.totp.as_ref().map_or(0, |t| t.recovery_hashes.len())
    }
}

impl PendingLogin {
    pub fn is_live(&self, now: UnixTime) -> bool {
        now < self.expires_at && self.attempts_left > 0
    }
}

/// A login key (`Authorization: Token …`); stored under the hash of its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginKey {
    pub user_id: UserId,
    /// The user's `key_epoch` when it was issued.
    pub epoch: u64,
    pub created_at: UnixTime,
    pub last_used_at: UnixTime,
}
