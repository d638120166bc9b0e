//! The routes: one filter function per route, composed of the filters in `filters` (so a route
//! cannot forget throttling or authentication) and ending in its handler. Anything the
//! framework rejects (unknown path 404, wrong method 405, body too large 413, wrong media type
//! 415, slow body 408) and every filter's refusal becomes the same JSON error shape in
//! `error::handle_rejection`.

use std::convert::Infallible;

use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::filters::{authenticated, json, request_context, throttled, with_state};
use super::{SharedState, handlers};
use crate::error::handle_rejection;
use crate::limits::Route;
use crate::service::input::{
    LoginForm, NoBody, PasswordChange, RecoveryCodesRegenerate, RegistrationForm, TotpActivate,
    TotpDeactivate, TotpVerify,
};

/// Every route the server answers (method, path). The OpenAPI document must describe each, and
/// metrics label requests with these paths; a test checks this table against the routes served.
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

type Route_ = BoxedFilter<(Response,)>;

/// The routes split by path, for the server layer: a request whose path is one of `ROUTES` (or
/// the bench baseline) goes straight to that route's filter, with the rejection handler; any
/// other path goes to the whole tree (`routes`). The answers are the same as the tree's (a
/// known path with another method is still 405, an unknown one 404), but a request no longer
/// tries every route before its own: in the tree, each `or` level is a boxed future and every
/// route before the matching one parses the path again, which was most of the pipeline's cost
/// for the later routes.
pub struct Dispatch {
    /// (path without its trailing slash, the route with the rejection handler).
    by_path: Vec<(&'static str, Route_)>,
    rest: Route_,
}

impl Dispatch {
    /// Built once per server, over the one shared state.
    pub fn new(state: &SharedState) -> Self {
        let recovered = |route: Route_| route.recover(handle_rejection).unify().boxed();
        #[allow(unused_mut)]
        let mut by_path: Vec<(&'static str, Route_)> = served(state)
            .into_iter()
            .map(|(_, path, route)| (path.trim_end_matches('/'), recovered(route)))
            .collect();
        #[cfg(feature = "bench")]
        by_path.push(("/api/v1/bench/baseline", recovered(baseline(state))));
        Self {
            by_path,
            rest: routes(state).boxed(),
        }
    }

    /// The filter that answers a request for `path`.
    pub fn route(&self, path: &str) -> &Route_ {
        let trimmed = path.trim_end_matches('/');
        self.by_path
            .iter()
            .find(|(p, _)| *p == trimmed)
            .map_or(&self.rest, |(_, route)| route)
    }
}

/// Every route of `served`, then the rejection handler: the whole tree, built once per server.
pub fn routes(
    state: &SharedState,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + use<> {
    let mut served = served(state).into_iter().map(|(_, _, route)| route);
    let first = served.next().unwrap_or_else(openapi);
    let api = served.fold(first, |api, route| api.or(route).unify().boxed());
    #[cfg(feature = "bench")]
    let api = api.or(baseline(state)).unify().boxed();
    // The self-service page is not part of the API (nor of `ROUTES`); off, its paths are 404.
    api.or(super::web::routes(state.config.web_ui))
        .unify()
        .recover(handle_rejection)
        .unify()
}

/// Every route served, with the method and path it answers: `routes` serves exactly these, and
/// a test holds `ROUTES` (and the OpenAPI document) to them and each filter to its path.
pub fn served(state: &SharedState) -> Vec<(&'static str, &'static str, Route_)> {
    vec![
        ("POST", "/api/v1/auth/register/", register(state)),
        ("POST", "/api/v1/auth/login/", login(state)),
        ("POST", "/api/v1/auth/logout/", logout(state)),
        ("POST", "/api/v1/auth/logout-all/", logout_all(state)),
        ("POST", "/api/v1/auth/password/", change_password(state)),
        ("GET", "/api/v1/auth/totp/", status(state)),
        ("POST", "/api/v1/auth/totp/setup/", setup(state)),
        ("POST", "/api/v1/auth/totp/activate/", activate(state)),
        ("POST", "/api/v1/auth/totp/verify/", verify(state)),
        ("POST", "/api/v1/auth/totp/deactivate/", deactivate(state)),
        (
            "POST",
            "/api/v1/auth/totp/recovery-codes/",
            recovery_codes(state),
        ),
        ("GET", "/api/v1/openapi.json", openapi()),
        ("GET", "/healthz", healthz(state)),
        ("GET", "/metrics", metrics(state)),
    ]
}

/// POST /api/v1/auth/register/ {username, password} → 201 {username}
pub fn register(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "register")
        .and(warp::post())
        .and(with_state(s))
        .and(throttled(s, Route::Register))
        .and(json::<RegistrationForm>(s))
        .then(handlers::register)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/login/ {username, password} → 200 {key} or {temp_token, totp_required, expires_in}
pub fn login(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "login")
        .and(warp::post())
        .and(with_state(s))
        .and(throttled(s, Route::Login))
        .and(json::<LoginForm>(s))
        .then(handlers::login)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/logout/ (Token) → 200; the key stops working.
pub fn logout(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "logout")
        .and(warp::post())
        .and(with_state(s))
        .and(request_context(s))
        .and(authenticated(s))
        .and(json::<NoBody>(s))
        .then(handlers::logout)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/logout-all/ (Token) → 200; every key of the user stops working.
pub fn logout_all(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "logout-all")
        .and(warp::post())
        .and(with_state(s))
        .and(request_context(s))
        .and(authenticated(s))
        .and(json::<NoBody>(s))
        .then(handlers::logout_all)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/password/ (Token) {current_password, new_password} → 200; other keys revoked.
pub fn change_password(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "password")
        .and(warp::post())
        .and(with_state(s))
        .and(throttled(s, Route::Login))
        .and(authenticated(s))
        .and(json::<PasswordChange>(s))
        .then(handlers::change_password)
        .map(Reply::into_response)
        .boxed()
}

/// GET /api/v1/auth/totp/ (Token) → 200 {active, pending, recovery_codes_remaining}
pub fn status(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "totp")
        .and(warp::get())
        .and(with_state(s))
        .and(authenticated(s))
        .map(handlers::status)
        .boxed()
}

/// POST /api/v1/auth/totp/setup/ (Token) → 201 TOTPSetup {secret_key, provisioning_uri, qr_code}
pub fn setup(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "totp" / "setup")
        .and(warp::post())
        .and(with_state(s))
        .and(request_context(s))
        .and(authenticated(s))
        .and(json::<NoBody>(s))
        .then(handlers::setup)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/totp/activate/ (Token) TOTPActivate {token} → 200 TOTPActivateResponse {recovery_codes}
pub fn activate(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "totp" / "activate")
        .and(warp::post())
        .and(with_state(s))
        .and(throttled(s, Route::Activate))
        .and(authenticated(s))
        .and(json::<TotpActivate>(s))
        .then(handlers::activate)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/totp/verify/ TOTPVerify {temp_token, token} → 200 TOTPVerifyResponse {key}
/// (plus `recovery_codes_remaining` when a recovery code was used)
pub fn verify(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "totp" / "verify")
        .and(warp::post())
        .and(with_state(s))
        .and(throttled(s, Route::Verify))
        .and(json::<TotpVerify>(s))
        .then(handlers::verify)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/totp/deactivate/ (Token) [{token}] → 200
pub fn deactivate(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "totp" / "deactivate")
        .and(warp::post())
        .and(with_state(s))
        .and(throttled(s, Route::Activate))
        .and(authenticated(s))
        .and(json::<TotpDeactivate>(s))
        .then(handlers::deactivate)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/auth/totp/recovery-codes/ (Token) {token} → 200 {recovery_codes}
pub fn recovery_codes(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "auth" / "totp" / "recovery-codes")
        .and(warp::post())
        .and(with_state(s))
        .and(throttled(s, Route::Activate))
        .and(authenticated(s))
        .and(json::<RecoveryCodesRegenerate>(s))
        .then(handlers::recovery_codes)
        .map(Reply::into_response)
        .boxed()
}

