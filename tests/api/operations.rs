use std::collections::BTreeSet;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::helpers::{assert_error, spawn_app, spawn_app_with, start, test_config};

fn served_document() -> Value {
    serde_json::from_str(totpd::http::handlers::OPENAPI).expect("the OpenAPI document is JSON")
}

fn seed_document() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("spec/authtotp.openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("seed spec")).expect("JSON")
}

/// `ours` keeps everything `seed` says: objects may gain keys, nothing else may change.
fn is_superset(ours: &Value, seed: &Value, at: &str, problems: &mut Vec<String>) {
    match (ours, seed) {
        (Value::Object(o), Value::Object(s)) => {
            for (key, value) in s {
                match o.get(key) {
                    Some(mine) => is_superset(mine, value, &format!("{at}/{key}"), problems),
                    None => problems.push(format!("{at}/{key} is missing")),
                }
            }
        }
        _ if ours == seed => {}
        _ => problems.push(format!("{at} changed")),
    }
}

#[tokio::test]
async fn the_document_is_served_as_json() {
    let app = spawn_app().await;
    let response = app
        .send(app.client.get(app.url("/api/v1/openapi.json")))
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, served_document());
    assert!(
        response.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
}

#[test]
fn every_route_the_server_has_is_documented_and_nothing_else() {
    let doc = served_document();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = totpd::http::routes::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, served);
}

/// `ROUTES` (which metrics and the test above use) is the list of routes the server serves,
/// and each route filter answers the method and path it is listed with, with or without the
/// trailing slash: a route added to the filters alone, or listed under a wrong path, fails here.
#[tokio::test]
async fn the_route_table_is_the_routes_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = totpd::app::Application::build(
        test_config(&dir),
        Arc::new(totpd::clock::ManualClock::new(crate::helpers::START)),
    )
    .await
    .expect("builds");
    let state = app.http_state();
    let served = totpd::http::routes::served(&state);
    let listed: Vec<(&str, &str)> = served.iter().map(|(m, p, _)| (*m, *p)).collect();
    assert_eq!(listed, totpd::http::routes::ROUTES);
    for (method, path, filter) in &served {
        for path in [*path, path.trim_end_matches('/')] {
            let matched = warp::test::request()
                .method(method)
                .path(path)
                .filter(filter)
                .await;
            if let Err(rejection) = matched {
                // A refusal of the route itself (no key, say) is fine: the path matched.
                assert!(
                    !rejection.is_not_found()
                        && rejection.find::<warp::reject::MethodNotAllowed>().is_none(),
                    "{method} {path} is not served by its filter: {rejection:?}"
                );
            }
        }
        let other = if *method == "GET" { "POST" } else { "GET" };
        let wrong = warp::test::request()
            .method(other)
            .path(path)
            .filter(filter)
            .await;
        assert!(wrong.is_err(), "{other} {path} is not a route");
    }
}

#[test]
fn the_four_seed_operations_and_their_components_are_kept() {
    let (ours, seed) = (served_document(), seed_document());
    let mut problems = Vec::new();
    for (path, item) in seed["paths"].as_object().expect("paths") {
        is_superset(&ours["paths"][path], item, path, &mut problems);
    }
    for section in ["schemas", "securitySchemes"] {
        is_superset(
            &ours["components"][section],
            &seed["components"][section],
            section,
            &mut problems,
        );
    }
    // The seed's 400 schema cannot be satisfied (see the spec's README); ours says what it means.
    let mut seed_responses = seed["components"]["responses"].clone();
    seed_responses["400"]["content"]["application/json"]
        .as_object_mut()
        .expect("400 content")
        .remove("schema");
    is_superset(
        &ours["components"]["responses"],
        &seed_responses,
        "responses",
        &mut problems,
    );
    assert_eq!(ours["security"], seed["security"]);
    assert!(problems.is_empty(), "{problems:#?}");
    let any_of =
        &ours["components"]["responses"]["400"]["content"]["application/json"]["schema"]["anyOf"];
    assert_eq!(any_of.as_array().map(Vec::len), Some(3));
}

#[test]
fn the_copy_of_the_seed_spec_is_the_shared_one() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/spec/authtotp.openapi.json");
    if let Ok(text) = std::fs::read_to_string(shared) {
        let shared: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(shared, seed_document());
    }
}

