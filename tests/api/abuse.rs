//! The abuse-resistance rules, each played as an attacker would try it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::helpers::{assert_error, raw_request, spawn_app, spawn_app_with, start, test_config};

const VERIFY: &str = "/api/v1/auth/totp/verify/";
const STATUS: &str = "/api/v1/auth/totp/";

fn retry_after(response: &crate::helpers::Response) -> u64 {
    response.headers["retry-after"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds")
}

/// Spends `n` wrong codes on fresh temp tokens (5 per token at most).
async fn fail_codes(
    app: &crate::helpers::TestApp,
    user: &crate::helpers::Enrolled,
    n: usize,
) -> Vec<StatusCode> {
    let mut statuses = Vec::new();
    let mut temp = app.temp_token(&user.username).await;
    for i in 0..n {
        if i % 5 == 0 {
            temp = app.temp_token(&user.username).await;
        }
        statuses.push(
            app.verify(&temp, &app.wrong_code(&user.totp, i as u32))
                .await
                .status,
        );
    }
    statuses
}

// ---- per-user lockout ----

#[tokio::test]
async fn ten_failures_across_temp_tokens_lock_the_user_even_for_the_right_code() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let statuses = fail_codes(&app, &user, 10).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::BAD_REQUEST),
        "{statuses:?}"
    );
    let temp = app.temp_token("alice").await;
    let right = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_error(&right, StatusCode::TOO_MANY_REQUESTS, "locked");
    assert_eq!(retry_after(&right), 900);
    // A wrong code gets the very same answer: the lock reveals nothing.
    let wrong = app.verify(&temp, &app.wrong_code(&user.totp, 99)).await;
    assert_eq!(wrong.body, right.body);
    // After 15 minutes the right code works, and resets the count.
    app.clock.advance(900);
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, 0)).await.status,
        StatusCode::OK
    );
    app.clock.advance(30);
    let statuses = fail_codes(&app, &user, 9).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::BAD_REQUEST));
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, 0)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn each_further_lock_doubles_up_to_a_day() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    for expected in [
        900, 1800, 3600, 7200, 14_400, 28_800, 57_600, 86_400, 86_400,
    ] {
        fail_codes(&app, &user, 10).await;
        let temp = app.temp_token("alice").await;
        let locked = app.verify(&temp, &app.code(&user.totp, 0)).await;
        assert_error(&locked, StatusCode::TOO_MANY_REQUESTS, "locked");
        assert_eq!(retry_after(&locked), expected);
        app.clock.advance(expected);
    }
}

