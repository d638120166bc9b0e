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
