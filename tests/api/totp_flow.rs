use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_error, spawn_app, spawn_app_with};

const SETUP: &str = "/api/v1/auth/totp/setup/";
const ACTIVATE: &str = "/api/v1/auth/totp/activate/";
const DEACTIVATE: &str = "/api/v1/auth/totp/deactivate/";
const STATUS: &str = "/api/v1/auth/totp/";

#[tokio::test]
async fn setup_returns_a_fresh_20_byte_secret_and_a_complete_uri() {
    let app = spawn_app_with(|c| c.issuer = "ACME Co".into()).await;
    let key = app.user_with_key("john doe").await;
    let (response, totp) = app.setup(&key).await;
    let secret = response.body["secret_key"].as_str().expect("secret");
    assert_eq!(secret.len(), 32);
    assert!(
        secret
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    );
    let uri = response.body["provisioning_uri"].as_str().expect("uri");
    assert_eq!(
        uri,
        format!(
            "otpauth://totp/ACME%20Co:john%20doe?secret={secret}&issuer=ACME%20Co&algorithm=SHA1&digits=6&period=30"
        )
    );
    assert_eq!(totp.issuer(), Some("ACME Co"));
    assert_eq!(totp.account_name(), "john doe");
    assert_eq!(response.headers["cache-control"], "no-store");
    let (again, _) = app.setup(&key).await;
    assert_ne!(again.body["secret_key"], response.body["secret_key"]);
    let status = app.get_auth(STATUS, &key).await;
    assert_eq!(
        status.body,
        json!({"active": false, "pending": true, "recovery_codes_remaining": 0})
    );
}

#[tokio::test]
async fn secrets_differ_across_many_setups() {
    let app = spawn_app().await;
    let mut seen = HashSet::new();
    for user in 0..5 {
        let key = app.user_with_key(&format!("user{user}")).await;
        for _ in 0..20 {
            let (response, _) = app.setup(&key).await;
            assert!(seen.insert(response.body["secret_key"].to_string()));
        }
    }
}

#[tokio::test]
async fn a_second_setup_replaces_the_pending_secret() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let (_, first) = app.setup(&key).await;
    let (_, second) = app.setup(&key).await;
    let stale = app
        .post_auth(ACTIVATE, &key, Some(&json!({"token": app.code(&first, 0)})))
        .await;
    assert_error(&stale, StatusCode::BAD_REQUEST, "invalid_code");
    let fresh = app
        .post_auth(
            ACTIVATE,
            &key,
            Some(&json!({"token": app.code(&second, 0)})),
        )
        .await;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.body);
}

#[tokio::test]
async fn activation_returns_ten_distinct_recovery_codes_once() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    assert_eq!(user.recovery_codes.len(), 10);
    let distinct: HashSet<_> = user.recovery_codes.iter().collect();
    assert_eq!(distinct.len(), 10);
    for code in &user.recovery_codes {
        assert_eq!(code.len(), 19, "xxxx-xxxx-xxxx-xxxx: {code}");
    }
    let status = app.get_auth(STATUS, &user.key).await;
    assert_eq!(
        status.body,
        json!({"active": true, "pending": false, "recovery_codes_remaining": 10})
    );
    let (dir, _) = app.stop().await;
    for code in &user.recovery_codes {
        assert!(!crate::helpers::dir_contains(dir.path(), code.as_bytes()));
        assert!(!crate::helpers::dir_contains(
            dir.path(),
            code.replace('-', "").as_bytes()
        ));
    }
}

