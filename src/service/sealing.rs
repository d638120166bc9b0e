//! TOTP secrets at rest: sealed with XChaCha20-Poly1305 under a master key that never enters the
//! sled files. The key comes from `TOTPD_MASTER_KEY` or from `master_key_file` (created with mode
//! 0600 on first start). Each sealed record names its key by id, and the associated data binds it
//! to its user, so a ciphertext copied to another user does not open. A keyring holds several keys
//! during a rotation; the last one seals.

use std::io::Write;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use data_encoding::{BASE64, HEXLOWER};

use crate::domain::secrets::{RngError, random_bytes};
use crate::domain::totp::Secret;
use crate::domain::user::{StoredSecret, UserId};
use crate::store::Store;

pub type KeyId = [u8; 8];

/// One 256-bit master key and its id (a BLAKE3-derived fingerprint, safe to print).
#[derive(Clone)]
pub struct MasterKey {
    id: KeyId,
    key: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", key_id_hex(&self.id))
    }
}

pub fn key_id_hex(id: &KeyId) -> String {
    HEXLOWER.encode(id)
}

impl MasterKey {
    pub fn generate() -> Result<Self, RngError> {
        Ok(Self::from_bytes(random_bytes::<32>()?))
    }

    pub fn from_bytes(key: [u8; 32]) -> Self {
        let derived = blake3::derive_key("totpd master key id v1", &key);
        let mut id = [0u8; 8];
        id.copy_from_slice(&derived[..8]);
        Self { id, key }
    }

    /// Base64 of the 32 bytes, as written in the key file and in `TOTPD_MASTER_KEY`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = BASE64
            .decode(text.trim().as_bytes())
            .map_err(|_| "a master key must be base64".to_owned())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a master key must be 32 bytes (44 base64 characters)".to_owned())?;
        Ok(Self::from_bytes(key))
    }

    pub fn to_text(&self) -> String {
        BASE64.encode(&self.key)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealError {
    /// Sealed under a key the keyring does not hold.
    UnknownKey(KeyId),
    /// The ciphertext, nonce or associated data do not match: tampered, or another user's.
    Unopenable,
    Rng,
}

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SealError::UnknownKey(id) => {
                write!(
                    f,
                    "sealed under master key {}, which is not configured",
                    key_id_hex(id)
                )
            }
            SealError::Unopenable => {
                f.write_str("a sealed secret does not open (tampered or moved)")
            }
            SealError::Rng => f.write_str("the random number generator failed"),
        }
    }
}

impl std::error::Error for SealError {}

/// The master keys in use; the last one seals, all of them open.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<MasterKey>,
}

/// Binds a sealed secret to its purpose and its user.
fn associated_data(user_id: UserId) -> Vec<u8> {
    let mut aad = b"totpd/totp-secret/v1/".to_vec();
    aad.extend_from_slice(&user_id.to_be_bytes());
    aad
}

impl Keyring {
    /// A keyring of at least one key; the last seals.
    pub fn new(keys: Vec<MasterKey>) -> Option<Self> {
        (!keys.is_empty()).then_some(Self { keys })
    }

    pub fn current(&self) -> &MasterKey {
        // `new` refuses an empty list.
        &self.keys[self.keys.len() - 1]
    }

    pub fn keys(&self) -> &[MasterKey] {
        &self.keys
    }

    pub fn seal(&self, user_id: UserId, secret: &Secret) -> Result<StoredSecret, SealError> {
        let key = self.current();
        let nonce = random_bytes::<24>().map_err(|_| SealError::Rng)?;
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.key));
        let aad = associated_data(user_id);
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Unopenable)?;
        Ok(StoredSecret::Sealed {
            key_id: key.id,
            nonce,
            ciphertext,
        })
    }

    pub fn open(&self, user_id: UserId, stored: &StoredSecret) -> Result<Secret, SealError> {
        match stored {
            StoredSecret::Plain(bytes) => Ok(Secret::from_bytes(bytes.clone())),
            StoredSecret::Sealed {
                key_id,
                nonce,
                ciphertext,
            } => {
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.id == *key_id)
                    .ok_or(SealError::UnknownKey(*key_id))?;
                let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.key));
                let aad = associated_data(user_id);
                cipher
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: ciphertext,
                            aad: &aad,
                        },
                    )
                    .map(Secret::from_bytes)
                    .map_err(|_| SealError::Unopenable)
            }
        }
    }

    /// Whether `stored` is already sealed under the current key.
    pub fn is_current(&self, stored: &StoredSecret) -> bool {
        stored.key_id() == Some(self.current().id)
    }
}

/// The pseudo-user the master-key check record is sealed for.
const CHECK_USER: UserId = UserId::MAX;
const CHECK_PLAINTEXT: &[u8] = b"totpd master key check v1";

/// Where the keyring comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Environment,
    File(std::path::PathBuf),
}