#[tokio::test]
async fn one_hundred_failures_lock_until_a_recovery_code_is_used() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    for _ in 0..10 {
        fail_codes(&app, &user, 10).await;
        app.clock.advance(86_400);
    }
    app.clock.advance(10 * 365 * 86_400);
    let temp = app.temp_token("alice").await;
    let locked = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_error(&locked, StatusCode::TOO_MANY_REQUESTS, "locked");
    assert!(
        locked.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("recovery code"))
    );
    let unlocked = app.verify(&temp, &user.recovery_codes[0]).await;
    assert_eq!(unlocked.status, StatusCode::OK, "{}", unlocked.body);
    app.clock.advance(30);
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, 0)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_lock_survives_a_restart() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    fail_codes(&app, &user, 10).await;
    let now = app.clock_now();
    let (dir, config) = app.stop().await;
    let app = start(dir, config).await;
    app.clock.set(now + 60);
    let temp = app.temp_token("alice").await;
    let locked = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_error(&locked, StatusCode::TOO_MANY_REQUESTS, "locked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_on_fresh_temp_tokens_cannot_outrun_the_lock() {
    let app = Arc::new(spawn_app().await);
    let user = app.enrolled_user("alice").await;
    // As many temp tokens as a user may hold at once (a newer login evicts the oldest).
    let mut temps = Vec::new();
    for _ in 0..totpd::domain::login::MAX_TEMP_TOKENS {
        temps.push(app.temp_token("alice").await);
    }
    let mut set = JoinSet::new();
    for (i, temp) in temps.into_iter().enumerate() {
        let app = Arc::clone(&app);
        let code = app.wrong_code(&user.totp, i as u32);
        set.spawn(async move { app.verify(&temp, &code).await.status });
    }
    let mut checked = 0;
    while let Some(status) = set.join_next().await {
        match status.expect("task") {
            StatusCode::BAD_REQUEST => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(checked, 10, "exactly the threshold of guesses was checked");
}

#[tokio::test]
async fn wrong_activation_codes_count_too() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let (_, totp) = app.setup(&key).await;
    for i in 0..10 {
        let response = app
            .post_auth(
                "/api/v1/auth/totp/activate/",
                &key,
                Some(&json!({"token": app.wrong_code(&totp, i)})),
            )
            .await;
        assert_error(&response, StatusCode::BAD_REQUEST, "invalid_code");
    }
    let response = app
        .post_auth(
            "/api/v1/auth/totp/activate/",
            &key,
            Some(&json!({"token": app.code(&totp, 0)})),
        )
        .await;
    assert_error(&response, StatusCode::TOO_MANY_REQUESTS, "locked");
}

#[tokio::test]
async fn brute_force_from_many_addresses_is_stopped_by_the_user_lock() {
    let app = spawn_app_with(|c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
        c.ip_rate = totpd::limits::Rate {
            per_minute: 30,
            burst: 10,
        };
    })
    .await;
    let user = app.enrolled_user("alice").await;
    let mut statuses = Vec::new();
    for i in 0..40u32 {
        let ip = format!("10.{}.{}.1", i / 250, i % 250);
        let login = app
            .post_from(
                "/api/v1/auth/login/",
                &json!({"username": "alice", "password": "password123"}),
                &ip,
            )
            .await;
        let temp = login.body["temp_token"].as_str().expect("temp").to_owned();
        let guess = json!({"temp_token": temp, "token": app.wrong_code(&user.totp, i)});
        statuses.push(app.post_from(VERIFY, &guess, &ip).await.status);
    }
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::BAD_REQUEST)
        .count();
    assert_eq!(checked, 10, "{statuses:?}");
}

// ---- per-IP and per-username throttles ----

