//! What each endpoint scenario sends: one request source per worker, drawing on the prepared
//! data. Codes are computed when the request is made, from the harness's own clock (the
//! server's clock: same machine).

use hyper::{Method, StatusCode};
use totpd::clock::{Clock, SystemClock};
use totpd::domain::totp::{self, PERIOD, Secret};

use crate::load::{Req, Source};
use crate::seed::{self, MainData, Pool, ValidUser};

const VERIFY: &str = "/api/v1/auth/totp/verify/";
const BARE: &str = "/api/v1/bench/bare/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Baseline,
    Login,
    Status,
    Setup,
    Activate,
    VerifyValid,
    VerifyRecovery,
    VerifyWrong,
    Logout,
    /// The external reference's GET (a separate bare warp process, `bare-warp`).
    BareGet,
    /// The external reference's POST, parsing the same body as verify.
    BarePost,
    /// Status's ceiling: `bare-warp --status-store` on the main data dir (warp, status's two
    /// sled reads and its log line, nothing of totpd's pipeline), run after the server stopped.
    StatusCeiling,
    /// The same without the log line (`--no-log`).
    StatusCeilingNoLog,
}

impl Endpoint {
    /// The endpoints of the totpd server (the bare warp references run on their own process).
    pub const ALL: [Endpoint; 9] = [
        Endpoint::Baseline,
        Endpoint::Login,
        Endpoint::Status,
        Endpoint::Setup,
        Endpoint::Activate,
        Endpoint::VerifyValid,
        Endpoint::VerifyRecovery,
        Endpoint::VerifyWrong,
        Endpoint::Logout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Baseline => "baseline",
            Endpoint::Login => "login",
            Endpoint::Status => "status",
            Endpoint::Setup => "setup",
            Endpoint::Activate => "activate",
            Endpoint::VerifyValid => "verify_valid",
            Endpoint::VerifyRecovery => "verify_recovery",
            Endpoint::VerifyWrong => "verify_wrong",
            Endpoint::Logout => "logout",
            Endpoint::BareGet => "bare warp GET",
            Endpoint::BarePost => "bare warp POST",
            Endpoint::StatusCeiling => "status ceiling",
            Endpoint::StatusCeilingNoLog => "status ceiling, no log",
        }
    }

    /// Whether a successful request of this kind is acknowledged only after a flush to disk.
    pub fn durable(self) -> bool {
        !matches!(
            self,
            Endpoint::Baseline
                | Endpoint::Status
                | Endpoint::BareGet
                | Endpoint::BarePost
                | Endpoint::StatusCeiling
                | Endpoint::StatusCeilingNoLog
        )
    }

    /// The bare warp route this endpoint is compared with: GET for status, POST for the rest.
    pub fn reference(self) -> Endpoint {
        match self {
            Endpoint::Status
            | Endpoint::BareGet
            | Endpoint::StatusCeiling
            | Endpoint::StatusCeilingNoLog => Endpoint::BareGet,
            _ => Endpoint::BarePost,
        }
    }

    pub fn route(self) -> &'static str {
        match self {
            Endpoint::Baseline => "POST /api/v1/bench/baseline/",
            Endpoint::Login => "POST /api/v1/auth/login/",
            Endpoint::Status => "GET /api/v1/auth/totp/",
            Endpoint::Setup => "POST /api/v1/auth/totp/setup/",
            Endpoint::Activate => "POST /api/v1/auth/totp/activate/",
            Endpoint::VerifyValid | Endpoint::VerifyRecovery | Endpoint::VerifyWrong => {
                "POST /api/v1/auth/totp/verify/"
            }
            Endpoint::Logout => "POST /api/v1/auth/logout/",
            Endpoint::BareGet => "GET /api/v1/bench/bare/ (bare-warp)",
            Endpoint::BarePost => "POST /api/v1/bench/bare/ (bare-warp)",
            Endpoint::StatusCeiling => "GET /api/v1/bench/bare/status/ (bare-warp --status-store)",
            Endpoint::StatusCeilingNoLog => {
                "GET /api/v1/bench/bare/status/ (bare-warp --status-store, --no-log)"
            }
        }
    }
}

