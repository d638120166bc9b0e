//! warp filters only: path, method, state, the raw request parts each handler needs. Anything the
//! framework rejects (unknown path 404, wrong method 405, body too large 413, wrong media type
//! 415, slow body 408) becomes the same JSON error shape in `error::handle_rejection`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use warp::http::{HeaderMap, header};
use warp::{Filter, Rejection, Reply};

use crate::error::{Error, handle_rejection};
use crate::handlers::Request;
use crate::server::ClientAddr;
use crate::{AppState, handlers};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Every route the server answers (method, path). The OpenAPI document must describe each
/// (a test checks), and metrics label requests with these paths.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/auth/register/"),
    ("POST", "/api/v1/auth/login/"),
    ("POST", "/api/v1/auth/logout/"),
    ("POST", "/api/v1/auth/logout-all/"),
    ("POST", "/api/v1/auth/password/"),
    ("GET", "/api/v1/auth/totp/"),
    ("POST", "/api/v1/auth/totp/setup/"),
    ("POST", "/api/v1/auth/totp/activate/"),
    ("POST", "/api/v1/auth/totp/verify/"),
    ("POST", "/api/v1/auth/totp/deactivate/"),
    ("POST", "/api/v1/auth/totp/recovery-codes/"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
];

/// The route a request path belongs to (with or without the trailing slash), or `other`: a
/// label with a bounded set of values.
pub fn route_label(path: &str) -> &'static str {
    let trimmed = path.trim_end_matches('/');
    ROUTES
        .iter()
        .map(|(_, route)| *route)
        .find(|route| route.trim_end_matches('/') == trimmed)
        .unwrap_or("other")
}

pub fn routes(state: AppState) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let body_timeout = state.config.body_read_timeout;
    let web_ui = state.config.web_ui;
    let body = body(Duration::from_secs(body_timeout));
    let state = warp::any().map(move || state.clone());
    let request = warp::ext::optional::<ClientAddr>()
        .and(warp::header::headers_cloned())
        .map(|peer, headers| Request { peer, headers });
    // POST routes: path, state, request parts, body.
    let post = |path: warp::filters::BoxedFilter<()>| {
        path.and(warp::post())
            .and(state.clone())
            .and(request)
            .and(body.clone())
    };

    let register =
        post(warp::path!("api" / "v1" / "auth" / "register").boxed()).then(handlers::register);
    let login = post(warp::path!("api" / "v1" / "auth" / "login").boxed()).then(handlers::login);
    let logout = post(warp::path!("api" / "v1" / "auth" / "logout").boxed()).then(handlers::logout);
    let logout_all =
        post(warp::path!("api" / "v1" / "auth" / "logout-all").boxed()).then(handlers::logout_all);
    let password = post(warp::path!("api" / "v1" / "auth" / "password").boxed())
        .then(handlers::change_password);
    let status = warp::path!("api" / "v1" / "auth" / "totp")
        .and(warp::get())
        .and(state.clone())
        .and(request)
        .then(handlers::status);
    let setup =
        post(warp::path!("api" / "v1" / "auth" / "totp" / "setup").boxed()).then(handlers::setup);
    let activate = post(warp::path!("api" / "v1" / "auth" / "totp" / "activate").boxed())
        .then(handlers::activate);
    let verify =
        post(warp::path!("api" / "v1" / "auth" / "totp" / "verify").boxed()).then(handlers::verify);
    let deactivate = post(warp::path!("api" / "v1" / "auth" / "totp" / "deactivate").boxed())
        .then(handlers::deactivate);
    let recovery_codes =
        post(warp::path!("api" / "v1" / "auth" / "totp" / "recovery-codes").boxed())
            .then(handlers::recovery_codes);
    let openapi = warp::path!("api" / "v1" / "openapi.json")
        .and(warp::get())
        .map(handlers::openapi);
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(state.clone())
        .then(handlers::healthz);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(state.clone())
        .and(request)
        .then(handlers::metrics);

    #[cfg(feature = "bench")]
    let register = register.or(baseline(Duration::from_secs(body_timeout)));

    register
        .or(login)
        .or(logout)
        .or(logout_all)
        .or(password)
        .or(status)
        .or(setup)
        .or(activate)
        .or(verify)
        .or(deactivate)
        .or(recovery_codes)
        .or(openapi)
        .or(healthz)
        .or(metrics)
        .or(crate::web::routes(web_ui))
        .recover(handle_rejection)
}

/// POST /api/v1/bench/baseline/ — parses the same body as verify and answers a constant, with no
/// store access: the yardstick benchmarks report every route against (feature `bench` only).
#[cfg(feature = "bench")]
fn baseline(timeout: Duration) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "bench" / "baseline")
        .and(warp::post())
        .and(body(timeout))
        .then(|body: Bytes| async move {
            crate::input::TotpVerify::parse(&body).map(|_| {
                crate::error::json_response(
                    warp::http::StatusCode::OK,
                    &serde_json::json!({ "key": "baseline" }),
                )
            })
        })
}

/// The request body, at most `MAX_BODY_BYTES`, read within `timeout`. Works with and without
/// `Content-Length` (warp's `content_length_limit` would answer 411 to a body-less POST that
/// omits it). A non-empty body must be `application/json`.
fn body(timeout: Duration) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(warp::body::stream())
        .and_then(move |headers: HeaderMap, stream| async move {
            read_body(&headers, stream, timeout)
                .await
                .map_err(warp::reject::custom)
        })
}

async fn read_body<S, B>(headers: &HeaderMap, stream: S, timeout: Duration) -> Result<Bytes, Error>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(Error::PayloadTooLarge);
    }
    let body = tokio::time::timeout(timeout, collect_limited(stream))
        .await
        .map_err(|_| Error::RequestTimeout)??;
    if !body.is_empty() && !is_json(headers) {
        return Err(Error::UnsupportedMediaType);
    }
    Ok(body)
}

async fn collect_limited<S, B>(stream: S) -> Result<Bytes, Error>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|_| Error::Parse("The request body could not be read."))?;
        if body.len() + chunk.remaining() > MAX_BODY_BYTES {
            return Err(Error::PayloadTooLarge);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(body.freeze())
}

/// `application/json`, any case, parameters (such as charset) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_route_with_or_without_the_slash() {
        assert_eq!(
            route_label("/api/v1/auth/totp/verify/"),
            "/api/v1/auth/totp/verify/"
        );
        assert_eq!(
            route_label("/api/v1/auth/totp/verify"),
            "/api/v1/auth/totp/verify/"
        );
        assert_eq!(route_label("/healthz"), "/healthz");
        assert_eq!(route_label("/api/v1/auth/totp/"), "/api/v1/auth/totp/");
        assert_eq!(route_label("/wp-admin/x"), "other");
        assert_eq!(route_label("/"), "other");
    }
}
