//! The records kept in sled and their byte encoding: one format-version byte, then postcard 1.x.
//! postcard is not self-describing, so a changed record gets a new version byte and the old
//! decoder stays; fields are never skipped conditionally.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;

/// The version byte written before every record.
pub const FORMAT_VERSION: u8 = 1;

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
}

/// A secret handed out by setup and not yet confirmed by activate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTotp {
    pub secret: StoredSecret,
    pub created_at: UnixTime,
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
    /// Whether the login key `digest`, issued at `epoch`, has not been revoked.
    pub fn key_valid(&self, digest: &Digest, epoch: u64) -> bool {
        epoch >= self.key_epoch
            || (self.kept_key.as_ref() == Some(digest) && epoch + 1 == self.key_epoch)
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

/// One entry of the audit trail. Never holds a code, key, token, password or secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub time: UnixTime,
    pub kind: EventKind,
    pub user_id: Option<UserId>,
    pub username: Option<String>,
    pub ip: Option<std::net::IpAddr>,
    /// `ok` or why not: `wrong_code`, `replay`, `locked`, …
    pub outcome: String,
}

/// What happened. Append new kinds at the end: the index is what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Login,
    TempTokenIssued,
    Verify,
    ReplayRefused,
    LockStarted,
    RecoveryCodeUsed,
    Setup,
    Activate,
    Deactivate,
    RecoveryCodesRegenerated,
    KeyRevoked,
    PasswordChanged,
    UserCreated,
    AdminAction,
}

impl EventKind {
    pub const ALL: [EventKind; 14] = [
        EventKind::Login,
        EventKind::TempTokenIssued,
        EventKind::Verify,
        EventKind::ReplayRefused,
        EventKind::LockStarted,
        EventKind::RecoveryCodeUsed,
        EventKind::Setup,
        EventKind::Activate,
        EventKind::Deactivate,
        EventKind::RecoveryCodesRegenerated,
        EventKind::KeyRevoked,
        EventKind::PasswordChanged,
        EventKind::UserCreated,
        EventKind::AdminAction,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Login => "login",
            EventKind::TempTokenIssued => "temp_token_issued",
            EventKind::Verify => "verify",
            EventKind::ReplayRefused => "replay_refused",
            EventKind::LockStarted => "lock_started",
            EventKind::RecoveryCodeUsed => "recovery_code_used",
            EventKind::Setup => "setup",
            EventKind::Activate => "activate",
            EventKind::Deactivate => "deactivate",
            EventKind::RecoveryCodesRegenerated => "recovery_codes_regenerated",
            EventKind::KeyRevoked => "key_revoked",
            EventKind::PasswordChanged => "password_changed",
            EventKind::UserCreated => "user_created",
            EventKind::AdminAction => "admin_action",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownVersion(u8),
    Malformed,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Empty => f.write_str("empty record"),
            DecodeError::UnknownVersion(v) => write!(f, "record format version {v} is unknown"),
            DecodeError::Malformed => f.write_str("malformed record"),
        }
    }
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    let mut bytes = vec![FORMAT_VERSION];
    // Serializing these plain structs into a Vec cannot fail.
    bytes.extend(postcard::to_allocvec(record).unwrap_or_default());
    bytes
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&FORMAT_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|_| DecodeError::Malformed)
        }
        Some((&other, _)) => Err(DecodeError::UnknownVersion(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_user() -> User {
        User {
            id: 7,
            username: "alice".into(),
            password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA".into(),
            created_at: 1_700_000_000,
            key_epoch: 1,
            kept_key: None,
            totp: Some(ActiveTotp {
                secret: StoredSecret::Plain(vec![1; 20]),
                last_step: 56_666_666,
                activated_at: 1_700_000_100,
                recovery_key: [9; 32],
                recovery_hashes: vec![[3; 32]],
            }),
            pending: None,
            failures: FailureState {
                consecutive: 3,
                locked_until: 0,
                locks: 1,
            },
            last_login: Some(1_700_000_200),
            temp_tokens: vec![PendingLogin {
                digest: [4; 32],
                expires_at: 1_700_000_500,
                attempts_left: 5,
            }],
        }
    }

    #[test]
    fn records_round_trip() {
        let user = sample_user();
        assert_eq!(decode::<User>(&encode(&user)), Ok(user));
        let key = LoginKey {
            user_id: 1,
            epoch: 0,
            created_at: 5,
            last_used_at: 6,
        };
        assert_eq!(decode::<LoginKey>(&encode(&key)), Ok(key));
    }

    /// The stored bytes are a contract with every data dir already written: this test fails on
    /// any change to the encoding of a version-1 record.
    #[test]
    fn version_1_user_bytes_are_stable() {
        let hex = data_encoding::HEXLOWER.encode(&encode(&sample_user()));
        assert_eq!(
            hex,
            "010705616c6963652d246172676f6e32696424763d3139246d3d382c743d312c703d312463324673\
             64484e68624851246147467a614180e2cfaa06010001001401010101010101010101010101010101\
             01010101aad4821be4e2cfaa06090909090909090909090909090909090909090909090909090909\
             09090909090103030303030303030303030303030303030303030303030303030303030303030003\
             000101c8e3cfaa060104040404040404040404040404040404040404040404040404040404040404\
             04f4e5cfaa0605"
        );
    }

    #[test]
    fn sealed_secrets_and_events_round_trip() {
        let sealed = StoredSecret::Sealed {
            key_id: [1; 8],
            nonce: [2; 24],
            ciphertext: vec![3; 36],
        };
        assert_eq!(decode::<StoredSecret>(&encode(&sealed)), Ok(sealed.clone()));
        assert_eq!(format!("{sealed:?}"), "StoredSecret(<redacted>)");
        for kind in EventKind::ALL {
            let event = AuditEvent {
                time: 5,
                kind,
                user_id: Some(1),
                username: Some("a".into()),
                ip: Some([127, 0, 0, 1].into()),
                outcome: "ok".into(),
            };
            assert_eq!(decode::<AuditEvent>(&encode(&event)), Ok(event));
        }
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused_not_panicked_on() {
        assert_eq!(decode::<User>(&[]), Err(DecodeError::Empty));
        assert_eq!(decode::<User>(&[2, 0]), Err(DecodeError::UnknownVersion(2)));
        assert_eq!(
            decode::<User>(&[1, 0xff, 0xff]),
            Err(DecodeError::Malformed)
        );
        // A forged huge length prefix must fail cleanly rather than allocate.
        let forged = [1, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(decode::<User>(&forged), Err(DecodeError::Malformed));
    }
}
