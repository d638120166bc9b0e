//! The conformance suite: what every [`Store`] backend must do, as test functions over the
//! trait. A backend runs all of them with one line in a test file:
//!
//! ```ignore
//! totpd::store_conformance_suite!(|| async { /* a fresh, empty store */ });
//! ```
//!
//! The functions panic on a failure, like the tests they are. They use the domain's own
//! functions for every change, as the service does.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use super::port::{BackupRecord, Created, Store, UserChange, Writes};
use crate::domain::audit::{AuditEvent, EventKind};
use crate::domain::keys::{self, KeyCheck, KeyLifetime};
use crate::domain::lockout::LockPolicy;
use crate::domain::login::{self, CodeStepRefusal};
use crate::domain::second_factor::Proof;
use crate::domain::secrets::RecoveryCode;
use crate::domain::user::{ActiveTotp, Digest, PendingLogin, StoredSecret, User, UserId};

/// A fresh, empty store for one test, and what must live as long as it (a temp dir, say).
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub keep: Box<dyn std::any::Any + Send + Sync>,
}

/// Runs every conformance test against the stores `$make` (an async closure) returns. With
/// `if $available`, a test whose backend is not at hand (`$available()` false) returns at once:
/// the function should say so loudly, or panic where skipping is not allowed (CI).
#[macro_export]
macro_rules! store_conformance_suite {
    ($make:expr) => {
        $crate::store_conformance_suite!($make, if || true);
    };
    ($make:expr, if $available:expr) => {
        $crate::store_conformance_suite!(@each $make, $available;
            users_get_fresh_ids_and_names_stay_unique,
            concurrent_changes_of_one_user_are_all_applied,
            a_change_writes_its_key_temp_token_and_events_with_it,
            a_temp_token_has_one_winner,
            a_time_step_has_one_winner,
            a_recovery_code_has_one_winner,
            keys_are_found_revoked_and_carried_over,
            the_sweep_deletes_what_expired_and_nothing_else,
            a_backup_restores_into_an_empty_store);
    };
    (@each $make:expr, $available:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                if !($available)() {
                    return;
                }
                $crate::store::conformance::$name($make).await;
            }
        )*
    };
}

const NOW: u64 = 1_800_000_000;
const POLICY: LockPolicy = LockPolicy {
    threshold: 1_000,
    base_seconds: 900,
    max_seconds: 86_400,
    hard_limit: 10_000,
};

/// An audit event of `kind` at the suite's clock, for tests that write one.
pub fn event(kind: EventKind) -> AuditEvent {
    AuditEvent {
        time: NOW,
        kind,
        user_id: None,
        username: None,
        ip: None,
        outcome: "ok".into(),
    }
}

/// The outcomes of the stored audit events of `kind`, oldest first.
pub async fn outcomes(store: &dyn Store, kind: EventKind) -> Vec<String> {
    store
        .events(0)
        .await
        .expect("store")
        .into_iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.outcome)
        .collect()
}

/// A new user `name` (password hash `$argon2id$hash`), created through the store.
pub async fn new_user(store: &dyn Store, name: &str) -> User {
    store
        .create_user(name, "$argon2id$hash", NOW, event(EventKind::UserCreated))
        .await
        .expect("store")
        .user()
        .expect("a new name")
}

/// Applies `change` (which must not fail) through the store.
async fn apply(store: &dyn Store, id: UserId, mut change: impl FnMut(&mut User) -> Writes + Send) {
    let change: &mut UserChange<'_> = &mut change;
    store
        .update_user(id, change)
        .await
        .expect("store")
        .expect("the user exists");
}

/// The user the temp token `digest` is indexed to, found as the code step of a login finds it
/// (a change that changes nothing).
async fn user_by_temp_token(store: &dyn Store, digest: &Digest) -> Option<User> {
    let mut nothing = |_: &mut User| Writes::default();
    store
        .update_user_by_temp_token(digest, &mut nothing)
        .await
        .expect("store")
}

fn recovery(text: &str) -> RecoveryCode {
    RecoveryCode::parse(text).expect("a recovery code")
}

