use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_error, spawn_app, spawn_app_with};

#[tokio::test]
async fn login_without_totp_gives_a_working_key_stored_only_as_a_hash() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    assert!(key.len() >= 40, "at least 160 bits: {key}");
    let status = app.get_auth("/api/v1/auth/totp/", &key).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(
        status.body,
        json!({"active": false, "pending": false, "recovery_codes_remaining": 0})
    );
    // The key itself is nowhere in the data dir.
    let (dir, _) = app.stop().await;
    assert!(
        !crate::helpers::dir_contains(dir.path(), key.as_bytes()),
        "plaintext key on disk"
    );
}

#[tokio::test]
async fn two_logins_give_two_different_keys() {
    let app = spawn_app().await;
    let a = app.user_with_key("alice").await;
    let b = app.login("alice", "password123").await.body["key"].clone();
    assert_ne!(json!(a), b);
}

#[tokio::test]
async fn login_with_totp_gives_a_temp_token_and_no_key() {
    let app = spawn_app_with(|c| c.temp_token_ttl = 120).await;
    app.enrolled_user("alice").await;
    let response = app.login("alice", "password123").await;
    assert_eq!(response.status, StatusCode::OK);
    let body = response.body.as_object().expect("object");
    assert!(body.get("key").is_none(), "no key before the second factor");
    assert_eq!(body["totp_required"], json!(true));
    assert_eq!(body["expires_in"], json!(120));
    let temp = body["temp_token"].as_str().expect("temp token");
    assert!(temp.len() >= 22, "at least 128 bits: {temp}");
    let (dir, _) = app.stop().await;
    assert!(
        !crate::helpers::dir_contains(dir.path(), temp.as_bytes()),
        "plaintext temp token on disk"
    );
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let app = spawn_app().await;
    app.create_user("alice", "password123").await;
    app.enrolled_user("bob").await;
    let wrong = app.login("alice", "wrong-password").await;
    let unknown = app.login("nobody", "wrong-password").await;
    let wrong_totp_user = app.login("bob", "wrong-password").await;
    assert_error(&wrong, StatusCode::BAD_REQUEST, "invalid_credentials");
    assert_eq!(wrong.body, unknown.body);
    assert_eq!(wrong.body, wrong_totp_user.body);
    assert_eq!(wrong.status, unknown.status);
    assert!(wrong.body["non_field_errors"].is_array());
}

/// An unknown user costs one Argon2 run too (against a dummy hash), so timing does not tell
/// which users exist. With real-cost Argon2 a shortcut would be ~100x faster; the bound is loose.
#[tokio::test]
async fn an_unknown_user_costs_as_much_as_a_wrong_password() {
    let app =
        spawn_app_with(|c| c.argon2 = totpd::service::password::Argon2Settings::default()).await;
    app.create_user("alice", "password123").await;
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        app.login("alice", "wrong-password").await;
        known.push(t.elapsed());
        let t = Instant::now();
        app.login("nobody", "wrong-password").await;
        unknown.push(t.elapsed());
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[2], unknown[2]);
    assert!(k > Duration::from_millis(2), "argon2 ran: {k:?}");
    assert!(u * 3 > k, "unknown user {u:?} vs wrong password {k:?}");
}

#[tokio::test]
async fn login_reports_every_missing_field() {
    let app = spawn_app().await;
    let response = app.post("/api/v1/auth/login/", &json!({})).await;
    assert_error(&response, StatusCode::BAD_REQUEST, "required");
    assert_eq!(
        response.body["username"],
        json!(["This field is required."])
    );
    assert_eq!(
        response.body["password"],
        json!(["This field is required."])
    );
    let response = app
        .post("/api/v1/auth/login/", &json!({"username": "alice"}))
        .await;
    assert_eq!(
        response.body,
        json!({"password": ["This field is required."], "code": "required"})
    );
    let response = app
        .post(
            "/api/v1/auth/login/",
            &json!({"username": 5, "password": null}),
        )
        .await;
    assert_error(&response, StatusCode::BAD_REQUEST, "invalid");
    assert_eq!(
        response.body["password"],
        json!(["This field may not be null."])
    );
}

#[tokio::test]
async fn an_oversized_password_is_refused_before_hashing() {
    let app = spawn_app().await;
    let response = app
        .post(
            "/api/v1/auth/login/",
            &json!({"username": "alice", "password": "x".repeat(5000)}),
        )
        .await;
    assert_error(&response, StatusCode::BAD_REQUEST, "max_length");
}

