use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_error, raw_request, raw_status, spawn_app};

#[tokio::test]
async fn unknown_paths_are_404_json() {
    let app = spawn_app().await;
    // (`/` is the self-service page: tests/web.rs.)
    for path in [
        "/nope",
        "/api/v1/auth/totp/nope/",
        "/api/v1/auth/totp/verify/extra/",
    ] {
        let response = app.send(app.client.post(app.url(path))).await;
        assert_error(&response, StatusCode::NOT_FOUND, "not_found");
        let response = app.send(app.client.get(app.url(path))).await;
        assert_error(&response, StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test]
async fn wrong_methods_are_405_json() {
    let app = spawn_app().await;
    for path in [
        "/api/v1/auth/totp/verify/",
        "/api/v1/auth/totp/setup/",
        "/api/v1/auth/totp/activate/",
        "/api/v1/auth/totp/deactivate/",
        "/api/v1/auth/login/",
    ] {
        for method in ["GET", "PUT", "DELETE", "PATCH"] {
            let method: reqwest::Method = method.parse().expect("method");
            let response = app.send(app.client.request(method, app.url(path))).await;
            assert_error(
                &response,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            );
        }
    }
    let post_status = app
        .send(app.client.post(app.url("/api/v1/auth/totp/")))
        .await;
    assert_error(
        &post_status,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn paths_work_with_and_without_the_trailing_slash() {
    let app = spawn_app().await;
    let response = app
        .post(
            "/api/v1/auth/login",
            &json!({"username": "x", "password": "y"}),
        )
        .await;
    assert_error(&response, StatusCode::BAD_REQUEST, "invalid_credentials");
}

#[tokio::test]
async fn malformed_and_non_object_json_is_a_parse_error() {
    let app = spawn_app().await;
    for body in [
        "{",
        "[]",
        "null",
        "\"x\"",
        "{\"token\":\"1\"} trailing",
        "\u{feff}{}",
    ] {
        for path in ["/api/v1/auth/totp/verify/", "/api/v1/auth/login/"] {
            let response = app
                .send(
                    app.client
                        .post(app.url(path))
                        .header("Content-Type", "application/json")
                        .body(body.to_owned()),
                )
                .await;
            assert_error(&response, StatusCode::BAD_REQUEST, "parse_error");
            assert!(response.body["detail"].is_string());
        }
    }
    let invalid_utf8 = app
        .send(
            app.client
                .post(app.url("/api/v1/auth/totp/verify/"))
                .header("Content-Type", "application/json")
                .body(b"{\"token\":\"\xff\"}".to_vec()),
        )
        .await;
    assert_error(&invalid_utf8, StatusCode::BAD_REQUEST, "parse_error");
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let response = app
        .send(
            app.client
                .post(app.url("/api/v1/auth/totp/verify/"))
                .header("Content-Type", "application/json")
                .body(deep),
        )
        .await;
    assert_error(&response, StatusCode::BAD_REQUEST, "parse_error");
}

#[tokio::test]
async fn bodies_over_16_kib_are_413() {
    let app = spawn_app().await;
    let big = json!({"username": "a", "password": "x".repeat(17 * 1024)});
    let response = app.post("/api/v1/auth/login/", &big).await;
    assert_error(
        &response,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    // Chunked, without Content-Length: counted as it arrives.
    let chunk = "x".repeat(8 * 1024);
    let mut request = b"POST /api/v1/auth/login/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..3 {
        request.extend(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
    }
    request.extend(b"0\r\n\r\n");
    let response = raw_request(app.addr, &request).await;
    assert_eq!(raw_status(&response), 413, "{response}");
    assert!(response.contains("payload_too_large"));
}

#[tokio::test]
async fn a_chunked_body_within_the_limit_is_read() {
    let app = spawn_app().await;
    let body = r#"{"username":"x","password":"y"}"#;
    let request = format!(
        "POST /api/v1/auth/login/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let response = raw_request(app.addr, request.as_bytes()).await;
    assert_eq!(raw_status(&response), 400, "{response}");
    assert!(response.contains("invalid_credentials"), "{response}");
}

#[tokio::test]
async fn non_json_bodies_are_415() {
    let app = spawn_app().await;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = app
            .client
            .post(app.url("/api/v1/auth/login/"))
            .body(r#"{"username":"x","password":"y"}"#);
        if let Some(ct) = content_type {
            request = request.header("Content-Type", ct);
        }
        let response = app.send(request).await;
        assert_error(
            &response,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
    }
    let with_charset = app
        .send(
            app.client
                .post(app.url("/api/v1/auth/login/"))
                .header("Content-Type", "Application/JSON; charset=utf-8")
                .body(r#"{"username":"x","password":"y"}"#),
        )
        .await;
    assert_error(
        &with_charset,
        StatusCode::BAD_REQUEST,
        "invalid_credentials",
    );
}

/// setup, deactivate and logout have no body: they must work with `Content-Length: 0` and with
/// no Content-Length at all (warp's content_length_limit would answer 411).
#[tokio::test]
async fn body_less_posts_work_with_and_without_content_length() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    for (path, want) in [
        ("/api/v1/auth/totp/setup/", 201),
        ("/api/v1/auth/totp/deactivate/", 400), // not active: a 400 from the use case, not 411
        ("/api/v1/auth/logout/", 200),
    ] {
        for length in ["", "Content-Length: 0\r\n"] {
            let key = if path.ends_with("logout/") {
                app.login("alice", "password123").await.body["key"]
                    .as_str()
                    .expect("key")
                    .to_owned()
            } else {
                key.clone()
            };
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Token {key}\r\n{length}Connection: close\r\n\r\n"
            );
            let response = raw_request(app.addr, request.as_bytes()).await;
            assert_eq!(raw_status(&response), want, "{path} [{length}] {response}");
            assert!(
                response
                    .to_ascii_lowercase()
                    .contains("content-type: application/json")
            );
        }
    }
}

#[tokio::test]
async fn non_ascii_and_duplicate_authorization_headers_are_403() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let cases = [
        b"Authorization: Token \xff\xfe\r\n".to_vec(),
        format!("Authorization: Token {key}\r\nAuthorization: Token {key}\r\n").into_bytes(),
        format!("Authorization: Token {}\r\n", "a".repeat(8000)).into_bytes(),
    ];
    for header in cases {
        let mut request =
            b"GET /api/v1/auth/totp/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".to_vec();
        request.extend(&header);
        request.extend(b"\r\n");
        let response = raw_request(app.addr, &request).await;
        assert_eq!(raw_status(&response), 403, "{response}");
        assert!(response.contains("authentication_failed"), "{response}");
    }
}

#[tokio::test]
async fn a_head_block_over_the_limit_is_refused_without_a_500() {
    let app = spawn_app().await;
    let request = format!(
        "GET /api/v1/auth/totp/ HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let response = raw_request(app.addr, request.as_bytes()).await;
    if !response.is_empty() {
        let status = raw_status(&response);
        assert!((400..500).contains(&status), "{response}");
    }
    // The server is still serving.
    assert_eq!(
        app.send(app.client.get(app.url("/nope"))).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn every_answer_is_json_with_no_store_and_nosniff() {
    let app = spawn_app().await;
    let key = app.user_with_key("alice").await;
    let responses = [
        app.send(app.client.get(app.url("/nope"))).await,
        app.post("/api/v1/auth/login/", &json!({})).await,
        app.get_auth("/api/v1/auth/totp/", &key).await,
        app.post_auth("/api/v1/auth/totp/setup/", &key, None).await,
    ];
    for response in responses {
        assert_eq!(response.headers["content-type"], "application/json");
        assert_eq!(response.headers["cache-control"], "no-store");
        assert_eq!(response.headers["x-content-type-options"], "nosniff");
        assert!(response.body["code"].is_string() || response.status.is_success());
    }
}

#[tokio::test]
async fn a_slow_body_times_out_with_408() {
    let app = crate::helpers::spawn_app_with(|c| c.body_read_timeout = 1).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"POST /api/v1/auth/login/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user")
        .await
        .expect("write");
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut response),
    )
    .await;
    assert!(read.is_ok(), "the server did not give up on the slow body");
    let response = String::from_utf8_lossy(&response);
    assert_eq!(raw_status(&response), 408, "{response}");
    assert!(response.contains("request_timeout"));
}

#[cfg(not(feature = "bench"))]
#[tokio::test]
async fn the_benchmark_baseline_route_is_absent_from_normal_builds() {
    let app = spawn_app().await;
    let response = app
        .post(
            "/api/v1/bench/baseline/",
            &json!({"temp_token": "t", "token": "123456"}),
        )
        .await;
    assert_error(&response, StatusCode::NOT_FOUND, "not_found");
}