#[tokio::test]
async fn login_is_throttled_per_ip_with_drf_body_and_retry_after() {
    let app = spawn_app_with(|c| {
        c.ip_rate = totpd::limits::Rate {
            per_minute: 30,
            burst: 10,
        }
    })
    .await;
    app.create_user("alice", "password123").await;
    for _ in 0..10 {
        assert_eq!(
            app.login("alice", "password123").await.status,
            StatusCode::OK
        );
    }
    let throttled = app.login("alice", "password123").await;
    assert_error(&throttled, StatusCode::TOO_MANY_REQUESTS, "throttled");
    assert_eq!(
        throttled.body,
        json!({"detail": "Request was throttled. Expected available in 2 seconds.", "code": "throttled"})
    );
    assert_eq!(retry_after(&throttled), 2);
    app.clock.advance(2);
    assert_eq!(
        app.login("alice", "password123").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() {
    let rate = totpd::limits::Rate {
        per_minute: 30,
        burst: 10,
    };
    let body = json!({"temp_token": "t", "token": "123456"});
    let untrusted = spawn_app_with(|c| c.ip_rate = rate).await;
    let statuses: Vec<_> = {
        let mut out = Vec::new();
        for i in 0..11 {
            out.push(
                untrusted
                    .post_from(VERIFY, &body, &format!("10.0.0.{i}"))
                    .await
                    .status,
            );
        }
        out
    };
    assert_eq!(
        statuses[10],
        StatusCode::TOO_MANY_REQUESTS,
        "spoofed addresses share one bucket"
    );
    let trusted = spawn_app_with(|c| {
        c.ip_rate = rate;
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
    })
    .await;
    for i in 0..20 {
        let response = trusted
            .post_from(VERIFY, &body, &format!("10.0.0.{i}"))
            .await;
        assert_eq!(
            response.status,
            StatusCode::UNAUTHORIZED,
            "each address has its own bucket"
        );
    }
}

#[tokio::test]
async fn routes_have_separate_budgets_and_zero_turns_limits_off() {
    let app = spawn_app_with(|c| {
        c.ip_rate = totpd::limits::Rate {
            per_minute: 30,
            burst: 10,
        }
    })
    .await;
    let body = json!({"temp_token": "t", "token": "123456"});
    for _ in 0..10 {
        app.post(VERIFY, &body).await;
    }
    assert_error(
        &app.post(VERIFY, &body).await,
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
    );
    // Login has its own bucket.
    assert_error(
        &app.login("x", "y").await,
        StatusCode::BAD_REQUEST,
        "invalid_credentials",
    );
    let open = spawn_app().await; // the test default: per_minute = 0
    for _ in 0..50 {
        assert_eq!(
            open.post(VERIFY, &body).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
}

#[tokio::test]
async fn failed_logins_are_throttled_per_username_without_revealing_the_user() {
    let app = spawn_app_with(|c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
        c.login_failure_rate = totpd::limits::Rate {
            per_minute: 30,
            burst: 10,
        };
    })
    .await;
    app.create_user("alice", "password123").await;
    let mut last = Vec::new();
    for name in ["alice", "nobody"] {
        for i in 0..10 {
            let body = json!({"username": name, "password": "wrong-password"});
            let response = app
                .post_from("/api/v1/auth/login/", &body, &format!("10.1.0.{i}"))
                .await;
            assert_error(&response, StatusCode::BAD_REQUEST, "invalid_credentials");
        }
        let body = json!({"username": name, "password": "password123"});
        let response = app
            .post_from("/api/v1/auth/login/", &body, "10.2.0.1")
            .await;
        assert_error(&response, StatusCode::TOO_MANY_REQUESTS, "throttled");
        last.push(response.body);
    }
    assert_eq!(
        last[0], last[1],
        "a real and a made-up user are throttled alike"
    );
    app.clock.advance(2);
    assert_eq!(
        app.login("alice", "password123").await.status,
        StatusCode::OK
    );
}

// ---- secrets at rest ----

fn base32_decode(s: &str) -> Vec<u8> {
    data_encoding::BASE32_NOPAD
        .decode(s.as_bytes())
        .expect("base32")
}

#[tokio::test]
async fn the_database_holds_no_secret_in_clear() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let (pending, _) = app.setup(&key).await;
    let user = app.enrolled_user("bob").await;
    let secrets = [
        pending.body["secret_key"]
            .as_str()
            .expect("secret")
            .to_owned(),
        user.totp.secret().to_base32(),
    ];
    let (dir, config) = app.stop().await;
    let db = config.data_dir.join("db");
    for secret in &secrets {
        assert!(
            !crate::helpers::dir_contains(&db, secret.as_bytes()),
            "base32 secret in the db"
        );
        assert!(
            !crate::helpers::dir_contains(&db, &base32_decode(secret)),
            "raw secret in the db"
        );
    }
    drop(dir);
}

#[tokio::test]
async fn a_database_copied_without_its_key_does_not_start() {
    let app = spawn_app().await;
    app.enrolled_user("alice").await;
    let (dir, config) = app.stop().await;
    // The db alone, in a new data dir: no key file.
    let thief = tempfile::tempdir().expect("tempdir");
    let mut stolen = test_config(&thief);
    copy_dir(&config.data_dir.join("db"), &stolen.data_dir.join("db"));
    let built =
        totpd::app::Application::build(stolen.clone(), Arc::new(totpd::clock::ManualClock::new(0)))
            .await;
    let error = built.err().expect("refused");
    assert!(error.contains("master key is missing"), "{error}");
    assert!(!stolen.master_key_path().exists(), "no new key was made up");
    // A wrong key is refused too, naming both key ids.
    let wrong = totpd::service::sealing::MasterKey::generate().expect("rng");
    stolen.master_key = Some(wrong.to_text());
    let error = totpd::app::Application::build(stolen, Arc::new(totpd::clock::ManualClock::new(0)))
        .await
        .err()
        .expect("refused");
    assert!(error.contains("does not match"), "{error}");
    drop(dir);
}

#[tokio::test]
async fn a_key_from_the_environment_works_and_no_key_file_is_written() {
    let key = totpd::service::sealing::MasterKey::generate().expect("rng");
    let text = key.to_text();
    let app = spawn_app_with(move |c| c.master_key = Some(text)).await;
    let user = app.enrolled_user("alice").await;
    assert!(!app.config.master_key_path().exists());
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, 0)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_key_file_is_private() {
    let app = spawn_app().await;
    let path = app.config.master_key_path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&app.config.data_dir)
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }
    assert!(
        !path.starts_with(app.config.data_dir.join("db")),
        "outside the sled files"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

// ---- sessions ----

#[tokio::test]
async fn keys_expire_after_their_absolute_lifetime() {
    let app = spawn_app_with(|c| {
        c.key_ttl = 3600;
        c.key_idle_ttl = 3600;
    })
    .await;
    let key = app.user_with_key("alice").await;
    for _ in 0..4 {
        app.clock.advance(899);
        assert_eq!(app.get_auth(STATUS, &key).await.status, StatusCode::OK);
    }
    app.clock.advance(4);
    assert_error(
        &app.get_auth(STATUS, &key).await,
        StatusCode::FORBIDDEN,
        "authentication_failed",
    );
}

#[tokio::test]
async fn keys_expire_when_idle() {
    let app = spawn_app_with(|c| c.key_idle_ttl = 600).await;
    let key = app.user_with_key("alice").await;
    app.clock.advance(500);
    assert_eq!(app.get_auth(STATUS, &key).await.status, StatusCode::OK);
    app.clock.advance(500);
    assert_eq!(
        app.get_auth(STATUS, &key).await.status,
        StatusCode::OK,
        "use renewed it"
    );
    app.clock.advance(601);
    assert_error(
        &app.get_auth(STATUS, &key).await,
        StatusCode::FORBIDDEN,
        "authentication_failed",
    );
}

#[tokio::test]
async fn logout_all_revokes_every_key_of_the_user_only() {
    let app = spawn_app().await;
    let first = app.user_with_key("alice").await;
    let second = app.login("alice", "password123").await.body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let bob = app.user_with_key("bob").await;
    let response = app
        .post_auth("/api/v1/auth/logout-all/", &first, None)
        .await;
    assert_eq!(response.status, StatusCode::OK);
    for key in [&first, &second] {
        assert_error(
            &app.get_auth(STATUS, key).await,
            StatusCode::FORBIDDEN,
            "authentication_failed",
        );
    }
    assert_eq!(app.get_auth(STATUS, &bob).await.status, StatusCode::OK);
    let fresh = app.login("alice", "password123").await.body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_eq!(app.get_auth(STATUS, &fresh).await.status, StatusCode::OK);
}

#[tokio::test]
async fn deactivating_revokes_every_other_key() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    let other = app.verify(&temp, &app.code(&user.totp, 0)).await.body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let response = app
        .post_auth("/api/v1/auth/totp/deactivate/", &user.key, None)
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        app.get_auth(STATUS, &user.key).await.status,
        StatusCode::OK,
        "the caller stays"
    );
    assert_error(
        &app.get_auth(STATUS, &other).await,
        StatusCode::FORBIDDEN,
        "authentication_failed",
    );
}

