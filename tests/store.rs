//! The store conformance suite (`totpd::store::conformance`) against every backend: here sled,
//! on a fresh temporary data dir per test.

use std::sync::Arc;

use totpd::store::conformance::TestStore;
use totpd::store::{StoreConfig, open};

async fn sled_store() -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig::Sled {
        data_dir: dir.path().join("data"),
        cache_capacity: 4 * 1024 * 1024,
    };
    let store = open(&config).await.expect("the store opens");
    TestStore {
        store: Arc::clone(&store),
        keep: Box::new(dir),
    }
}

totpd::store_conformance_suite!(sled_store);

/// A restore takes effect only when its source confirms, after the last record, that all of
/// them were good (a backup file's checksum is at its end): without it, nothing is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_without_its_sources_confirmation_installs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig::Sled {
        data_dir: dir.path().join("data"),
        cache_capacity: 4 * 1024 * 1024,
    };
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

/// A backup written by totpd 0.1 carries no id counter: importing its users moves the
/// counter past them, so a user created afterwards replaces no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_imported_without_a_counter_are_never_overwritten() {
    use totpd::domain::audit::{AuditEvent, EventKind};
    use totpd::domain::user::User;
    use totpd::store::codec::encode;
    let TestStore { store, keep: _keep } = sled_store().await;
    let bob = User::new(41, "bob".into(), "$argon2id$hash".into(), 5);
    let record = totpd::store::BackupRecord {
        kind: "users".into(),
        key: bob.id.to_be_bytes().to_vec(),
        value: encode(&bob),
    };
    store.import(record).await.expect("import");
    let event = AuditEvent {
        time: 6,
        kind: EventKind::UserCreated,
        user_id: None,
        username: None,
        ip: None,
        outcome: "ok".into(),
    };
    let carol = store
        .create_user("carol", "$argon2id$other", 6, event)
        .await
        .expect("store")
        .user()
        .expect("a new name");
    assert!(carol.id > bob.id, "{} after {}", carol.id, bob.id);
    assert_eq!(store.user(bob.id).await.expect("store"), Some(bob));
}
