//! What every integration-test target needs to start totpd, in one place: the binary with a
//! clean environment and test-speed settings, or the server in this process with the same
//! settings. Each target includes it with `mod common;` and uses what it needs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use totpd::clock::{Clock, ManualClock};
use totpd::config::Config;
use totpd::limits::Rate;
use totpd::service::password::Argon2Settings;

pub const BIN: &str = env!("CARGO_BIN_EXE_totpd");

/// Limits off: tests that are about them turn them on.
pub const NO_LIMIT: Rate = Rate {
    per_minute: 0,
    burst: 10,
};

/// Every test client connects from 127.0.0.1, so the per-address connection cap is lifted;
/// the test that is about it sets it.
pub const NO_CONNECTION_CAP: usize = 1_000_000;

/// Cheap Argon2 so tests spend their time on behaviour, not hashing.
pub const CHEAP_ARGON2: Argon2Settings = Argon2Settings {
    memory_kib: 64,
    iterations: 1,
    parallelism: 1,
};

/// The defaults, with cheap Argon2 and the rate limits off.
pub fn quick_config(data_dir: PathBuf) -> Config {
    Config {
        listen: ([127, 0, 0, 1], 0).into(),
        data_dir,
        argon2: CHEAP_ARGON2,
        hash_threads: 2,
        ip_rate: NO_LIMIT,
        login_failure_rate: NO_LIMIT,
        max_connections_per_ip: NO_CONNECTION_CAP,
        ..Config::default()
    }
}

/// A `totpd` command on `data_dir` with the same settings as `quick_config`, no inherited
/// `TOTPD_*` variable (an unknown one would stop the start) and an empty config file in
/// `config_dir` (so a stray ./config.toml is not read). Logs at `warn`.
pub fn totpd(config_dir: &Path, data_dir: &Path) -> Command {
    let config = config_dir.join("empty.toml");
    if !config.exists() {
        std::fs::write(&config, "").expect("empty config file");
    }
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TOTPD_") {
            command.env_remove(key);
        }
    }
    command
        .env("TOTPD_CONFIG", config)
        .env(
            "TOTPD_ARGON2_MEMORY_KIB",
            CHEAP_ARGON2.memory_kib.to_string(),
        )
        .env(
            "TOTPD_ARGON2_ITERATIONS",
            CHEAP_ARGON2.iterations.to_string(),
        )
        .env("TOTPD_RATE_LIMIT_PER_MINUTE", "0")
        .env("TOTPD_RATE_LIMIT_LOGIN_FAILURES_PER_MINUTE", "0")
        .env(
            "TOTPD_MAX_CONNECTIONS_PER_IP",
            NO_CONNECTION_CAP.to_string(),
        )
        .env("TOTPD_LOG_LEVEL", "warn")
        .arg("--data-dir")
        .arg(data_dir);
    command
}

/// A started server's first stdout line, and what it printed after (it should print nothing
/// more: the caller checks).
pub struct Listening {
    /// `http://IP:PORT` or `https://IP:PORT`.
    pub base: String,
    pub later_lines: Arc<Mutex<Vec<String>>>,
}

/// Waits for `listening on <base>` on the child's piped stdout, then keeps reading the rest on
/// a thread (so the server never blocks on a full pipe) and keeps any line it finds.
pub fn listening(child: &mut Child, timeout: Duration) -> Result<Listening, String> {
    let stdout = child.stdout.take().ok_or("stdout is not piped")?;
    let later_lines = Arc::new(Mutex::new(Vec::new()));
    let later = Arc::clone(&later_lines);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send(line);
        let mut rest = String::new();
        while stdout.read_line(&mut rest).unwrap_or(0) > 0 {
            later.lock().expect("lock").push(std::mem::take(&mut rest));
        }
    });
    let line = rx
        .recv_timeout(timeout)
        .map_err(|_| format!("no listening line within {timeout:?}"))?;
    let base = line
        .trim_end()
        .strip_prefix("listening on ")
        .filter(|base| base.starts_with("http://") || base.starts_with("https://"))
        .ok_or_else(|| format!("unexpected first line {line:?}"))?
        .to_owned();
    Ok(Listening { base, later_lines })
}

/// The server in this process on a free port, running until the process ends: its base URL and
/// its service (to create users directly).
pub async fn serve_in_process(
    config: Config,
    clock: ManualClock,
) -> (String, Arc<totpd::service::Service>) {
    let shared: Arc<dyn Clock> = Arc::new(clock);
    let app = totpd::app::Application::build(config, shared)
        .await
        .expect("the application builds");
    let base = format!("http://{}", app.local_addr());
    let service = app.service();
    tokio::spawn(app.run_until_stopped(std::future::pending::<()>()));
    (base, service)
}

