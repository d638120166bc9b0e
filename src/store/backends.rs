//! Choosing and opening a backend: the only place that names one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::port::{BackupRecord, OpenError, Store};
use super::sled;

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// The page cache in bytes (sled's own default is 1 GiB, far too much for an edge box).
    pub cache_capacity: u64,
}

/// Opens (or creates) the store.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, OpenError> {
    Ok(Arc::new(sled::SledStore::open(
        &config.data_dir,
        config.cache_capacity,
    )?))
}

/// Restores `records` into a new store at `config`, all or nothing: the store is built beside
/// the data dir's database and moved into place only when all `expected` records arrived.
pub async fn restore(
    config: &StoreConfig,
    records: tokio::sync::mpsc::Receiver<BackupRecord>,
    expected: u64,
) -> Result<u64, String> {
    sled::restore(&config.data_dir, config.cache_capacity, records, expected).await
}

/// Whether `data_dir` already holds a database.
pub fn exists(data_dir: &Path) -> bool {
    sled::exists(data_dir)
}
