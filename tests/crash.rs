//! Crash consistency. The real binary runs a mixed load — logins, verifies with TOTP codes and
//! with recovery codes, setups, activations, deactivations, logouts — from one task per user, and
//! is killed with SIGKILL at a random moment (at least 20 times), then restarted on the same data
//! dir. Every 2xx answer is recorded in a model; after each restart the model is checked:
//!
//! - every acknowledged login key works, unless an acknowledged logout or deactivation revoked
//!   it, and then it must not;
//! - every acknowledged consumed recovery code, time step and temp token stays consumed;
//! - TOTP is active, pending or off as the last acknowledged setup, activation or deactivation
//!   left it;
//! - the database opens: the listening line comes, and the server logs no error and no panic.
//!
//! A request cut by the kill has an unknown outcome: the model settles it after the restart (an
//! activation or deactivation by reading the status) or stops relying on what it touched.
//! `CRASH_KILLS` and `CRASH_SEED` override the number of kills (default 24) and the seed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use totp_rs::Totp;

mod common;

use common::report;

const USERS: usize = 12;
const PASSWORD: &str = "password123";
/// Wrong codes a temp token survives (the largest allowed), so the checks need few logins.
const TEMP_TOKEN_ATTEMPTS: u32 = 20;
/// Consecutive failed codes that lock a user (the largest allowed). Checking that consumed
/// codes stay consumed fails codes on purpose; the model keeps every user below this.
const LOCKOUT_THRESHOLD: u32 = 100;
/// A user whose failure count may have reached this gets a success before more checks.
const FAILURE_BUDGET: u32 = 60;
/// A recovery code that is nobody's: sent with a used temp token, it is refused either way, so
/// checking a temp token can never log anyone in.
const NOBODYS_RECOVERY_CODE: &str = "0000-0000-0000-0000";

fn unix_now() -> u64 {
    std::time::UNIX_EPOCH.elapsed().expect("clock").as_secs()
}

fn step_now() -> u64 {
    unix_now() / 30
}

// ---- the process ----

fn totpd(dir: &Path) -> Command {
    let mut command = common::totpd(dir, &dir.join("data"));
    command
        .env("TOTPD_LOCKOUT_THRESHOLD", LOCKOUT_THRESHOLD.to_string())
        .env("TOTPD_TEMP_TOKEN_ATTEMPTS", TEMP_TOKEN_ATTEMPTS.to_string())
        .env("TOTPD_ALLOW_REGISTRATION", "true");
    command
}

struct Server {
    child: Child,
    api: Api,
    log: PathBuf,
}

impl Server {
    /// Starts the server; `None` (with the reason) if it does not print its listening line.
    fn start(dir: &Path, run: usize) -> Result<Server, String> {
        let log = dir.join(format!("server-{run}.log"));
        let mut child = totpd(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn totpd");
        let listening = match common::listening(&mut child, Duration::from_secs(30)) {
            Ok(listening) => listening,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("start failed: {e} {stderr}"));
            }
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        Ok(Server {
            child,
            api: Api {
                base: listening.base,
                client,
            },
            log,
        })
    }