/// An enrolled user whose last step is 0, with one recovery code, and `tokens` temp tokens
/// (digests `[i; 32]`, five attempts each) indexed.
pub async fn enrolled(store: &dyn Store, name: &str, tokens: u8) -> User {
    let user = new_user(store, name).await;
    let code = recovery("aaaa-bbbb-cccc-dddd");
    apply(store, user.id, |u| {
        u.totp = Some(ActiveTotp {
            secret: StoredSecret::Plain(vec![7; 20]),
            last_step: 0,
            activated_at: NOW,
            recovery_key: [3; 32],
            recovery_hashes: vec![code.digest(&[3; 32])],
            burned_steps: Vec::new(),
        });
        Writes::default()
    })
    .await;
    for i in 1..=tokens {
        let token = PendingLogin {
            digest: [i; 32],
            expires_at: NOW + 300,
            attempts_left: 5,
        };
        apply(store, user.id, |u| {
            login::pass_password(u, "$argon2id$hash", None, token.clone(), NOW).expect("same hash");
            Writes {
                temp_token: Some((token.digest, token.expires_at)),
                ..Writes::default()
            }
        })
        .await;
    }
    store.user(user.id).await.expect("store").expect("user")
}

/// Sends `proofs[i]` with temp token `tokens[i]`, all at once; how many logged in.
async fn race_logins(store: Arc<dyn Store>, id: UserId, attempts: Vec<(Digest, Proof)>) -> usize {
    let secret = StoredSecret::Plain(vec![7; 20]);
    let mut tasks = tokio::task::JoinSet::new();
    for (temp, proof) in attempts {
        let (store, secret) = (Arc::clone(&store), secret.clone());
        tasks.spawn(async move {
            let mut outcome = None;
            let mut change = |u: &mut User| {
                outcome = Some(login::pass_code(u, &temp, &proof, &secret, &POLICY, NOW));
                Writes::default()
            };
            // As the code step of a login does: found and changed by the temp token.
            let found = store
                .update_user_by_temp_token(&temp, &mut change)
                .await
                .expect("store");
            assert_eq!(found.map(|u| u.id), Some(id), "the token's user");
            outcome.expect("ran")
        });
    }
    let mut winners = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome.expect("task") {
            Ok(_) => winners += 1,
            Err(CodeStepRefusal::Refused(_) | CodeStepRefusal::InvalidTempToken) => {}
        }
    }
    winners
}

pub async fn users_get_fresh_ids_and_names_stay_unique<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let alice = new_user(store.as_ref(), "alice").await;
    let bob = new_user(store.as_ref(), "bob").await;
    assert_ne!(alice.id, bob.id);
    let again = store
        .create_user("alice", "x", NOW, event(EventKind::UserCreated))
        .await
        .expect("store");
    assert_eq!(again, Created::NameTaken, "a taken name is refused");
    assert_eq!(
        store.user_by_name("alice").await.expect("store"),
        Some(alice.clone())
    );
    let removed = store.remove_user(bob.id, Vec::new()).await.expect("store");
    assert_eq!(removed.map(|u| u.id), Some(bob.id));
    assert_eq!(store.user(bob.id).await.expect("store"), None);
    let carol = new_user(store.as_ref(), "carol").await;
    assert!(
        carol.id != bob.id && carol.id != alice.id,
        "an id is never given twice"
    );
    let listed: Vec<String> = store
        .users(None, 10)
        .await
        .expect("store")
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(listed, ["alice", "carol"]);
    let after_alice = store.users(Some(alice.id), 10).await.expect("store");
    assert_eq!(after_alice.len(), 1);
    let events = store.events(0).await.expect("store");
    let names: BTreeSet<_> = events.iter().filter_map(|e| e.username.clone()).collect();
    assert_eq!(
        names,
        ["alice", "bob", "carol"].map(String::from).into(),
        "the creation event names its user"
    );
}

pub async fn concurrent_changes_of_one_user_are_all_applied<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let user = new_user(store.as_ref(), "alice").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let mut change = |u: &mut User| {
                u.failures.record_failure(&POLICY, NOW);
                Writes::default()
            };
            store
                .update_user(user.id, &mut change)
                .await
                .expect("store");
        });
    }
    while tasks.join_next().await.is_some() {}
    let user = store.user(user.id).await.expect("store").expect("user");
    assert_eq!(user.failures.consecutive, 64, "no change was lost");
}

