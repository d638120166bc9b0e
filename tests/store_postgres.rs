//! The store conformance suite (`totpd::store::conformance`) against PostgreSQL, each test in a
//! schema of its own in the database `TOTPD_TEST_DATABASE_URL` names (skipped, loudly, when it
//! is unset; failed when `CI` is set too). Also what only a shared database has: migrations.

mod common;

use std::sync::Arc;

use common::{TestSchema, test_database_url};
use totpd::store::conformance::{TestStore, event, new_user, outcomes};
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

/// A session of its own that holds user `id`'s row (a transaction left open) until it sends
/// `COMMIT`.
async fn hold_row(schema: &TestSchema, id: u64) -> tokio_postgres::Client {
    let (holder, connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM users WHERE id = {id} FOR UPDATE"
        ))
        .await
        .expect("lock");
    holder
}

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

/// A change whose request goes away mid-way (its future dropped while its write waits for the
/// user's row, as when a client disconnects) must leave no lock behind: a pooled connection
/// left inside a transaction would take the row lock when it came and keep it, and every later
/// change of the user, on any instance, would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_abandoned_mid_way_leaves_no_lock_behind() {
    use std::future::Future;
    use std::time::Duration;
    use totpd::store::Writes;

    let Some(url) = test_database_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    let abandoning = open(&schema.store_config(1)).await.expect("opens");
    let other = open(&schema.store_config(1)).await.expect("opens");
    let user = new_user(abandoning.as_ref(), "alice").await;

    // Someone else holds the row, so the change's write waits for it.
    let holder = hold_row(&schema, user.id).await;
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

/// Concurrent changes of a few users through two instances at once (so through their group
/// commits, batches of many users each, which overlap): every change is written exactly once,
/// with its own key and event, and no batch fails (two batches locking the same users in
/// different orders would deadlock, and PostgreSQL would abort one of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_batches_of_two_instances_write_every_change_once() {
    use totpd::domain::audit::{AuditEvent, EventKind};
    use totpd::domain::keys;
    use totpd::domain::user::User;
    use totpd::store::Writes;

    let Some(url) = test_database_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    let instances = [
        open(&schema.store_config(8)).await.expect("opens"),
        open(&schema.store_config(8)).await.expect("opens"),
    ];
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(
            new_user(instances[0].as_ref(), &format!("user{i}"))
                .await
                .id,
        );
    }
    // A table of realistic size, so that the planner reaches users through the index, in
    // the order of each batch, rather than through one scan in the table's order.
    let (filler, connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    filler
        .batch_execute(&format!(
            "INSERT INTO users SELECT 1000000 + g, 'filler' || g, false, record \
             FROM users, generate_series(1, 20000) g WHERE id = {}; ANALYZE users",
            ids[0]
        ))
        .await
        .expect("filler users");
    const CHANGES: u32 = 600;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..CHANGES {
        let store = std::sync::Arc::clone(&instances[n as usize % 2]);
        // Users in a different order on each instance.
        let id = if n % 2 == 0 {
            ids[(n as usize / 2) % ids.len()]
        } else {
            ids[ids.len() - 1 - (n as usize / 2) % ids.len()]
        };
        tasks.spawn(async move {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&n.to_be_bytes());
            let mut change = |u: &mut User| {
                u.failures.consecutive += 1;
                Writes {
                    key: Some((digest, keys::new_key(u, u.key_epoch, 1_800_000_000))),
                    events: vec![AuditEvent {
                        user_id: Some(u.id),
                        outcome: n.to_string(),
                        ..event(EventKind::Verify)
                    }],
                    ..Writes::default()
                }
            };
            store
                .update_user(id, &mut change)
                .await
                .expect("no batch fails")
                .expect("the user");
            (n, id, digest)
        });
    }
    let mut per_user = std::collections::HashMap::<u64, u32>::new();
    while let Some(done) = tasks.join_next().await {
        let (n, id, digest) = done.expect("task");
        *per_user.entry(id).or_default() += 1;
        let (key, owner) = instances[1]
            .user_by_key(&digest)
            .await
            .expect("store")
            .unwrap_or_else(|| panic!("change {n}'s key was written"));
        assert_eq!(
            (key.user_id, owner.id),
            (id, id),
            "change {n}'s key is its user's"
        );
    }
    for id in &ids {
        let user = instances[0].user(*id).await.expect("store").expect("user");
        assert_eq!(
            user.failures.consecutive, per_user[id],
            "user {id}: every change applied once"
        );
    }
    let outcomes = outcomes(instances[0].as_ref(), EventKind::Verify).await;
    let distinct: std::collections::BTreeSet<&String> = outcomes.iter().collect();
    assert_eq!(
        (outcomes.len(), distinct.len()),
        (CHANGES as usize, CHANGES as usize),
        "one event per change, none for a change that lost its compare"
    );
}

/// A user's row held by a transaction that does not end (an operator's session, a stuck
/// client): a change of that user fails within the pool wait (the 503 of the API), instead of
/// hanging, and works again once the row is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_held_elsewhere_fails_the_change_quickly_instead_of_hanging() {
    use std::time::{Duration, Instant};
    use totpd::store::{StoreError, Writes};

    let Some(url) = test_database_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    // The pool wait of `store_config`: 2 s.
    let store = open(&schema.store_config(2)).await.expect("opens");
    let user = new_user(store.as_ref(), "alice").await;
    let holder = hold_row(&schema, user.id).await;
    let mut change = |u: &mut totpd::domain::user::User| {
        u.last_login = Some(1);
        Writes::default()
    };
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        store.update_user(user.id, &mut change),
    )
    .await
    .expect("no hang");
    let waited = started.elapsed();
    assert!(
        matches!(outcome, Err(StoreError::Backend(ref m)) if m.contains("lock")),
        "{outcome:?}"
    );
    assert!(waited < Duration::from_secs(4), "failed after {waited:?}");
    holder.batch_execute("COMMIT").await.expect("unlock");
    let mut change = |u: &mut totpd::domain::user::User| {
        u.last_login = Some(2);
        Writes::default()
    };
    let changed = store
        .update_user(user.id, &mut change)
        .await
        .expect("store");
    assert_eq!(changed.and_then(|u| u.last_login), Some(2));
}
