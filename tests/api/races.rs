//! Double-spends raced in parallel: exactly one request may win each one-time thing.

use std::collections::HashSet;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;
use tokio::task::JoinSet;

use crate::helpers::{TestApp, spawn_app};

const N: usize = 32;

/// Runs `N` verifies at once, each with its own (temp token, code) pair; returns the statuses
/// and the keys of the winners.
async fn race_verifies(
    app: &Arc<TestApp>,
    attempts: Vec<(String, String)>,
) -> (Vec<StatusCode>, Vec<String>) {
    let mut set = JoinSet::new();
    for (temp, code) in attempts {
        let app = Arc::clone(app);
        set.spawn(async move { app.verify(&temp, &code).await });
    }
    let mut statuses = Vec::new();
    let mut keys = Vec::new();
    while let Some(result) = set.join_next().await {
        let response = result.expect("task");
        assert!(!response.status.is_server_error(), "{}", response.body);
        if response.status == StatusCode::OK {
            keys.push(response.body["key"].as_str().expect("key").to_owned());
        }
        statuses.push(response.status);
    }
    (statuses, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_temp_token_raced_with_a_valid_code_wins_once() {
    let app = Arc::new(spawn_app().await);
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    // Different valid codes (steps -1, 0, +1) so the step rule alone cannot explain the result.
    let codes = [
        app.code(&user.totp, -1),
        app.code(&user.totp, 0),
        app.code(&user.totp, 1),
    ];
    let attempts = (0..N)
        .map(|i| (temp.clone(), codes[i % 3].clone()))
        .collect();
    let (statuses, keys) = race_verifies(&app, attempts).await;
    assert_eq!(keys.len(), 1, "{statuses:?}");
    for key in &keys {
        assert_eq!(
            app.get_auth("/api/v1/auth/totp/", key).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_code_raced_across_many_temp_tokens_wins_once() {
    let app = Arc::new(spawn_app().await);
    let user = app.enrolled_user("alice").await;
    let code = app.code(&user.totp, 0);
    let mut attempts = Vec::new();
    for _ in 0..N {
        attempts.push((app.temp_token("alice").await, code.clone()));
    }
    let (statuses, keys) = race_verifies(&app, attempts).await;
    assert_eq!(keys.len(), 1, "{statuses:?}");
    // The replays count as failures: ten of them lock the user, and the rest get 429.
    let rejected = statuses
        .iter()
        .filter(|s| **s == StatusCode::BAD_REQUEST)
        .count();
    let locked = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(rejected + locked, N - 1, "{statuses:?}");
    assert_eq!(rejected, 10, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_recovery_code_raced_across_many_temp_tokens_wins_once() {
    let app = Arc::new(spawn_app().await);
    let user = app.enrolled_user("alice").await;
    let code = user.recovery_codes[0].clone();
    let mut attempts = Vec::new();
    for _ in 0..N {
        attempts.push((app.temp_token("alice").await, code.clone()));
    }
    let (statuses, keys) = race_verifies(&app, attempts).await;
    assert_eq!(keys.len(), 1, "{statuses:?}");
    let status = app.get_auth("/api/v1/auth/totp/", &user.key).await;
    assert_eq!(status.body["recovery_codes_remaining"], json!(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_users_racing_at_once_each_win_once() {
    let app = Arc::new(spawn_app().await);
    let mut attempts = Vec::new();
    let mut users = Vec::new();
    for i in 0..8 {
        let user = app.enrolled_user(&format!("user{i}")).await;
        users.push(user);
    }
    for user in &users {
        let code = app.code(&user.totp, 0);
        for _ in 0..4 {
            attempts.push((app.temp_token(&user.username).await, code.clone()));
            attempts.push((
                app.temp_token(&user.username).await,
                user.recovery_codes[0].clone(),
            ));
        }
    }
    let (_, keys) = race_verifies(&app, attempts).await;
    // Per user: one win with the code, one with the recovery code.
    assert_eq!(keys.len(), 16);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_activations_succeed_once_and_only_the_winners_codes_work() {
    let app = Arc::new(spawn_app().await);
    let key = app.user_with_key("alice").await;
    let (_, totp) = app.setup(&key).await;
    let code = app.code(&totp, 0);
    let mut set = JoinSet::new();
    for _ in 0..N {
        let (app, key, code) = (Arc::clone(&app), key.clone(), code.clone());
        set.spawn(async move {
            app.post_auth(
                "/api/v1/auth/totp/activate/",
                &key,
                Some(&json!({"token": code})),
            )
            .await
        });
    }
    let mut winners = Vec::new();
    while let Some(result) = set.join_next().await {
        let response = result.expect("task");
        match response.status {
            StatusCode::OK => winners.push(response.body["recovery_codes"].clone()),
            StatusCode::BAD_REQUEST => {
                assert!(response.body.get("recovery_codes").is_none());
            }
            other => panic!("unexpected {other}: {}", response.body),
        }
    }
    assert_eq!(winners.len(), 1);
    let codes = winners[0].as_array().expect("codes");
    let temp = app.temp_token("alice").await;
    let response = app.verify(&temp, codes[0].as_str().expect("code")).await;
    assert_eq!(response.status, StatusCode::OK, "the winner's codes work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_wrong_codes_never_exceed_the_attempt_limit() {
    let app = Arc::new(spawn_app().await);
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    let valid: HashSet<String> = (-1..=1).map(|o| app.code(&user.totp, o)).collect();
    let wrong: Vec<String> = (0..)
        .map(|i: u32| format!("{:06}", i * 7919 % 1_000_000))
        .filter(|c| !valid.contains(c))
        .take(N)
        .collect();
    let attempts = wrong.into_iter().map(|c| (temp.clone(), c)).collect();
    let (statuses, _) = race_verifies(&app, attempts).await;
    let processed = statuses
        .iter()
        .filter(|s| **s == StatusCode::BAD_REQUEST)
        .count();
    assert!(
        processed <= 5,
        "{processed} wrong codes were checked against one temp token"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::UNAUTHORIZED)
            .count(),
        N - processed
    );
}
