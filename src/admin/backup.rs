//! The backup file: a consistent snapshot of every record (users, keys, audit events, and the
//! store's own `meta` records: the master-key check and the next user id), with a checksum,
//! written while the server keeps serving and restored, all or nothing, into an empty store (a sled data dir or a PostgreSQL database: the
//! records are the same bytes in both).
//! The master key is not in it: back it up apart.
//!
//! Format: `TOTPD-BACKUP\n` and a version byte; records `1, kind len (u16), kind, key len
//! (u32), key, value len (u32), value`; a trailer `0, record count (u64), BLAKE3 of every byte
//! before the trailer`. Integers are big-endian. Files written by totpd 0.1 (which also carry
//! the `usernames` and `temp_tokens` indexes, and an unnamed `meta` kind) restore too.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::service::Service;
use crate::store::{self, BackupRecord, StoreConfig};

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

/// Writes a backup to `path` (mode 0600, via a temp file and a rename) from the service's
/// snapshot; returns the number of records.
pub async fn write(service: &Service, path: &Path) -> Result<u64, String> {
    let (sink, records) = mpsc::channel::<BackupRecord>(1024);
    let target = path.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_file(&target, records));
    let exported = service.export(sink).await;
    let written = writer.await.map_err(|e| e.to_string())??;
    let exported = exported.map_err(|e| format!("backup failed: {}", e.code()))?;
    if written != exported {
        return Err(format!(
            "backup incomplete: {written} of {exported} records written"
        ));
    }
    Ok(written)
}

fn write_file(path: &Path, mut records: mpsc::Receiver<BackupRecord>) -> Result<u64, String> {
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
    let mut count = 0u64;
    while let Some(record) = records.blocking_recv() {
        out.write_all(&[1]).map_err(io)?;
        out.write_all(&(record.kind.len() as u16).to_be_bytes())
            .map_err(io)?;
        out.write_all(record.kind.as_bytes()).map_err(io)?;
        out.write_all(&(record.key.len() as u32).to_be_bytes())
            .map_err(io)?;
        out.write_all(&record.key).map_err(io)?;
        out.write_all(&(record.value.len() as u32).to_be_bytes())
            .map_err(io)?;
        out.write_all(&record.value).map_err(io)?;
        count += 1;
    }
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

/// Restores `path` into the (empty) store of `config`. The file is checked in full before
/// anything is written, and the store is moved into place only once complete.
pub async fn restore(path: &Path, config: &StoreConfig) -> Result<u64, String> {
    let file = path.to_path_buf();
    let expected = tokio::task::spawn_blocking(move || read(&file, |_| Ok(())))
        .await
        .map_err(|e| e.to_string())??;
    if store::holds_data(config).await? {
        return Err(format!(
            "{} already holds a database: restore needs an empty store",
            config.describe()
        ));
    }
    let (sink, records) = mpsc::channel::<BackupRecord>(1024);
    let (verified, confirmation) = tokio::sync::oneshot::channel();
    let file = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let read = read(&file, |record| {
            sink.blocking_send(BackupRecord {
                kind: record.tree,
                key: record.key,
                value: record.value,
            })
            .map_err(|_| "the restore stopped".to_owned())
        })?;
        // Only a file whose trailer checked out again lets the restore take effect.
        let _ = verified.send(());
        Ok::<_, String>(read)
    });
    let restored = store::restore(config, records, expected, confirmation).await;
    let read = reader.await.map_err(|e| e.to_string())??;
    let restored = restored?;
    if read != restored {
        return Err(format!("restore incomplete: {restored} of {read} records"));
    }
    Ok(restored)
}
