//! The backup file: every record of every tree, with a checksum, written while the server keeps
//! serving and restored into an empty data dir. The master key is not in it: back it up apart.
//!
//! Format: `TOTPD-BACKUP\n` and a version byte; records `1, name len (u16), name, key len
//! (u32), key, value len (u32), value`; a trailer `0, record count (u64), BLAKE3 of every byte
//! before the trailer`. Integers are big-endian.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::store::Store;

const MAGIC: &[u8] = b"TOTPD-BACKUP\n";
const VERSION: u8 = 1;

/// A writer that hashes what passes through.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a backup of `store` to `path` (mode 0600, via a temp file and a rename); returns the
/// number of records.
pub fn write(store: &Store, path: &Path) -> Result<u64, String> {
    let tmp = partial_path(path);
    remove_stale_partial(&tmp)?;
    // Created exclusively (O_CREAT|O_EXCL never follows a symlink and never reuses a file with
    // other permissions) and 0600 from the first byte: the backup holds every record.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&tmp).map_err(|e| {
        format!(
            "cannot create {}: {e} (something else created it meanwhile?)",
            tmp.display()
        )
    })?;
    let mut out = Hashing {
        inner: BufWriter::new(file),
        hasher: blake3::Hasher::new(),
    };
    let io = |e: std::io::Error| format!("cannot write {}: {e}", tmp.display());
    out.write_all(MAGIC).map_err(io)?;
    out.write_all(&[VERSION]).map_err(io)?;
    let count = store
        .for_each_record(|tree, key, value| {
            out.write_all(&[1])?;
            out.write_all(&(tree.len() as u16).to_be_bytes())?;
            out.write_all(tree.as_bytes())?;
            out.write_all(&(key.len() as u32).to_be_bytes())?;
            out.write_all(key)?;
            out.write_all(&(value.len() as u32).to_be_bytes())?;
            out.write_all(value)
        })
        .map_err(|e| e.to_string())?
        .map_err(io)?;
    let digest = out.hasher.finalize();
    let mut inner = out.inner;
    inner.write_all(&[0]).map_err(io)?;
    inner.write_all(&count.to_be_bytes()).map_err(io)?;
    inner.write_all(digest.as_bytes()).map_err(io)?;
    let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename to {}: {e}", path.display()))?;
    Ok(count)
}

/// `<file>.partial`, beside the backup so the final rename stays on one file system.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// A `.partial` left by a crashed backup is removed when it is a regular file of ours: it can
/// hold nothing but an unfinished backup of our own. Anything else there (a symlink, a
/// directory, another user's file) is not ours to touch: the backup stops and says so. (Even if
/// it is swapped after this check, `create_new` refuses it, and unlinking a planted symlink
/// would not touch its target.)
fn remove_stale_partial(tmp: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(tmp) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {}: {e}", tmp.display())),
    };
    #[cfg(unix)]
    let ours = {
        use std::os::unix::fs::MetadataExt;
        meta.uid() == rustix::process::geteuid().as_raw()
    };
    #[cfg(not(unix))]
    let ours = true;
    if !meta.file_type().is_file() || !ours {
        return Err(format!(
            "{} exists and is not a regular file of this user (a symlink or someone else's \
             file?): refusing to write through it; inspect and remove it, then run the backup again",
            tmp.display()
        ));
    }
    std::fs::remove_file(tmp).map_err(|e| format!("cannot remove the stale {}: {e}", tmp.display()))
}

/// One record as read back.
struct Record {
    tree: String,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// A reader that hashes what it reads.
struct Checked {
    input: BufReader<File>,
    hasher: blake3::Hasher,
}

impl Checked {
    fn bytes(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.input.read_exact(&mut buf).ok()?;
        self.hasher.update(&buf);
        Some(buf)
    }