#[tokio::test]
async fn setup_and_activate_refuse_when_totp_is_active() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let setup = app.post_auth(SETUP, &user.key, None).await;
    assert_error(&setup, StatusCode::BAD_REQUEST, "totp_already_active");
    assert!(setup.body.get("secret_key").is_none());
    assert!(setup.body["non_field_errors"].is_array());
    let activate = app
        .post_auth(
            ACTIVATE,
            &user.key,
            Some(&json!({"token": app.code(&user.totp, 0)})),
        )
        .await;
    assert_error(&activate, StatusCode::BAD_REQUEST, "totp_already_active");
    // The active secret was not replaced: its codes still log in.
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, 0)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn activate_needs_a_pending_setup_and_the_right_code() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let none = app
        .post_auth(ACTIVATE, &key, Some(&json!({"token": "123456"})))
        .await;
    assert_error(&none, StatusCode::BAD_REQUEST, "totp_not_pending");
    let (_, totp) = app.setup(&key).await;
    let right = app.code(&totp, 0);
    let wrong = if right == "000000" {
        "000001"
    } else {
        "000000"
    };
    let response = app
        .post_auth(ACTIVATE, &key, Some(&json!({"token": wrong})))
        .await;
    assert_error(&response, StatusCode::BAD_REQUEST, "invalid_code");
    assert_eq!(response.body["token"], json!(["Invalid code."]));
    // Beyond the ten steps the clock-drift hint looks at (see clock_skew.rs), a plain wrong code.
    let far = app
        .post_auth(ACTIVATE, &key, Some(&json!({"token": app.code(&totp, 11)})))
        .await;
    assert_error(&far, StatusCode::BAD_REQUEST, "invalid_code");
    // Still inactive: the password alone logs in.
    assert!(
        app.login("alice", "password123")
            .await
            .body
            .get("key")
            .is_some()
    );
    let missing = app.post_auth(ACTIVATE, &key, Some(&json!({}))).await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "required");
    let number = app
        .post_auth(ACTIVATE, &key, Some(&json!({"token": 123456})))
        .await;
    assert_error(&number, StatusCode::BAD_REQUEST, "invalid");
}

#[tokio::test]
async fn the_activation_code_cannot_be_used_again_at_verify() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let (_, totp) = app.setup(&key).await;
    let code = app.code(&totp, 0);
    let response = app
        .post_auth(ACTIVATE, &key, Some(&json!({"token": code})))
        .await;
    assert_eq!(response.status, StatusCode::OK);
    let temp = app.temp_token("alice").await;
    assert_error(
        &app.verify(&temp, &code).await,
        StatusCode::BAD_REQUEST,
        "invalid_code",
    );
}

#[tokio::test]
async fn verify_with_a_current_code_gives_a_working_key() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    let response = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert_eq!(
        response.body.as_object().map(|o| o.len()),
        Some(1),
        "only the key"
    );
    let key = response.body["key"].as_str().expect("key");
    assert_eq!(app.get_auth(STATUS, key).await.status, StatusCode::OK);
    assert_eq!(response.headers["cache-control"], "no-store");
}

#[tokio::test]
async fn codes_with_spaces_are_accepted() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    let code = app.code(&user.totp, 0);
    let spaced = format!("{} {}", &code[..3], &code[3..]);
    assert_eq!(app.verify(&temp, &spaced).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_code_is_accepted_once_even_across_logins() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let code = app.code(&user.totp, 0);
    let first = app.temp_token("alice").await;
    assert_eq!(app.verify(&first, &code).await.status, StatusCode::OK);
    let second = app.temp_token("alice").await;
    let replay = app.verify(&second, &code).await;
    assert_error(&replay, StatusCode::BAD_REQUEST, "invalid_code");
    // Same body as a wrong code: a replay reveals nothing.
    let third = app.temp_token("alice").await;
    let wrong = app
        .verify(&third, if code == "111111" { "222222" } else { "111111" })
        .await;
    assert_eq!(replay.body, wrong.body);
}

#[tokio::test]
async fn an_older_code_is_refused_after_a_newer_one() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, 1)).await.status,
        StatusCode::OK
    );
    let temp = app.temp_token("alice").await;
    let older = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_error(&older, StatusCode::BAD_REQUEST, "invalid_code");
}

#[tokio::test]
async fn the_window_is_one_step_either_side_by_default() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    app.clock.advance(90); // the activation step is well in the past
    for (offset, accepted) in [(-2, false), (-1, true), (2, false), (1, true)] {
        let temp = app.temp_token("alice").await;
        let response = app.verify(&temp, &app.code(&user.totp, offset)).await;
        assert_eq!(
            response.status == StatusCode::OK,
            accepted,
            "offset {offset}: {}",
            response.body
        );
    }
}

#[tokio::test]
async fn skew_zero_accepts_only_the_current_step() {
    let app = spawn_app_with(|c| c.totp_skew = 0).await;
    let user = app.enrolled_user("alice").await;
    app.clock.advance(90);
    for (offset, accepted) in [(-1, false), (1, false), (0, true)] {
        let temp = app.temp_token("alice").await;
        let response = app.verify(&temp, &app.code(&user.totp, offset)).await;
        assert_eq!(
            response.status == StatusCode::OK,
            accepted,
            "offset {offset}"
        );
    }
}