#[tokio::test]
async fn changing_the_password_needs_the_old_one_and_revokes_other_sessions() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    let other = app.verify(&temp, &app.code(&user.totp, 0)).await.body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let outstanding = app.temp_token("alice").await;
    let wrong = app
        .post_auth(
            "/api/v1/auth/password/",
            &user.key,
            Some(&json!({"current_password": "nope-nope", "new_password": "new password 1"})),
        )
        .await;
    assert_error(&wrong, StatusCode::BAD_REQUEST, "invalid");
    assert!(wrong.body["current_password"].is_array());
    let short = app
        .post_auth(
            "/api/v1/auth/password/",
            &user.key,
            Some(&json!({"current_password": "password123", "new_password": "short"})),
        )
        .await;
    assert_error(&short, StatusCode::BAD_REQUEST, "min_length");
    let ok = app
        .post_auth(
            "/api/v1/auth/password/",
            &user.key,
            Some(&json!({"current_password": "password123", "new_password": "new password 1"})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(app.get_auth(STATUS, &user.key).await.status, StatusCode::OK);
    assert_error(
        &app.get_auth(STATUS, &other).await,
        StatusCode::FORBIDDEN,
        "authentication_failed",
    );
    app.clock.advance(30);
    let stale = app.verify(&outstanding, &app.code(&user.totp, 0)).await;
    assert_error(&stale, StatusCode::UNAUTHORIZED, "invalid_temp_token");
    assert_error(
        &app.login("alice", "password123").await,
        StatusCode::BAD_REQUEST,
        "invalid_credentials",
    );
    assert_eq!(
        app.login("alice", "new password 1").await.status,
        StatusCode::OK
    );
}

// ---- the second factor where it matters ----

#[tokio::test]
async fn deactivate_checks_a_token_when_one_is_given() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let deactivate = |token: String| {
        let app = &app;
        let key = user.key.clone();
        async move {
            app.post_auth(
                "/api/v1/auth/totp/deactivate/",
                &key,
                Some(&json!({"token": token})),
            )
            .await
        }
    };
    assert_error(
        &deactivate(app.wrong_code(&user.totp, 1)).await,
        StatusCode::BAD_REQUEST,
        "invalid_code",
    );
    assert_error(
        &deactivate("abc".into()).await,
        StatusCode::BAD_REQUEST,
        "invalid",
    );
    assert_eq!(
        app.get_auth(STATUS, &user.key).await.body["active"],
        json!(true)
    );
    assert_eq!(
        deactivate(app.code(&user.totp, 0)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.get_auth(STATUS, &user.key).await.body["active"],
        json!(false)
    );
}

#[tokio::test]
async fn deactivate_accepts_a_recovery_code() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let response = app
        .post_auth(
            "/api/v1/auth/totp/deactivate/",
            &user.key,
            Some(&json!({"token": user.recovery_codes[0]})),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
}

#[tokio::test]
async fn a_code_can_be_required_to_deactivate() {
    let app = spawn_app_with(|c| c.require_code_to_deactivate = true).await;
    let user = app.enrolled_user("alice").await;
    let bare = app
        .post_auth("/api/v1/auth/totp/deactivate/", &user.key, None)
        .await;
    assert_eq!(bare.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bare.body,
        json!({"token": ["This field is required."], "code": "required"})
    );
    let with_code = app
        .post_auth(
            "/api/v1/auth/totp/deactivate/",
            &user.key,
            Some(&json!({"token": app.code(&user.totp, 0)})),
        )
        .await;
    assert_eq!(with_code.status, StatusCode::OK);
}

#[tokio::test]
async fn recovery_codes_can_be_regenerated_with_a_code_and_the_old_set_dies() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let path = "/api/v1/auth/totp/recovery-codes/";
    let wrong = app
        .post_auth(
            path,
            &user.key,
            Some(&json!({"token": app.wrong_code(&user.totp, 3)})),
        )
        .await;
    assert_error(&wrong, StatusCode::BAD_REQUEST, "invalid_code");
    let missing = app.post_auth(path, &user.key, None).await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "required");
    let fresh = app
        .post_auth(
            path,
            &user.key,
            Some(&json!({"token": app.code(&user.totp, 0)})),
        )
        .await;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.body);
    let codes: Vec<String> =
        serde_json::from_value(fresh.body["recovery_codes"].clone()).expect("codes");
    assert_eq!(codes.len(), 10);
    assert!(codes.iter().all(|c| !user.recovery_codes.contains(c)));
    let temp = app.temp_token("alice").await;
    assert_error(
        &app.verify(&temp, &user.recovery_codes[0]).await,
        StatusCode::BAD_REQUEST,
        "invalid_code",
    );
    assert_eq!(app.verify(&temp, &codes[0]).await.status, StatusCode::OK);
    // The code that regenerated them was consumed.
    let temp = app.temp_token("alice").await;
    assert_error(
        &app.verify(&temp, &app.code(&user.totp, 0)).await,
        StatusCode::BAD_REQUEST,
        "invalid_code",
    );
}

