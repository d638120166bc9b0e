//! Choosing and opening a backend: the only place that names them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::port::{BackupRecord, OpenError, Store};
use super::postgres::{self, PostgresConfig};
use super::sled;

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store in `data_dir`.
    Sled {
        data_dir: PathBuf,
        /// The page cache in bytes (sled's own default is 1 GiB, far too much for an edge box).
        cache_capacity: u64,
    },
    /// A PostgreSQL database, shared by any number of instances.
    Postgres(PostgresConfig),
}

impl StoreConfig {
    /// Whether this store allows one process only (the CLI then goes through the server).
    pub fn single_process(&self) -> bool {
        matches!(self, StoreConfig::Sled { .. })
    }

    /// Where the store is, for messages (no password).
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Sled { data_dir, .. } => format!("sled:{}", data_dir.display()),
            StoreConfig::Postgres(pg) => format!("postgres:{}", pg.url),
        }
    }
}

/// Opens (or creates) the store; a PostgreSQL store's schema is migrated first.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, OpenError> {
    match config {
        StoreConfig::Sled {
            data_dir,
            cache_capacity,
        } => {
            let (dir, cache) = (data_dir.clone(), *cache_capacity);
            let store = tokio::task::spawn_blocking(move || sled::SledStore::open(&dir, cache))
                .await
                .map_err(|e| OpenError::Io {
                    path: data_dir.clone(),
                    cause: e.to_string(),
                })??;
            Ok(Arc::new(store))
        }
        StoreConfig::Postgres(pg) => Ok(Arc::new(postgres::PostgresStore::open(pg).await?)),
    }
}

/// Restores `records` into a new store at `config`, all or nothing: sled builds the store
/// beside the data dir's database and moves it into place only when all `expected` records
/// arrived and the source confirmed them on `verified` (its checksum held to the end);
/// PostgreSQL imports them in one transaction into an empty database, committed likewise.
pub async fn restore(
    config: &StoreConfig,
    records: tokio::sync::mpsc::Receiver<BackupRecord>,
    expected: u64,
    verified: tokio::sync::oneshot::Receiver<()>,
) -> Result<u64, String> {
    match config {
        StoreConfig::Sled {
            data_dir,
            cache_capacity,
        } => sled::restore(data_dir, *cache_capacity, records, expected, verified).await,
        StoreConfig::Postgres(pg) => {
            let store = postgres::PostgresStore::open(pg)
                .await
                .map_err(|e| e.to_string())?;
            let restored = store.restore(records, expected, verified).await;
            let _ = store.close().await;
            restored
        }
    }
}

/// Whether the store at `config` already holds data (a restore or a copy needs it empty).
pub async fn holds_data(config: &StoreConfig) -> Result<bool, String> {
    match config {
        StoreConfig::Sled { data_dir, .. } => Ok(sled::exists(data_dir)),
        StoreConfig::Postgres(pg) => {
            let store = postgres::PostgresStore::open(pg)
                .await
                .map_err(|e| e.to_string())?;
            let empty = store.is_empty().await.map_err(|e| e.to_string());
            let _ = store.close().await;
            empty.map(|empty| !empty)
        }
    }
}

/// Whether `data_dir` already holds a sled database.
pub fn exists(data_dir: &Path) -> bool {
    sled::exists(data_dir)
}
