//! The store conformance suite (`totpd::store::conformance`) against every backend: here sled,
//! on a fresh temporary data dir per test.

use std::sync::Arc;

use totpd::store::conformance::{TestStore, enrolled, new_user};
use totpd::store::{StoreConfig, open};

/// A sled store in `<dir>/data`, with a small cache.
fn sled_config(dir: &std::path::Path) -> StoreConfig {
    StoreConfig::Sled {
        data_dir: dir.join("data"),
        cache_capacity: 4 * 1024 * 1024,
    }
}

async fn sled_store() -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sled_config(dir.path());
    let store = open(&config).await.expect("the store opens");
    TestStore {
        store: Arc::clone(&store),
        keep: Box::new(dir),
    }
}

/// Imports a user without TOTP as a restore does: past the operations that keep the counts.
async fn import_user(
    store: &dyn totpd::store::Store,
    id: u64,
    name: &str,
) -> totpd::domain::user::User {
    let user = totpd::domain::user::User::new(id, name.into(), "$argon2id$hash".into(), 5);
    store
        .import(totpd::store::BackupRecord {
            kind: "users".into(),
            key: id.to_be_bytes().to_vec(),
            value: totpd::store::codec::encode(&user),
        })
        .await
        .expect("import");
    user
}

totpd::store_conformance_suite!(sled_store);

/// A restore takes effect only when its source confirms, after the last record, that all of
/// them were good (a backup file's checksum is at its end): without it, nothing is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_without_its_sources_confirmation_installs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sled_config(dir.path());
    let record = totpd::store::BackupRecord {
        kind: "meta".into(),
        key: b"next_user_id".to_vec(),
        value: 7u64.to_be_bytes().to_vec(),
    };
    for confirm in [false, true] {
        let (sink, records) = tokio::sync::mpsc::channel(4);
        let (verified, confirmation) = tokio::sync::oneshot::channel();
        sink.send(record.clone()).await.expect("send");
        drop(sink);
        if confirm {
            verified.send(()).expect("confirm");
        } else {
            drop(verified);
        }
        let restored = totpd::store::restore(&config, records, 1, confirmation).await;
        assert_eq!(restored.is_ok(), confirm, "{restored:?}");
        assert_eq!(totpd::store::exists(&dir.path().join("data")), confirm);
    }
}

/// A restore counts its users once, so the first start on the restored data needs no scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeps_the_counts_of_what_it_restored() {
    let source = sled_store().await;
    new_user(source.store.as_ref(), "alice").await;
    enrolled(source.store.as_ref(), "bob", 0).await;
    enrolled(source.store.as_ref(), "carol", 0).await;
    let (sink, mut exported) = tokio::sync::mpsc::channel(64);
    source.store.export(sink).await.expect("export");
    let mut records = Vec::new();
    while let Some(record) = exported.recv().await {
        records.push(record);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sled_config(dir.path());
    let (sink, receiver) = tokio::sync::mpsc::channel(64);
    let (verified, confirmation) = tokio::sync::oneshot::channel();
    let expected = records.len() as u64;
    for record in records {
        sink.send(record).await.expect("send");
    }
    drop(sink);
    verified.send(()).expect("confirm");
    totpd::store::restore(&config, receiver, expected, confirmation)
        .await
        .expect("restored");
    let store = open(&config).await.expect("the restored store opens");
    assert_eq!(store.stats().counts, Some((3, 2)));
}

