//! totpd on PostgreSQL over HTTP: the two-step login, and what several instances on one
//! database must get right — one winner for each one-time thing sent to both at once, a lock
//! and a revoked key that hold on the other instance at once, and a database that goes away
//! and comes back (503s, never a 500, then service again). Plus the commands that move an
//! installation: `store copy` both ways and `migrate --dry-run`.
//!
//! Two `Application`s run in this process on one schema of the database that
//! `TOTPD_TEST_DATABASE_URL` names (skipped, loudly, when unset; failed when `CI` is set too).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use totp_rs::Totp;
use totpd::clock::{Clock, ManualClock};
use totpd::config::{Config, StoreKind};
use totpd::store::DatabaseUrl;

use common::{TestSchema, test_database_url};

const PASSWORD: &str = "password123";
const NOW: u64 = 1_800_000_015;

/// One server on the shared database: the common client, answers expected.
struct Instance(common::ApiClient);

type Answer = common::ApiAnswer;

impl Instance {
    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> Answer {
        self.0.post(path, key, body).await.expect("answered")
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        self.0.get(path, key).await.expect("answered")
    }

    async fn login(&self, name: &str) -> Answer {
        self.0.login(name, PASSWORD).await.expect("answered")
    }

    async fn verify(&self, temp: &str, token: &str) -> Answer {
        self.0.verify(temp, token).await.expect("answered")
    }
}

/// Two instances (`a`, `b`) on one fresh schema, sharing the master key file, with users
/// `user0..users` created through `a`.
struct Cluster {
    a: Instance,
    b: Instance,
    /// Both instances' clock.
    clock: ManualClock,
    _schema: TestSchema,
    _dir: TempDir,
}

fn instance_config(dir: &TempDir, name: &str, url: String, tune: &impl Fn(&mut Config)) -> Config {
    let mut config = common::quick_config(dir.path().join(name));
    config.store = StoreKind::Postgres;
    config.database_url = Some(DatabaseUrl::new(url));
    config.database_pool_size = 8;
    config.database_timeout_ms = 500;
    config.master_key_file = Some(dir.path().join("master.key"));
    config.lockout.threshold = 100;
    tune(&mut config);
    config
}

async fn cluster(users: usize, tune: impl Fn(&mut Config)) -> Option<Cluster> {
    let url = test_database_url()?;
    let schema = TestSchema::create(&url).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(NOW);
    let (base_a, service) = common::serve_in_process(
        instance_config(&dir, "a", schema.url.clone(), &tune),
        clock.clone(),
    )
    .await;
    let (base_b, _) = common::serve_in_process(
        instance_config(&dir, "b", schema.url.clone(), &tune),
        clock.clone(),
    )
    .await;
    let ctx = totpd::service::Ctx {
        now: clock.now(),
        ip: None,
    };
    for i in 0..users {
        service
            .create_user(&format!("user{i}"), PASSWORD.to_owned(), "test", &ctx)
            .await
            .expect("user");
    }
    let instance = |base| Instance(common::ApiClient::new(base));
    Some(Cluster {
        a: instance(base_a),
        b: instance(base_b),
        clock,
        _schema: schema,
        _dir: dir,
    })
}

struct Enrolled {
    totp: Totp,
    codes: Vec<String>,
}

/// Logs in on `on` (no TOTP yet: a key), sets up and activates TOTP.
async fn enrol(on: &Instance, name: &str) -> Enrolled {
    let (status, body) = on.login(name).await;
    assert_eq!(status, 200, "{body}");
    let key = body["key"].as_str().expect("a key").to_owned();
    let (status, setup) = on.post("totp/setup/", Some(&key), json!({})).await;
    assert_eq!(status, 201, "{setup}");
    let totp = Totp::from_url(setup["provisioning_uri"].as_str().expect("uri")).expect("uri");
    let code = totp.generate(NOW).to_string();
    let (status, body) = on
        .post("totp/activate/", Some(&key), json!({"token": code}))
        .await;
    assert_eq!(status, 200, "{body}");
    let codes = body["recovery_codes"]
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c.as_str().expect("code").to_owned())
        .collect();
    Enrolled { totp, codes }
}

async fn temp_token(on: &Instance, name: &str) -> String {
    let (status, body) = on.login(name).await;
    assert_eq!(status, 200, "{body}");
    body["temp_token"]
        .as_str()
        .expect("a temp token")
        .to_owned()
}

