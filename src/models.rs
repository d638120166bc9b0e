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
    /// Bumped when outstanding temp tokens must die (TOTP deactivated, password changed).
    pub stamp: u64,
    /// Bumped to revoke every login key issued before (logout-all, password change).
    pub key_epoch: u64,
    pub totp: Option<ActiveTotp>,
    pub pending: Option<PendingTotp>,
    pub failures: FailureState,
    pub last_login: Option<UnixTime>,
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
    Plain(Vec<u8>),
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

/// The intermediate token between password and code; stored under the hash of its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TempToken {
    pub user_id: UserId,
    /// The user's `stamp` when it was issued.
    pub stamp: u64,
    pub expires_at: UnixTime,
    pub attempts_left: u32,
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
            stamp: 2,
            key_epoch: 1,
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
             64484e68624851246147467a614180e2cfaa06020101001401010101010101010101010101010101\
             01010101aad4821be4e2cfaa06090909090909090909090909090909090909090909090909090909\
             09090909090103030303030303030303030303030303030303030303030303030303030303030003\
             000101c8e3cfaa06"
        );
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
