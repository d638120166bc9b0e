//! One plain function per route: typed input and a session in (the filters of `routes` made
//! them), a use case of the service, JSON out. Handlers never see a request or the store.

use serde_json::json;
use warp::http::{StatusCode, header};
use warp::reply::Response;

use super::SharedState;
use super::qr;
use crate::error::{Error, json_response};
use crate::service::input::{
    LoginForm, NoBody, PasswordChange, RecoveryCodesRegenerate, RegistrationForm, TotpActivate,
    TotpDeactivate, TotpVerify,
};
use crate::service::{Ctx, LoginResult, Session, TotpStatus};

type Reply = Result<Response, Error>;

/// POST /api/v1/auth/register/
pub async fn register(state: SharedState, ctx: Ctx, form: RegistrationForm) -> Reply {
    let user = state.service.register(form.0, &ctx).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "username": user.username }),
    ))
}

/// POST /api/v1/auth/login/
pub async fn login(state: SharedState, ctx: Ctx, form: LoginForm) -> Reply {
    let body = match state.service.log_in(form.0, &ctx).await? {
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

/// POST /api/v1/auth/logout/
pub async fn logout(state: SharedState, ctx: Ctx, session: Session, _: NoBody) -> Reply {
    state.service.log_out(&session, &ctx).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "Logged out." }),
    ))
}

/// POST /api/v1/auth/logout-all/
pub async fn logout_all(state: SharedState, ctx: Ctx, session: Session, _: NoBody) -> Reply {
    state.service.log_out_everywhere(&session, &ctx).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "Logged out everywhere." }),
    ))
}

/// POST /api/v1/auth/password/
pub async fn change_password(
    state: SharedState,
    ctx: Ctx,
    session: Session,
    input: PasswordChange,
) -> Reply {
    state.service.change_password(&session, input, &ctx).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "Password changed." }),
    ))
}

/// GET /api/v1/auth/totp/
pub fn status(state: SharedState, session: Session) -> Response {
    json_response(
        StatusCode::OK,
        &status_body(&state.service.totp_status(&session)),
    )
}

/// The body of status's answer (public for the bench's status ceiling, which answers the same).
pub fn status_body(status: &TotpStatus) -> serde_json::Value {
    json!({
        "active": status.active,
        "pending": status.pending,
        "recovery_codes_remaining": status.recovery_codes_remaining,
    })
}

/// POST /api/v1/auth/totp/setup/
pub async fn setup(state: SharedState, ctx: Ctx, session: Session, _: NoBody) -> Reply {
    let setup = state.service.set_up_totp(&session, &ctx).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "secret_key": setup.secret_key,
            "qr_code": qr::svg_data_uri(&setup.provisioning_uri),
            "provisioning_uri": setup.provisioning_uri,
        }),
    ))
}

/// POST /api/v1/auth/totp/activate/
pub async fn activate(
    state: SharedState,
    ctx: Ctx,
    session: Session,
    input: TotpActivate,
) -> Reply {
    let codes = state
        .service
        .activate_totp(&session, &input.token, &ctx)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "recovery_codes": codes }),
    ))
}

/// POST /api/v1/auth/totp/verify/
pub async fn verify(state: SharedState, ctx: Ctx, input: TotpVerify) -> Reply {
    let verified = state.service.verify_totp(input, &ctx).await?;
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

/// POST /api/v1/auth/totp/deactivate/
pub async fn deactivate(
    state: SharedState,
    ctx: Ctx,
    session: Session,
    input: TotpDeactivate,
) -> Reply {
    state
        .service
        .turn_off_totp(&session, input.token, &ctx)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "detail": "TOTP deactivated." }),
    ))
}

/// POST /api/v1/auth/totp/recovery-codes/
pub async fn recovery_codes(
    state: SharedState,
    ctx: Ctx,
    session: Session,
    input: RecoveryCodesRegenerate,
) -> Reply {
    let codes = state
        .service
        .regenerate_recovery_codes(&session, input.token, &ctx)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "recovery_codes": codes }),
    ))
}

/// The OpenAPI 3 document of every route, served as written in `src/http/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// GET /api/v1/openapi.json
pub fn openapi() -> Response {
    let mut response = Response::new(OPENAPI.into());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// GET /healthz
pub async fn healthz(state: SharedState) -> Response {
    if state.service.healthy().await {
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

/// GET /metrics
pub async fn metrics(state: SharedState, ctx: Ctx) -> Reply {
    let allowed = &state.config.metrics_allow;
    if !allowed.is_empty()
        && !ctx
            .ip
            .is_some_and(|ip| allowed.iter().any(|n| n.contains(&ip)))
    {
        return Err(Error::PermissionDenied);
    }
    let stats = state.service.store_stats();
    let mut response = Response::new(state.metrics.render(&stats).into());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