pub async fn a_change_writes_its_key_temp_token_and_events_with_it<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let user = new_user(store.as_ref(), "alice").await;
    let outcome = |text: &str| AuditEvent {
        user_id: Some(user.id),
        outcome: text.into(),
        ..event(EventKind::Verify)
    };
    apply(store.as_ref(), user.id, |u| {
        u.last_login = Some(NOW);
        Writes {
            key: Some(([5; 32], keys::new_key(u, u.key_epoch, NOW))),
            temp_token: Some(([6; 32], NOW + 300)),
            events: vec![outcome("first"), outcome("second")],
        }
    })
    .await;
    let (key, owner) = store
        .user_by_key(&[5; 32])
        .await
        .expect("store")
        .expect("the key was written");
    assert_eq!((key.user_id, owner.id), (user.id, user.id));
    assert_eq!(owner.last_login, Some(NOW), "with the user's change");
    let indexed = user_by_temp_token(store.as_ref(), &[6; 32]).await;
    assert_eq!(
        indexed.map(|u| u.id),
        Some(user.id),
        "the temp token indexed"
    );
    // Events only, the user unchanged: still written.
    apply(store.as_ref(), user.id, |_| Writes {
        events: vec![outcome("third")],
        ..Writes::default()
    })
    .await;
    let written = outcomes(store.as_ref(), EventKind::Verify).await;
    assert_eq!(written, ["first", "second", "third"], "in order");
}

pub async fn a_temp_token_has_one_winner<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let user = enrolled(store.as_ref(), "alice", 1).await;
    assert_eq!(
        user_by_temp_token(store.as_ref(), &[1; 32])
            .await
            .map(|u| u.id),
        Some(user.id)
    );
    let mut ran = false;
    let mut change = |_: &mut User| {
        ran = true;
        Writes::default()
    };
    let unknown = store.update_user_by_temp_token(&[9; 32], &mut change).await;
    assert_eq!(
        unknown.expect("store"),
        None,
        "an unknown token finds no one"
    );
    assert!(!ran, "and changes nothing");
    let attempts = (0..16).map(|i| ([1; 32], Proof::Step(100 + i))).collect();
    assert_eq!(race_logins(Arc::clone(&store), user.id, attempts).await, 1);
    let after = store.user(user.id).await.expect("store").expect("user");
    assert!(
        after.temp_tokens.is_empty(),
        "the winner consumed the token"
    );
    let step = after.totp.map(|t| t.last_step);
    assert!(
        matches!(step, Some(100..=115)),
        "the winner's step: {step:?}"
    );
}

pub async fn a_time_step_has_one_winner<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let user = enrolled(store.as_ref(), "alice", 16).await;
    let attempts = (1..=16).map(|i| ([i; 32], Proof::Step(500))).collect();
    assert_eq!(race_logins(Arc::clone(&store), user.id, attempts).await, 1);
    let user = store.user(user.id).await.expect("store").expect("user");
    assert_eq!(user.totp.map(|t| t.last_step), Some(500));
    assert_eq!(user.failures.consecutive, 15, "every replay was counted");
}

pub async fn a_recovery_code_has_one_winner<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let user = enrolled(store.as_ref(), "alice", 16).await;
    let code = recovery("aaaa-bbbb-cccc-dddd");
    let attempts = (1..=16)
        .map(|i| ([i; 32], Proof::Recovery(code.clone())))
        .collect();
    assert_eq!(race_logins(Arc::clone(&store), user.id, attempts).await, 1);
    let user = store.user(user.id).await.expect("store").expect("user");
    assert_eq!(user.recovery_codes_remaining(), 0);
}

pub async fn keys_are_found_revoked_and_carried_over<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let user = new_user(store.as_ref(), "alice").await;
    let (kept, other) = ([1u8; 32], [2u8; 32]);
    for digest in [kept, other] {
        apply(store.as_ref(), user.id, |u| {
            let step = login::pass_password(u, "$argon2id$hash", None, token(0), NOW);
            let Ok(login::PasswordStep::Key { epoch }) = step else {
                panic!("no TOTP: a key")
            };
            Writes {
                key: Some((digest, keys::new_key(u, epoch, NOW))),
                ..Writes::default()
            }
        })
        .await;
    }
    let life = KeyLifetime {
        absolute: 3600,
        idle: 3600,
    };
    let check = |found: Option<(crate::domain::user::LoginKey, User)>, digest: &Digest| {
        found.map(|(key, user)| keys::check(&user, digest, &key, life, NOW))
    };
    let found = store.user_by_key(&other).await.expect("store");
    assert_eq!(check(found, &other), Some(KeyCheck::Valid { touch: false }));
    // Everything but `kept` is revoked in one change; `kept` stays valid and moves epoch.
    apply(store.as_ref(), user.id, |u| {
        keys::revoke_all(u, Some(&kept));
        Writes::default()
    })
    .await;
    let found = store.user_by_key(&other).await.expect("store");
    assert_eq!(check(found, &other), Some(KeyCheck::Dead));
    let (key, now_user) = store
        .user_by_key(&kept)
        .await
        .expect("store")
        .expect("kept");
    assert_eq!(
        key.epoch, now_user.key_epoch,
        "the kept key moved to the new epoch"
    );
    assert!(matches!(
        keys::check(&now_user, &kept, &key, life, NOW),
        KeyCheck::Valid { .. }
    ));
    // A second raise no longer keeps it through `kept_key`, but its own epoch does not lag.
    assert!(store.revoke_key(&kept, Vec::new()).await.expect("store"));
    assert_eq!(store.user_by_key(&kept).await.expect("store"), None);
    assert!(!store.revoke_key(&kept, Vec::new()).await.expect("store"));
}