/// GET /api/v1/openapi.json → the OpenAPI 3 document of every route.
pub fn openapi() -> Route_ {
    warp::path!("api" / "v1" / "openapi.json")
        .and(warp::get())
        .map(handlers::openapi)
        .boxed()
}

/// GET /healthz → 200 {"status": "ok"} when the store answers, else 503.
pub fn healthz(s: &SharedState) -> Route_ {
    warp::path!("healthz")
        .and(warp::get())
        .and(with_state(s))
        .then(handlers::healthz)
        .boxed()
}

/// GET /metrics → Prometheus text; only for `metrics_allow` addresses when that is set.
pub fn metrics(s: &SharedState) -> Route_ {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_state(s))
        .and(request_context(s))
        .then(handlers::metrics)
        .map(Reply::into_response)
        .boxed()
}

/// POST /api/v1/bench/baseline/ — parses the same body as verify and answers a constant, with no
/// store access: the yardstick benchmarks report every route against (feature `bench` only).
#[cfg(feature = "bench")]
fn baseline(s: &SharedState) -> Route_ {
    warp::path!("api" / "v1" / "bench" / "baseline")
        .and(warp::post())
        .and(json::<TotpVerify>(s))
        .map(|_: TotpVerify| {
            crate::error::json_response(
                warp::http::StatusCode::OK,
                &serde_json::json!({ "key": "baseline" }),
            )
        })
        .boxed()
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
