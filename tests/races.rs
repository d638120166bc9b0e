//! Races, many at once. Every user at the same time races three double-spends — one temp token
//! with several valid recovery codes, one recovery code across several temp tokens, one time step
//! across several temp tokens — and one user gets rounds of parallel setups, activations,
//! deactivations and verifies. Each one-time thing is spent exactly once, the state afterwards is
//! the one the winners' answers describe, and no request gets a 5xx. The server runs in this
//! process with a manual clock; the lockout threshold is raised to its maximum because the losers'
//! refused codes count as failures and locks are not the subject here.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinSet;
use totp_rs::Totp;
use totpd::clock::{Clock, ManualClock};

const PASSWORD: &str = "password123";
/// Parallel requests per contested thing.
const RACERS: usize = 6;
const USERS: usize = 16;

mod common;

use common::report;

struct App {
    api: common::ApiClient,
    clock: ManualClock,
    /// Every answer's status, to show that none was a 5xx.
    answers: AtomicUsize,
    server_errors: std::sync::Mutex<Vec<String>>,
    _dir: TempDir,
}

type Answer = common::ApiAnswer;

async fn spawn_app() -> Arc<App> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::quick_config(dir.path().join("data"));
    config.lockout.threshold = 100;
    let clock = ManualClock::new(1_800_000_015);
    let (base, service) = common::serve_in_process(config, clock.clone()).await;
    let ctx = totpd::service::Ctx {
        now: clock.now(),
        ip: None,
    };
    for i in 0..USERS {
        service
            .create_user(&format!("user{i}"), PASSWORD.to_owned(), "test", &ctx)
            .await
            .expect("user");
    }
    Arc::new(App {
        api: common::ApiClient::new(base),
        clock,
        answers: AtomicUsize::new(0),
        server_errors: std::sync::Mutex::new(Vec::new()),
        _dir: dir,
    })
}

impl App {
    /// Counts an answer and keeps any 5xx; every answer must be JSON.
    fn record(&self, answer: reqwest::Result<Answer>, what: &str) -> Answer {
        let (status, body) = answer.unwrap_or_else(|e| panic!("{what}: not answered: {e}"));
        self.answers.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors
                .lock()
                .expect("lock")
                .push(format!("{what}: {status} {body}"));
        }
        assert!(!body.is_null(), "{what}: not JSON ({status})");
        (status, body)
    }

    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> Answer {
        self.record(self.api.post(path, key, body).await, path)
    }

    async fn status(&self, key: &str) -> Answer {
        self.record(self.api.status(key).await, "status")
    }

    async fn login(&self, name: &str) -> Answer {
        self.record(self.api.login(name, PASSWORD).await, "login")
    }

    async fn key(&self, name: &str) -> String {
        let (status, body) = self.login(name).await;
        assert_eq!(status, 200, "{body}");
        body["key"].as_str().expect("key").to_owned()
    }

    async fn temp_token(&self, name: &str) -> String {
        let (status, body) = self.login(name).await;
        assert_eq!(status, 200, "{body}");
        body["temp_token"].as_str().expect("temp_token").to_owned()
    }

    async fn verify(&self, temp: &str, token: &str) -> Answer {
        self.record(self.api.verify(temp, token).await, "totp/verify/")
    }

    async fn setup(&self, key: &str) -> Answer {
        self.post("totp/setup/", Some(key), json!({})).await
    }

    async fn activate(&self, key: &str, code: &str) -> Answer {
        self.post("totp/activate/", Some(key), json!({"token": code}))
            .await
    }

    async fn deactivate(&self, key: &str) -> Answer {
        self.post("totp/deactivate/", Some(key), json!({})).await
    }

    /// The code of `totp` for the current manual time plus `steps` steps.
    fn code(&self, totp: &Totp, steps: i64) -> String {
        let t = self.clock.now() as i64 + steps * 30;
        totp.generate(t as u64).to_string()
    }

    fn assert_no_server_error(&self) {
        let errors = self.server_errors.lock().expect("lock");
        assert!(errors.is_empty(), "5xx answers: {errors:?}");
    }
}

