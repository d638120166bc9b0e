//! One function per route: raw request parts → typed input (`input`) → use case (`service`) →
//! JSON response. Handlers never see storage; they read the clock and the client's address into
//! a `Ctx` and apply the per-IP throttles.

use bytes::Bytes;
use serde_json::json;
use warp::http::{HeaderMap, StatusCode, header};
use warp::reply::Response;

use crate::AppState;
use crate::error::{Error, json_response};
use crate::input::{
    self, Credentials, PasswordChange, RecoveryCodesRegenerate, TotpActivate, TotpDeactivate,
    TotpVerify,
};
use crate::limits::{Route, client_ip};
use crate::metrics::StoreGauges;
use crate::server::ClientAddr;
use crate::service::{Ctx, LoginResult, Session};

type Reply = Result<Response, Error>;

/// The request's headers and the address of the connection it came on.
pub struct Request {
    pub peer: Option<ClientAddr>,
    pub headers: HeaderMap,
}

impl Request {
    /// The time and the client's address (from `X-Forwarded-For` only behind a trusted proxy).
    fn ctx(&self, state: &AppState) -> Ctx {
        let forwarded: Vec<&str> = self
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        Ctx {
            now: state.clock.now(),
            ip: client_ip(
                self.peer.map(|p| p.0),
                &forwarded,
                &state.config.trusted_proxies,
            ),
        }
    }

    /// The session of the `Authorization: Token <key>` header, or the 403 to answer.
    fn session(&self, state: &AppState, ctx: &Ctx) -> Result<Session, Error> {
        let values: Vec<&[u8]> = self
            .headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let key = input::login_key(&values)?;
        state.service.authenticate(&key, ctx.now)
    }
}

/// Spends one request of the client's budget for `route`, or answers 429.
fn throttle(state: &AppState, route: Route, ctx: &Ctx) -> Result<(), Error> {
    match ctx.ip {
        Some(ip) => state
            .ip_limits
            .take(&(route, ip), ctx.now)
            .map_err(|wait| Error::Throttled { wait }),
        None => Ok(()),
    }
}

/// POST /api/v1/auth/register/ {username, password} → 201 {username}
pub async fn register(state: AppState, request: Request, body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    throttle(&state, Route::Register, &ctx)?;
    let input = Credentials::for_registration(&body)?;
    let user = state.service.register(input, &ctx).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "username": user.username }),
    ))
}

/// POST /api/v1/auth/login/ {username, password} → 200 {key} or {temp_token, totp_required, expires_in}
pub async fn login(state: AppState, request: Request, body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    throttle(&state, Route::Login, &ctx)?;
    let input = Credentials::for_login(&body)?;
    let body = match state.service.login(input, &ctx).await? {
        LoginResult::Key(key) => json!({ "key": key }),
        LoginResult::TotpRequired {
            temp_token,
            expires_in,
        } => json!({
            "temp_token": temp_token,
            "totp_required": true,
            "expires_in": expires_in,
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// POST /api/v1/auth/logout/ (Token) → 200; the key stops working.
pub async fn logout(state: AppState, request: Request, _body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    let session = request.session(&state, &ctx)?;
    state.service.logout(&session, &ctx).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "Logged out." }),
    ))
}

/// POST /api/v1/auth/logout-all/ (Token) → 200; every key of the user stops working.
pub async fn logout_all(state: AppState, request: Request, _body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    let session = request.session(&state, &ctx)?;
    state.service.logout_all(&session, &ctx).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "Logged out everywhere." }),
    ))
}

/// POST /api/v1/auth/password/ (Token) {current_password, new_password} → 200; other keys revoked.
pub async fn change_password(state: AppState, request: Request, body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    throttle(&state, Route::Login, &ctx)?;
    let session = request.session(&state, &ctx)?;
    let input = PasswordChange::parse(&body)?;
    state.service.change_password(&session, input, &ctx).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "Password changed." }),
    ))
}

/// GET /api/v1/auth/totp/ (Token) → 200 {active, pending, recovery_codes_remaining}
pub async fn status(state: AppState, request: Request) -> Reply {
    let ctx = request.ctx(&state);
    let session = request.session(&state, &ctx)?;
    let status = state.service.status(&session);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "active": status.active,
            "pending": status.pending,
            "recovery_codes_remaining": status.recovery_codes_remaining,
        }),
    ))
}