// ---- hostile input ----

/// Random bytes, random JSON and random headers against every route: never a 5xx, always JSON.
#[tokio::test]
async fn random_input_never_gets_a_server_error() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    // Every route but /metrics, whose answer is Prometheus text rather than JSON.
    let routes: Vec<_> = totpd::http::routes::ROUTES
        .iter()
        .filter(|(_, p)| *p != "/metrics")
        .collect();
    let fields = [
        "username",
        "password",
        "token",
        "temp_token",
        "current_password",
        "new_password",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x70_7064);
    for round in 0..60 {
        for &&(method, path) in &routes {
            let body: Vec<u8> = match round % 3 {
                0 => (0..rng.random_range(0..300))
                    .map(|_| rng.random())
                    .collect(),
                1 => {
                    let mut object = serde_json::Map::new();
                    for field in fields {
                        if rng.random_bool(0.6) {
                            object.insert(field.into(), random_json(&mut rng, 3));
                        }
                    }
                    serde_json::to_vec(&object).expect("json")
                }
                _ => random_json(&mut rng, 4).to_string().into_bytes(),
            };
            let content_type = [
                "application/json",
                "text/plain",
                "application/json; charset=latin1",
                "",
            ][rng.random_range(0..4)];
            let mut request = app
                .client
                .request(method.parse().expect("method"), app.url(path))
                .body(body);
            if !content_type.is_empty() {
                request = request.header("Content-Type", content_type);
            }
            if rng.random_bool(0.5) {
                request = request.header("Authorization", format!("Token {key}"));
            }
            let response = app.send(request).await;
            assert!(
                response.status.is_client_error() || response.status.is_success(),
                "{method} {path}: {} {}",
                response.status,
                response.body
            );
            assert!(
                response.body.is_object(),
                "{method} {path}: not a JSON object"
            );
        }
    }
}

