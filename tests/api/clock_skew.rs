//! The clock-drift hint: a wrong code that is the code of a time 2 to 10 steps from the
//! server's is refused and counted like any wrong code, but answered `clock_skew` with how far
//! and which way the device's clock seems off; and its step is spent. Codes come from totp-rs at
//! offsets from the manual clock, which stays in the middle of a step (`helpers::START`), so a
//! code k steps away is k × 30 s off.

use reqwest::StatusCode;
use serde_json::{Value, json};
use totp_rs::Totp;

use crate::helpers::{Response, TestApp, assert_error, spawn_app, spawn_app_with, start};

const ACTIVATE: &str = "/api/v1/auth/totp/activate/";
const DEACTIVATE: &str = "/api/v1/auth/totp/deactivate/";
const RECOVERY_CODES: &str = "/api/v1/auth/totp/recovery-codes/";
const STATUS: &str = "/api/v1/auth/totp/";

/// The offsets that get the hint with the default window (±1).
fn hinted_offsets() -> impl Iterator<Item = i64> {
    (2..=10).flat_map(|k| [k, -k])
}

/// Asserts a `clock_skew` answer for a code `offset` steps from now: 400, the `token` field's
/// one sentence with the right direction and seconds, and nothing else in the body.
fn assert_clock_skew(response: &Response, offset: i64) {
    assert_error(response, StatusCode::BAD_REQUEST, "clock_skew");
    let body = response.body.as_object().expect("an object");
    assert_eq!(body.len(), 2, "{}", response.body);
    let messages = response.body["token"].as_array().expect("token messages");
    assert_eq!(messages.len(), 1, "{}", response.body);
    let message = messages[0].as_str().expect("a sentence");
    let seconds = offset.unsigned_abs() * 30;
    let (relation, clock) = if offset > 0 {
        ("ahead of", "fast")
    } else {
        ("behind", "slow")
    };
    assert_eq!(
        message,
        format!(
            "This code is for a time about {seconds} seconds {relation} the server's: your \
             device's clock seems about {seconds} seconds {clock}. Set it to update \
             automatically, then try a new code."
        ),
        "offset {offset}"
    );
}

fn assert_invalid_code(response: &Response) {
    assert_error(response, StatusCode::BAD_REQUEST, "invalid_code");
    assert_eq!(
        response.body,
        json!({ "token": ["Invalid code."], "code": "invalid_code" })
    );
}

/// An enrolled user whose last accepted step is more than 10 steps in the past, so codes up to
/// 10 steps behind now are not replays.
async fn enrolled_long_ago(app: &TestApp, name: &str) -> crate::helpers::Enrolled {
    let user = app.enrolled_user(name).await;
    app.clock.advance(15 * 30);
    user
}

fn token(code: &str) -> Value {
    json!({ "token": code })
}

#[tokio::test]
async fn clock_skew_at_verify_for_2_to_10_steps_either_way_and_invalid_code_at_11() {
    // Enough failures allowed to try every offset without a lock.
    let app = spawn_app_with(|c| c.lockout.threshold = 50).await;
    let user = enrolled_long_ago(&app, "alice").await;
    for offset in hinted_offsets() {
        let temp = app.temp_token("alice").await;
        let response = app.verify(&temp, &app.code(&user.totp, offset)).await;
        assert_clock_skew(&response, offset);
    }
    for offset in [11, -11, 12, -20] {
        let temp = app.temp_token("alice").await;
        let response = app.verify(&temp, &app.code(&user.totp, offset)).await;
        assert_invalid_code(&response);
    }
    // None of them logged in, and the code of now still does.
    let temp = app.temp_token("alice").await;
    let ok = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
}

#[tokio::test]
async fn clock_skew_with_a_wider_window_starts_beyond_it() {
    let app = spawn_app_with(|c| c.totp_skew = 2).await;
    let user = enrolled_long_ago(&app, "alice").await;
    let temp = app.temp_token("alice").await;
    assert_clock_skew(&app.verify(&temp, &app.code(&user.totp, 3)).await, 3);
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, -2)).await.status,
        StatusCode::OK
    );
}

/// Codes 2 to 10 steps off sent to `path` get the clock-skew hint; 11 steps off, a plain
/// invalid code.
async fn assert_skew_is_hinted_up_to_10_steps(app: &TestApp, path: &str, key: &str, totp: &Totp) {
    for offset in hinted_offsets() {
        let response = app
            .post_auth(path, key, Some(&token(&app.code(totp, offset))))
            .await;
        assert_clock_skew(&response, offset);
    }
    for offset in [11, -11] {
        let response = app
            .post_auth(path, key, Some(&token(&app.code(totp, offset))))
            .await;
        assert_invalid_code(&response);
    }
}

