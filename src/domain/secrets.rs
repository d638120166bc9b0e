//! Random values handed to clients and the hashes they are stored as. Keys and temp tokens are
//! stored only as BLAKE3 digests and looked up by digest; recovery codes only as BLAKE3 hashes
//! keyed per user. All randomness comes from the operating system's CSPRNG.

use data_encoding::{BASE64URL_NOPAD, Encoding, HEXLOWER, Specification};
use rand::TryRngCore;
use rand::rngs::OsRng;

use crate::domain::user::Digest;

/// How many recovery codes activation hands out.
pub const RECOVERY_CODE_COUNT: usize = 10;
/// 10 bytes = 80 bits per recovery code, shown as 16 Crockford base32 characters.
const RECOVERY_CODE_BYTES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngError;

impl std::fmt::Display for RngError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the operating system's random number generator failed")
    }
}

impl std::error::Error for RngError {}

pub fn random_bytes<const N: usize>() -> Result<[u8; N], RngError> {
    let mut bytes = [0u8; N];
    OsRng.try_fill_bytes(&mut bytes).map_err(|_| RngError)?;
    Ok(bytes)
}

/// The digest a key or temp token is stored and looked up under.
pub fn token_digest(token: &str) -> Digest {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// A login key: 32 random bytes (256 bits) as 64 lower-case hex characters.
pub fn new_login_key() -> Result<(String, Digest), RngError> {
    let key = HEXLOWER.encode(&random_bytes::<32>()?);
    let digest = token_digest(&key);
    Ok((key, digest))
}

/// A temp token: 32 random bytes as 43 base64url characters.
pub fn new_temp_token() -> Result<(String, Digest), RngError> {
    let token = BASE64URL_NOPAD.encode(&random_bytes::<32>()?);
    let digest = token_digest(&token);
    Ok((token, digest))
}

/// Crockford's base32 in lower case: no i, l, o or u, so codes read aloud or copied by hand
/// survive. Decoding ignores case, dashes and spaces and reads i/l as 1 and o as 0.
fn recovery_alphabet() -> Encoding {
    let mut spec = Specification::new();
    spec.symbols.push_str("0123456789abcdefghjkmnpqrstvwxyz");
    spec.translate.from.push_str("ABCDEFGHJKMNPQRSTVWXYZIiLlOo");
    spec.translate.to.push_str("abcdefghjkmnpqrstvwxyz111100");
    spec.ignore.push_str("- ");
    spec.encoding().expect("a valid base32 specification")
}

/// A recovery code as typed, reduced to its 10 bytes; `None` if it cannot be one.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryCode([u8; RECOVERY_CODE_BYTES]);

impl RecoveryCode {
    pub fn parse(input: &str) -> Option<Self> {
        if input.len() > 64 {
            return None;
        }
        let bytes = recovery_alphabet().decode(input.as_bytes()).ok()?;
        bytes.try_into().ok().map(Self)
    }

    /// The keyed hash stored for this code (the key is per user).
    pub fn digest(&self, user_key: &Digest) -> Digest {
        *blake3::keyed_hash(user_key, &self.0).as_bytes()
    }

    /// `xxxx-xxxx-xxxx-xxxx`
    fn display(&self) -> String {
        let plain = recovery_alphabet().encode(&self.0);
        let groups: Vec<&str> = plain
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        groups.join("-")
    }
}

impl std::fmt::Debug for RecoveryCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryCode(<redacted>)")
    }
}

/// A fresh set of recovery codes: the texts to show once, and the hashes to store.
pub struct RecoveryCodes {
    pub key: Digest,
    pub shown: Vec<String>,
    pub hashes: Vec<Digest>,
}

pub fn new_recovery_codes() -> Result<RecoveryCodes, RngError> {
    let key = random_bytes::<32>()?;
    let mut shown = Vec::with_capacity(RECOVERY_CODE_COUNT);
    let mut hashes = Vec::with_capacity(RECOVERY_CODE_COUNT);
    while shown.len() < RECOVERY_CODE_COUNT {
        let code = RecoveryCode(random_bytes::<RECOVERY_CODE_BYTES>()?);
        let hash = code.digest(&key);
        if !hashes.contains(&hash) {
            shown.push(code.display());
            hashes.push(hash);
        }
    }
    Ok(RecoveryCodes { key, shown, hashes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn keys_and_temp_tokens_are_long_unique_and_hash_to_their_digest() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let (key, digest) = new_login_key().expect("rng");
            assert_eq!(key.len(), 64);
            assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(digest, token_digest(&key));
            assert!(seen.insert(key));
            let (temp, digest) = new_temp_token().expect("rng");
            assert_eq!(temp.len(), 43);
            assert_eq!(digest, token_digest(&temp));
            assert!(seen.insert(temp));
        }
    }

    #[test]
    fn recovery_codes_are_ten_distinct_grouped_codes_of_80_bits() {
        let codes = new_recovery_codes().expect("rng");
        assert_eq!(codes.shown.len(), 10);
        assert_eq!(codes.hashes.len(), 10);
        let distinct: HashSet<_> = codes.shown.iter().collect();
        assert_eq!(distinct.len(), 10);
        for (shown, hash) in codes.shown.iter().zip(&codes.hashes) {
            assert_eq!(shown.len(), 19, "{shown}");
            assert_eq!(shown.matches('-').count(), 3);
            let parsed = RecoveryCode::parse(shown).expect("parses back");
            assert_eq!(&parsed.digest(&codes.key), hash);
        }
    }

    #[test]
    fn recovery_code_input_ignores_case_dashes_and_spaces() {
        let codes = new_recovery_codes().expect("rng");
        let shown = &codes.shown[0];
        let want = RecoveryCode::parse(shown).expect("valid");
        let variants = [
            shown.to_uppercase(),
            shown.replace('-', ""),
            shown.replace('-', " "),
            format!(" {} ", shown.replace('-', "")),
        ];
        for v in variants {
            assert_eq!(RecoveryCode::parse(&v), Some(want.clone()), "{v}");
        }
        assert!(RecoveryCode::parse("123456").is_none());
        assert!(RecoveryCode::parse("uuuu-uuuu-uuuu-uuuu").is_none());
        assert!(RecoveryCode::parse(&"a".repeat(100_000)).is_none());
    }

    #[test]
    fn the_same_code_hashes_differently_for_different_users() {
        let code = RecoveryCode([7; RECOVERY_CODE_BYTES]);
        assert_ne!(code.digest(&[1; 32]), code.digest(&[2; 32]));
    }
}
