//! The store conformance suite (`totpd::store::conformance`) against PostgreSQL, each test in a
//! schema of its own in the database `TOTPD_TEST_DATABASE_URL` names (skipped, loudly, when it
//! is unset; failed when `CI` is set too). Also what only a shared database has: migrations.

mod common;

use std::sync::Arc;

use common::{TestSchema, test_database_url};
use totpd::store::conformance::TestStore;
use totpd::store::{OpenError, StoreConfig, open};

async fn postgres_store() -> TestStore {
    let url = test_database_url().expect("checked by the suite");
    let schema = TestSchema::create(&url).await;
    let store = open(&schema.store_config(8))
        .await
        .expect("the store opens");
    TestStore {
        store: Arc::clone(&store),
        keep: Box::new(schema),
    }
}

fn available() -> bool {
    test_database_url().is_some()
}

totpd::store_conformance_suite!(postgres_store, if available);

/// Instances starting together migrate once (the advisory lock), and a schema written by a
/// newer totpd is refused with a message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_run_once_and_a_newer_schema_is_refused() {
    let Some(url) = test_database_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    let config = schema.store_config(2);
    let opening: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { open(&config).await.map(|_| ()) })
        })
        .collect();
    for task in opening {
        task.await.expect("task").expect("every instance starts");
    }
    let (client, connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let rows = client
        .query("SELECT version FROM schema_version", &[])
        .await
        .expect("the version table");
    assert_eq!(rows.len(), totpd::store::postgres::MIGRATIONS.len());
    client
        .execute(
            "INSERT INTO schema_version (version, name) VALUES (999, '0999_future')",
            &[],
        )
        .await
        .expect("insert");
    let Err(refused) = open(&config).await else {
        panic!("a newer schema must be refused")
    };
    assert!(matches!(
        refused,
        OpenError::NewerDatabaseSchema { found: 999, .. }
    ));
    assert!(
        refused.to_string().contains("use a newer totpd"),
        "{refused}"
    );
}

/// A database that does not answer fails fast with a message that names no password.
#[tokio::test]
async fn an_unreachable_database_is_reported_without_its_password() {
    // Port 1 on loopback: nothing listens there.
    let config = StoreConfig::Postgres(totpd::store::PostgresConfig {
        url: totpd::store::DatabaseUrl::new("postgres://totpd:hunter2@127.0.0.1:1/totpd"),
        pool_size: 1,
        timeout: std::time::Duration::from_millis(500),
        ca_file: None,
    });
    let started = std::time::Instant::now();
    let Err(error) = open(&config).await else {
        panic!("nothing listens there")
    };
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let message = error.to_string();
    assert!(message.contains("cannot connect"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("totpd:***@127.0.0.1:1"), "{message}");
}
