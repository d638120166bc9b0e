//! One function per route: raw request parts → typed input (`input`) → use case (`service`) →
//! JSON response. Handlers never see storage and never read the clock except through `AppState`.

use bytes::Bytes;
use serde_json::json;
use warp::http::{HeaderMap, StatusCode, header};
use warp::reply::Response;

use crate::AppState;
use crate::error::{Error, json_response};
use crate::input::{self, Credentials, TotpActivate, TotpVerify};
use crate::service::{LoginResult, Session};

type Reply = Result<Response, Error>;

/// The session of the `Authorization: Token <key>` header, or the 403 to answer.
fn session(state: &AppState, headers: &HeaderMap) -> Result<Session, Error> {
    let values: Vec<&[u8]> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let key = input::login_key(&values)?;
    state.service.authenticate(&key)
}

/// POST /api/v1/auth/register/ {username, password} → 201 {username}
pub async fn register(state: AppState, body: Bytes) -> Reply {
    let input = Credentials::for_registration(&body)?;
    let user = state.service.register(input, state.clock.now()).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "username": user.username }),
    ))
}

/// POST /api/v1/auth/login/ {username, password} → 200 {key} or {temp_token, totp_required, expires_in}
pub async fn login(state: AppState, body: Bytes) -> Reply {
    let input = Credentials::for_login(&body)?;
    let body = match state.service.login(input, state.clock.now()).await? {
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
pub async fn logout(state: AppState, headers: HeaderMap, _body: Bytes) -> Reply {
    let session = session(&state, &headers)?;
    state.service.logout(&session).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "Logged out." }),
    ))
}

/// GET /api/v1/auth/totp/ (Token) → 200 {active, pending, recovery_codes_remaining}
pub async fn status(state: AppState, headers: HeaderMap) -> Reply {
    let session = session(&state, &headers)?;
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
pub async fn setup(state: AppState, headers: HeaderMap, _body: Bytes) -> Reply {
    let session = session(&state, &headers)?;
    let setup = state.service.setup(&session, state.clock.now()).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "secret_key": setup.secret_key,
            "provisioning_uri": setup.provisioning_uri,
        }),
    ))
}

/// POST /api/v1/auth/totp/activate/ (Token) TOTPActivate {token} → 200 TOTPActivateResponse {recovery_codes}
pub async fn activate(state: AppState, headers: HeaderMap, body: Bytes) -> Reply {
    let session = session(&state, &headers)?;
    let input = TotpActivate::parse(&body)?;
    let codes = state
        .service
        .activate(&session, &input.token, state.clock.now())
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "recovery_codes": codes }),
    ))
}

/// POST /api/v1/auth/totp/verify/ TOTPVerify {temp_token, token} → 200 TOTPVerifyResponse {key}
pub async fn verify(state: AppState, body: Bytes) -> Reply {
    let input = TotpVerify::parse(&body)?;
    let verified = state.service.verify(input, state.clock.now()).await?;
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

/// POST /api/v1/auth/totp/deactivate/ (Token) → 200
pub async fn deactivate(state: AppState, headers: HeaderMap, _body: Bytes) -> Reply {
    let session = session(&state, &headers)?;
    state.service.deactivate(&session).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "TOTP deactivated." }),
    ))
}