/// A clean close keeps the user counts for the next open, which then needs no full scan of the
/// users; a store that was not closed (a crash), or one that imported users behind the
/// counts' back, has to count again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_kept_by_a_clean_close_serve_the_next_open_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sled_config(dir.path());
    let store = open(&config).await.expect("open");
    assert_eq!(
        store.stats().counts,
        Some((0, 0)),
        "a database created just now needs no count"
    );
    new_user(store.as_ref(), "alice").await;
    enrolled(store.as_ref(), "bob", 0).await;
    assert_eq!(store.stats().counts, Some((2, 1)));
    store.close().await.expect("close");
    drop(store);

    let store = open(&config).await.expect("reopen");
    assert_eq!(
        store.stats().counts,
        Some((2, 1)),
        "kept by the clean close"
    );
    enrolled(store.as_ref(), "carol", 0).await;
    assert_eq!(store.stats().counts, Some((3, 2)), "kept up to date");
    drop(store); // not closed: as after a crash

    let store = open(&config).await.expect("reopen after no close");
    assert_eq!(
        store.stats().counts,
        None,
        "an open takes the kept counts out: after a crash they would be stale"
    );
    store.recount().await.expect("count");
    assert_eq!(store.stats().counts, Some((3, 2)));
    store.close().await.expect("close");
    // A change after the close (a request that outlived shutdown's deadline) takes the kept
    // counts out again.
    new_user(store.as_ref(), "dave").await;
    drop(store);
    let store = open(&config).await.expect("reopen");
    assert_eq!(
        store.stats().counts,
        None,
        "no stale counts after a late change"
    );
    store.recount().await.expect("count");
    assert_eq!(store.stats().counts, Some((4, 2)));
    store.close().await.expect("close");
    drop(store);

    let store = open(&config).await.expect("reopen");
    assert_eq!(store.stats().counts, Some((4, 2)));
    import_user(store.as_ref(), 90, "erin").await;
    assert_eq!(store.stats().counts, None, "an import makes them unknown");
    store.close().await.expect("close");
    drop(store);
    let store = open(&config).await.expect("reopen");
    assert_eq!(store.stats().counts, None, "and none are kept");
    store.recount().await.expect("count");
    assert_eq!(store.stats().counts, Some((5, 2)));
}

/// A backup written by totpd 0.1 carries no id counter: importing its users moves the
/// counter past them, so a user created afterwards replaces no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_imported_without_a_counter_are_never_overwritten() {
    let TestStore { store, keep: _keep } = sled_store().await;
    let bob = import_user(store.as_ref(), 41, "bob").await;
    let carol = new_user(store.as_ref(), "carol").await;
    assert!(carol.id > bob.id, "{} after {}", carol.id, bob.id);
    assert_eq!(store.user(bob.id).await.expect("store"), Some(bob));
}

/// While an export holds writers back (a consistent backup), a writer waits without taking its
/// worker thread: on a one-worker runtime a read spawned after it is still answered, and the
/// writer goes on once the export is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn writers_waiting_behind_a_backup_leave_the_workers_to_readers() {
    let TestStore { store, keep: _keep } = sled_store().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let user = new_user(store.as_ref(), &format!("u{i}")).await;
        ids.push(user.id);
    }
    // The export fills its one-slot channel and then waits, holding the writers back.
    let (sink, mut records) = tokio::sync::mpsc::channel(1);
    let exporting = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.export(sink).await })
    };
    let first = records.recv().await.expect("the export started");
    let writer = {
        let store = Arc::clone(&store);
        let id = ids[0];
        tokio::spawn(async move {
            let mut change = |user: &mut totpd::domain::user::User| {
                user.last_login = Some(9);
                totpd::store::Writes::default()
            };
            store.update_user(id, &mut change).await.expect("store")
        })
    };
    tokio::task::yield_now().await;
    let (answered, answer) = std::sync::mpsc::channel();
    {
        let store = Arc::clone(&store);
        let id = ids[1];
        tokio::spawn(async move {
            let _ = answered.send(store.user(id).await.expect("store"));
        });
    }
    // Waited for on this thread, not on the runtime: a worker blocked by the writer would
    // stall the runtime's own timers too.
    let read = answer
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("a read is answered while a writer waits");
    assert!(read.is_some());
    let mut received = vec![first];
    while let Some(record) = records.recv().await {
        received.push(record);
    }
    let exported = exporting.await.expect("task").expect("export");
    assert_eq!(exported, received.len() as u64);
    // The snapshot was taken before the waiting write landed: no user in it has it.
    let users: Vec<totpd::domain::user::User> = received
        .iter()
        .filter(|r| r.kind == "users")
        .map(|r| totpd::store::codec::decode(&r.value).expect("a user record"))
        .collect();
    assert_eq!(users.len(), 4);
    assert!(users.iter().all(|u| u.last_login.is_none()));
    let written = writer.await.expect("task").expect("user");
    assert_eq!(written.last_login, Some(9));
}

/// Closing while a full count scans stops the count and waits for its thread: once `close`
/// returns, the data dir opens again at once (a restart in the same process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_during_a_count_leaves_the_data_dir_free() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sled_config(dir.path());
    let store = open(&config).await.expect("open");
    for id in 1..=20_000u64 {
        import_user(store.as_ref(), id, &format!("user-{id}")).await;
    }
    store.close().await.expect("close");
    drop(store);
    for round in 0..5 {
        let store = open(&config).await.expect("the data dir is free");
        let counting = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.recount().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(round)).await;
        store.close().await.expect("close");
        counting.await.expect("task").expect("count");
        drop(store);
        let store = open(&config)
            .await
            .expect("the data dir is free after close");
        // Stopped, or finished before the close: never a partial count.
        assert!(
            matches!(store.stats().counts, None | Some((20_000, 0))),
            "{:?}",
            store.stats().counts
        );
        store.close().await.expect("close");
    }
}