/// A figure for the test's output: straight to stderr, which the harness shows.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The PostgreSQL server the tests may use: `TOTPD_TEST_DATABASE_URL` (`.ci/run` starts one).
pub const TEST_DATABASE_VAR: &str = "TOTPD_TEST_DATABASE_URL";

/// The test database's URL, or `None` after a loud note on stderr: PostgreSQL tests then
/// skip, except under CI (`CI` set), where a missing database fails them.
pub fn test_database_url() -> Option<String> {
    match std::env::var(TEST_DATABASE_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{TEST_DATABASE_VAR} is not set, and CI is: the PostgreSQL tests must run")
        }
        _ => {
            report(&format!(
                "SKIPPED: {TEST_DATABASE_VAR} is not set, so this PostgreSQL test did not run \
                 (`source ci/postgres.sh start` sets it)"
            ));
            None
        }
    }
}

/// A schema of its own in the test database, for one test: dropped when this is dropped.
pub struct TestSchema {
    /// The test database's URL with `search_path` set to the schema.
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestSchema {
    /// Creates a fresh schema `totpd_test_<random>` in `base` (the test database's URL).
    pub async fn create(base: &str) -> TestSchema {
        let name = format!("totpd_test_{:016x}", rand::random::<u64>());
        let (client, connection) = tokio_postgres::connect(base, tokio_postgres::NoTls)
            .await
            .expect("the test database answers");
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .expect("create the test schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        TestSchema {
            url: format!("{base}{separator}options=-c%20search_path%3D{name}"),
            admin_url: base.to_owned(),
            name,
        }
    }

    /// `url` with its host and port replaced by `addr` (to reach the database through a proxy).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let (userinfo, after) = rest.rsplit_once('@').map_or(("", rest), |(u, a)| (u, a));
        let path = &after[after.find('/').unwrap_or(after.len())..];
        let at = if userinfo.is_empty() { "" } else { "@" };
        format!("{scheme}://{userinfo}{at}{addr}{path}")
    }

    /// A store config on this schema.
    pub fn store_config(&self, pool_size: usize) -> totpd::store::StoreConfig {
        totpd::store::StoreConfig::Postgres(totpd::store::PostgresConfig {
            url: totpd::store::DatabaseUrl::new(self.url.clone()),
            pool_size,
            timeout: Duration::from_secs(2),
            ca_file: None,
        })
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop has no runtime to lean on: a thread of its own, with its own small runtime.
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The answer to an API call: the status and the JSON body (`null` when it is not JSON).
pub type ApiAnswer = (u16, serde_json::Value);

/// The one HTTP client of the test targets that drive the API by hand (`tests/api/` wraps the
/// same calls with its manual clock): the routes under `/api/v1/auth/` by name. A transport
/// error is returned, not a panic, so that targets that kill servers can count it.
#[derive(Clone)]
pub struct ApiClient {
    pub base: String,
    pub client: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            client: reqwest::Client::new(),
        }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> reqwest::Result<ApiAnswer> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        ))
    }

    fn with_key(request: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
        match key {
            Some(key) => request.header("Authorization", format!("Token {key}")),
            None => request,
        }
    }

    /// POST `/api/v1/auth/{path}` with a JSON body, and a login key when given.
    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: serde_json::Value,
    ) -> reqwest::Result<ApiAnswer> {
        let url = format!("{}/api/v1/auth/{path}", self.base);
        self.send(Self::with_key(self.client.post(url), key).json(&body))
            .await
    }

    /// GET `path` (from the server's root, such as `/healthz`), with a login key when given.
    pub async fn get(&self, path: &str, key: Option<&str>) -> reqwest::Result<ApiAnswer> {
        let url = format!("{}{path}", self.base);
        self.send(Self::with_key(self.client.get(url), key)).await
    }

    /// GET the TOTP status with `key`.
    pub async fn status(&self, key: &str) -> reqwest::Result<ApiAnswer> {
        self.get("/api/v1/auth/totp/", Some(key)).await
    }

    pub async fn login(&self, name: &str, password: &str) -> reqwest::Result<ApiAnswer> {
        let body = serde_json::json!({"username": name, "password": password});
        self.post("login/", None, body).await
    }

    pub async fn verify(&self, temp: &str, token: &str) -> reqwest::Result<ApiAnswer> {
        let body = serde_json::json!({"temp_token": temp, "token": token});
        self.post("totp/verify/", None, body).await
    }
}