/// The same verify sent to both instances at once, `n` times each; the answers.
async fn both_at_once(cluster: &Cluster, pairs: Vec<(String, String)>) -> Vec<Answer> {
    let mut sends = Vec::new();
    for (i, (temp, code)) in pairs.into_iter().enumerate() {
        let on = if i % 2 == 0 { &cluster.a } else { &cluster.b };
        sends.push(async move { on.verify(&temp, &code).await });
    }
    futures_util::future::join_all(sends).await
}

fn winners(answers: &[Answer]) -> usize {
    for (status, body) in answers {
        assert!(*status < 500, "a server error: {status} {body}");
    }
    answers.iter().filter(|(status, _)| *status == 200).count()
}

/// The two-step login over HTTP, with each step on a different instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_login_crosses_instances() {
    let Some(cluster) = cluster(1, |_| {}).await else {
        return;
    };
    let enrolled = enrol(&cluster.a, "user0").await;
    let temp = temp_token(&cluster.a, "user0").await;
    let later = enrolled.totp.generate(NOW + 30).to_string();
    let (status, body) = cluster.b.verify(&temp, &later).await;
    assert_eq!(status, 200, "{body}");
    let key = body["key"].as_str().expect("a key");
    let (status, body) = cluster.a.get("/api/v1/auth/totp/", Some(key)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["active"], json!(true), "{body}");
    let (status, body) = cluster.b.get("/healthz", None).await;
    assert_eq!((status, body["status"].clone()), (200, json!("ok")));
    let metrics = cluster
        .a
        .0
        .client
        .get(format!("{}/metrics", cluster.a.0.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("totpd_db_pool_max_size 8"), "{metrics}");
}

/// One temp token, one time step and one recovery code, each sent to both instances at once:
/// exactly one request wins each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_one_time_thing_has_one_winner_across_instances() {
    let Some(cluster) = cluster(1, |_| {}).await else {
        return;
    };
    let enrolled = enrol(&cluster.a, "user0").await;
    // Activation used the step of NOW: a fresh step at each round, 90 s apart.
    let code = |t: u64| enrolled.totp.generate(t).to_string();

    // One temp token, eight valid codes (the skew window's two fresh steps, repeated).
    cluster.clock.set(NOW + 90);
    let temp = temp_token(&cluster.a, "user0").await;
    let pairs = (0..8)
        .map(|i| (temp.clone(), code(NOW + 90 + (i % 2) * 30)))
        .collect();
    assert_eq!(winners(&both_at_once(&cluster, pairs).await), 1);

    // One time step, eight temp tokens.
    cluster.clock.set(NOW + 300);
    let mut temps = Vec::new();
    for i in 0..8 {
        let on = if i % 2 == 0 { &cluster.a } else { &cluster.b };
        temps.push(temp_token(on, "user0").await);
    }
    let step = code(NOW + 300);
    let pairs = temps.iter().map(|t| (t.clone(), step.clone())).collect();
    assert_eq!(winners(&both_at_once(&cluster, pairs).await), 1);

    // One recovery code, eight temp tokens.
    let mut temps = Vec::new();
    for i in 0..8 {
        let on = if i % 2 == 0 { &cluster.a } else { &cluster.b };
        temps.push(temp_token(on, "user0").await);
    }
    let recovery = enrolled.codes[0].clone();
    let pairs = temps
        .iter()
        .map(|t| (t.clone(), recovery.clone()))
        .collect();
    assert_eq!(winners(&both_at_once(&cluster, pairs).await), 1);
}

/// A lock reached through A holds on B, and a key revoked on A is refused on B at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_and_a_revocation_hold_on_the_other_instance() {
    let Some(cluster) = cluster(2, |c| c.lockout.threshold = 3).await else {
        return;
    };
    // The revocation first: user1 has no TOTP, so a login gives a key at once.
    let (status, body) = cluster.a.login("user1").await;
    assert_eq!(status, 200, "{body}");
    let key = body["key"].as_str().expect("a key").to_owned();
    let (status, _) = cluster.b.get("/api/v1/auth/totp/", Some(&key)).await;
    assert_eq!(status, 200);
    let (status, body) = cluster.a.post("logout/", Some(&key), json!({})).await;
    assert!(status < 300, "{status} {body}");
    let (status, body) = cluster.b.get("/api/v1/auth/totp/", Some(&key)).await;
    assert!(
        (status == 401 || status == 403) && body["code"] == json!("authentication_failed"),
        "the key was revoked on A: {status} {body}"
    );

    let enrolled = enrol(&cluster.a, "user0").await;
    let temp = temp_token(&cluster.a, "user0").await;
    for _ in 0..3 {
        let (status, body) = cluster.a.verify(&temp, "000000").await;
        assert!(status == 400 || status == 429, "{status} {body}");
    }
    let right = enrolled.totp.generate(NOW + 30).to_string();
    let (status, body) = cluster.b.login("user0").await;
    let answer = if status == 200 {
        let temp = body["temp_token"]
            .as_str()
            .expect("a temp token")
            .to_owned();
        cluster.b.verify(&temp, &right).await
    } else {
        (status, body)
    };
    assert_eq!(answer.0, 429, "the lock from A holds on B: {}", answer.1);
    assert_eq!(answer.1["code"], json!("locked"), "{}", answer.1);
}