#[tokio::test]
async fn registration_is_off_by_default() {
    let app = spawn_app().await;
    let response = app
        .post(
            "/api/v1/auth/register/",
            &json!({"username": "eve", "password": "password123"}),
        )
        .await;
    assert_error(&response, StatusCode::FORBIDDEN, "registration_disabled");
    assert_error(
        &app.login("eve", "password123").await,
        StatusCode::BAD_REQUEST,
        "invalid_credentials",
    );
}

#[tokio::test]
async fn registration_when_allowed_creates_a_user_who_can_log_in() {
    let app = spawn_app_with(|c| c.allow_registration = true).await;
    let register = |name: &str, password: &str| {
        let body = json!({"username": name, "password": password});
        let app = &app;
        async move { app.post("/api/v1/auth/register/", &body).await }
    };
    let response = register("  eve ", "password123").await;
    assert_eq!(response.status, StatusCode::CREATED, "{}", response.body);
    assert_eq!(response.body, json!({"username": "eve"}));
    assert_eq!(app.login("eve", "password123").await.status, StatusCode::OK);
    assert_error(
        &register("eve", "password123").await,
        StatusCode::BAD_REQUEST,
        "unique",
    );
    assert_error(
        &register("mallory", "short").await,
        StatusCode::BAD_REQUEST,
        "min_length",
    );
    assert_error(
        &register("", "password123").await,
        StatusCode::BAD_REQUEST,
        "blank",
    );
    assert_error(
        &register("admin\u{202E}gnp", "password123").await,
        StatusCode::BAD_REQUEST,
        "invalid",
    );
    assert_error(
        &register(&"x".repeat(151), "password123").await,
        StatusCode::BAD_REQUEST,
        "max_length",
    );
}

#[tokio::test]
async fn usernames_are_unicode_normalized() {
    let app = spawn_app_with(|c| c.allow_registration = true).await;
    let nfd = "jose\u{301}";
    let nfc = "jos\u{e9}";
    let response = app
        .post(
            "/api/v1/auth/register/",
            &json!({"username": nfd, "password": "password123"}),
        )
        .await;
    assert_eq!(response.body, json!({"username": nfc}));
    let again = app
        .post(
            "/api/v1/auth/register/",
            &json!({"username": nfc, "password": "password123"}),
        )
        .await;
    assert_error(&again, StatusCode::BAD_REQUEST, "unique");
    assert_eq!(app.login(nfd, "password123").await.status, StatusCode::OK);
}

#[tokio::test]
async fn logout_revokes_only_the_key_it_was_called_with() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let other = app.login("alice", "password123").await.body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let response = app.post_auth("/api/v1/auth/logout/", &key, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let after = app.get_auth("/api/v1/auth/totp/", &key).await;
    assert_error(&after, StatusCode::FORBIDDEN, "authentication_failed");
    let again = app.post_auth("/api/v1/auth/logout/", &key, None).await;
    assert_error(&again, StatusCode::FORBIDDEN, "authentication_failed");
    assert_eq!(
        app.get_auth("/api/v1/auth/totp/", &other).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn missing_and_invalid_keys_get_403_on_every_authenticated_route() {
    let app = spawn_app().await;
    let routes = [
        ("POST", "/api/v1/auth/totp/setup/"),
        ("POST", "/api/v1/auth/totp/activate/"),
        ("POST", "/api/v1/auth/totp/deactivate/"),
        ("POST", "/api/v1/auth/logout/"),
        ("GET", "/api/v1/auth/totp/"),
    ];
    for (method, path) in routes {
        let method: reqwest::Method = method.parse().expect("method");
        let missing = app
            .send(app.client.request(method.clone(), app.url(path)))
            .await;
        assert_error(&missing, StatusCode::FORBIDDEN, "not_authenticated");
        assert!(missing.body["detail"].is_string());
        for header in ["Token nope", "Token a b", "Token ", "token"] {
            let bad = app
                .send(
                    app.client
                        .request(method.clone(), app.url(path))
                        .header("Authorization", header),
                )
                .await;
            assert_error(&bad, StatusCode::FORBIDDEN, "authentication_failed");
        }
        let bearer = app
            .send(
                app.client
                    .request(method.clone(), app.url(path))
                    .header("Authorization", "Bearer abc"),
            )
            .await;
        assert_error(&bearer, StatusCode::FORBIDDEN, "not_authenticated");
    }
}

#[tokio::test]
async fn a_temp_token_is_not_a_login_key() {
    let app = spawn_app().await;
    app.enrolled_user("alice").await;
    let temp = app.temp_token("alice").await;
    for path in ["/api/v1/auth/totp/setup/", "/api/v1/auth/totp/deactivate/"] {
        let response = app.post_auth(path, &temp, None).await;
        assert_error(&response, StatusCode::FORBIDDEN, "authentication_failed");
    }
}