#[tokio::test]
async fn clock_skew_at_activate_deactivate_and_recovery_codes() {
    let app = spawn_app_with(|c| c.lockout.threshold = 50).await;
    let key = app.user_with_key("alice").await;
    let (_, totp) = app.setup(&key).await;
    assert_skew_is_hinted_up_to_10_steps(&app, ACTIVATE, &key, &totp).await;
    let status = app.get_auth(STATUS, &key).await;
    assert_eq!(status.body["active"], json!(false), "{}", status.body);
    let activated = app
        .post_auth(ACTIVATE, &key, Some(&token(&app.code(&totp, 0))))
        .await;
    assert_eq!(activated.status, StatusCode::OK, "{}", activated.body);

    // Past the activation step, so codes up to 10 steps behind are not replays.
    app.clock.advance(15 * 30);
    for path in [RECOVERY_CODES, DEACTIVATE] {
        assert_skew_is_hinted_up_to_10_steps(&app, path, &key, &totp).await;
    }
    // Nothing changed: TOTP is still on with the first ten recovery codes.
    let status = app.get_auth(STATUS, &key).await;
    assert_eq!(
        status.body,
        json!({"active": true, "pending": false, "recovery_codes_remaining": 10})
    );
}

#[tokio::test]
async fn skewed_codes_spend_temp_token_attempts_and_count_towards_the_lock() {
    let app = spawn_app().await;
    let user = enrolled_long_ago(&app, "alice").await;
    let right = app.code(&user.totp, 0);
    // Five answers kill a temp token, hinted or not.
    let temp = app.temp_token("alice").await;
    for offset in [2, -3, 4, -5, 10] {
        assert_clock_skew(
            &app.verify(&temp, &app.code(&user.totp, offset)).await,
            offset,
        );
    }
    let dead = app.verify(&temp, &right).await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "invalid_temp_token");
    // Five more make ten failures in a row: the lock (the tenth still gets the hint).
    let temp = app.temp_token("alice").await;
    for offset in [-2, 3, -4, 5] {
        assert_clock_skew(
            &app.verify(&temp, &app.code(&user.totp, offset)).await,
            offset,
        );
    }
    let tenth = app.verify(&temp, &app.code(&user.totp, -10)).await;
    assert_clock_skew(&tenth, -10);
    let temp = app.temp_token("alice").await;
    let locked = app.verify(&temp, &right).await;
    assert_error(&locked, StatusCode::TOO_MANY_REQUESTS, "locked");
    // While locked, a skewed code is not even checked: `locked`, never the hint.
    let temp = app.temp_token("alice").await;
    let skewed = app.verify(&temp, &app.code(&user.totp, 3)).await;
    assert_error(&skewed, StatusCode::TOO_MANY_REQUESTS, "locked");
    // The audit trail says what happened.
    let outcomes: Vec<String> = app
        .events()
        .await
        .into_iter()
        .filter(|e| e.kind.name() == "verify")
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "clock_skew").count(),
        10,
        "{outcomes:?}"
    );
    assert!(
        app.events()
            .await
            .iter()
            .any(|e| e.kind.name() == "lock_started")
    );
}

#[tokio::test]
async fn a_code_from_a_fast_clock_is_spent_but_the_steps_before_it_are_not() {
    let app = spawn_app().await;
    let user = enrolled_long_ago(&app, "alice").await;
    let fast = app.code(&user.totp, 3);
    let sent_at = app.clock_now();
    let temp = app.temp_token("alice").await;
    assert_clock_skew(&app.verify(&temp, &fast).await, 3);
    // The code of the next step (inside the window) is still good.
    let next = app.verify(&temp, &app.code(&user.totp, 1)).await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.body);
    // Survives a restart: the burned step is in the user's record.
    let (dir, config) = app.stop().await;
    let app = start(dir, config).await;
    app.clock.set(sent_at + 3 * 30);
    assert_eq!(
        app.code(&user.totp, 0),
        fast,
        "the fast code's time has come"
    );
    let temp = app.temp_token("alice").await;
    assert_invalid_code(&app.verify(&temp, &fast).await);
    // The step after it is good.
    let after = app.verify(&temp, &app.code(&user.totp, 1)).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
}

#[tokio::test]
async fn a_fast_code_refused_at_activation_stays_spent_after_it() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let (_, totp) = app.setup(&key).await;
    let fast = app.code(&totp, 4);
    let refused = app.post_auth(ACTIVATE, &key, Some(&token(&fast))).await;
    assert_clock_skew(&refused, 4);
    let activated = app
        .post_auth(ACTIVATE, &key, Some(&token(&app.code(&totp, 0))))
        .await;
    assert_eq!(activated.status, StatusCode::OK, "{}", activated.body);
    app.clock.advance(4 * 30);
    let temp = app.temp_token("alice").await;
    assert_eq!(app.code(&totp, 0), fast, "the fast code's time has come");
    assert_invalid_code(&app.verify(&temp, &fast).await);
    // The step after it is good.
    let ok = app.verify(&temp, &app.code(&totp, 1)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
}

#[tokio::test]
async fn a_code_from_a_slow_clock_older_than_the_last_step_is_a_plain_replay() {
    let app = spawn_app().await;
    let user = enrolled_long_ago(&app, "alice").await;
    let used = app.code(&user.totp, 0);
    let temp = app.temp_token("alice").await;
    assert_eq!(app.verify(&temp, &used).await.status, StatusCode::OK);
    // Three steps later the same code is three steps behind: still a replay, same body as a
    // wrong code.
    app.clock.advance(3 * 30);
    let temp = app.temp_token("alice").await;
    assert_invalid_code(&app.verify(&temp, &used).await);
}
