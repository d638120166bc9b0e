//! The byte encoding of stored records: one format-version byte, then postcard 1.x. postcard is
//! not self-describing, so a changed record gets a new version byte and the old decoder stays;
//! fields are never skipped conditionally.
//!
//! Each record type has its own version ([`Record::VERSION`]). Users are at version 2: the
//! active and the pending secret gained `burned_steps` (the clock-drift hint's spent steps).
//! A version-1 user is read through a frozen copy of the old structs (`v1`), with no burned
//! steps, and written as version 2 at its next change. Everything else is at version 1.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::audit::AuditEvent;
use crate::domain::user::{LoginKey, StoredSecret, User};

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

/// A type stored with this encoding.
pub trait Record: Serialize + DeserializeOwned {
    /// The version byte written before every record of this type.
    const VERSION: u8;

    /// Reads `body`, written under an earlier `version` of this type.
    fn decode_earlier(version: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let _ = body;
        Err(DecodeError::UnknownVersion(version))
    }
}

impl Record for User {
    const VERSION: u8 = 2;

    fn decode_earlier(version: u8, body: &[u8]) -> Result<Self, DecodeError> {
        match version {
            1 => postcard::from_bytes::<v1::User>(body)
                .map(User::from)
                .map_err(|_| DecodeError::Malformed),
            other => Err(DecodeError::UnknownVersion(other)),
        }
    }
}

impl Record for LoginKey {
    const VERSION: u8 = 1;
}

impl Record for AuditEvent {
    const VERSION: u8 = 1;
}

impl Record for StoredSecret {
    const VERSION: u8 = 1;
}

pub fn encode<T: Record>(record: &T) -> Vec<u8> {
    let mut bytes = vec![T::VERSION];
    // Serializing these plain structs into a Vec cannot fail.
    bytes.extend(postcard::to_allocvec(record).unwrap_or_default());
    bytes
}

pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&version, rest)) if version == T::VERSION => {
            postcard::from_bytes(rest).map_err(|_| DecodeError::Malformed)
        }
        Some((&version, rest)) => T::decode_earlier(version, rest),
    }
}

/// Version 1 of the user record, frozen: these structs must never change, or data dirs written
/// before version 2 stop opening. The types they share with version 2 (`StoredSecret`,
/// `FailureState`, `PendingLogin`) are the same in both; whoever changes one of those makes a
/// version 3 and freezes its version-2 form here too.
mod v1 {
    use serde::{Deserialize, Serialize};