fn totp_of(setup: &Value) -> Totp {
    Totp::from_url(setup["provisioning_uri"].as_str().expect("uri")).expect("totp-rs reads it")
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// Counts answers by (status, code).
fn tally(answers: &[Answer]) -> BTreeMap<(u16, String), usize> {
    let mut counts = BTreeMap::new();
    for (status, body) in answers {
        let code = body["code"].as_str().unwrap_or("-").to_owned();
        *counts.entry((*status, code)).or_insert(0) += 1;
    }
    counts
}

struct Enrolled {
    name: String,
    key: String,
    totp: Totp,
    codes: Vec<String>,
}

async fn enrol(app: &App, name: &str) -> Enrolled {
    let key = app.key(name).await;
    let (status, setup) = app.setup(&key).await;
    assert_eq!(status, 201, "{setup}");
    let totp = totp_of(&setup);
    let (status, body) = app.activate(&key, &app.code(&totp, 0)).await;
    assert_eq!(status, 200, "{body}");
    Enrolled {
        name: name.to_owned(),
        key,
        totp,
        codes: strings(&body["recovery_codes"]),
    }
}

/// What one user raced: the answers of each double-spend.
struct Raced {
    one_temp_token: Vec<Answer>,
    one_recovery_code: Vec<Answer>,
    one_time_step: Vec<Answer>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_double_spending_at_once_wins_each_thing_exactly_once() {
    let app = spawn_app().await;
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(enrol(&app, &format!("user{i}")).await);
    }
    // Past the activation steps: the current step is fresh for everyone.
    app.clock.advance(30);

    // Everything each user will race, prepared first so the races start together.
    let mut planned = Vec::new();
    for user in &users {
        let temp = app.temp_token(&user.name).await;
        let a: Vec<(String, String)> = user.codes[1..=RACERS]
            .iter()
            .map(|c| (temp.clone(), c.clone()))
            .collect();
        let mut b = Vec::new();
        let mut c = Vec::new();
        for _ in 0..RACERS {
            b.push((app.temp_token(&user.name).await, user.codes[0].clone()));
            c.push((app.temp_token(&user.name).await, app.code(&user.totp, 0)));
        }
        planned.push([a, b, c]);
    }
    let mut set = JoinSet::new();
    for (u, races) in planned.into_iter().enumerate() {
        for (r, race) in races.into_iter().enumerate() {
            for (temp, token) in race {
                let app = Arc::clone(&app);
                set.spawn(async move { (u, r, app.verify(&temp, &token).await) });
            }
        }
    }
    let mut raced: Vec<Raced> = (0..USERS)
        .map(|_| Raced {
            one_temp_token: Vec::new(),
            one_recovery_code: Vec::new(),
            one_time_step: Vec::new(),
        })
        .collect();
    let mut parallel = 0;
    while let Some(joined) = set.join_next().await {
        let (u, r, answer) = joined.expect("task");
        parallel += 1;
        match r {
            0 => raced[u].one_temp_token.push(answer),
            1 => raced[u].one_recovery_code.push(answer),
            _ => raced[u].one_time_step.push(answer),
        }
    }
    app.assert_no_server_error();

    let mut checked = 0;
    let mut all_keys = HashSet::new();
    for (user, raced) in users.iter().zip(&raced) {
        let name = &user.name;
        for (what, answers, loser) in [
            (
                "one temp token, several recovery codes",
                &raced.one_temp_token,
                (401, "invalid_temp_token"),
            ),
            (
                "one recovery code, several temp tokens",
                &raced.one_recovery_code,
                (400, "invalid_code"),
            ),
            (
                "one time step, several temp tokens",
                &raced.one_time_step,
                (400, "invalid_code"),
            ),
        ] {
            let counts = tally(answers);
            let wins = counts.get(&(200, "-".to_owned())).copied().unwrap_or(0);
            let losses = counts
                .get(&(loser.0, loser.1.to_owned()))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                (wins, losses),
                (1, RACERS - 1),
                "{name}, {what}: {counts:?}"
            );
            for (status, body) in answers {
                if *status == 200 {
                    all_keys.insert(body["key"].as_str().expect("key").to_owned());
                }
            }
            checked += 1;
        }
        // Two recovery codes are gone: the contested one and one of the codes raced on one temp
        // token — exactly one.
        let (status, body) = app.status(&user.key).await;
        assert_eq!(
            (status, &body["recovery_codes_remaining"]),
            (200, &json!(8)),
            "{name}: {body}"
        );
        let temp = app.temp_token(name).await;
        let (status, _) = app.verify(&temp, &user.codes[0]).await;
        assert_eq!(
            status, 400,
            "{name}: the contested recovery code stays spent"
        );
        let mut refused = 0;
        for code in &user.codes[1..=RACERS] {
            let temp = app.temp_token(name).await;
            if app.verify(&temp, code).await.0 == 400 {
                refused += 1;
            }
        }
        assert_eq!(
            refused, 1,
            "{name}: exactly one of the codes raced on one temp token was spent"
        );
        // The contested step stays spent; the next one works.
        let temp = app.temp_token(name).await;
        assert_eq!(
            app.verify(&temp, &app.code(&user.totp, 0)).await.0,
            400,
            "{name}"
        );
        let temp = app.temp_token(name).await;
        assert_eq!(
            app.verify(&temp, &app.code(&user.totp, 1)).await.0,
            200,
            "{name}"
        );
        checked += 4;
    }
    assert_eq!(all_keys.len(), USERS * 3, "every winner got its own key");
    for key in &all_keys {
        assert_eq!(app.status(key).await.0, 200, "a winner's key works");
    }
    app.assert_no_server_error();
    report(&format!(
        "races: {USERS} users at once, {parallel} parallel verifies ({} double-spends of {RACERS} racers): \
         each won exactly once; {checked} invariants checked, {} keys work; {} answers, 0 with a 5xx",
        USERS * 3,
        all_keys.len(),
        app.answers.load(Ordering::Relaxed)
    ));
}

