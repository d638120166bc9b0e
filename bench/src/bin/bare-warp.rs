//! The external reference of `totpd-bench`: the smallest warp 0.4 server that does what a totpd
//! request minimally must — route, read a JSON body, answer JSON — and nothing else (no store,
//! no logging, no request id, no limits). It runs as its own process, like totpd, so a ratio
//! against it includes everything totpd adds on top of the framework; the harness starts it,
//! reads the `listening on http://ADDR` line it prints, and stops it with SIGTERM.
//!
//! - `GET /api/v1/bench/bare/` answers a small constant JSON object (the reference for status);
//! - `POST /api/v1/bench/bare/` parses the `{temp_token, token}` body of verify into a typed
//!   struct and answers a constant (the reference for every POST endpoint).
//!
//! It uses warp's own `serve` on a default multi-threaded tokio runtime, as a newcomer would.
//!
//! Started as `bare-warp --status-store DIR` on a prepared data dir that no server holds, it
//! also answers `GET /api/v1/bench/bare/status/` with what the status route cannot do without:
//! the login key of the `Authorization` header looked up in sled and its user read (both
//! decoded, as totpd's store does), the answer built from the user, and one log line per
//! request written as totpd writes it (`tracing`'s formatter on totpd's batched writer, level
//! info). That is status's ceiling on warp, sled and a log line: what totpd's pipeline adds on
//! top of it (connection guards, request id, client address, limits, metrics) is the gap.
//! `--status-store DIR --no-log` leaves the log line out (its `tracing::info!` is then filtered
//! out by no subscriber at all), for what the line itself costs.

use std::io::Write;
use std::time::Instant;

use serde::Deserialize;
use totpd::domain::user::{LoginKey, User};
use totpd::service::TotpStatus;
use totpd::store::codec::decode;
use warp::http::StatusCode;
use warp::{Filter, Reply};

/// The body of `POST /api/v1/auth/totp/verify/`.
#[derive(Deserialize)]
struct VerifyBody {
    temp_token: String,
    token: String,
}

/// Status's store: the trees it reads.
#[derive(Clone)]
struct StatusStore {
    keys: sled::Tree,
    users: sled::Tree,
}

impl StatusStore {
    fn open(data_dir: &str) -> StatusStore {
        let db = sled::Config::new()
            .path(std::path::Path::new(data_dir).join("db"))
            .cache_capacity(totpd::config::Config::default().cache_capacity)
            .open()
            .expect("open the prepared sled database");
        StatusStore {
            keys: db.open_tree("keys").expect("keys tree"),
            users: db.open_tree("users").expect("users tree"),
        }
    }

    /// The user of `authorization`'s key, as status answers it; `None` for a missing key.
    fn status(&self, authorization: &str) -> Option<serde_json::Value> {
        let key = authorization.strip_prefix("Token ")?;
        let digest = totpd::domain::secrets::token_digest(key);
        let record = self.keys.get(digest).ok()??;
        let record: LoginKey = decode(&record).ok()?;
        let user = self.users.get(record.user_id.to_be_bytes()).ok()??;
        let status = TotpStatus::of(&decode::<User>(&user).ok()?);
        Some(totpd::http::handlers::status_body(&status))
    }
}

/// The status ceiling's route, with its log line; without a store (no `--status-store`) it
/// answers 404, as an unknown path does.
fn status_route(
    store: Option<StatusStore>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::get()
        .and(warp::path!("api" / "v1" / "bench" / "bare" / "status"))
        .and(warp::header::<String>("authorization"))
        .map(move |authorization: String| {
            let Some(store) = &store else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let started = Instant::now();
            let (status, body) = match store.status(&authorization) {
                Some(body) => (StatusCode::OK, body),
                None => (
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"detail": "Invalid token."}),
                ),
            };
            tracing::info!(
                target: "totpd::http",
                method = "GET",
                route = "/api/v1/bench/bare/status/",
                status = status.as_u16(),
                latency_us = started.elapsed().as_micros() as u64,
                "request"
            );
            warp::reply::with_status(warp::reply::json(&body), status).into_response()
        })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (status_store, log) = match args.as_slice() {
        [flag, dir] if flag == "--status-store" => (Some(StatusStore::open(dir)), true),
        [flag, dir, no_log] if flag == "--status-store" && no_log == "--no-log" => {
            (Some(StatusStore::open(dir)), false)
        }
        _ => (None, false),
    };
    // The log line as totpd writes it; kept until main returns, so the last lines are written.
    let _log = log.then(|| {
        let (writer, guard) =
            totpd::log_writer::batched(std::io::stderr(), "bare-log").expect("log thread");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(writer)
            .with_ansi(false)
            .try_init();
        guard
    });
    let get = warp::get()
        .and(warp::path!("api" / "v1" / "bench" / "bare"))
        .map(|| warp::reply::json(&serde_json::json!({"enabled": true, "pending": false})));
    let post = warp::post()
        .and(warp::path!("api" / "v1" / "bench" / "bare"))
        .and(warp::body::content_length_limit(16 * 1024))
        .and(warp::body::json())
        .map(|body: VerifyBody| {
            // Read both fields, so the parse cannot be optimised away.
            let ok = !body.temp_token.is_empty() && !body.token.is_empty();
            warp::reply::json(&serde_json::json!({ "ok": ok }))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on http://{addr}");
    let _ = stdout.flush();
    let shutdown = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    warp::serve(get.or(post).or(status_route(status_store)))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}