    use crate::clock::UnixTime;
    use crate::domain::user::{self, Digest, FailureState, PendingLogin, StoredSecret, UserId};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct User {
        pub id: UserId,
        pub username: String,
        pub password_hash: String,
        pub created_at: UnixTime,
        pub key_epoch: u64,
        pub kept_key: Option<Digest>,
        pub totp: Option<ActiveTotp>,
        pub pending: Option<PendingTotp>,
        pub failures: FailureState,
        pub last_login: Option<UnixTime>,
        pub temp_tokens: Vec<PendingLogin>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ActiveTotp {
        pub secret: StoredSecret,
        pub last_step: u64,
        pub activated_at: UnixTime,
        pub recovery_key: Digest,
        pub recovery_hashes: Vec<Digest>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PendingTotp {
        pub secret: StoredSecret,
        pub created_at: UnixTime,
    }

    /// A version-1 user has burned no step.
    impl From<User> for user::User {
        fn from(old: User) -> Self {
            Self {
                id: old.id,
                username: old.username,
                password_hash: old.password_hash,
                created_at: old.created_at,
                key_epoch: old.key_epoch,
                kept_key: old.kept_key,
                totp: old.totp.map(|t| user::ActiveTotp {
                    secret: t.secret,
                    last_step: t.last_step,
                    activated_at: t.activated_at,
                    recovery_key: t.recovery_key,
                    recovery_hashes: t.recovery_hashes,
                    burned_steps: Vec::new(),
                }),
                pending: old.pending.map(|p| user::PendingTotp {
                    secret: p.secret,
                    created_at: p.created_at,
                    burned_steps: Vec::new(),
                }),
                failures: old.failures,
                last_login: old.last_login,
                temp_tokens: old.temp_tokens,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::audit::{AuditEvent, EventKind};
    use crate::domain::user::{
        ActiveTotp, FailureState, LoginKey, PendingLogin, PendingTotp, StoredSecret, User,
    };

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
                burned_steps: Vec::new(),
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

    /// `sample_user` as totpd wrote it before version 2.
    const SAMPLE_USER_V1: &str = "\
        010705616c6963652d246172676f6e32696424763d3139246d3d382c743d312c703d312463324673\
        64484e68624851246147467a614180e2cfaa06010001001401010101010101010101010101010101\
        01010101aad4821be4e2cfaa06090909090909090909090909090909090909090909090909090909\
        09090909090103030303030303030303030303030303030303030303030303030303030303030003\
        000101c8e3cfaa060104040404040404040404040404040404040404040404040404040404040404\
        04f4e5cfaa0605";

    fn unhex(hex: &str) -> Vec<u8> {
        data_encoding::HEXLOWER.decode(hex.as_bytes()).expect("hex")
    }

    /// The stored bytes are a contract with every data dir already written: a version-1 user
    /// record (written by every totpd before version 2) must keep reading as the same user,
    /// with no burned steps, and the frozen version-1 structs must still be that format.
    #[test]
    fn version_1_user_bytes_are_stable() {
        let bytes = unhex(SAMPLE_USER_V1);
        assert_eq!(decode::<User>(&bytes), Ok(sample_user()));
        let frozen: v1::User = postcard::from_bytes(&bytes[1..]).expect("version 1");
        let mut again = vec![1];
        again.extend(postcard::to_allocvec(&frozen).expect("encodes"));
        assert_eq!(again, bytes);
        // Its next write is version 2, which reads back the same.
        let rewritten = encode(&decode::<User>(&bytes).expect("decodes"));
        assert_eq!(rewritten[0], 2);
        assert_eq!(decode::<User>(&rewritten), Ok(sample_user()));
    }

    /// Version 2, the same contract: this test fails on any change to the encoding of a user.
    #[test]
    fn version_2_user_bytes_are_stable() {
        let mut user = sample_user();
        if let Some(totp) = user.totp.as_mut() {
            totp.burned_steps = vec![56_666_668, 56_666_670];
        }
        user.pending = Some(PendingTotp {
            secret: StoredSecret::Plain(vec![2; 20]),
            created_at: 1_700_000_300,
            burned_steps: vec![56_666_675],
        });
        let hex = data_encoding::HEXLOWER.encode(&encode(&user));
        assert_eq!(
            hex,
            "020705616c6963652d246172676f6e32696424763d3139246d3d382c743d312c703d312463324673\
             64484e68624851246147467a614180e2cfaa06010001001401010101010101010101010101010101\
             01010101aad4821be4e2cfaa06090909090909090909090909090909090909090909090909090909\
             090909090901030303030303030303030303030303030303030303030303030303030303030302ac\
             d4821baed4821b0100140202020202020202020202020202020202020202ace4cfaa0601b3d4821b\
             03000101c8e3cfaa0601040404040404040404040404040404040404040404040404040404040404\
             0404f4e5cfaa0605"
        );
        assert_eq!(decode::<User>(&unhex(&hex)), Ok(user));
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
        assert_eq!(decode::<User>(&[3, 0]), Err(DecodeError::UnknownVersion(3)));
        assert_eq!(decode::<User>(&[0, 0]), Err(DecodeError::UnknownVersion(0)));
        assert_eq!(
            decode::<LoginKey>(&[2, 0]),
            Err(DecodeError::UnknownVersion(2))
        );
        for version in [1, 2] {
            assert_eq!(
                decode::<User>(&[version, 0xff, 0xff]),
                Err(DecodeError::Malformed)
            );
        }
        // A forged huge length prefix must fail cleanly rather than allocate.
        for version in [1, 2] {
            let forged = [
                version, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ];
            assert_eq!(decode::<User>(&forged), Err(DecodeError::Malformed));
        }
    }
}