type Request =
    Arc<dyn Fn(Arc<App>, usize) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// A kind of request to race: `f(app, i)` makes the i-th copy.
fn race<F, Fut>(f: F) -> Request
where
    F: Fn(Arc<App>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    Arc::new(move |app, i| Box::pin(f(app, i)))
}

/// Sends `n` copies of each kind of request at once; returns the answers per kind.
async fn at_once(
    app: &Arc<App>,
    requests: Vec<(&'static str, usize, Request)>,
) -> BTreeMap<&'static str, Vec<Answer>> {
    let mut set = JoinSet::new();
    for (kind, n, make) in requests {
        for i in 0..n {
            let future = make(Arc::clone(app), i);
            set.spawn(async move { (kind, future.await) });
        }
    }
    let mut answers: BTreeMap<&'static str, Vec<Answer>> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let (kind, answer) = joined.expect("task");
        answers.entry(kind).or_default().push(answer);
    }
    answers
}

fn count(answers: &BTreeMap<&str, Vec<Answer>>, kind: &str, status: u16) -> usize {
    answers
        .get(kind)
        .map_or(0, |a| a.iter().filter(|(s, _)| *s == status).count())
}

/// Every answer of `kind` is one of `allowed` (status, code); 2xx answers have no code.
fn assert_only(answers: &BTreeMap<&str, Vec<Answer>>, kind: &str, allowed: &[(u16, &str)]) {
    for (status, body) in answers.get(kind).into_iter().flatten() {
        let code = body["code"].as_str().unwrap_or("-");
        assert!(
            allowed.contains(&(*status, code)),
            "{kind}: unexpected {status} {body}"
        );
    }
}

