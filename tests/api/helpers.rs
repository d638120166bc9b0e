//! `spawn_app()`: the real server in this process on a free port, with a temp data dir and a
//! manual clock; plus request helpers and an enrolment helper that computes codes with totp-rs.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;
use totp_rs::Totp;
use totpd::app::Application;
use totpd::clock::ManualClock;
use totpd::config::Config;
use totpd::domain::audit::AuditEvent;
use totpd::service::{Ctx, Service};

/// A Unix time in the middle of a 30 s step, so ±1 step is unambiguous.
pub const START: u64 = 1_800_000_015;

pub struct TestApp {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub clock: ManualClock,
    pub service: Arc<Service>,
    pub config: Config,
    pub dir: TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

/// `common::quick_config` (cheap Argon2, limits off) on a data dir inside `dir`.
pub fn test_config(dir: &TempDir) -> Config {
    crate::common::quick_config(dir.path().join("data"))
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(edit: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(&dir);
    edit(&mut config);
    start(dir, config).await
}

/// Starts a server on `config` (its data dir may hold state from an earlier server).
pub async fn start(dir: TempDir, config: Config) -> TestApp {
    let clock = ManualClock::new(START);
    let shared: Arc<dyn totpd::clock::Clock> = Arc::new(clock.clone());
    let app = Application::build(config, shared)
        .await
        .expect("the application builds");
    let addr = app.local_addr();
    let (service, config) = (app.service(), app.config().clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    TestApp {
        base: format!("http://{addr}"),
        addr,
        client: reqwest::Client::new(),
        clock,
        service,
        config,
        dir,
        shutdown: Some(tx),
        server: Some(server),
    }
}

pub struct Response {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl TestApp {
    /// Stops the server and closes the store, keeping the data dir for a restart.
    pub async fn stop(mut self) -> (TempDir, Config) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("stopped cleanly");
        }
        (self.dir, self.config.clone())
    }

    /// The audit trail, oldest first.
    pub async fn events(&self) -> Vec<AuditEvent> {
        self.service.audit_trail(0, None).await.expect("events")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Response {
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body read");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
        };
        Response {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.send(self.client.post(self.url(path)).json(body)).await
    }

    pub async fn post_auth(&self, path: &str, key: &str, body: Option<&Value>) -> Response {
        let mut request = self
            .client
            .post(self.url(path))
            .header("Authorization", format!("Token {key}"));
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request).await
    }

    pub async fn get_auth(&self, path: &str, key: &str) -> Response {
        self.send(
            self.client
                .get(self.url(path))
                .header("Authorization", format!("Token {key}")),
        )
        .await
    }

    pub async fn create_user(&self, username: &str, password: &str) {
        self.service
            .create_user(
                username,
                password.to_owned(),
                "ok",
                &Ctx {
                    now: self.clock_now(),
                    ip: None,
                },
            )
            .await
            .expect("user created");
    }

    pub fn clock_now(&self) -> u64 {
        use totpd::clock::Clock;
        self.clock.now()
    }

    pub async fn login(&self, username: &str, password: &str) -> Response {
        self.post(
            "/api/v1/auth/login/",
            &json!({ "username": username, "password": password }),
        )
        .await
    }

    /// A user without TOTP and their login key.
    pub async fn user_with_key(&self, username: &str) -> String {
        self.create_user(username, "password123").await;
        let response = self.login(username, "password123").await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.body);
        response.body["key"].as_str().expect("key").to_owned()
    }

    /// setup: the response and the authenticator built from its provisioning URI.
    pub async fn setup(&self, key: &str) -> (Response, Totp) {
        let response = self.post_auth("/api/v1/auth/totp/setup/", key, None).await;
        assert_eq!(response.status, StatusCode::CREATED, "{}", response.body);
        let uri = response.body["provisioning_uri"].as_str().expect("uri");
        let totp = Totp::from_url(uri).expect("totp-rs accepts the provisioning URI");
        (response, totp)
    }

    /// A code for the current manual time plus `offset_steps` steps.
    pub fn code(&self, totp: &Totp, offset_steps: i64) -> String {
        let t = self.clock_now() as i64 + offset_steps * 30;
        totp.generate(t as u64).to_string()
    }

    /// A user with TOTP active: (login key, authenticator, recovery codes). The clock is moved
    /// one step on afterwards, so the next code is fresh.
    pub async fn enrolled_user(&self, username: &str) -> Enrolled {
        let key = self.user_with_key(username).await;
        let (_, totp) = self.setup(&key).await;
        let code = self.code(&totp, 0);
        let response = self
            .post_auth(
                "/api/v1/auth/totp/activate/",
                &key,
                Some(&json!({ "token": code })),
            )
            .await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.body);
        let recovery_codes = response.body["recovery_codes"]
            .as_array()
            .expect("codes")
            .iter()
            .map(|c| c.as_str().expect("string").to_owned())
            .collect();
        self.clock.advance(30);
        Enrolled {
            username: username.to_owned(),
            key,
            totp,
            recovery_codes,
        }
    }

    /// Password step for an enrolled user: the temp token.
    pub async fn temp_token(&self, username: &str) -> String {
        let response = self.login(username, "password123").await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.body);
        assert_eq!(response.body["totp_required"], json!(true));
        response.body["temp_token"]
            .as_str()
            .expect("temp_token")
            .to_owned()
    }

    /// POST with an `X-Forwarded-For` header.
    pub async fn post_from(&self, path: &str, body: &Value, forwarded_for: &str) -> Response {
        self.send(
            self.client
                .post(self.url(path))
                .header("X-Forwarded-For", forwarded_for)
                .json(body),
        )
        .await
    }

    /// A code that is not the code of any step within ±10 of now: a sure wrong guess, which
    /// gets `invalid_code` (not the clock-drift hint, `clock_skew`).
    pub fn wrong_code(&self, totp: &Totp, salt: u32) -> String {
        let valid: Vec<String> = (-10..=10).map(|o| self.code(totp, o)).collect();
        (0u32..)
            .map(|i| format!("{:06}", (salt.wrapping_mul(7919) + i * 104_729) % 1_000_000))
            .find(|c| !valid.contains(c))
            .expect("some wrong code")
    }

    pub async fn verify(&self, temp_token: &str, token: &str) -> Response {
        self.post(
            "/api/v1/auth/totp/verify/",
            &json!({ "temp_token": temp_token, "token": token }),
        )
        .await
    }
}

pub struct Enrolled {
    pub username: String,
    pub key: String,
    pub totp: Totp,
    pub recovery_codes: Vec<String>,
}

/// Asserts a DRF-shaped error: the status, the code, and a JSON content type.
pub fn assert_error(response: &Response, status: StatusCode, code: &str) {
    assert_eq!(response.status, status, "{}", response.body);
    assert_eq!(response.body["code"], json!(code), "{}", response.body);
    let content_type = response
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
}

/// Sends raw bytes on a fresh connection and returns the whole response text.
pub async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut response),
    )
    .await;
    String::from_utf8_lossy(&response).into_owned()
}

/// The status code of a raw HTTP response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// Searches every file under `dir` for `needle`.
pub fn dir_contains(dir: &std::path::Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            dir_contains(&path, needle)
        } else {
            std::fs::read(&path)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}