/// Every `$ref` points at something that exists.
#[test]
fn every_reference_resolves() {
    fn walk(value: &Value, doc: &Value, missing: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    let pointer = target.trim_start_matches('#');
                    if doc.pointer(pointer).is_none() {
                        missing.push(target.clone());
                    }
                }
                map.values().for_each(|v| walk(v, doc, missing));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, doc, missing)),
            _ => {}
        }
    }
    let doc = served_document();
    let mut missing = Vec::new();
    walk(&doc, &doc, &mut missing);
    assert!(missing.is_empty(), "{missing:?}");
}

#[tokio::test]
async fn setup_returns_a_qr_code_of_the_provisioning_uri() {
    let app = spawn_app().await;
    let key = app.user_with_key("john doe").await;
    let (setup, _) = app.setup(&key).await;
    let uri = setup.body["provisioning_uri"].as_str().expect("uri");
    let data = setup.body["qr_code"].as_str().expect("qr_code");
    let svg = data
        .strip_prefix("data:image/svg+xml;base64,")
        .and_then(|b64| data_encoding::BASE64.decode(b64.as_bytes()).ok())
        .map(|bytes| String::from_utf8(bytes).expect("utf-8"))
        .expect("an SVG data URI");
    // Read the modules back out of the served SVG: a path of runs "M{x} {y}h{n}v1h-{n}z" …
    let view = svg
        .split("viewBox=\"0 0 ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("a square viewBox");
    let path = svg
        .split(" d=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a path");
    let mut dark = vec![false; view * view];
    for run in path.split('M').filter(|r| !r.is_empty()) {
        let numbers: Vec<usize> = run
            .split(|c: char| !c.is_ascii_digit())
            .filter(|n| !n.is_empty())
            .filter_map(|n| n.parse().ok())
            .collect();
        let (x, y, len) = (numbers[0], numbers[1], numbers[2]);
        for cell in &mut dark[y * view + x..y * view + x + len] {
            *cell = true;
        }
    }
    // … and read them with an independent decoder, as a phone camera would.
    let scale = 4;
    let size = view * scale;
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(size, size, |x, y| {
        if dark[(y / scale) * view + x / scale] {
            0
        } else {
            255
        }
    });
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1);
    let (_, content) = grids[0].decode().expect("decodes");
    assert_eq!(content, uri);
}

#[tokio::test]
async fn healthz_answers_when_the_store_does() {
    let app = spawn_app().await;
    let response = app.send(app.client.get(app.url("/healthz"))).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, json!({"status": "ok"}));
}