/// The keys of one user, as each race needs them: `main` for setups and activations, one key
/// per racing deactivation (so each deactivation's own key is the only one it keeps).
struct Keys {
    main: String,
    deactivate: Vec<String>,
}

/// Fresh keys for a user with TOTP off (the password step alone gives a key).
async fn fresh_keys(app: &App, name: &str) -> Keys {
    let mut deactivate = Vec::new();
    for _ in 0..RACERS {
        deactivate.push(app.key(name).await);
    }
    Keys {
        main: app.key(name).await,
        deactivate,
    }
}

/// The key of the one deactivation that answered 200, and asserts the others were refused.
fn deactivation_winner(answers: &BTreeMap<&str, Vec<Answer>>, keys: &Keys) -> Option<String> {
    let winners: Vec<usize> = answers
        .get("deactivate")
        .into_iter()
        .flatten()
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body["i"].as_u64().expect("index") as usize)
        .collect();
    assert!(
        winners.len() <= 1,
        "{} deactivations succeeded",
        winners.len()
    );
    winners.first().map(|i| keys.deactivate[*i].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_setup_activate_deactivate_and_verify_on_one_user_keep_one_consistent_state() {
    let app = spawn_app().await;
    let name = "user0";
    const ROUNDS: usize = 8;
    let mut parallel = 0;
    let mut checked = 0;
    // Rounds whose raced secret was: replaced before any activation, activated, activated and
    // deactivated.
    let mut outcomes = [0; 3];
    // A deactivation racing with another key revokes it: that request's 403 is the rule.
    let revoked = (403, "authentication_failed");
    for round in 0..ROUNDS {
        app.clock.advance(60);
        // Round start: TOTP off. One setup whose secret is then raced: activations with its
        // code against more setups (which replace it) and, every other round, deactivations.
        let mut keys = fresh_keys(&app, name).await;
        let (status, first) = app.setup(&keys.main).await;
        assert_eq!(status, 201, "round {round}: {first}");
        let first = totp_of(&first);
        let code = app.code(&first, 0);
        let (k1, k2, kd) = (
            keys.main.clone(),
            keys.main.clone(),
            keys.deactivate.clone(),
        );
        let answers = at_once(
            &app,
            vec![
                (
                    "setup",
                    RACERS,
                    race(move |app, _| {
                        let key = k1.clone();
                        async move { app.setup(&key).await }
                    }),
                ),
                (
                    "activate",
                    RACERS,
                    race(move |app, _| {
                        let (key, code) = (k2.clone(), code.clone());
                        async move { app.activate(&key, &code).await }
                    }),
                ),
                (
                    "deactivate",
                    if round % 2 == 1 { RACERS / 2 } else { 0 },
                    race(move |app, i| {
                        let key = kd[i].clone();
                        async move {
                            let (status, mut body) = app.deactivate(&key).await;
                            body["i"] = json!(i);
                            (status, body)
                        }
                    }),
                ),
            ],
        )
        .await;
        parallel += answers.values().map(Vec::len).sum::<usize>();
        app.assert_no_server_error();
        assert_only(
            &answers,
            "setup",
            &[(201, "-"), (400, "totp_already_active"), revoked],
        );
        assert_only(
            &answers,
            "activate",
            &[
                (200, "-"),
                (400, "invalid_code"),
                (400, "totp_already_active"),
                (400, "totp_not_pending"),
                revoked,
            ],
        );
        assert_only(
            &answers,
            "deactivate",
            &[(200, "-"), (400, "totp_not_active"), revoked],
        );
        let activated = count(&answers, "activate", 200);
        let winner = deactivation_winner(&answers, &keys);
        let deactivated = usize::from(winner.is_some());
        outcomes[activated + deactivated] += 1;
        assert!(
            activated <= 1,
            "round {round}: {activated} activations of one secret"
        );
        assert!(
            deactivated <= activated,
            "round {round}: {deactivated} deactivations of {activated} activations"
        );
        if let Some(kept) = &winner {
            // Every key but the winning deactivation's is revoked, then fresh keys are needed.
            assert_eq!(app.status(kept).await.0, 200, "round {round}: the kept key");
            assert_eq!(app.status(&keys.main).await.0, 403, "round {round}");
            for key in keys.deactivate.iter().filter(|k| *k != kept) {
                assert_eq!(app.status(key).await.0, 403, "round {round}");
            }
            keys = fresh_keys(&app, name).await;
            checked += 2 + RACERS;
        } else {
            assert_eq!(count(&answers, "setup", 403), 0, "round {round}");
            assert_eq!(count(&answers, "activate", 403), 0, "round {round}");
        }
        let (status, state) = app.status(&keys.main).await;
        assert_eq!(status, 200);
        assert_eq!(
            state["active"],
            json!(activated == 1 && deactivated == 0),
            "round {round}: {state} after {activated} activations and {deactivated} deactivations"
        );
        checked += 4;

        // Settle to TOTP on with a known secret: if a pending setup is left, exactly one of the
        // acknowledged secrets is it.
        let codes = if state["active"] == json!(true) {
            let winner = answers["activate"]
                .iter()
                .find(|(s, _)| *s == 200)
                .expect("winner");
            // The active secret is the raced one: its next code verifies.
            let temp = app.temp_token(name).await;
            assert_eq!(
                app.verify(&temp, &app.code(&first, 1)).await.0,
                200,
                "round {round}"
            );
            checked += 1;
            strings(&winner.1["recovery_codes"])
        } else {
            let mut candidates = vec![first];
            for (status, body) in &answers["setup"] {
                if *status == 201 {
                    candidates.push(totp_of(body));
                }
            }
            let mut activated_with = Vec::new();
            let mut codes = Vec::new();
            for (i, totp) in candidates.iter().enumerate() {
                let (status, body) = app.activate(&keys.main, &app.code(totp, 1)).await;
                if status == 200 {
                    activated_with.push(i);
                    codes = strings(&body["recovery_codes"]);
                }
            }
            if state["pending"] == json!(true) {
                assert_eq!(
                    activated_with.len(),
                    1,
                    "round {round}: one pending secret, an acknowledged one"
                );
            } else {
                assert!(activated_with.is_empty(), "round {round}");
                let (status, setup) = app.setup(&keys.main).await;
                assert_eq!(status, 201);
                let (status, body) = app
                    .activate(&keys.main, &app.code(&totp_of(&setup), 1))
                    .await;
                assert_eq!(status, 200, "{body}");
                codes = strings(&body["recovery_codes"]);
            }
            checked += 1;
            codes
        };

        // TOTP on: deactivations (each with its own key) race setups and logins finishing with
        // recovery codes.
        let mut temps = Vec::new();
        for _ in 0..RACERS / 2 {
            temps.push(app.temp_token(name).await);
        }
        let (k1, kd) = (keys.main.clone(), keys.deactivate.clone());
        let recovery = codes.clone();
        let answers = at_once(
            &app,
            vec![
                (
                    "deactivate",
                    RACERS,
                    race(move |app, i| {
                        let key = kd[i].clone();
                        async move {
                            let (status, mut body) = app.deactivate(&key).await;
                            body["i"] = json!(i);
                            (status, body)
                        }
                    }),
                ),
                (
                    "setup",
                    RACERS / 2,
                    race(move |app, _| {
                        let key = k1.clone();
                        async move { app.setup(&key).await }
                    }),
                ),
                (
                    "verify",
                    RACERS / 2,
                    race(move |app, i| {
                        let (temp, code) = (temps[i].clone(), recovery[i].clone());
                        async move { app.verify(&temp, &code).await }
                    }),
                ),
            ],
        )
        .await;
        parallel += answers.values().map(Vec::len).sum::<usize>();
        app.assert_no_server_error();
        assert_only(
            &answers,
            "deactivate",
            &[(200, "-"), (400, "totp_not_active"), revoked],
        );
        assert_only(
            &answers,
            "setup",
            &[(201, "-"), (400, "totp_already_active"), revoked],
        );
        assert_only(
            &answers,
            "verify",
            &[(200, "-"), (401, "invalid_temp_token")],
        );
        let kept = deactivation_winner(&answers, &keys)
            .unwrap_or_else(|| panic!("round {round}: no deactivation succeeded"));
        let (status, state) = app.status(&kept).await;
        assert_eq!(
            status, 200,
            "round {round}: the winning deactivation keeps its key"
        );
        assert_eq!(state["active"], json!(false), "round {round}: {state}");
        assert_eq!(
            state["pending"],
            json!(count(&answers, "setup", 201) > 0),
            "round {round}: pending iff a setup after the deactivation was acknowledged: {state}"
        );
        // Every other key is revoked, including keys that verify issued before the deactivation.
        let mut others: Vec<String> = keys
            .deactivate
            .iter()
            .chain([&keys.main])
            .filter(|k| **k != kept)
            .cloned()
            .collect();
        for (status, body) in &answers["verify"] {
            if *status == 200 {
                others.push(body["key"].as_str().expect("key").to_owned());
            }
        }
        for other in &others {
            assert_eq!(
                app.status(other).await.0,
                403,
                "round {round}: a key outlived the deactivation"
            );
        }
        checked += 4 + others.len();
    }
    app.assert_no_server_error();
    report(&format!(
        "races: {ROUNDS} rounds of parallel setup/activate/deactivate/verify on one user, \
         {parallel} parallel requests (raced secret replaced first in {} rounds, activated in {}, \
         activated then deactivated in {}), {checked} invariants checked, 0 answers with a 5xx",
        outcomes[0], outcomes[1], outcomes[2]
    ));
}

/// A key that a deactivation keeps (the one it was sent with) is valid before and after it, so
/// requests made with it while the deactivation runs must not be refused as unauthenticated.
///
/// Regression test: `Store::authenticate_key` once read the key record and then, separately,
/// the user; a deactivation committing in between (raising the user's key epoch and re-stamping
/// the kept key) made the request fail with 403 although the key was never revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_a_deactivation_keeps_is_never_refused_while_it_runs() {
    let app = spawn_app().await;
    let name = "user0";
    let key = app.key(name).await;
    let mut refused = Vec::new();
    let mut requests = 0;
    for round in 0..150 {
        app.clock.advance(60);
        let (status, setup) = app.setup(&key).await;
        assert_eq!(status, 201, "{setup}");
        let (status, body) = app.activate(&key, &app.code(&totp_of(&setup), 0)).await;
        assert_eq!(status, 200, "{body}");
        let k1 = key.clone();
        let k2 = key.clone();
        let answers = at_once(
            &app,
            vec![
                (
                    "deactivate",
                    1,
                    race(move |app, _| {
                        let key = k1.clone();
                        async move { app.deactivate(&key).await }
                    }),
                ),
                (
                    "status",
                    3 * RACERS,
                    race(move |app, _| {
                        let key = k2.clone();
                        async move { app.status(&key).await }
                    }),
                ),
            ],
        )
        .await;
        assert_eq!(count(&answers, "deactivate", 200), 1);
        requests += 3 * RACERS;
        for (status, body) in &answers["status"] {
            if *status != 200 {
                refused.push(format!("round {round}: {status} {body}"));
            }
        }
        assert_eq!(app.status(&key).await.0, 200, "the kept key works after");
    }
    assert!(
        refused.is_empty(),
        "{} of {requests} requests with the kept key were refused: {refused:?}",
        refused.len()
    );
}