fn random_json(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(rng.random::<i64>()),
        3 => json!(format!("{:06}", rng.random_range(0..1_000_000))),
        4 => {
            let s: String = (0..rng.random_range(0..40))
                .map(|_| rng.random::<char>())
                .collect();
            json!(s)
        }
        5 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut object = serde_json::Map::new();
            for i in 0..rng.random_range(0..4) {
                object.insert(format!("k{i}"), random_json(rng, depth - 1));
            }
            Value::Object(object)
        }
    }
}

/// Many slow clients dribbling a request head do not stop a normal client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_block_others() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|c| c.header_read_timeout = 2).await;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        stream
            .write_all(b"POST /api/v1/auth/login/ HTTP/1.1\r\nHost: t\r\n")
            .await
            .expect("write");
        slow.push(stream);
    }
    let started = Instant::now();
    let response = app.login("nobody", "password123").await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // The stalled connections are closed after the header timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut closed = 0;
    for mut stream in slow {
        let mut buf = [0u8; 512];
        use tokio::io::AsyncReadExt;
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 200, "stalled connections were dropped");
}

#[tokio::test]
async fn http2_is_not_spoken() {
    let app = spawn_app().await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let response = raw_request(app.addr, preface).await;
    assert!(!response.contains("HTTP/2"), "{response:?}");
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 4"),
        "{response:?}"
    );
}

