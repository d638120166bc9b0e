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

use std::io::Write;

use serde::Deserialize;
use warp::Filter;

/// The body of `POST /api/v1/auth/totp/verify/`.
#[derive(Deserialize)]
struct VerifyBody {
    temp_token: String,
    token: String,
}

#[tokio::main]
async fn main() {
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
    warp::serve(get.or(post))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}