#[tokio::test]
async fn a_temp_token_works_once() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &app.code(&user.totp, 0)).await.status,
        StatusCode::OK
    );
    app.clock.advance(30);
    let again = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_error(&again, StatusCode::UNAUTHORIZED, "invalid_temp_token");
    assert!(again.body["detail"].is_string());
}

#[tokio::test]
async fn a_temp_token_expires_after_its_ttl() {
    let app = spawn_app_with(|c| c.temp_token_ttl = 300).await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    app.clock.advance(299);
    let wrong = app.verify(&temp, "000000").await;
    assert_ne!(
        wrong.status,
        StatusCode::UNAUTHORIZED,
        "still alive at 299 s"
    );
    app.clock.advance(1);
    let late = app.verify(&temp, &app.code(&user.totp, 0)).await;
    assert_error(&late, StatusCode::UNAUTHORIZED, "invalid_temp_token");
}

#[tokio::test]
async fn a_temp_token_dies_after_five_wrong_codes() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    let right = app.code(&user.totp, 0);
    let wrong: Vec<String> = (0..10)
        .map(|i| format!("{:06}", (i * 111_111) % 1_000_000))
        .filter(|c| *c != right && *c != app.code(&user.totp, -1) && *c != app.code(&user.totp, 1))
        .take(5)
        .collect();
    for code in &wrong {
        assert_error(
            &app.verify(&temp, code).await,
            StatusCode::BAD_REQUEST,
            "invalid_code",
        );
    }
    let dead = app.verify(&temp, &right).await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "invalid_temp_token");
    // A fresh login still works with the same code: the code was never consumed.
    let fresh = app.temp_token("alice").await;
    assert_eq!(app.verify(&fresh, &right).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_attempt_limit_is_configurable() {
    let app = spawn_app_with(|c| c.temp_token_attempts = 1).await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    let right = app.code(&user.totp, 0);
    let wrong = if right == "999999" {
        "999998"
    } else {
        "999999"
    };
    assert_error(
        &app.verify(&temp, wrong).await,
        StatusCode::BAD_REQUEST,
        "invalid_code",
    );
    assert_error(
        &app.verify(&temp, &right).await,
        StatusCode::UNAUTHORIZED,
        "invalid_temp_token",
    );
}

#[tokio::test]
async fn unknown_temp_tokens_get_401() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let code = app.code(&user.totp, 0);
    for temp in ["nope", &"x".repeat(5000), "Token abc"] {
        assert_error(
            &app.verify(temp, &code).await,
            StatusCode::UNAUTHORIZED,
            "invalid_temp_token",
        );
    }
}

#[tokio::test]
async fn verify_validates_its_fields_first() {
    let app = spawn_app().await;
    let missing = app.post("/api/v1/auth/totp/verify/", &json!({})).await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "required");
    assert_eq!(
        missing.body["temp_token"],
        json!(["This field is required."])
    );
    assert_eq!(missing.body["token"], json!(["This field is required."]));
    for bad in [
        json!(123456),
        json!("12345"),
        json!("1234567"),
        json!("+12345"),
        json!("１２３４５６"),
        json!([]),
    ] {
        let response = app
            .post(
                "/api/v1/auth/totp/verify/",
                &json!({"temp_token": "t", "token": bad}),
            )
            .await;
        assert_error(&response, StatusCode::BAD_REQUEST, "invalid");
        assert!(response.body["token"].is_array(), "{bad}");
    }
}

#[tokio::test]
async fn a_recovery_code_logs_in_once_and_reports_what_is_left() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let code = &user.recovery_codes[3];
    let temp = app.temp_token("alice").await;
    let response = app.verify(&temp, code).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert_eq!(response.body["recovery_codes_remaining"], json!(9));
    let key = response.body["key"].as_str().expect("key");
    assert_eq!(
        app.get_auth(STATUS, key).await.body["recovery_codes_remaining"],
        json!(9)
    );
    let temp = app.temp_token("alice").await;
    assert_error(
        &app.verify(&temp, code).await,
        StatusCode::BAD_REQUEST,
        "invalid_code",
    );
}