/// POST /api/v1/auth/totp/setup/ (Token) → 201 TOTPSetup {secret_key, provisioning_uri}
pub async fn setup(state: AppState, request: Request, _body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    let session = request.session(&state, &ctx)?;
    let setup = state.service.setup(&session, &ctx).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "secret_key": setup.secret_key,
            "provisioning_uri": setup.provisioning_uri,
            "qr_code": setup.qr_code,
        }),
    ))
}

/// POST /api/v1/auth/totp/activate/ (Token) TOTPActivate {token} → 200 TOTPActivateResponse {recovery_codes}
pub async fn activate(state: AppState, request: Request, body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    throttle(&state, Route::Activate, &ctx)?;
    let session = request.session(&state, &ctx)?;
    let input = TotpActivate::parse(&body)?;
    let codes = state.service.activate(&session, &input.token, &ctx).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "recovery_codes": codes }),
    ))
}

/// POST /api/v1/auth/totp/verify/ TOTPVerify {temp_token, token} → 200 TOTPVerifyResponse {key}
/// (plus `recovery_codes_remaining` when a recovery code was used)
pub async fn verify(state: AppState, request: Request, body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    throttle(&state, Route::Verify, &ctx)?;
    let input = TotpVerify::parse(&body)?;
    let verified = state.service.verify(input, &ctx).await?;
    let body = if verified.recovery_code_used {
        json!({
            "key": verified.key,
            "recovery_codes_remaining": verified.recovery_codes_remaining,
        })
    } else {
        json!({ "key": verified.key })
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// POST /api/v1/auth/totp/deactivate/ (Token) [{token}] → 200
pub async fn deactivate(state: AppState, request: Request, body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    let session = request.session(&state, &ctx)?;
    let input = TotpDeactivate::parse(&body)?;
    state
        .service
        .deactivate(&session, input.token, &ctx)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "TOTP deactivated." }),
    ))
}

/// POST /api/v1/auth/totp/recovery-codes/ (Token) {token} → 200 {recovery_codes}
pub async fn recovery_codes(state: AppState, request: Request, body: Bytes) -> Reply {
    let ctx = request.ctx(&state);
    throttle(&state, Route::Activate, &ctx)?;
    let session = request.session(&state, &ctx)?;
    let input = RecoveryCodesRegenerate::parse(&body)?;
    let codes = state
        .service
        .regenerate_recovery_codes(&session, input.token, &ctx)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "recovery_codes": codes }),
    ))
}

/// The OpenAPI 3 document of every route, served as written in `src/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// GET /api/v1/openapi.json
pub fn openapi() -> Response {
    let mut response = warp::reply::Response::new(OPENAPI.into());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// GET /healthz → 200 {"status": "ok"} when the store answers a read, else 503.
pub async fn healthz(state: AppState) -> Response {
    let store = std::sync::Arc::clone(&state.store);
    let healthy = tokio::task::spawn_blocking(move || store.is_healthy())
        .await
        .unwrap_or(false);
    if healthy {
        json_response(StatusCode::OK, &json!({ "status": "ok" }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({
                "status": "unavailable",
                "detail": "The store does not answer.",
                "code": "service_unavailable",
            }),
        )
    }
}

/// GET /metrics → Prometheus text; only for `metrics_allow` addresses when that is set.
pub async fn metrics(state: AppState, request: Request) -> Reply {
    let ctx = request.ctx(&state);
    let allowed = &state.config.metrics_allow;
    if !allowed.is_empty()
        && !ctx
            .ip
            .is_some_and(|ip| allowed.iter().any(|n| n.contains(&ip)))
    {
        return Err(Error::PermissionDenied);
    }
    let store = std::sync::Arc::clone(&state.store);
    let gauges = tokio::task::spawn_blocking(move || {
        // Until the count after start is done, the gauges read 0.
        let (users, totp_active) = store.counts().unwrap_or((0, 0));
        let (flushes, acknowledged_writes) = store.commit_stats();
        Ok::<_, crate::store::StoreError>(StoreGauges {
            users,
            totp_active,
            database_bytes: store.size_on_disk()?,
            flushes,
            acknowledged_writes,
        })
    })
    .await
    .map_err(|_| Error::Internal)??;
    let mut response = warp::reply::Response::new(state.metrics.render(&gauges).into());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
