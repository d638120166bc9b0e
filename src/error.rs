//! The one error type of the API. Every variant knows its HTTP status, its `code` and which of the
//! three Django-REST-Framework body shapes it uses:
//! `{"detail", "code"}`, `{"<field>": [..], "code"}` or `{"non_field_errors": [..], "code"}`.
//! Internal failures answer fixed text and log their cause; nothing internal reaches a client.

use std::convert::Infallible;

use serde_json::{Map, Value, json};
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};

/// One message about one input field, with the DRF code that names the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
    pub code: &'static str,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>, code: &'static str) -> Self {
        Self {
            field,
            message: message.into(),
            code,
        }
    }

    pub fn required(field: &'static str) -> Self {
        Self::new(field, "This field is required.", "required")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// 400: one or more fields failed validation; `code` is the first error's.
    Fields(Vec<FieldError>),
    /// 400: the body is not a JSON object.
    Parse(&'static str),
    /// 400: wrong password or unknown user (one body for both).
    InvalidCredentials,
    /// 400: wrong, replayed or stale code (one body for all three).
    InvalidCode,
    /// 400: a wrong code that is the code of a time a few steps from now: the device's clock
    /// seems `drift_seconds` ahead of the server's (negative: behind). Refused and counted like
    /// `InvalidCode`; only the sentence differs, so that a person can fix the clock.
    ClockSkew { drift_seconds: i64 },
    /// 400: setup or activate while TOTP is already active.
    TotpAlreadyActive,
    /// 400: activate without a pending setup.
    TotpNotPending,
    /// 400: deactivate while TOTP is not active.
    TotpNotActive,
    /// 401: the temp token is unknown, expired, used, or has no attempts left.
    InvalidTempToken,
    /// 403: no `Authorization: Token …` header.
    NotAuthenticated,
    /// 403: a malformed header, or an unknown, revoked or expired key.
    AuthenticationFailed(&'static str),
    /// 403: `allow_registration` is off.
    RegistrationDisabled,
    /// 403: the client may not read this (`metrics_allow`).
    PermissionDenied,
    /// 429: too many failed codes; the user is locked for `retry_after` seconds (`None`: until a
    /// recovery code or an administrator ends it).
    Locked { retry_after: Option<u64> },
    /// 429: a rate limit; a token is available in `wait` seconds.
    Throttled { wait: u64 },
    /// 404
    NotFound,
    /// 405
    MethodNotAllowed,
    /// 408: the body did not arrive within `body_read_timeout`.
    RequestTimeout,
    /// 413: the body is over the limit.
    PayloadTooLarge,
    /// 415: a body that is not `application/json`.
    UnsupportedMediaType,
    /// 503: the store failed; the cause was logged.
    Unavailable,
    /// 500: a bug; the cause was logged.
    Internal,
}

impl Error {
    pub fn field(field: &'static str, message: impl Into<String>, code: &'static str) -> Self {
        Self::Fields(vec![FieldError::new(field, message, code)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Fields(_)
            | Error::Parse(_)
            | Error::InvalidCredentials
            | Error::InvalidCode
            | Error::ClockSkew { .. }
            | Error::TotpAlreadyActive
            | Error::TotpNotPending
            | Error::TotpNotActive => StatusCode::BAD_REQUEST,
            Error::InvalidTempToken => StatusCode::UNAUTHORIZED,
            Error::NotAuthenticated
            | Error::AuthenticationFailed(_)
            | Error::RegistrationDisabled
            | Error::PermissionDenied => StatusCode::FORBIDDEN,
            Error::Locked { .. } | Error::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::Fields(errors) => errors.first().map_or("invalid", |e| e.code),
            Error::Parse(_) => "parse_error",
            Error::InvalidCredentials => "invalid_credentials",
            Error::InvalidCode => "invalid_code",
            Error::ClockSkew { .. } => "clock_skew",
            Error::TotpAlreadyActive => "totp_already_active",
            Error::TotpNotPending => "totp_not_pending",
            Error::TotpNotActive => "totp_not_active",
            Error::InvalidTempToken => "invalid_temp_token",
            Error::NotAuthenticated => "not_authenticated",
            Error::AuthenticationFailed(_) => "authentication_failed",
            Error::RegistrationDisabled => "registration_disabled",
            Error::PermissionDenied => "permission_denied",
            Error::Locked { .. } => "locked",
            Error::Throttled { .. } => "throttled",
            Error::NotFound => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::RequestTimeout => "request_timeout",
            Error::PayloadTooLarge => "payload_too_large",
            Error::UnsupportedMediaType => "unsupported_media_type",
            Error::Unavailable => "service_unavailable",
            Error::Internal => "internal_error",
        }
    }

    /// The DRF-shaped JSON body.
    pub fn body(&self) -> Value {
        let code = self.code();
        let non_field = |message: &str| json!({ "non_field_errors": [message], "code": code });
        let detail = |message: &str| json!({ "detail": message, "code": code });
        match self {
            Error::Fields(errors) => {
                let mut body = Map::new();
                for e in errors {
                    let messages = body
                        .entry(e.field)
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(list) = messages {
                        list.push(Value::String(e.message.clone()));
                    }
                }
                body.insert("code".into(), Value::String(code.into()));
                Value::Object(body)
            }
            Error::InvalidCode => json!({ "token": ["Invalid code."], "code": code }),
            Error::ClockSkew { drift_seconds } => {
                json!({ "token": [clock_skew_message(*drift_seconds)], "code": code })
            }
            Error::InvalidCredentials => non_field("Unable to log in with provided credentials."),
            Error::TotpAlreadyActive => non_field("TOTP is already active."),
            Error::TotpNotPending => non_field("No pending TOTP setup: call setup first."),
            Error::TotpNotActive => non_field("TOTP is not active."),
            Error::Parse(message) => detail(message),
            Error::InvalidTempToken => detail("Invalid or expired temporary token."),
            Error::NotAuthenticated => detail("Authentication credentials were not provided."),
            Error::AuthenticationFailed(message) => detail(message),
            Error::RegistrationDisabled => detail("Registration is disabled."),
            Error::PermissionDenied => detail("You do not have permission to perform this action."),
            Error::Locked {
                retry_after: Some(seconds),
            } => detail(&format!(
                "Too many failed codes: this account is locked. Try again in {seconds} seconds."
            )),
            Error::Locked { retry_after: None } => detail(
                "Too many failed codes: this account is locked until a recovery code is used or an administrator unlocks it.",
            ),
            Error::Throttled { wait } => detail(&format!(
                "Request was throttled. Expected available in {wait} seconds."
            )),
            Error::NotFound => detail("Not found."),
            Error::MethodNotAllowed => detail("Method not allowed."),
            Error::RequestTimeout => detail("The request body did not arrive in time."),
            Error::PayloadTooLarge => detail("Request body is too large."),
            Error::UnsupportedMediaType => {
                detail("Unsupported media type: send Content-Type: application/json.")
            }
            Error::Unavailable => detail("The store is unavailable; try again."),
            Error::Internal => detail("Internal server error."),
        }
    }
}

/// The clock-drift hint: what happened, what it means, what to do — for a person looking at
/// their phone, who may never have thought about its clock.
fn clock_skew_message(drift_seconds: i64) -> String {
    let (seconds, relation, clock) = if drift_seconds >= 0 {
        (drift_seconds.unsigned_abs(), "ahead of", "fast")
    } else {
        (drift_seconds.unsigned_abs(), "behind", "slow")
    };
    format!(
        "This code is for a time about {seconds} seconds {relation} the server's: your device's \
         clock seems about {seconds} seconds {clock}. Set it to update automatically, then try \
         a new code."
    )
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for Error {}

impl warp::reject::Reject for Error {}

/// `Retry-After` of a lock with no end: a day, so clients back off for long.
const HARD_LOCK_RETRY_AFTER: u64 = 24 * 60 * 60;

impl Reply for Error {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status(), &self.body());
        let retry_after = match self {
            Error::Locked { retry_after } => Some(retry_after.unwrap_or(HARD_LOCK_RETRY_AFTER)),
            Error::Throttled { wait } => Some(wait),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status() == StatusCode::METHOD_NOT_ALLOWED {
            // The routes are all POST except the status read.
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
        }
        response
    }
}

/// A JSON response with the headers every answer carries: no caching (codes, keys and secrets
/// pass through here) and no MIME sniffing.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = warp::reply::json(body).into_response();
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Turns the framework's own rejections (404, 405, 413, 415 and our body filter's errors) into
/// the same JSON shapes as every other error.
pub async fn handle_rejection(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let error = if let Some(e) = rejection.find::<Error>() {
        e.clone()
    } else if rejection.is_not_found() {
        Error::NotFound
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        Error::MethodNotAllowed
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        Error::PayloadTooLarge
    } else if rejection
        .find::<warp::reject::UnsupportedMediaType>()
        .is_some()
    {
        Error::UnsupportedMediaType
    } else {
        tracing::error!(?rejection, "unhandled rejection");
        Error::Internal
    };
    Ok(error.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_and_locked_answers_carry_retry_after() {
        let response = Error::Throttled { wait: 7 }.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(
            Error::Throttled { wait: 7 }.body(),
            json!({"detail": "Request was throttled. Expected available in 7 seconds.", "code": "throttled"})
        );
        let response = Error::Locked { retry_after: None }.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "86400");
    }

    #[test]
    fn the_clock_skew_answer_says_how_far_which_way_and_what_to_do() {
        let fast = Error::ClockSkew { drift_seconds: 90 };
        assert_eq!(fast.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            fast.body(),
            json!({
                "token": ["This code is for a time about 90 seconds ahead of the server's: your \
                           device's clock seems about 90 seconds fast. Set it to update \
                           automatically, then try a new code."],
                "code": "clock_skew"
            })
        );
        let slow = Error::ClockSkew { drift_seconds: -60 }.body();
        let message = slow["token"][0].as_str().expect("a sentence");
        assert!(
            message.starts_with("This code is for a time about 60 seconds behind the server's: ")
                && message.contains("your device's clock seems about 60 seconds slow."),
            "{message}"
        );
    }

    #[test]
    fn field_errors_group_messages_by_field_and_take_the_first_code() {
        let e = Error::Fields(vec![
            FieldError::required("temp_token"),
            FieldError::new("token", "Not a valid string.", "invalid"),
        ]);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body(),
            json!({
                "temp_token": ["This field is required."],
                "token": ["Not a valid string."],
                "code": "required"
            })
        );
    }

    #[test]
    fn every_body_has_a_code_string_in_one_of_the_three_shapes() {
        let all = [
            Error::field("x", "m", "invalid"),
            Error::Parse("p"),
            Error::InvalidCredentials,
            Error::InvalidCode,
            Error::ClockSkew { drift_seconds: 90 },
            Error::ClockSkew {
                drift_seconds: -300,
            },
            Error::TotpAlreadyActive,
            Error::TotpNotPending,
            Error::TotpNotActive,
            Error::InvalidTempToken,
            Error::NotAuthenticated,
            Error::AuthenticationFailed("a"),
            Error::RegistrationDisabled,
            Error::PermissionDenied,
            Error::Locked {
                retry_after: Some(5),
            },
            Error::Locked { retry_after: None },
            Error::Throttled { wait: 3 },
            Error::NotFound,
            Error::MethodNotAllowed,
            Error::RequestTimeout,
            Error::PayloadTooLarge,
            Error::UnsupportedMediaType,
            Error::Unavailable,
            Error::Internal,
        ];
        for e in all {
            let body = e.body();
            let object = body.as_object().expect("an object");
            assert_eq!(object.get("code"), Some(&Value::String(e.code().into())));
            let shape_ok = object.get("detail").is_some_and(Value::is_string)
                || object.get("non_field_errors").is_some_and(Value::is_array)
                || object
                    .iter()
                    .any(|(k, v)| k != "code" && v.as_array().is_some_and(|a| !a.is_empty()));
            assert!(shape_ok, "{e:?} -> {body}");
            assert_eq!(object.len(), 2, "{body}");
        }
    }
}