/// The keyring for this data dir: `master_key` (TOTPD_MASTER_KEY) if set, else the key file —
/// created, mode 0600, only when the store has never sealed anything. The store's check record
/// must open with it: a wrong or missing key stops the start instead of producing garbage codes.
/// `master_key` is the configured key text (`TOTPD_MASTER_KEY`), `path` the key file's place.
pub async fn establish(
    master_key: Option<&str>,
    path: &Path,
    store: &dyn Store,
) -> Result<(Keyring, KeySource), String> {
    let check = store.master_key_check().await.map_err(|e| e.to_string())?;
    let path = path.to_path_buf();
    let (ring, source) = if let Some(text) = master_key {
        let keys = text
            .split(',')
            .map(MasterKey::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("TOTPD_MASTER_KEY: {e}"))?;
        let ring = Keyring::new(keys).ok_or("TOTPD_MASTER_KEY holds no key")?;
        (ring, KeySource::Environment)
    } else if path.exists() {
        (read_key_file(&path)?, KeySource::File(path))
    } else if let Some(check) = &check {
        return Err(format!(
            "the master key is missing: this data dir's secrets are sealed under key {}, but {} \
             does not exist and TOTPD_MASTER_KEY is not set; restore the key file",
            check.key_id().map(|id| key_id_hex(&id)).unwrap_or_default(),
            path.display()
        ));
    } else {
        let key = MasterKey::generate().map_err(|e| e.to_string())?;
        write_key_file(&path, std::slice::from_ref(&key))
            .map_err(|e| format!("cannot create the master key file {}: {e}", path.display()))?;
        tracing::info!(key_id = %key_id_hex(&key.id()), path = %path.display(), "created a new master key");
        (
            Keyring::new(vec![key]).ok_or("no key")?,
            KeySource::File(path),
        )
    };
    match &check {
        Some(check) => match ring.open(CHECK_USER, check) {
            Ok(plain) if plain.as_bytes() == CHECK_PLAINTEXT => {}
            _ => {
                return Err(format!(
                    "the master key does not match this data dir: its secrets are sealed under \
                     key {}, the configured key is {}",
                    check.key_id().map(|id| key_id_hex(&id)).unwrap_or_default(),
                    key_id_hex(&ring.current().id())
                ));
            }
        },
        None => write_check(&ring, store).await?,
    }
    Ok((ring, source))
}

/// Records which key seals this data dir (done again after a rotation).
pub async fn write_check(ring: &Keyring, store: &dyn Store) -> Result<(), String> {
    let check = ring
        .seal(CHECK_USER, &Secret::from_bytes(CHECK_PLAINTEXT.to_vec()))
        .map_err(|e| e.to_string())?;
    store
        .set_master_key_check(&check)
        .await
        .map_err(|e| e.to_string())
}

/// Reads a key file: one base64 key per line (comments with `#`), the last one current.
pub fn read_key_file(path: &Path) -> Result<Keyring, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the master key file {}: {e}", path.display()))?;
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(MasterKey::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Keyring::new(keys).ok_or_else(|| format!("{}: holds no key", path.display()))
}

/// Writes `keys` to `path` with mode 0600, atomically (temp file, fsync, rename).
pub fn write_key_file(path: &Path, keys: &[MasterKey]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    writeln!(
        file,
        "# totpd master keys: keep secret, back up apart from the data. Last line seals."
    )?;
    for key in keys {
        writeln!(file, "{}", key.to_text())?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(vec![MasterKey::generate().expect("rng")]).expect("one key")
    }

    #[test]
    fn a_sealed_secret_opens_for_its_user_only() {
        let ring = ring();
        let secret = Secret::from_bytes(vec![7; 20]);
        let sealed = ring.seal(42, &secret).expect("sealed");
        assert_eq!(ring.open(42, &sealed), Ok(secret.clone()));
        assert_eq!(ring.open(43, &sealed), Err(SealError::Unopenable));
        let StoredSecret::Sealed { ciphertext, .. } = &sealed else {
            panic!("sealed")
        };
        assert!(!ciphertext.windows(20).any(|w| w == secret.as_bytes()));
    }

    #[test]
    fn a_tampered_ciphertext_does_not_open() {
        let ring = ring();
        let sealed = ring
            .seal(1, &Secret::from_bytes(vec![1; 20]))
            .expect("sealed");
        let StoredSecret::Sealed {
            key_id,
            nonce,
            mut ciphertext,
        } = sealed
        else {
            panic!("sealed")
        };
        ciphertext[0] ^= 1;
        let tampered = StoredSecret::Sealed {
            key_id,
            nonce,
            ciphertext,
        };
        assert_eq!(ring.open(1, &tampered), Err(SealError::Unopenable));
    }

    #[test]
    fn the_wrong_key_is_named_not_guessed_at() {
        let sealed = ring()
            .seal(1, &Secret::from_bytes(vec![1; 20]))
            .expect("sealed");
        let other = ring();
        assert!(matches!(
            other.open(1, &sealed),
            Err(SealError::UnknownKey(_))
        ));
    }

    #[test]
    fn a_keyring_opens_old_keys_and_seals_with_the_last() {
        let old = MasterKey::generate().expect("rng");
        let new = MasterKey::generate().expect("rng");
        let before = Keyring::new(vec![old.clone()]).expect("ring");
        let sealed_old = before
            .seal(5, &Secret::from_bytes(vec![9; 20]))
            .expect("sealed");
        let during = Keyring::new(vec![old, new.clone()]).expect("ring");
        assert!(during.open(5, &sealed_old).is_ok());
        assert!(!during.is_current(&sealed_old));
        let resealed = during
            .seal(5, &Secret::from_bytes(vec![9; 20]))
            .expect("sealed");
        assert_eq!(resealed.key_id(), Some(new.id()));
    }

    #[test]
    fn key_text_round_trips_and_bad_text_is_refused() {
        let key = MasterKey::generate().expect("rng");
        let parsed = MasterKey::parse(&key.to_text()).expect("valid");
        assert_eq!(parsed.id(), key.id());
        assert!(MasterKey::parse("not base64!").is_err());
        assert!(MasterKey::parse(&BASE64.encode(&[0u8; 16])).is_err());
        assert!(!format!("{key:?}").contains(&key.to_text()));
    }

    #[test]
    fn key_files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("master.key");
        let keys = vec![
            MasterKey::generate().expect("rng"),
            MasterKey::generate().expect("rng"),
        ];
        write_key_file(&path, &keys).expect("written");
        let ring = read_key_file(&path).expect("read");
        assert_eq!(ring.keys().len(), 2);
        assert_eq!(ring.current().id(), keys[1].id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