    /// A length-prefixed field, the prefix `width` bytes wide.
    fn field(&mut self, width: usize) -> Option<Vec<u8>> {
        let len = self
            .bytes(width)?
            .iter()
            .fold(0usize, |n, b| (n << 8) | usize::from(*b));
        (len <= 64 * 1024 * 1024).then_some(())?;
        self.bytes(len)
    }
}

/// Reads the records of a backup, calling `each` for every one, and checks the trailer.
fn read(path: &Path, mut each: impl FnMut(Record) -> Result<(), String>) -> Result<u64, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut input = Checked {
        input: BufReader::new(file),
        hasher: blake3::Hasher::new(),
    };
    let bad = |what: &str| format!("{} is not a valid totpd backup ({what})", path.display());
    if input.bytes(MAGIC.len()).as_deref() != Some(MAGIC) {
        return Err(bad("wrong header"));
    }
    let version = input.bytes(1).ok_or_else(|| bad("truncated"))?[0];
    if version != VERSION {
        return Err(bad(&format!("version {version}")));
    }
    let mut count = 0u64;
    loop {
        let mut tag = [0u8; 1];
        input
            .input
            .read_exact(&mut tag)
            .map_err(|_| bad("truncated"))?;
        match tag[0] {
            0 => break,
            1 => {
                input.hasher.update(&tag);
            }
            _ => return Err(bad("unknown record tag")),
        }
        let tree = input.field(2).ok_or_else(|| bad("truncated record"))?;
        let tree = String::from_utf8(tree).map_err(|_| bad("tree name"))?;
        let key = input.field(4).ok_or_else(|| bad("truncated record"))?;
        let value = input.field(4).ok_or_else(|| bad("truncated record"))?;
        each(Record { tree, key, value })?;
        count += 1;
    }
    let mut trailer = [0u8; 40];
    input
        .input
        .read_exact(&mut trailer)
        .map_err(|_| bad("truncated trailer"))?;
    let declared = u64::from_be_bytes(trailer[..8].try_into().map_err(|_| bad("trailer"))?);
    if declared != count || input.hasher.finalize().as_bytes() != &trailer[8..] {
        return Err(bad("checksum mismatch"));
    }
    Ok(count)
}

/// Restores `path` into `data_dir`, which must hold no database yet. The file is checked in
/// full before anything is written.
pub fn restore(path: &Path, data_dir: &Path, cache_capacity: u64) -> Result<u64, String> {
    read(path, |_| Ok(()))?;
    if data_dir.join("db").exists() {
        return Err(format!(
            "{} already holds a database: restore needs an empty data dir",
            data_dir.display()
        ));
    }
    let store = Store::open(data_dir, cache_capacity).map_err(|e| e.to_string())?;
    let count = read(path, |record| {
        match store.restore_record(&record.tree, &record.key, &record.value) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "the backup names an unknown tree {:?}",
                record.tree
            )),
            Err(e) => Err(e.to_string()),
        }
    })?;
    store.flush_now().map_err(|e| e.to_string())?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_restores_every_record_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("a"), 1 << 20).expect("open");
        for i in 0..50 {
            store
                .create_user(&format!("user{i}"), "$argon2id$dummy", 1)
                .expect("store")
                .expect("new");
        }
        let file = dir.path().join("backup.bin");
        let written = write(&store, &file).expect("backup");
        assert!(written >= 100);
        let restored = restore(&file, &dir.path().join("b"), 1 << 20).expect("restore");
        assert_eq!(restored, written);
        let copy = Store::open(&dir.path().join("b"), 1 << 20).expect("open copy");
        copy.recount().expect("count");
        assert_eq!(copy.counts(), Some((50, 0)));
        assert!(copy.user_by_name("user49").expect("read").is_some());

        // Into a data dir that already has a database: refused.
        let again = restore(&file, &dir.path().join("b"), 1 << 20);
        assert!(again.err().is_some_and(|e| e.contains("empty data dir")));

        // One flipped byte: refused before anything is written.
        let mut bytes = std::fs::read(&file).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&file, &bytes).expect("write");
        let damaged = restore(&file, &dir.path().join("c"), 1 << 20);
        assert!(damaged.is_err());
        assert!(!dir.path().join("c").join("db").exists());
    }
}
