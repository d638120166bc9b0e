//! The byte encoding of stored records: one format-version byte, then postcard 1.x. postcard is
//! not self-describing, so a changed record gets a new version byte and the old decoder stays;
//! fields are never skipped conditionally.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The version byte written before every record.
pub const FORMAT_VERSION: u8 = 1;

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
    use crate::domain::audit::{AuditEvent, EventKind};
    use crate::domain::user::{
        ActiveTotp, FailureState, LoginKey, PendingLogin, StoredSecret, User,
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