fn token(i: u8) -> PendingLogin {
    PendingLogin {
        digest: [i; 32],
        expires_at: NOW + 300,
        attempts_left: 5,
    }
}

pub async fn the_sweep_deletes_what_expired_and_nothing_else<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let user = enrolled(store.as_ref(), "alice", 1).await;
    let digest = [9u8; 32];
    apply(store.as_ref(), user.id, |u| Writes {
        key: Some((digest, keys::new_key(u, u.key_epoch, NOW))),
        ..Writes::default()
    })
    .await;
    let mut old = event(EventKind::Login);
    old.time = NOW - 10 * 86_400;
    store.record_events(vec![old]).await.expect("store");
    let life = KeyLifetime {
        absolute: 86_400,
        idle: 86_400,
    };
    // Nothing is due yet but the old event.
    let removed = store.sweep(NOW, life, NOW - 86_400).await.expect("store");
    assert_eq!(removed, 1);
    assert!(user_by_temp_token(store.as_ref(), &[1; 32]).await.is_some());
    assert!(store.user_by_key(&digest).await.expect("store").is_some());
    assert!(
        store
            .events(0)
            .await
            .expect("store")
            .iter()
            .all(|e| e.time >= NOW)
    );
    // A day later: the temp token's index entry and the key are gone, the recent events kept.
    let later = NOW + 86_400;
    let removed = store.sweep(later, life, NOW - 86_400).await.expect("store");
    assert_eq!(removed, 2);
    assert_eq!(user_by_temp_token(store.as_ref(), &[1; 32]).await, None);
    assert_eq!(store.user_by_key(&digest).await.expect("store"), None);
    assert!(!store.events(0).await.expect("store").is_empty());
}

pub async fn a_backup_restores_into_an_empty_store<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = TestStore>,
{
    let TestStore { store, keep: _keep } = make().await;
    let alice = enrolled(store.as_ref(), "alice", 2).await;
    let bob = new_user(store.as_ref(), "bob").await;
    let digest = [5u8; 32];
    apply(store.as_ref(), bob.id, |u| Writes {
        key: Some((digest, keys::new_key(u, 0, NOW))),
        ..Writes::default()
    })
    .await;
    let check = StoredSecret::Plain(b"check".to_vec());
    store.set_master_key_check(&check).await.expect("store");
    let removed = new_user(store.as_ref(), "zed").await;
    store
        .remove_user(removed.id, Vec::new())
        .await
        .expect("store");

    let (sink, mut records) = tokio::sync::mpsc::channel::<BackupRecord>(16);
    let exporting = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.export(sink).await })
    };
    let mut exported = Vec::new();
    while let Some(record) = records.recv().await {
        exported.push(record);
    }
    let count = exporting.await.expect("task").expect("store");
    assert_eq!(count, exported.len() as u64);

    let TestStore {
        store: copy,
        keep: _keep_copy,
    } = make().await;
    for record in exported {
        copy.import(record).await.expect("import");
    }
    for user in [&alice, &bob] {
        assert_eq!(
            copy.user_by_name(&user.username)
                .await
                .expect("store")
                .as_ref(),
            Some(user),
            "{} came back whole",
            user.username
        );
    }
    assert!(user_by_temp_token(copy.as_ref(), &[1; 32]).await.is_some());
    assert!(copy.user_by_key(&digest).await.expect("store").is_some());
    assert_eq!(copy.master_key_check().await.expect("store"), Some(check));
    assert_eq!(
        copy.events(0).await.expect("store").len(),
        store.events(0).await.expect("store").len()
    );
    // The next user gets an id no user ever had: not alice's, bob's or the removed one's.
    let carol = new_user(copy.as_ref(), "carol").await;
    assert!(carol.id > removed.id, "{} after {}", carol.id, removed.id);
    assert_eq!(
        copy.user_by_name("bob").await.expect("store").as_ref(),
        Some(&bob),
        "creating a user replaced no one"
    );
}
