//! `totpd store copy`: moves an installation between stores (sled to PostgreSQL and back)
//! through the backup records, which are the same bytes in both. The target must be empty;
//! the copy is all or nothing (the target's restore is); the counts of users, keys and audit
//! events are compared at the end. The master key is not a record: it stays where it is.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::{self, BackupRecord, DatabaseUrl, PostgresConfig, Store, StoreConfig};

/// Parses `sled:DIR` or `postgres:URL` (`postgres:postgres://user:pw@host/db`).
pub fn parse_location(text: &str, cache_capacity: u64) -> Result<StoreConfig, String> {
    if let Some(dir) = text.strip_prefix("sled:") {
        if dir.is_empty() {
            return Err("sled: needs a data dir, like sled:/var/lib/totpd".into());
        }
        return Ok(StoreConfig::Sled {
            data_dir: PathBuf::from(dir),
            cache_capacity,
        });
    }
    if let Some(url) = text.strip_prefix("postgres:") {
        url.parse::<tokio_postgres::Config>()
            .map_err(|e| format!("postgres: needs a URL like postgres://user:pw@host/db ({e})"))?;
        return Ok(StoreConfig::Postgres(PostgresConfig {
            url: DatabaseUrl::new(url),
            pool_size: 4,
            timeout: Duration::from_secs(10),
            ca_file: None,
        }));
    }
    Err("a store is sled:DIR or postgres:URL".into())
}

/// How many records of each kind `store` exports.
async fn census(store: &Arc<dyn Store>) -> Result<BTreeMap<String, u64>, String> {
    let (sink, mut records) = mpsc::channel::<BackupRecord>(1024);
    let exporting = {
        let store = Arc::clone(store);
        tokio::spawn(async move { store.export(sink).await })
    };
    let mut counts = BTreeMap::new();
    while let Some(record) = records.recv().await {
        *counts.entry(record.kind).or_insert(0) += 1;
    }
    exporting
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the source failed: {e}"))?;
    Ok(counts)
}

/// Copies every record of `from` into the empty store `to`; returns the lines to print.
pub async fn copy(from: &StoreConfig, to: &StoreConfig) -> Result<String, String> {
    if from == to {
        return Err("the source and the target are the same store".into());
    }
    if store::holds_data(to).await? {
        return Err(format!(
            "{} already holds data: the copy needs an empty target",
            to.describe()
        ));
    }
    let source = store::open(from).await.map_err(|e| match e {
        store::OpenError::Locked(_) => {
            format!("{e}: stop the server before copying its store")
        }
        other => other.to_string(),
    })?;
    // Two passes over the source: one to count, one to copy (the target's restore checks the
    // count, so a source that changed in between fails the copy instead of half-copying it).
    let before = census(&source).await?;
    let expected = before.values().sum();
    let (sink, records) = mpsc::channel::<BackupRecord>(1024);
    let (verified, confirmation) = tokio::sync::oneshot::channel();
    let exporting = {
        let source = Arc::clone(&source);
        tokio::spawn(async move {
            let exported = source.export(sink).await;
            if exported.is_ok() {
                let _ = verified.send(());
            }
            exported
        })
    };
    let restored = store::restore(to, records, expected, confirmation).await;
    exporting
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the source failed: {e}"))?;
    let restored = restored.map_err(|e| {
        format!("{e} (the source changed during the copy? stop every server first)")
    })?;
    let target = store::open(to).await.map_err(|e| e.to_string())?;
    let after = census(&target).await?;
    source.close().await.map_err(|e| e.to_string())?;
    target.close().await.map_err(|e| e.to_string())?;
    let mut out = format!(
        "copied {restored} records from {} to {}\n",
        from.describe(),
        to.describe()
    );
    for kind in ["users", "keys", "audit"] {
        let (a, b) = (
            before.get(kind).copied().unwrap_or(0),
            after.get(kind).copied().unwrap_or(0),
        );
        if a != b {
            return Err(format!(
                "verification failed: {a} {kind} in the source, {b} in the target"
            ));
        }
        out.push_str(&format!("  {kind}: {a} in both\n"));
    }
    out.push_str(
        "the master key is not copied: give the servers on the target the same key \
         (the master.key file or TOTPD_MASTER_KEY)\n",
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_parsed_and_checked() {
        assert_eq!(
            parse_location("sled:/srv/totpd", 1024),
            Ok(StoreConfig::Sled {
                data_dir: PathBuf::from("/srv/totpd"),
                cache_capacity: 1024
            })
        );
        let Ok(StoreConfig::Postgres(pg)) = parse_location("postgres:postgres://u:pw@h/db", 1)
        else {
            panic!("a postgres location")
        };
        assert_eq!(pg.url.expose(), "postgres://u:pw@h/db");
        assert!(parse_location("sled:", 1).is_err());
        assert!(parse_location("mysql://h/db", 1).is_err());
    }
}