// ---- audit trail ----

#[tokio::test]
async fn security_events_are_recorded_with_user_and_address_and_no_secrets() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    app.verify(&temp, &app.wrong_code(&user.totp, 5)).await;
    app.verify(&temp, &app.code(&user.totp, 0)).await;
    let temp = app.temp_token("alice").await;
    app.verify(&temp, &app.code(&user.totp, 0)).await; // replay
    app.verify(&temp, &user.recovery_codes[0]).await;
    app.login("alice", "wrong-password").await;
    app.post_auth("/api/v1/auth/totp/deactivate/", &user.key, None)
        .await;
    app.post_auth("/api/v1/auth/logout/", &user.key, None).await;
    let events = app.events().await;
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.kind.name(), e.outcome.as_str()))
        .collect();
    for expected in [
        ("user_created", "ok"),
        ("login", "ok"),
        ("setup", "ok"),
        ("activate", "ok"),
        ("temp_token_issued", "ok"),
        ("verify", "wrong_code"),
        ("verify", "ok"),
        ("replay_refused", "refused"),
        ("verify", "replay"),
        ("recovery_code_used", "9_left"),
        ("login", "failed"),
        ("deactivate", "ok"),
        ("key_revoked", "logout"),
    ] {
        assert!(seen.contains(&expected), "missing {expected:?} in {seen:?}");
    }
    // (The user was created in-process by the test, not over HTTP: that event has no address.)
    for event in events.iter().filter(|e| e.kind.name() != "user_created") {
        assert_eq!(
            event.ip,
            Some("127.0.0.1".parse().expect("ip")),
            "{event:?}"
        );
        assert_eq!(event.username.as_deref(), Some("alice"));
    }
    let rendered = format!("{events:?}");
    for secret in user
        .recovery_codes
        .iter()
        .chain([&user.key, &user.totp.secret().to_base32()])
    {
        assert!(!rendered.contains(secret.as_str()));
    }
}

#[tokio::test]
async fn a_lock_is_an_event() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    fail_codes(&app, &user, 10).await;
    let locks: Vec<_> = app
        .events()
        .await
        .into_iter()
        .filter(|e| e.kind.name() == "lock_started")
        .collect();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].outcome, "for_900s");
}

#[tokio::test]
async fn old_events_are_swept_after_the_retention() {
    let app = spawn_app_with(|c| c.audit_retention_days = 1).await;
    app.user_with_key("alice").await;
    let now = app.clock_now();
    assert!(!app.events().await.is_empty());
    app.service.sweep(now + 3600, 3600).await.expect("sweep");
    assert!(
        !app.events().await.is_empty(),
        "younger than the cutoff: kept"
    );
    app.service
        .sweep(now + 2 * 86_400, 86_400)
        .await
        .expect("sweep");
    assert!(app.events().await.is_empty());
}

/// Beyond `max_connections`, new connections wait in the backlog until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_capped() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|c| {
        c.max_connections = 2;
        c.header_read_timeout = 2;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        stream.write_all(b"GET /").await.expect("write");
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let response = app.send(app.client.get(app.url("/nope"))).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "served after {waited:?}: the cap did not hold"
    );
    drop(held);
}

/// A flood of password logins cannot pile up temp tokens: a user holds at most
/// `MAX_TEMP_TOKENS`, and the oldest is the first to go.
#[tokio::test]
async fn temp_tokens_per_user_are_capped_oldest_first() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let first = app.temp_token("alice").await;
    let mut rest = Vec::new();
    for _ in 0..totpd::domain::login::MAX_TEMP_TOKENS {
        rest.push(app.temp_token("alice").await);
    }
    let evicted = app.verify(&first, &app.code(&user.totp, 0)).await;
    assert_error(&evicted, StatusCode::UNAUTHORIZED, "invalid_temp_token");
    let oldest_kept = app.verify(&rest[0], &app.code(&user.totp, 0)).await;
    assert_eq!(oldest_kept.status, StatusCode::OK);
}
