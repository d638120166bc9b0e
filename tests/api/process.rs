//! The real binary: CLI behaviour, the listening line, config errors, restarts and `kill -9`.
//! These use the real clock; codes come from totp-rs at the current time.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use totp_rs::Totp;

const BIN: &str = env!("CARGO_BIN_EXE_totpd");

/// A `totpd` command on `data_dir` with cheap Argon2 and no stray TOTPD_* settings.
fn totpd(data_dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TOTPD_")) {
        command.env_remove(key);
    }
    command
        .env("TOTPD_ARGON2_MEMORY_KIB", "64")
        .env("TOTPD_ARGON2_ITERATIONS", "1")
        .env("TOTPD_CONFIG", data_dir.join("absent-is-fine.toml"))
        .arg("--data-dir")
        .arg(data_dir);
    command
}

/// Writes an empty config file so TOTPD_CONFIG points at something readable.
fn prepare(dir: &Path) {
    std::fs::write(dir.join("absent-is-fine.toml"), "").expect("config");
}

fn add_user(dir: &Path, name: &str, password: &str) -> std::process::Output {
    let mut child = totpd(dir)
        .args(["user", "add", name, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    // The command may refuse the name and exit before reading: a broken pipe is fine.
    let _ = writeln!(stdin, "{password}");
    drop(stdin);
    child.wait_with_output().expect("wait")
}

struct Server {
    child: Child,
    base: String,
    client: reqwest::Client,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut child = totpd(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("listening line");
        let addr = line
            .trim_end()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let _: std::net::SocketAddr = addr.parse().expect("IP:PORT");
        // Keep draining stdout so the server never blocks on it; it must print nothing more.
        std::thread::spawn(move || {
            let mut rest = String::new();
            while stdout.read_line(&mut rest).unwrap_or(0) > 0 {
                assert!(rest.is_empty(), "extra stdout line: {rest:?}");
            }
        });
        Server {
            child,
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
        }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(key) = key {
            request = request.header("Authorization", format!("Token {key}"));
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn status(&self, key: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}/api/v1/auth/totp/", self.base))
            .header("Authorization", format!("Token {key}"))
            .send()
            .await
            .expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn login(&self) -> Value {
        let (status, body) = self
            .post(
                "/api/v1/auth/login/",
                None,
                json!({"username": "alice", "password": "password123"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn verify(&self, token: &str) -> (StatusCode, Value) {
        let temp = self.login().await["temp_token"]
            .as_str()
            .expect("temp")
            .to_owned();
        self.post(
            "/api/v1/auth/totp/verify/",
            None,
            json!({"temp_token": temp, "token": token}),
        )
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn user_add_refuses_duplicates_empty_names_and_short_passwords() {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let ok = add_user(dir.path(), "alice", "password123");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (name, password, needle) in [
        ("alice", "password123", "already exists"),
        ("", "password123", "invalid user name"),
        ("bob", "short", "invalid password"),
    ] {
        let out = add_user(dir.path(), name, password);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
}

#[test]
fn bad_configuration_stops_the_start_with_one_line_per_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "colour = 1\n[totp]\nskew = 7\n").expect("write");
    let out = totpd(dir.path())
        .env("TOTPD_CONFIG", &config)
        .env("TOTPD_TEMP_TOKEN_TTL", "forever")
        .arg("serve")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing on stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    assert!(
        stderr.contains("colour")
            && stderr.contains("totp.skew")
            && stderr.contains("TOTPD_TEMP_TOKEN_TTL")
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_says_so_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let server = Server::start(dir.path());
    let second = totpd(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    // The first server is unaffected.
    let (status, _) = server
        .post(
            "/api/v1/auth/login/",
            None,
            json!({"username": "x", "password": "y"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Every admin command works while the server holds the data dir (through its socket) and
/// without it (opening the data dir directly), with the same results.
#[tokio::test]
async fn admin_commands_work_with_and_without_a_running_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let run = |args: &[&str]| {
        let out = totpd(dir.path()).args(args).output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for running in [false, true] {
        let server = running.then(|| Server::start(dir.path()));
        let name = if running { "alice" } else { "carol" };
        let out = add_user(dir.path(), name, "password123");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let again = add_user(dir.path(), name, "password123");
        assert_eq!(again.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
        let (code, list, _) = run(&["user", "list"]);
        assert_eq!(code, Some(0));
        assert!(
            list.lines()
                .any(|l| l.starts_with(name) && l.contains("off") && l.contains("never")),
            "{list}"
        );
        let (code, _, err) = run(&["user", "unlock", name]);
        assert_eq!(code, Some(0), "{err}");
        let (code, _, err) = run(&["user", "reset-totp", name]);
        assert_eq!(code, Some(0), "{err}");
        let (code, _, err) = run(&["user", "remove", "nobody"]);
        assert_eq!(code, Some(1));
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("no user named"), "{err}");
        if let Some(server) = &server {
            // The user created through the socket logs in over HTTP.
            let (status, _) = server
                .post(
                    "/api/v1/auth/login/",
                    None,
                    json!({"username": name, "password": "password123"}),
                )
                .await;
            assert_eq!(status, StatusCode::OK);
        }
        drop(server);
    }
    let (_, list, _) = run(&["user", "list"]);
    assert!(list.contains("alice") && list.contains("carol"), "{list}");
    let (code, _, err) = run(&["user", "remove", "carol"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, list, _) = run(&["user", "list"]);
    assert!(!list.contains("carol"), "{list}");
}

#[cfg(unix)]
#[test]
fn the_admin_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let server = Server::start(dir.path());
    let socket = dir.path().join("admin.sock");
    let mode = std::fs::metadata(&socket)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(server);
}

/// Every acknowledged change survives `kill -9` right after the answer: activation, the consumed
/// time step, a consumed recovery code, an issued key, a logout, a deactivation.
#[tokio::test]
async fn kill_9_right_after_a_response_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    assert!(
        add_user(dir.path(), "alice", "password123")
            .status
            .success()
    );

    let server = Server::start(dir.path());
    let key = server.login().await["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let (status, setup) = server
        .post("/api/v1/auth/totp/setup/", Some(&key), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let totp = Totp::from_url(setup["provisioning_uri"].as_str().expect("uri")).expect("uri");
    let code = totp.generate_current().to_string();
    let (status, activated) = server
        .post(
            "/api/v1/auth/totp/activate/",
            Some(&key),
            json!({"token": code}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{activated}");
    server.kill9();

    let server = Server::start(dir.path());
    let (status, body) = server.status(&key).await;
    assert_eq!(
        (status, body["active"].clone()),
        (StatusCode::OK, json!(true))
    );
    let (status, _) = server.verify(&code).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the activation step stays consumed"
    );
    let recovery = activated["recovery_codes"][0]
        .as_str()
        .expect("code")
        .to_owned();
    let (status, verified) = server.verify(&recovery).await;
    assert_eq!(status, StatusCode::OK);
    let second_key = verified["key"].as_str().expect("key").to_owned();
    server.kill9();

    let server = Server::start(dir.path());
    let (status, _) = server.verify(&recovery).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the recovery code stays consumed"
    );
    assert_eq!(
        server.status(&second_key).await.0,
        StatusCode::OK,
        "the issued key stays"
    );
    let (status, _) = server
        .post("/api/v1/auth/logout/", Some(&second_key), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.kill9();

    let server = Server::start(dir.path());
    assert_eq!(
        server.status(&second_key).await.0,
        StatusCode::FORBIDDEN,
        "logout stays"
    );
    let (status, _) = server
        .post("/api/v1/auth/totp/deactivate/", Some(&key), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.kill9();

    let server = Server::start(dir.path());
    assert_eq!(
        server.status(&key).await.1["active"],
        json!(false),
        "deactivation stays"
    );
    server.kill9();
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let mut server = Server::start(dir.path());
    let pid = server.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let mut waited = Duration::ZERO;
    loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(waited < Duration::from_secs(10), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    }
}

/// `rotate-key` re-seals every secret under a new key: codes keep working, the key file holds
/// only the new key, and the old key alone no longer opens the data dir.
#[tokio::test]
async fn rotate_key_reseals_under_a_new_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    assert!(
        add_user(dir.path(), "alice", "password123")
            .status
            .success()
    );
    let server = Server::start(dir.path());
    let key = server.login().await["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let (_, setup) = server
        .post("/api/v1/auth/totp/setup/", Some(&key), json!({}))
        .await;
    let totp = Totp::from_url(setup["provisioning_uri"].as_str().expect("uri")).expect("uri");
    let (status, _) = server
        .post(
            "/api/v1/auth/totp/activate/",
            Some(&key),
            json!({"token": totp.generate_current().to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    drop(server);

    let key_file = dir.path().join("master.key");
    let old = std::fs::read_to_string(&key_file).expect("key file");
    let out = totpd(dir.path()).arg("rotate-key").output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-sealed 1 secrets"));
    let new = std::fs::read_to_string(&key_file).expect("key file");
    assert_ne!(old, new);
    let key_lines = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(key_lines(&new), 1, "the old key is gone from the file");

    let server = Server::start(dir.path());
    let next_step = totp.generate(totp_now() + 30).to_string();
    let (status, body) = server.verify(&next_step).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the secret opens under the new key: {body}"
    );
    drop(server);

    // The old key alone is refused at start, with a clear message.
    std::fs::write(&key_file, &old).expect("restore old key");
    let out = totpd(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match"), "{stderr}");
}

fn totp_now() -> u64 {
    std::time::UNIX_EPOCH.elapsed().expect("clock").as_secs()
}

#[tokio::test]
async fn events_prints_the_audit_trail() {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    assert!(
        add_user(dir.path(), "alice", "password123")
            .status
            .success()
    );
    assert!(add_user(dir.path(), "bob", "password123").status.success());
    let server = Server::start(dir.path());
    server.login().await;
    let (status, _) = server
        .post(
            "/api/v1/auth/login/",
            None,
            json!({"username": "bob", "password": "nope-nope"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    drop(server);

    let out = totpd(dir.path())
        .args(["events", "--user", "alice", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let events: Vec<&str> = lines
        .iter()
        .map(|l| l["event"].as_str().expect("event"))
        .collect();
    assert_eq!(events, ["user_created", "login"]);
    assert!(lines.iter().all(|l| l["user"] == json!("alice")));
    assert_eq!(lines[1]["ip"], json!("127.0.0.1"));
    assert_eq!(lines[1]["outcome"], json!("ok"));

    let out = totpd(dir.path())
        .args(["events", "--since", "1h"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("login") && text.contains("\"bob\"") && text.contains("failed"),
        "{text}"
    );
    let out = totpd(dir.path())
        .args(["events", "--since", "2999-01-01T00:00:00Z"])
        .output()
        .expect("run");
    assert!(out.stdout.is_empty());
    let out = totpd(dir.path())
        .args(["events", "--since", "soon"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
}
