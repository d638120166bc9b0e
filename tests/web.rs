//! The self-service page (`src/http/web.rs`, `src/http/web/`): what the server sends (types, security
//! headers, no inline code, `web_ui = false`), and the whole flow in headless Chromium against the
//! real binary, driven over WebDriver (chromedriver from Debian's `chromium-driver`).

#[path = "common/mod.rs"]
mod common;

#[path = "web/browser.rs"]
mod browser;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap};

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("ASCII header")
}

fn assert_security_headers(path: &str, headers: &HeaderMap) {
    assert_eq!(
        header(headers, "content-security-policy"),
        CSP,
        "CSP of {path}"
    );
    assert_eq!(header(headers, "x-frame-options"), "DENY", "{path}");
    assert_eq!(header(headers, "referrer-policy"), "no-referrer", "{path}");
    assert_eq!(
        header(headers, "x-content-type-options"),
        "nosniff",
        "{path}"
    );
    assert_eq!(header(headers, "cache-control"), "no-store", "{path}");
}

#[tokio::test]
async fn page_script_and_stylesheet_are_served_with_their_types_and_security_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, _state) = common::serve_in_process(
        common::quick_config(dir.path().join("data")),
        totpd::clock::ManualClock::new(1_800_000_015),
    )
    .await;
    let client = reqwest::Client::new();
    for (path, content_type, needle) in [
        ("/", "text/html; charset=utf-8", "<h1>"),
        ("/index.html", "text/html; charset=utf-8", "<h1>"),
        ("/app.js", "text/javascript; charset=utf-8", "'use strict'"),
        (
            "/style.css",
            "text/css; charset=utf-8",
            "prefers-color-scheme: dark",
        ),
    ] {
        let response = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            header(response.headers(), CONTENT_TYPE.as_str()),
            content_type,
            "{path}"
        );
        assert_security_headers(path, response.headers());
        let body = response.text().await.expect("body");
        assert!(body.contains(needle), "{path} is not the expected file");
    }
    // Only GET: the page's paths are not a place to post to.
    for path in ["/", "/app.js"] {
        let response = client
            .post(format!("{base}{path}"))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
    // Other paths stay unknown, whatever the method.
    for path in ["/nope", "/index.html/x", "/app.js/x", "/web/app.js"] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let response = client
                .request(method.clone(), format!("{base}{path}"))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
        }
    }
    // The API around it is unchanged.
    let response = client
        .get(format!("{base}/api/v1/auth/totp/"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

/// The CSP forbids inline script and style; this keeps the files within it (the browser test
/// would see the violations only on the paths it walks) and the page free of other origins.
#[test]
fn the_page_has_no_inline_script_or_style_and_no_other_origin() {
    let html = include_str!("../src/http/web/index.html");
    let lower = html.to_ascii_lowercase();
    let mut scripts = 0;
    for (at, _) in lower.match_indices("<script") {
        let tag = &lower[at..at + lower[at..].find('>').expect("tag ends")];
        assert!(tag.contains(" src="), "inline script: {tag}");
        let after = &lower[at + tag.len() + 1..];
        assert!(
            after.starts_with("</script>"),
            "a script with src has content"
        );
        scripts += 1;
    }
    assert_eq!(scripts, 1, "one script, app.js");
    assert!(!lower.contains("<style"), "inline <style>");
    assert!(!lower.contains("style="), "style attribute");
    // Inline event handlers (onclick= …) are inline script too.
    for (at, _) in lower.match_indices(" on") {
        let word: String = lower[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        assert!(
            !lower[at + 1 + word.len()..].starts_with('='),
            "inline handler {word}="
        );
    }
    for text in [html, include_str!("../src/http/web/style.css")] {
        for origin in ["http:", "https:", "//", "@import", "url("] {
            let found = text
                .lines()
                .filter(|l| {
                    !l.trim_start().starts_with("/*") && !l.trim_start().starts_with("<!--")
                })
                .any(|l| l.contains(origin) && !l.contains("://www.w3.org"));
            assert!(!found, "a reference to another resource: {origin}");
        }
    }
    // The script builds the page from text nodes: no HTML from the server is ever parsed, and it
    // never sets a style (which the CSP would refuse).
    let js = include_str!("../src/http/web/app.js");
    for forbidden in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        ".style.",
        "localStorage",
        "http:",
        "https:",
    ] {
        assert!(!js.contains(forbidden), "app.js uses {forbidden}");
    }
}

#[test]
fn web_ui_false_answers_404_on_the_page_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = common::totpd(dir.path(), &dir.path().join("data"))
        .env("TOTPD_WEB_UI", "false")
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn totpd");
    let listening = common::listening(&mut child, Duration::from_secs(20));
    let result = std::panic::catch_unwind(|| {
        let base = listening.as_ref().expect("listening").base.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let client = reqwest::Client::new();
            for path in ["/", "/index.html", "/app.js", "/style.css"] {
                let response = client
                    .get(format!("{base}{path}"))
                    .send()
                    .await
                    .expect("GET");
                assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
                let body: serde_json::Value = response.json().await.expect("JSON");
                assert_eq!(body["code"], "not_found", "{path}");
            }
            let response = client
                .get(format!("{base}/healthz"))
                .send()
                .await
                .expect("GET");
            assert_eq!(response.status(), StatusCode::OK, "the API still answers");
        });
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// `user add NAME --password-stdin` through the CLI (the running server carries it out).
pub fn add_user(dir: &std::path::Path, data_dir: &std::path::Path, name: &str, password: &str) {
    let mut child = common::totpd(dir, data_dir)
        .args(["user", "add", name, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn totpd user add");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{password}").expect("password to stdin");
    drop(stdin);
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "user add failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