/// A sled store holding `keys` login keys of user 1, all long expired at `SWEEP_NOW`; the key
/// numbered n has the digest starting with n's big-endian bytes, so a sweep meets them in order.
async fn store_with_expired_keys(config: &StoreConfig, keys: u64) -> Arc<dyn totpd::store::Store> {
    use totpd::domain::user::LoginKey;
    use totpd::store::codec::encode;
    let store = open(config).await.expect("open");
    import_user(store.as_ref(), 1, "owner").await;
    for n in 0..keys {
        let key = LoginKey {
            user_id: 1,
            epoch: 0,
            created_at: 1_000,
            last_used_at: 1_000,
        };
        store
            .import(totpd::store::BackupRecord {
                kind: "keys".into(),
                key: key_digest(n).to_vec(),
                value: encode(&key),
            })
            .await
            .expect("import");
    }
    store
}

fn key_digest(n: u64) -> [u8; 32] {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&n.to_be_bytes());
    digest
}

/// Closes `store` while `sweeping` may still run, drops that task as the server does at
/// shutdown (not awaited to its end), and reopens the data dir at once: once close has
/// returned, nothing of the sweep may hold it.
async fn close_and_reopen<T>(
    store: Arc<dyn totpd::store::Store>,
    sweeping: tokio::task::JoinHandle<T>,
    config: &StoreConfig,
) -> Arc<dyn totpd::store::Store> {
    store.close().await.expect("close");
    sweeping.abort();
    let _ = sweeping.await;
    drop(store);
    open(config)
        .await
        .expect("the data dir is free once close returns")
}

const SWEEP_NOW: u64 = 10_000_000;
const SWEEP_LIFE: totpd::domain::keys::KeyLifetime = totpd::domain::keys::KeyLifetime {
    absolute: 86_400,
    idle: 86_400,
};

/// The sweep is paced (a pause every few hundred records, so a long scan never holds a core
/// for long) and stops when the store closes: close does not wait for a whole slow scan, and
/// the next sweep, after a reopen, removes what the stopped one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_a_sweep_and_the_next_sweep_finishes_it() {
    const KEYS: u64 = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sled_config(dir.path());
    let store = store_with_expired_keys(&config, KEYS).await;
    let (now, life) = (SWEEP_NOW, SWEEP_LIFE);
    let sweeping = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.sweep(now, life, 0).await }
    });
    // Close once the sweep is under way (it goes in key order: the first key goes first).
    let started = std::time::Instant::now();
    while store
        .user_by_key(&key_digest(0))
        .await
        .expect("store")
        .is_some()
    {
        assert!(started.elapsed().as_secs() < 30, "the sweep never started");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let store = close_and_reopen(store, sweeping, &config).await;
    // At one pause per 256 records a whole sweep of these keys takes at least 78 ms: the first
    // one stopped part way, and the next one removes the rest.
    let second = store.sweep(now, life, 0).await.expect("sweep");
    assert!(
        second > 0 && second < KEYS as usize,
        "the first sweep removed none or all: {second} left"
    );
    assert_eq!(store.sweep(now, life, 0).await.expect("sweep"), 0);
    store.close().await.expect("close");
}

/// A sweep asked for just as the store closes, its thread not yet started or just started:
/// once close has returned, the sweep holds nothing (the data dir opens again at once) and
/// changes nothing after close's final flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_racing_close_leaves_the_data_dir_free() {
    const KEYS: u64 = 5_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sled_config(dir.path());
    let store = store_with_expired_keys(&config, KEYS).await;
    store.close().await.expect("close");
    drop(store);
    for round in 0..5u64 {
        let store = open(&config).await.expect("the data dir is free");
        let sweeping = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.sweep(SWEEP_NOW, SWEEP_LIFE, 0).await }
        });
        tokio::time::sleep(std::time::Duration::from_micros(round * 300)).await;
        let store = close_and_reopen(store, sweeping, &config).await;
        store.close().await.expect("close");
    }
    let store = open(&config).await.expect("open");
    store.sweep(SWEEP_NOW, SWEEP_LIFE, 0).await.expect("sweep");
    assert!(
        store
            .user_by_key(&key_digest(KEYS - 1))
            .await
            .expect("store")
            .is_none()
    );
    store.close().await.expect("close");
}