#[tokio::test]
async fn every_answer_has_a_distinct_request_id() {
    let app = spawn_app().await;
    let mut ids = BTreeSet::new();
    for path in ["/healthz", "/nope", "/api/v1/auth/totp/"] {
        let response = app.send(app.client.get(app.url(path))).await;
        let id = response.headers["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(id.len(), 16);
        assert!(ids.insert(id));
    }
}

#[tokio::test]
async fn metrics_count_requests_verify_outcomes_lockouts_and_users() {
    let app = spawn_app().await;
    let user = app.enrolled_user("alice").await;
    app.create_user("bob", "password123").await;
    let temp = app.temp_token("alice").await;
    app.verify(&temp, &app.wrong_code(&user.totp, 1)).await;
    app.verify(&temp, &app.code(&user.totp, 0)).await;
    let temp = app.temp_token("alice").await;
    app.verify(&temp, &app.code(&user.totp, 0)).await; // replay
    app.verify("no-such-token", "123456").await;
    // The replay and nine wrong codes after the success make ten failures: a lock.
    for i in 0..9 {
        let temp = app.temp_token("alice").await;
        app.verify(&temp, &app.wrong_code(&user.totp, 10 + i)).await;
    }
    let temp = app.temp_token("alice").await;
    app.verify(&temp, &app.code(&user.totp, 0)).await; // locked
    let response = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = response.text().await.expect("text");
    for line in [
        "totpd_http_requests_total{route=\"/api/v1/auth/totp/verify/\",status=\"200\"} 1",
        "totpd_http_requests_total{route=\"/api/v1/auth/totp/verify/\",status=\"401\"} 1",
        "totpd_http_requests_total{route=\"/api/v1/auth/totp/verify/\",status=\"429\"} 1",
        "totpd_http_requests_total{route=\"/api/v1/auth/totp/activate/\",status=\"200\"} 1",
        "totpd_verify_total{outcome=\"ok\"} 1",
        "totpd_verify_total{outcome=\"wrong_code\"} 10",
        "totpd_verify_total{outcome=\"replay\"} 1",
        "totpd_verify_total{outcome=\"invalid_temp_token\"} 1",
        "totpd_verify_total{outcome=\"locked\"} 1",
        "totpd_lockouts_total 1",
        "totpd_users 2",
        "totpd_users_totp_active 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
    assert!(text.contains(
        "totpd_http_request_duration_seconds_bucket{route=\"/api/v1/auth/login/\",le=\"+Inf\"}"
    ));
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert!(value("totpd_database_bytes") > 0);
    // Every durable answer above went through a flush; a flush may acknowledge several.
    let (flushes, acknowledged) = (
        value("totpd_store_flushes_total"),
        value("totpd_store_acknowledged_writes_total"),
    );
    assert!(
        flushes > 0 && acknowledged >= flushes,
        "{flushes} {acknowledged}"
    );
}

#[tokio::test]
async fn metrics_can_be_restricted_to_some_addresses() {
    let app = spawn_app_with(|c| c.metrics_allow = vec!["10.0.0.0/8".parse().expect("net")]).await;
    let response = app.send(app.client.get(app.url("/metrics"))).await;
    assert_error(&response, StatusCode::FORBIDDEN, "permission_denied");
    let open =
        spawn_app_with(|c| c.metrics_allow = vec!["127.0.0.1/32".parse().expect("net")]).await;
    let response = open
        .client
        .get(open.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
}

/// A backup taken while verifies consume recovery codes restores to a state where every code
/// consumed before the backup began stays consumed, and every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_load_restores_without_resurrecting_anything() {
    let app = Arc::new(spawn_app().await);
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(app.enrolled_user(&format!("user{i}")).await);
    }
    // Before the backup: each user spends recovery codes 0 and 1.
    for user in &users {
        for code in &user.recovery_codes[..2] {
            let temp = app.temp_token(&user.username).await;
            assert_eq!(app.verify(&temp, code).await.status, StatusCode::OK);
        }
    }
    // During the backup: more codes are spent in parallel.
    let mut load = JoinSet::new();
    for user in &users {
        for code in &user.recovery_codes[2..6] {
            let (app, name, code) = (Arc::clone(&app), user.username.clone(), code.clone());
            load.spawn(async move {
                let temp = app.temp_token(&name).await;
                app.verify(&temp, &code).await.status
            });
        }
    }
    let file = app.dir.path().join("backup.totpd");
    let written = totpd::admin::backup::write(&app.service, &file)
        .await
        .expect("backup");
    while let Some(status) = load.join_next().await {
        assert_eq!(status.expect("task"), StatusCode::OK);
    }
    assert!(written > 0);

    // Restore into a fresh data dir that has the same master key.
    let target = tempfile::tempdir().expect("tempdir");
    let config = test_config(&target);
    std::fs::create_dir_all(&config.data_dir).expect("mkdir");
    std::fs::copy(app.config.master_key_path(), config.master_key_path()).expect("key");
    let restored = totpd::admin::backup::restore(&file, &totpd::app::store_config(&config))
        .await
        .expect("restore");
    assert_eq!(restored, written);
    let copy = start(target, config).await;
    copy.clock.set(app.clock_now());
    for user in &users {
        for code in &user.recovery_codes[..2] {
            let temp = copy.temp_token(&user.username).await;
            let response = copy.verify(&temp, code).await;
            assert_error(&response, StatusCode::BAD_REQUEST, "invalid_code");
        }
        // Codes never used work; the store's invariants hold (active, codes counted).
        let temp = copy.temp_token(&user.username).await;
        assert_eq!(
            copy.verify(&temp, &user.recovery_codes[9]).await.status,
            StatusCode::OK
        );
        let status = copy.get_auth("/api/v1/auth/totp/", &user.key).await;
        assert_eq!(status.body["active"], json!(true));
        let left = status.body["recovery_codes_remaining"]
            .as_u64()
            .expect("count");
        assert!((3..=7).contains(&left), "{left}");
    }
}
