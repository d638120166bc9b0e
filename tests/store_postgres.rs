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

/// A change whose request goes away mid-transaction (its future dropped while it waits for
/// the user's row, as when a client disconnects) must not leave its pooled connection inside
/// the transaction: that connection would take the row lock when it came and keep it, and
/// every later change of the user, on any instance, would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_abandoned_mid_transaction_leaves_no_lock_behind() {
    use std::future::Future;
    use std::time::Duration;
    use totpd::domain::audit::{AuditEvent, EventKind};
    use totpd::store::Writes;

    let Some(url) = test_database_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    let abandoning = open(&schema.store_config(1)).await.expect("opens");
    let other = open(&schema.store_config(1)).await.expect("opens");
    let event = AuditEvent {
        time: 1_800_000_000,
        kind: EventKind::UserCreated,
        user_id: None,
        username: None,
        ip: None,
        outcome: "ok".into(),
    };
    let user = abandoning
        .create_user("alice", "$argon2id$hash", 1_800_000_000, event)
        .await
        .expect("store")
        .user()
        .expect("new");

    // Someone else holds the row, so the change waits inside its transaction.
    let (holder, connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM users WHERE id = {} FOR UPDATE",
            user.id
        ))
        .await
        .expect("lock");
    let mut change = |u: &mut totpd::domain::user::User| {
        u.last_login = Some(1);
        Writes::default()
    };
    let mut pending = Box::pin(abandoning.update_user(user.id, &mut change));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while tokio::time::Instant::now() < deadline {
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(pending.as_mut().poll(cx).is_ready()))
                .await;
        assert!(!polled, "the change cannot finish while the row is held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(pending);
    holder.batch_execute("COMMIT").await.expect("unlock");

    // Another instance changes the same user at once.
    let mut change = |u: &mut totpd::domain::user::User| {
        u.last_login = Some(2);
        Writes::default()
    };
    let changed = tokio::time::timeout(
        Duration::from_secs(10),
        other.update_user(user.id, &mut change),
    )
    .await
    .expect("the row is not left locked")
    .expect("store");
    assert_eq!(changed.and_then(|u| u.last_login), Some(2));
    // And the abandoning instance's pool still serves (a fresh connection).
    let read = abandoning
        .user(user.id)
        .await
        .expect("store")
        .expect("user");
    assert_eq!(
        read.last_login,
        Some(2),
        "the abandoned change wrote nothing"
    );
}