fn verify_body(temp_token: &str, code: &str) -> String {
    format!(r#"{{"temp_token":"{temp_token}","token":"{code}"}}"#)
}

/// One request source per worker for `endpoint` at `concurrency`.
pub fn sources(endpoint: Endpoint, data: &MainData, concurrency: usize) -> Vec<Source> {
    (0..concurrency)
        .map(|worker| source(endpoint, data, worker))
        .collect()
}

fn source(endpoint: Endpoint, data: &MainData, worker: usize) -> Source {
    match endpoint {
        Endpoint::Baseline => {
            // The same body shape and size as a verify.
            let body = verify_body("bench-baseline-temp-token-of-43-characters-", "123456");
            Box::new(move || {
                Some(Req::post(
                    "/api/v1/bench/baseline/",
                    body.clone(),
                    StatusCode::OK,
                ))
            })
        }
        Endpoint::BarePost => {
            let body = verify_body("bench-baseline-temp-token-of-43-characters-", "123456");
            Box::new(move || Some(Req::post(BARE, body.clone(), StatusCode::OK)))
        }
        Endpoint::BareGet => Box::new(|| {
            Some(Req {
                method: Method::GET,
                path: BARE,
                key: None,
                body: Default::default(),
                expect: StatusCode::OK,
            })
        }),
        Endpoint::Logout => {
            let pool = data.logout_keys.clone();
            Box::new(move || {
                let key = seed::take(&pool)?;
                Some(
                    Req::post("/api/v1/auth/logout/", String::new(), StatusCode::OK).with_key(&key),
                )
            })
        }
        Endpoint::Login => {
            let name = &data.login[worker % data.login.len()];
            let body = format!(r#"{{"username":"{name}","password":"{}"}}"#, seed::PASSWORD);
            Box::new(move || {
                Some(Req::post(
                    "/api/v1/auth/login/",
                    body.clone(),
                    StatusCode::OK,
                ))
            })
        }
        Endpoint::Status | Endpoint::StatusCeiling | Endpoint::StatusCeilingNoLog => {
            let key = data.status_keys[worker % data.status_keys.len()].clone();
            let path = if endpoint == Endpoint::Status {
                "/api/v1/auth/totp/"
            } else {
                "/api/v1/bench/bare/status/"
            };
            Box::new(move || {
                Some(Req {
                    method: Method::GET,
                    path,
                    key: Some(key.clone()),
                    body: Default::default(),
                    expect: StatusCode::OK,
                })
            })
        }
        Endpoint::Setup => {
            let pool = data.setup_keys.clone();
            Box::new(move || {
                let key = seed::take(&pool)?;
                Some(
                    Req::post(
                        "/api/v1/auth/totp/setup/",
                        String::new(),
                        StatusCode::CREATED,
                    )
                    .with_key(&key),
                )
            })
        }
        Endpoint::Activate => {
            let pool = data.activate.clone();
            Box::new(move || {
                let user = seed::take(&pool)?;
                let step = totp::step_at(SystemClock.now());
                let code = totp::code_at(&user.secret, step);
                let body = format!(r#"{{"token":"{}"}}"#, code.as_str());
                Some(
                    Req::post("/api/v1/auth/totp/activate/", body, StatusCode::OK)
                        .with_key(&user.key),
                )
            })
        }
        Endpoint::VerifyValid => valid_source(data.valid.clone()),
        Endpoint::VerifyRecovery => {
            let pool = data.recovery.clone();
            let mut current = None;
            Box::new(move || {
                loop {
                    let user: &mut seed::RecoveryUser = match &mut current {
                        Some(user) => user,
                        None => current.insert(seed::take(&pool)?),
                    };
                    match (user.tokens.pop(), user.codes.pop()) {
                        (Some(token), Some(code)) => {
                            return Some(Req::post(
                                VERIFY,
                                verify_body(&token, &code),
                                StatusCode::OK,
                            ));
                        }
                        _ => current = None,
                    }
                }
            })
        }
        Endpoint::VerifyWrong => {
            let pool = data.wrong.clone();
            let mut current = None;
            let mut sent = 0;
            let per_token = seed::wrong_per_token();
            Box::new(move || {
                if sent == per_token {
                    current = None;
                }
                let token: &mut seed::WrongToken = match &mut current {
                    Some(token) => token,
                    None => {
                        sent = 0;
                        current.insert(seed::take(&pool)?)
                    }
                };
                sent += 1;
                let code = wrong_code(&token.secret);
                Some(Req::post(
                    VERIFY,
                    verify_body(&token.token, &code),
                    StatusCode::BAD_REQUEST,
                ))
            })
        }
    }
}

/// Verify with valid codes. A worker takes a user and sends the codes of the steps still fresh
/// for it, oldest first (now-1, now, now+1: all inside the ±1 window), one prepared temp token
/// each, then takes the next user.
pub fn valid_source(pool: Pool<ValidUser>) -> Source {
    let mut current: Option<ValidUser> = None;
    Box::new(move || {
        loop {
            let user = match &mut current {
                Some(user) => user,
                None => current.insert(seed::take(&pool)?),
            };
            let now = SystemClock.now();
            let step = totp::step_at(now);
            // now-1 stops being valid at the next step boundary: not used in the last 3 s.
            let oldest = if now % PERIOD < PERIOD - 3 {
                step - 1
            } else {
                step
            };
            let next = (user.last_step + 1).max(oldest);
            match user.tokens.pop() {
                Some(token) if next <= step + 1 => {
                    user.last_step = next;
                    let code = totp::code_at(&user.secret, next);
                    return Some(Req::post(
                        VERIFY,
                        verify_body(&token, code.as_str()),
                        StatusCode::OK,
                    ));
                }
                _ => current = None,
            }
        }
    })
}

/// Six digits that are not the code of any step from now-1 to now+2 (now+2: the server may see
/// the request after the next step boundary).
fn wrong_code(secret: &Secret) -> String {
    let step = totp::step_at(SystemClock.now());
    let valid: Vec<String> = (step - 1..=step + 2)
        .map(|s| totp::code_at(secret, s).as_str().to_owned())
        .collect();
    (0..)
        .map(|n: u32| format!("{:06}", n * 111_111 % 1_000_000))
        .find(|c| !valid.contains(c))
        .unwrap_or_default()
}