    fn kill9(mut self) -> PathBuf {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
        self.log.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of a server log that show the store or the server in trouble.
fn log_problems(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("panicked"))
        .map(str::to_owned)
        .collect()
}

type Api = common::ApiClient;
type Answer = reqwest::Result<common::ApiAnswer>;

// ---- the model ----

/// What one user's TOTP is, as far as acknowledged answers tell.
enum Tfa {
    Off,
    /// An acknowledged setup of this secret, not activated yet.
    Pending(Totp),
    /// A setup whose answer was lost: the pending secret is unknown (set up again).
    PendingUnknown,
    Active(Active),
}

struct Active {
    totp: Totp,
    /// The highest step used or possibly used: the next TOTP verify must use a later one.
    last_step: u64,
    /// Recovery codes known to be unused.
    unused: Vec<String>,
    /// Recovery codes that may or may not have been used (their request was cut by a kill, or
    /// they were never seen because the activation's answer was lost).
    uncertain: usize,
    /// Acknowledged: recovery codes consumed, and time steps consumed (activation and verifies).
    consumed_codes: Vec<String>,
    consumed_steps: Vec<u64>,
}

impl Active {
    /// The step a TOTP verify can use now, if any: later than the last one, inside ±1 step.
    fn next_step(&self) -> Option<u64> {
        let now = step_now();
        let step = (self.last_step + 1).max(now);
        (step <= now + 1).then_some(step)
    }
}

/// The request a user had in flight when the server died.
enum Op {
    Login,
    Logout(String),
    Setup,
    Activate,
    VerifyRecovery,
    VerifyStep,
    Deactivate(String),
}

struct Account {
    name: String,
    /// Acknowledged keys not revoked by an acknowledged logout or deactivation: must work.
    keys: Vec<String>,
    /// Keys an acknowledged logout or deactivation revoked: must not work.
    revoked: Vec<String>,
    /// Temp tokens an acknowledged verify used: must stay used.
    used_temp_tokens: Vec<String>,
    tfa: Tfa,
    /// An upper bound on the server's count of consecutive failed codes for this user.
    failures: u32,
    in_flight: Option<Op>,
}

#[derive(Default)]
struct Figures {
    acknowledged: AtomicUsize,
    keys_working: AtomicUsize,
    keys_revoked: AtomicUsize,
    recovery_codes: AtomicUsize,
    steps: AtomicUsize,
    temp_tokens: AtomicUsize,
    states: AtomicUsize,
    settled: AtomicUsize,
    violations: Mutex<Vec<String>>,
}

impl Figures {
    fn ack(&self) {
        self.acknowledged.fetch_add(1, Ordering::Relaxed);
    }

    fn violation(&self, what: String) {
        self.violations.lock().expect("lock").push(what);
    }