#[tokio::test]
async fn recovery_code_input_ignores_case_dashes_and_spaces() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let variants = [
        user.recovery_codes[0].to_uppercase(),
        user.recovery_codes[1].replace('-', ""),
        user.recovery_codes[2].replace('-', " "),
    ];
    for variant in variants {
        let temp = app.temp_token("alice").await;
        assert_eq!(
            app.verify(&temp, &variant).await.status,
            StatusCode::OK,
            "{variant}"
        );
    }
}

#[tokio::test]
async fn a_wrong_recovery_code_spends_an_attempt() {
    let app = spawn_app_with(|c| c.temp_token_attempts = 2).await;
    let user = app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    for _ in 0..2 {
        let response = app.verify(&temp, "abcd-efgh-jkmn-pqrs").await;
        assert_error(&response, StatusCode::BAD_REQUEST, "invalid_code");
    }
    let dead = app.verify(&temp, &user.recovery_codes[0]).await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "invalid_temp_token");
}

#[tokio::test]
async fn recovery_codes_belong_to_their_user() {
    let app = spawn_app().await;
    let alice = app.enrolled_user("alice").await;
    app.enrolled_user("bob").await;
    let temp = app.temp_token("bob").await;
    let response = app.verify(&temp, &alice.recovery_codes[0]).await;
    assert_error(&response, StatusCode::BAD_REQUEST, "invalid_code");
}

#[tokio::test]
async fn deactivate_removes_totp_and_kills_outstanding_temp_tokens() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let outstanding = app.temp_token("alice").await;
    let response = app.post_auth(DEACTIVATE, &user.key, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let status = app.get_auth(STATUS, &user.key).await;
    assert_eq!(
        status.body,
        json!({"active": false, "pending": false, "recovery_codes_remaining": 0})
    );
    let verify = app.verify(&outstanding, &app.code(&user.totp, 0)).await;
    assert_error(&verify, StatusCode::UNAUTHORIZED, "invalid_temp_token");
    assert!(
        app.login("alice", "password123")
            .await
            .body
            .get("key")
            .is_some()
    );
    let again = app.post_auth(DEACTIVATE, &user.key, None).await;
    assert_error(&again, StatusCode::BAD_REQUEST, "totp_not_active");
}

#[tokio::test]
async fn old_recovery_codes_and_secret_die_with_deactivation() {
    let app = spawn_app().await;
    let old = app.enrolled_user("alice").await;
    app.post_auth(DEACTIVATE, &old.key, None).await;
    let (setup, totp) = app.setup(&old.key).await;
    assert_ne!(
        setup.body["secret_key"].as_str(),
        Some(old.totp.secret().to_base32().as_str())
    );
    let activated = app
        .post_auth(
            ACTIVATE,
            &old.key,
            Some(&json!({"token": app.code(&totp, 0)})),
        )
        .await;
    assert_eq!(activated.status, StatusCode::OK);
    app.clock.advance(30);
    for code in &old.recovery_codes[..3] {
        let temp = app.temp_token("alice").await;
        assert_error(
            &app.verify(&temp, code).await,
            StatusCode::BAD_REQUEST,
            "invalid_code",
        );
    }
    let temp = app.temp_token("alice").await;
    let old_secret = app.verify(&temp, &app.code(&old.totp, 0)).await;
    assert_error(&old_secret, StatusCode::BAD_REQUEST, "invalid_code");
}

#[tokio::test]
async fn state_survives_a_restart() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    let code = app.code(&user.totp, 0);
    let temp = app.temp_token("alice").await;
    assert_eq!(app.verify(&temp, &code).await.status, StatusCode::OK);
    let now = app.clock_now();
    let (dir, config) = app.stop().await;
    let app = crate::helpers::start(dir, config).await;
    app.clock.set(now);
    assert_eq!(
        app.get_auth(STATUS, &user.key).await.body["active"],
        json!(true)
    );
    let temp = app.temp_token("alice").await;
    assert_error(
        &app.verify(&temp, &code).await,
        StatusCode::BAD_REQUEST,
        "invalid_code",
    );
    let temp = app.temp_token("alice").await;
    assert_eq!(
        app.verify(&temp, &user.recovery_codes[0]).await.status,
        StatusCode::OK
    );
}