/// A TCP proxy to the database that can be cut (every connection dropped, new ones refused)
/// and restored: a database that goes away, without stopping the shared test server.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accepting, held) = (Arc::clone(&up), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().expect("lock").push(task);
            }
        });
        Proxy {
            addr,
            up,
            connections,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.connections.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// The database goes away under load and comes back: requests answer 503
/// `service_unavailable` quickly meanwhile (never a 500), `/healthz` says so, and service
/// resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_gives_503s_then_recovery() {
    let Some(url) = test_database_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    let target: SocketAddr = {
        let pg: tokio_postgres::Config = url.parse().expect("url");
        let host = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(_) => panic!("the test database must be on TCP"),
        };
        format!("{host}:{}", pg.get_ports()[0])
            .parse()
            .expect("an IP address and port")
    };
    let proxy = Proxy::start(target).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = instance_config(&dir, "a", schema.url_via(proxy.addr), &|_| {});
    let clock = ManualClock::new(NOW);
    let (base, service) = common::serve_in_process(config, clock.clone()).await;
    let ctx = totpd::service::Ctx { now: NOW, ip: None };
    service
        .create_user("user0", PASSWORD.to_owned(), "test", &ctx)
        .await
        .expect("user");
    let app = Arc::new(Instance(common::ApiClient::new(base)));

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (app, stop) = (Arc::clone(&app), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = std::time::Instant::now();
                let (status, body) = app.login("user0").await;
                answers.push((status, body["code"].clone(), started.elapsed()));
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = app.get("/healthz", None).await;
    assert_eq!(status, 503, "{body}");
    proxy.restore();
    // Recovery: within a few seconds, answers are 200 again.
    let mut recovered = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if app.login("user0").await.0 == 200 && app.get("/healthz", None).await.0 == 200 {
            recovered = true;
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    for task in load {
        answers.extend(task.await.expect("load"));
    }
    assert!(
        recovered,
        "service did not resume after the database came back"
    );
    let unavailable = answers.iter().filter(|(s, _, _)| *s == 503).count();
    assert!(unavailable > 0, "the outage gave no 503");
    for (status, code, elapsed) in &answers {
        assert!(
            *status == 200 || (*status == 503 && *code == json!("service_unavailable")),
            "only 200 or 503 service_unavailable, got {status} {code}"
        );
        assert!(
            *elapsed < Duration::from_secs(3),
            "a request waited {elapsed:?}: the pool wait must be bounded"
        );
    }
    common::report(&format!(
        "outage: {} answers, {unavailable} of them 503",
        answers.len()
    ));
}

/// `store copy` moves an installation from sled to PostgreSQL and back, refuses a target that
/// holds data, and the CLI works on PostgreSQL directly; `migrate --dry-run` prints the SQL.
#[test]
fn store_copy_moves_an_installation_both_ways() {
    let Some(url) = test_database_url() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let schema = runtime.block_on(TestSchema::create(&url));
    let dir = tempfile::tempdir().expect("tempdir");
    let sled_dir = dir.path().join("sled");
    let run = |command: &mut std::process::Command, stdin: &str| {
        use std::io::Write;
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("totpd runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("totpd ends");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let totpd = |data_dir: &std::path::Path| common::totpd(dir.path(), data_dir);
    let on_postgres = |data_dir: &std::path::Path| {
        let mut command = totpd(data_dir);
        command
            .env("TOTPD_STORE", "postgres")
            .env("TOTPD_DATABASE_URL", &schema.url)
            .env("TOTPD_MASTER_KEY_FILE", sled_dir.join("master.key"));
        command
    };

    let (ok, out) = run(on_postgres(&sled_dir).args(["migrate", "--dry-run"]), "");
    assert!(ok, "{out}");
    assert!(out.contains("CREATE TABLE users"), "{out}");

    for name in ["alice", "bob"] {
        let (ok, out) = run(
            totpd(&sled_dir).args(["user", "add", name, "--password-stdin"]),
            "password123\n",
        );
        assert!(ok, "{out}");
    }
    let to_pg = format!("postgres:{}", schema.url);
    let from_sled = format!("sled:{}", sled_dir.display());
    let (ok, out) = run(
        totpd(&sled_dir).args(["store", "copy", "--from", &from_sled, "--to", &to_pg]),
        "",
    );
    assert!(ok, "{out}");
    assert!(out.contains("users: 2 in both"), "{out}");
    assert!(
        !out.contains("totpd:totpd@"),
        "the password is not printed: {out}"
    );

    let (ok, out) = run(
        totpd(&sled_dir).args(["store", "copy", "--from", &from_sled, "--to", &to_pg]),
        "",
    );
    assert!(!ok, "a second copy must be refused");
    assert!(out.contains("already holds data"), "{out}");

    // The CLI on PostgreSQL opens the database itself, and sees the copied users.
    let (ok, out) = run(on_postgres(&sled_dir).args(["user", "list"]), "");
    assert!(ok, "{out}");
    assert!(out.contains("alice") && out.contains("bob"), "{out}");
    let (ok, out) = run(
        on_postgres(&sled_dir).args(["user", "add", "carol", "--password-stdin"]),
        "password123\n",
    );
    assert!(ok, "{out}");

    let back = dir.path().join("back");
    let (ok, out) = run(
        totpd(&sled_dir).args([
            "store",
            "copy",
            "--from",
            &to_pg,
            "--to",
            &format!("sled:{}", back.display()),
        ]),
        "",
    );
    assert!(ok, "{out}");
    assert!(out.contains("users: 3 in both"), "{out}");
    let mut list = totpd(&back);
    list.env("TOTPD_MASTER_KEY_FILE", sled_dir.join("master.key"));
    let (ok, out) = run(list.args(["user", "list"]), "");
    assert!(ok, "{out}");
    assert!(out.contains("carol"), "{out}");
}

/// Two real binaries on one database; one is killed with SIGKILL while it issues login keys.
/// Every key it acknowledged works on the other: an answer means the commit happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_instance_under_load_loses_no_acknowledged_change() {
    let Some(url) = test_database_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let command = |name: &str| {
        let mut command = common::totpd(dir.path(), &dir.path().join(name));
        command
            .env("TOTPD_STORE", "postgres")
            .env("TOTPD_DATABASE_URL", &schema.url)
            .env("TOTPD_MASTER_KEY_FILE", dir.path().join("master.key"));
        command
    };
    let added = command("a")
        .args(["user", "add", "user0", "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(format!("{PASSWORD}\n").as_bytes())?;
            child.wait()
        })
        .expect("user add runs");
    assert!(added.success());
    let serve = |name: &str| {
        let mut child = command(name)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the server starts");
        let listening = common::listening(&mut child, Duration::from_secs(20)).expect("listening");
        (child, listening.base)
    };
    let (mut a, base_a) = serve("a");
    let (mut b, base_b) = serve("b");
    let a_instance = Arc::new(common::ApiClient::new(base_a));
    let mut load = Vec::new();
    for _ in 0..4 {
        let on = Arc::clone(&a_instance);
        load.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            loop {
                let Ok((status, body)) = on.login("user0", PASSWORD).await else {
                    return keys; // the instance is gone
                };
                if status != 200 {
                    continue;
                }
                let Some(key) = body["key"].as_str() else {
                    return keys; // cut off mid-answer
                };
                keys.push(key.to_owned());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let mut acknowledged = Vec::new();
    for task in load {
        acknowledged.extend(task.await.expect("load"));
    }
    assert!(
        !acknowledged.is_empty(),
        "the load got no answer before the kill"
    );
    let on_b = Instance(common::ApiClient::new(base_b));
    for key in &acknowledged {
        let (status, body) = on_b.get("/api/v1/auth/totp/", Some(key)).await;
        assert_eq!(status, 200, "an acknowledged key was lost: {body}");
    }
    common::report(&format!(
        "kill -9: {} acknowledged keys, all valid on the other instance",
        acknowledged.len()
    ));
    let _ = b.kill();
    let _ = b.wait();
}