    fn count(counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn totp_from(setup: &Value) -> Totp {
    Totp::from_url(
        setup["provisioning_uri"]
            .as_str()
            .expect("provisioning_uri"),
    )
    .expect("totp-rs reads the provisioning URI")
}

fn code(totp: &Totp, step: u64) -> String {
    totp.generate(step * 30).to_string()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---- the load ----

/// Runs one user's share of the load until `stop`; a failed request means the server is gone,
/// and `in_flight` then says which request's outcome is unknown.
async fn load(
    mut a: Account,
    api: Api,
    stop: Arc<AtomicBool>,
    f: Arc<Figures>,
    seed: u64,
) -> Account {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::SeqCst) {
        if one_action(&mut a, &api, &mut rng, &f).await.is_err() {
            break;
        }
    }
    a
}

async fn one_action(
    a: &mut Account,
    api: &Api,
    rng: &mut StdRng,
    f: &Figures,
) -> Result<(), reqwest::Error> {
    let roll = rng.random_range(0..10);
    if a.keys.is_empty() || (roll == 0 && a.keys.len() < 4) {
        if matches!(a.tfa, Tfa::Active(_)) {
            // With TOTP on, a key takes a verify: below.
        } else {
            return login_for_key(a, api, f).await;
        }
    }
    if roll == 1 && a.keys.len() >= 2 {
        let key = a.keys[rng.random_range(0..a.keys.len())].clone();
        return logout(a, api, f, key).await;
    }
    match &a.tfa {
        Tfa::Active(active) => {
            if a.keys.is_empty() {
                return verify(a, api, rng, f).await;
            }
            let stuck = active.unused.is_empty() && active.next_step().is_none();
            if roll == 2 || stuck {
                let key = a.keys[rng.random_range(0..a.keys.len())].clone();
                deactivate(a, api, f, key).await
            } else {
                verify(a, api, rng, f).await
            }
        }
        Tfa::Pending(_) if roll >= 4 => activate(a, api, f).await,
        _ => setup(a, api, f).await,
    }
}

async fn login_for_key(a: &mut Account, api: &Api, f: &Figures) -> Result<(), reqwest::Error> {
    a.in_flight = Some(Op::Login);
    let (status, body) = api.login(&a.name, PASSWORD).await?;
    a.in_flight = None;
    match (status, body["key"].as_str()) {
        (200, Some(key)) => {
            f.ack();
            a.keys.push(key.to_owned());
        }
        _ => f.violation(format!(
            "{}: login with TOTP off answered {status} {body}",
            a.name
        )),
    }
    Ok(())
}

async fn logout(
    a: &mut Account,
    api: &Api,
    f: &Figures,
    key: String,
) -> Result<(), reqwest::Error> {
    a.in_flight = Some(Op::Logout(key.clone()));
    let (status, body) = api.post("logout/", Some(&key), json!({})).await?;
    a.in_flight = None;
    a.keys.retain(|k| *k != key);
    if status == 200 {
        f.ack();
        a.revoked.push(key);
    } else {
        f.violation(format!(
            "{}: logout with a working key answered {status} {body}",
            a.name
        ));
    }
    Ok(())
}

async fn setup(a: &mut Account, api: &Api, f: &Figures) -> Result<(), reqwest::Error> {
    a.in_flight = Some(Op::Setup);
    let (status, body) = api.post("totp/setup/", Some(&a.keys[0]), json!({})).await?;
    a.in_flight = None;
    if status == 201 {
        f.ack();
        a.tfa = Tfa::Pending(totp_from(&body));
    } else {
        f.violation(format!("{}: setup answered {status} {body}", a.name));
    }
    Ok(())
}

async fn activate(a: &mut Account, api: &Api, f: &Figures) -> Result<(), reqwest::Error> {
    let Tfa::Pending(totp) = &a.tfa else {
        return Ok(());
    };
    let step = step_now();
    let token = code(totp, step);
    a.in_flight = Some(Op::Activate);
    let (status, body) = api
        .post("totp/activate/", Some(&a.keys[0]), json!({"token": token}))
        .await?;
    a.in_flight = None;
    if status == 200 {
        f.ack();
        let Tfa::Pending(totp) = std::mem::replace(&mut a.tfa, Tfa::Off) else {
            unreachable!("checked above");
        };
        a.tfa = Tfa::Active(Active {
            totp,
            last_step: step,
            unused: strings(&body["recovery_codes"]),
            uncertain: 0,
            consumed_codes: Vec::new(),
            consumed_steps: vec![step],
        });
        a.failures = 0;
    } else {
        f.violation(format!(
            "{}: activation with a current code answered {status} {body}",
            a.name
        ));
    }
    Ok(())
}

async fn deactivate(
    a: &mut Account,
    api: &Api,
    f: &Figures,
    key: String,
) -> Result<(), reqwest::Error> {
    a.in_flight = Some(Op::Deactivate(key.clone()));
    let (status, body) = api.post("totp/deactivate/", Some(&key), json!({})).await?;
    a.in_flight = None;
    if status == 200 {
        f.ack();
        // Every other key of the user is revoked with it.
        let others: Vec<String> = a.keys.drain(..).filter(|k| *k != key).collect();
        a.revoked.extend(others);
        a.keys.push(key);
        a.tfa = Tfa::Off;
    } else {
        f.violation(format!("{}: deactivation answered {status} {body}", a.name));
    }
    Ok(())
}

/// The password step, then a verify with the next usable time step or an unused recovery code.
async fn verify(
    a: &mut Account,
    api: &Api,
    rng: &mut StdRng,
    f: &Figures,
) -> Result<(), reqwest::Error> {
    a.in_flight = Some(Op::Login);
    let (status, body) = api.login(&a.name, PASSWORD).await?;
    a.in_flight = None;
    let Some(temp) = body["temp_token"].as_str().map(str::to_owned) else {
        f.violation(format!(
            "{}: login with TOTP on answered {status} {body}",
            a.name
        ));
        return Ok(());
    };
    f.ack();
    let Tfa::Active(active) = &mut a.tfa else {
        return Ok(());
    };
    let step = active.next_step();
    let use_step = step.is_some() && (active.unused.is_empty() || rng.random_bool(0.3));
    let (token, used_step) = match step {
        Some(step) if use_step => {
            // Spent before sending: whether or not the server records it, never reuse it.
            active.last_step = step;
            a.in_flight = Some(Op::VerifyStep);
            (code(&active.totp, step), Some(step))
        }
        _ => {
            if active.unused.is_empty() {
                return Ok(());
            }
            let index = rng.random_range(0..active.unused.len());
            a.in_flight = Some(Op::VerifyRecovery);
            (active.unused.swap_remove(index), None)
        }
    };
    let (status, body) = api.verify(&temp, &token).await?;
    a.in_flight = None;
    let Tfa::Active(active) = &mut a.tfa else {
        unreachable!("checked above");
    };
    match (status, body["key"].as_str()) {
        (200, Some(key)) => {
            f.ack();
            a.keys.push(key.to_owned());
            a.used_temp_tokens.push(temp);
            a.failures = 0;
            match used_step {
                Some(step) => active.consumed_steps.push(step),
                None => {
                    let remaining =
                        body["recovery_codes_remaining"].as_u64().unwrap_or(999) as usize;
                    let known = active.unused.len();
                    if remaining < known || remaining > known + active.uncertain {
                        f.violation(format!(
                            "{}: {remaining} recovery codes left, expected {known} to {}",
                            a.name,
                            known + active.uncertain
                        ));
                    }
                    active.consumed_codes.push(token);
                }
            }
        }
        _ => {
            a.failures += 1;
            let what = if used_step.is_some() {
                "a fresh time step"
            } else {
                "an unused recovery code"
            };
            f.violation(format!(
                "{}: verify with {what} answered {status} {body}",
                a.name
            ));
        }
    }
    Ok(())
}

// ---- after a restart ----

/// Settles the request cut by the kill, then checks everything acknowledged so far.
async fn settle_and_check(mut a: Account, api: Api, f: Arc<Figures>) -> Account {
    settle(&mut a, &api, &f).await;
    check_keys(&a, &api, &f).await;
    check_state(&a, &api, &f).await;
    check_consumed(&mut a, &api, &f).await;
    check_temp_tokens(&a, &api, &f).await;
    if a.failures >= FAILURE_BUDGET {
        reset_failures(&mut a, &api, &f).await;
    }
    a
}

fn must(answer: Answer, what: &str) -> (u16, Value) {
    answer.unwrap_or_else(|e| panic!("the restarted server did not answer {what}: {e}"))
}

async fn settle(a: &mut Account, api: &Api, f: &Figures) {
    let Some(op) = a.in_flight.take() else {
        return;
    };
    Figures::count(&f.settled);
    match op {
        Op::Login | Op::VerifyStep => {} // nothing kept; a possibly used step is already skipped
        Op::Logout(key) => a.keys.retain(|k| *k != key),
        Op::Setup => a.tfa = Tfa::PendingUnknown,
        Op::VerifyRecovery => {
            if let Tfa::Active(active) = &mut a.tfa {
                active.uncertain += 1;
            }
        }
        Op::Activate => {
            let (status, body) = must(api.status(&a.keys[0]).await, "status");
            if status != 200 {
                f.violation(format!(
                    "{}: acknowledged key refused ({status} {body})",
                    a.name
                ));
                return;
            }
            if body["active"] == json!(true) {
                let Tfa::Pending(totp) = std::mem::replace(&mut a.tfa, Tfa::Off) else {
                    unreachable!("activate is only sent while pending");
                };
                a.tfa = Tfa::Active(Active {
                    totp,
                    last_step: step_now() + 1,
                    unused: Vec::new(),
                    uncertain: 10,
                    consumed_codes: Vec::new(),
                    consumed_steps: Vec::new(),
                });
                a.failures = 0;
            }
        }
        Op::Deactivate(key) => {
            let (status, body) = must(api.status(&key).await, "status");
            if status != 200 {
                f.violation(format!(
                    "{}: the deactivating key was refused ({status} {body})",
                    a.name
                ));
                return;
            }
            if body["active"] == json!(false) {
                // It happened, unacknowledged: the other keys' state is not ours to assert.
                a.keys.retain(|k| *k == key);
                a.tfa = Tfa::Off;
            }
        }
    }
}

async fn check_keys(a: &Account, api: &Api, f: &Figures) {
    for key in &a.keys {
        let (status, body) = must(api.status(key).await, "status");
        Figures::count(&f.keys_working);
        if status != 200 {
            f.violation(format!(
                "{}: an acknowledged key stopped working: {status} {body}",
                a.name
            ));
        }
    }
    for key in &a.revoked {
        let (status, body) = must(api.status(key).await, "status");
        Figures::count(&f.keys_revoked);
        if status != 403 {
            f.violation(format!(
                "{}: a logged-out or revoked key works again: {status} {body}",
                a.name
            ));
        }
    }
}

async fn check_state(a: &Account, api: &Api, f: &Figures) {
    let Some(key) = a.keys.first() else {
        return;
    };
    let (status, body) = must(api.status(key).await, "status");
    if status != 200 {
        return; // already reported by check_keys
    }
    Figures::count(&f.states);
    let (active, pending) = (
        body["active"] == json!(true),
        body["pending"] == json!(true),
    );
    let ok = match &a.tfa {
        Tfa::Off => !active && !pending,
        Tfa::Pending(_) => !active && pending,
        Tfa::PendingUnknown => !active,
        Tfa::Active(_) => active,
    };
    if !ok {
        f.violation(format!(
            "{}: TOTP state lost: the model says {}, the server {body}",
            a.name,
            match &a.tfa {
                Tfa::Off => "off",
                Tfa::Pending(_) => "pending",
                Tfa::PendingUnknown => "maybe pending",
                Tfa::Active(_) => "active",
            }
        ));
    }
}

/// A temp token for checks, with the number of wrong codes it can still take.
async fn fresh_temp(a: &Account, api: &Api, f: &Figures) -> Option<(String, u32)> {
    let (status, body) = must(api.login(&a.name, PASSWORD).await, "login");
    match body["temp_token"].as_str() {
        Some(temp) => Some((temp.to_owned(), TEMP_TOKEN_ATTEMPTS - 1)),
        None => {
            f.violation(format!(
                "{}: TOTP is active but login answered {status} {body}",
                a.name
            ));
            None
        }
    }
}

async fn check_consumed(a: &mut Account, api: &Api, f: &Figures) {
    let Tfa::Active(active) = &a.tfa else {
        return;
    };
    let now = step_now();
    let mut probes: Vec<(String, &AtomicUsize, &str)> = active
        .consumed_codes
        .iter()
        .map(|c| (c.clone(), &f.recovery_codes, "a consumed recovery code"))
        .collect();
    // Steps that fell out of the ±1 window are refused whatever the store says: skip them.
    probes.extend(
        active
            .consumed_steps
            .iter()
            .filter(|s| **s + 1 >= now)
            .map(|s| (code(&active.totp, *s), &f.steps, "a consumed time step")),
    );
    let mut temp: Option<(String, u32)> = None;
    for (token, counter, what) in probes {
        if temp.as_ref().is_none_or(|(_, left)| *left == 0) {
            temp = fresh_temp(a, api, f).await;
        }
        let Some((t, left)) = temp.as_mut() else {
            return;
        };
        *left -= 1;
        let (status, body) = must(api.verify(t, &token).await, "verify");
        Figures::count(counter);
        a.failures += 1;
        if status != 400 || body["code"] != json!("invalid_code") {
            f.violation(format!(
                "{}: {what} answered {status} {body}, not 400 invalid_code",
                a.name
            ));
        }
    }
}

async fn check_temp_tokens(a: &Account, api: &Api, f: &Figures) {
    for temp in &a.used_temp_tokens {
        let (status, body) = must(api.verify(temp, NOBODYS_RECOVERY_CODE).await, "verify");
        Figures::count(&f.temp_tokens);
        if status != 401 {
            f.violation(format!(
                "{}: a used temp token answered {status} {body}, not 401",
                a.name
            ));
        }
    }
}

/// One acknowledged success resets the server's failure count (or a deactivation takes the user
/// out of the checks that fail codes until the next activation, which resets it).
async fn reset_failures(a: &mut Account, api: &Api, f: &Figures) {
    let Tfa::Active(active) = &a.tfa else {
        return;
    };
    if !active.unused.is_empty() || active.next_step().is_some() {
        let mut rng = StdRng::seed_from_u64(a.failures.into());
        verify(a, api, &mut rng, f)
            .await
            .expect("the server answers");
    } else {
        let key = a.keys[0].clone();
        deactivate(a, api, f, key)
            .await
            .expect("the server answers");
    }
}

// ---- the cycle ----

/// The data dir, the users' model and the figures, across restarts.
struct World {
    dir: tempfile::TempDir,
    accounts: Vec<Account>,
    figures: Arc<Figures>,
    rng: StdRng,
    runs: usize,
}

impl World {
    /// A fresh data dir with `USERS` registered users, each with a key and TOTP off.
    async fn new(seed: u64) -> (World, Server) {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = Server::start(dir.path(), 0).expect("first start");
        let mut accounts = Vec::new();
        for i in 0..USERS {
            let name = format!("user{i}");
            let body = json!({"username": name, "password": PASSWORD});
            let (status, body) = server
                .api
                .post("register/", None, body)
                .await
                .expect("register");
            assert_eq!(status, 201, "{body}");
            let (status, body) = server.api.login(&name, PASSWORD).await.expect("login");
            assert_eq!(status, 200, "{body}");
            accounts.push(Account {
                name,
                keys: vec![body["key"].as_str().expect("key").to_owned()],
                revoked: Vec::new(),
                used_temp_tokens: Vec::new(),
                tfa: Tfa::Off,
                failures: 0,
                in_flight: None,
            });
        }
        let world = World {
            dir,
            accounts,
            figures: Arc::new(Figures::default()),
            rng: StdRng::seed_from_u64(seed),
            runs: 0,
        };
        (world, server)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the load on `server` for `millis` (longer if needed, up to 20 s, until it has
    /// acknowledged `min_acks` operations), then kills it with SIGKILL mid-load.
    async fn load_then_kill(&mut self, server: Server, millis: u64, min_acks: usize) {
        let acks_before = self.figures.acknowledged.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = self
            .accounts
            .drain(..)
            .map(|a| {
                tokio::spawn(load(
                    a,
                    server.api.clone(),
                    Arc::clone(&stop),
                    Arc::clone(&self.figures),
                    self.rng.random(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(millis)).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.figures.acknowledged.load(Ordering::Relaxed) - acks_before < min_acks
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::SeqCst);
        let log = server.kill9();
        for worker in workers {
            self.accounts.push(worker.await.expect("worker"));
        }
        self.check_log(&log);
    }

    fn check_log(&self, log: &Path) {
        for line in log_problems(log) {
            self.figures
                .violation(format!("run {}: the server logged: {line}", self.runs));
        }
    }

    /// Restarts on the same data dir and checks every user against the model.
    async fn restart_and_check(&mut self) -> Server {
        self.runs += 1;
        let server = match Server::start(self.path(), self.runs) {
            Ok(server) => server,
            Err(e) => panic!("the database did not open (start {}): {e}", self.runs),
        };
        let checks: Vec<_> = self
            .accounts
            .drain(..)
            .map(|a| {
                tokio::spawn(settle_and_check(
                    a,
                    server.api.clone(),
                    Arc::clone(&self.figures),
                ))
            })
            .collect();
        for check in checks {
            self.accounts.push(check.await.expect("check"));
        }
        server
    }

    /// SIGTERM, which must end the server cleanly.
    fn stop(&self, mut server: Server) {
        let pid = server.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.expect("kill").success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            if let Some(status) = server.child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(exit.success(), "exit status after SIGTERM: {exit}");
        self.check_log(&server.log);
    }

    fn violations(&self) -> Vec<String> {
        self.figures.violations.lock().expect("lock").clone()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill_at_random_moments() {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(unix_now);
    let started = Instant::now();
    let (mut world, mut server) = World::new(seed).await;
    for _ in 0..kills {
        let millis = world.rng.random_range(20..600);
        world.load_then_kill(server, millis, 0).await;
        server = world.restart_and_check().await;
    }
    world.stop(server);
    // The data dir opens offline too.
    let events = totpd(world.path())
        .args(["events", "--user", "user0"])
        .output()
        .expect("events");
    assert!(
        events.status.success() && !events.stdout.is_empty(),
        "the data dir does not open offline: {}",
        String::from_utf8_lossy(&events.stderr)
    );

    let f = &world.figures;
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let violations = world.violations();
    let checked = n(&f.keys_working)
        + n(&f.keys_revoked)
        + n(&f.recovery_codes)
        + n(&f.steps)
        + n(&f.temp_tokens)
        + n(&f.states);
    report(&format!(
        "crash consistency: {kills} kills (seed {seed}), {} acknowledged operations, {checked} checks \
         after restarts ({} keys working, {} keys revoked, {} recovery codes, {} time steps, {} temp \
         tokens, {} TOTP states; {} cut requests settled), violations = {}, {:.1} s",
        n(&f.acknowledged),
        n(&f.keys_working),
        n(&f.keys_revoked),
        n(&f.recovery_codes),
        n(&f.steps),
        n(&f.temp_tokens),
        n(&f.states),
        n(&f.settled),
        violations.len(),
        started.elapsed().as_secs_f64(),
    ));
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    for (what, counter) in [
        ("recovery codes", &f.recovery_codes),
        ("time steps", &f.steps),
        ("temp tokens", &f.temp_tokens),
        ("revoked keys", &f.keys_revoked),
    ] {
        assert!(n(counter) > 0, "no {what} were checked");
    }
}

/// The checks can fail: a data dir rolled back to a copy taken before the last load — what a
/// store that answered before flushing would leave — is caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_catch_a_database_that_lost_acknowledged_writes() {
    let (mut world, server) = World::new(7).await;
    world.load_then_kill(server, 300, 20).await;
    let server = world.restart_and_check().await;
    world.stop(server);
    assert!(world.violations().is_empty(), "{:?}", world.violations());
    let snapshot = world.path().join("snapshot");
    copy_dir(&world.path().join("data"), &snapshot);

    let server = world.restart_and_check().await;
    let before = world.figures.acknowledged.load(Ordering::Relaxed);
    world.load_then_kill(server, 300, 50).await;
    let lost = world.figures.acknowledged.load(Ordering::Relaxed) - before;
    assert!(lost > 20, "the load acknowledged only {lost} operations");
    std::fs::remove_dir_all(world.path().join("data")).expect("rm");
    copy_dir(&snapshot, &world.path().join("data"));
    let server = world.restart_and_check().await;
    drop(server);
    let violations = world.violations();
    report(&format!(
        "crash consistency self-test: {lost} acknowledged operations rolled back, {} violations caught",
        violations.len()
    ));
    assert!(
        !violations.is_empty(),
        "a rollback of {lost} acknowledged operations went unnoticed"
    );
}
