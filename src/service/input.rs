//! Parse, don't validate: raw request bytes and headers become typed inputs here, in one place,
//! collecting every field error (DRF's messages and codes) before anything else runs.

use serde_json::{Map, Value};
use unicode_normalization::UnicodeNormalization;

use super::password::{MAX_PASSWORD_BYTES, MIN_PASSWORD_CHARS};
use crate::domain::secrets::RecoveryCode;
use crate::domain::totp::Code;
use crate::error::{Error, FieldError};

/// Longest accepted username, in characters (Django's limit).
pub const MAX_USERNAME_CHARS: usize = 150;
/// Longest `Authorization` key or temp token looked at; longer ones cannot be ours.
const MAX_TOKEN_BYTES: usize = 256;

/// A request body as a JSON object; an empty body is an empty object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::Parse("JSON parse error - expected an object.")),
        Err(_) => Err(Error::Parse(
            "JSON parse error - the body is not valid JSON.",
        )),
    }
}

/// A required string field, with DRF's `required`, `null`, `invalid` and `blank` errors.
fn string_field(body: &Map<String, Value>, field: &'static str) -> Result<String, FieldError> {
    match body.get(field) {
        None => Err(FieldError::required(field)),
        Some(Value::Null) => Err(FieldError::new(
            field,
            "This field may not be null.",
            "null",
        )),
        Some(Value::String(s)) if s.trim().is_empty() => Err(FieldError::new(
            field,
            "This field may not be blank.",
            "blank",
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(FieldError::new(field, "Not a valid string.", "invalid")),
    }
}

/// Runs every field parser and reports all their errors together.
fn collect<A, B>(a: Result<A, FieldError>, b: Result<B, FieldError>) -> Result<(A, B), Error> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (a, b) => Err(Error::Fields(
            [a.err(), b.err()].into_iter().flatten().collect(),
        )),
    }
}

/// The canonical form a username is stored and looked up in: trimmed, Unicode NFC.
pub fn normalize_username(raw: &str) -> String {
    raw.trim().nfc().collect()
}

/// Characters that could make a name display as something else: controls, bidi overrides and
/// isolates, zero-width characters.
fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

/// A username for a new account, or why it cannot be one.
pub fn new_username(raw: &str) -> Result<String, FieldError> {
    let name = normalize_username(raw);
    if name.is_empty() {
        return Err(FieldError::new(
            "username",
            "This field may not be blank.",
            "blank",
        ));
    }
    if name.chars().count() > MAX_USERNAME_CHARS {
        return Err(FieldError::new(
            "username",
            format!("Ensure this field has no more than {MAX_USERNAME_CHARS} characters."),
            "max_length",
        ));
    }
    if name.chars().any(is_deceptive) {
        return Err(FieldError::new(
            "username",
            "Usernames may not contain control, bidirectional or zero-width characters.",
            "invalid",
        ));
    }
    Ok(name)
}

/// A password for a new account, or why it cannot be one.
pub fn new_password(raw: String) -> Result<String, FieldError> {
    if raw.chars().count() < MIN_PASSWORD_CHARS {
        return Err(FieldError::new(
            "password",
            format!("Ensure this field has at least {MIN_PASSWORD_CHARS} characters."),
            "min_length",
        ));
    }
    check_password_length(raw)
}

fn check_password_length(raw: String) -> Result<String, FieldError> {
    if raw.len() > MAX_PASSWORD_BYTES {
        return Err(FieldError::new(
            "password",
            format!("Ensure this field has no more than {MAX_PASSWORD_BYTES} bytes."),
            "max_length",
        ));
    }
    Ok(raw)
}

/// `{username, password}` as sent to login: no policy checks, so the answer reveals nothing.
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn for_login(body: &[u8]) -> Result<Self, Error> {
        let body = json_object(body)?;
        let username = string_field(&body, "username").and_then(|u| {
            if u.chars().count() > MAX_USERNAME_CHARS {
                Err(FieldError::new(
                    "username",
                    format!("Ensure this field has no more than {MAX_USERNAME_CHARS} characters."),
                    "max_length",
                ))
            } else {
                Ok(normalize_username(&u))
            }
        });
        let password = string_field(&body, "password").and_then(check_password_length);
        let (username, password) = collect(username, password)?;
        Ok(Self { username, password })
    }

    pub fn for_registration(body: &[u8]) -> Result<Self, Error> {
        let body = json_object(body)?;
        let username = string_field(&body, "username").and_then(|u| new_username(&u));
        let password = string_field(&body, "password").and_then(new_password);
        let (username, password) = collect(username, password)?;
        Ok(Self { username, password })
    }
}

fn code_field(body: &Map<String, Value>) -> Result<String, FieldError> {
    string_field(body, "token")
}

fn invalid_code_format() -> FieldError {
    FieldError::new(
        "token",
        "Enter the 6-digit code from your authenticator app.",
        "invalid",
    )
}

/// `TOTPActivate`: `{token}`, a 6-digit code.
pub struct TotpActivate {
    pub token: Code,
}

impl TotpActivate {
    pub fn parse(body: &[u8]) -> Result<Self, Error> {
        let body = json_object(body)?;
        let token = code_field(&body)
            .and_then(|t| Code::parse(&t).ok_or_else(invalid_code_format))
            .map_err(|e| Error::Fields(vec![e]))?;
        Ok(Self { token })
    }
}

/// What verify accepts in `token`: six digits are a TOTP code, anything else that decodes as a
/// recovery code is one. The two formats cannot be confused.
pub enum VerifyCode {
    Totp(Code),
    Recovery(RecoveryCode),
}

/// `TOTPVerify`: `{temp_token, token}`.
pub struct TotpVerify {
    pub temp_token: String,
    pub token: VerifyCode,
}

/// `token` as a TOTP code or a recovery code.
fn verify_code_field(body: &Map<String, Value>) -> Result<VerifyCode, FieldError> {
    code_field(body).and_then(|t| {
        if let Some(code) = Code::parse(&t) {
            Ok(VerifyCode::Totp(code))
        } else if let Some(code) = RecoveryCode::parse(&t) {
            Ok(VerifyCode::Recovery(code))
        } else {
            Err(FieldError::new(
                "token",
                "Enter the 6-digit code from your authenticator app or a recovery code.",
                "invalid",
            ))
        }
    })
}

impl TotpVerify {
    pub fn parse(body: &[u8]) -> Result<Self, Error> {
        let body = json_object(body)?;
        let temp_token = string_field(&body, "temp_token");
        let token = verify_code_field(&body);
        let (temp_token, token) = collect(temp_token, token)?;
        Ok(Self { temp_token, token })
    }
}

/// Deactivate's optional `{token}` (a spec extension: the spec's deactivate has no body).
pub struct TotpDeactivate {
    pub token: Option<VerifyCode>,
}

impl TotpDeactivate {
    pub fn parse(body: &[u8]) -> Result<Self, Error> {
        let body = json_object(body)?;
        if !body.contains_key("token") {
            return Ok(Self { token: None });
        }
        let token = verify_code_field(&body).map_err(|e| Error::Fields(vec![e]))?;
        Ok(Self { token: Some(token) })
    }
}

/// `{token}` for a new set of recovery codes: a current code or a recovery code.
pub struct RecoveryCodesRegenerate {
    pub token: VerifyCode,
}

impl RecoveryCodesRegenerate {
    pub fn parse(body: &[u8]) -> Result<Self, Error> {
        let body = json_object(body)?;
        let token = verify_code_field(&body).map_err(|e| Error::Fields(vec![e]))?;
        Ok(Self { token })
    }
}

/// `{current_password, new_password}`.
pub struct PasswordChange {
    pub current_password: String,
    pub new_password: String,
}

impl PasswordChange {
    pub fn parse(body: &[u8]) -> Result<Self, Error> {
        let body = json_object(body)?;
        let current = string_field(&body, "current_password")
            .and_then(check_password_length)
            .map_err(|e| FieldError {
                field: "current_password",
                ..e
            });
        let new = string_field(&body, "new_password")
            .and_then(new_password)
            .map_err(|e| FieldError {
                field: "new_password",
                ..e
            });
        let (current_password, new_password) = collect(current, new)?;
        Ok(Self {
            current_password,
            new_password,
        })
    }
}

/// The key in `Authorization: Token <key>` (scheme case-insensitive, as DRF), or the 403 to send.
pub fn login_key(values: &[&[u8]]) -> Result<String, Error> {
    let raw = match values {
        [] => return Err(Error::NotAuthenticated),
        [one] => *one,
        _ => {
            return Err(Error::AuthenticationFailed(
                "Invalid token header. Send one Authorization header.",
            ));
        }
    };
    let text = std::str::from_utf8(raw).map_err(|_| {
        Error::AuthenticationFailed(
            "Invalid token header. Token string should not contain invalid characters.",
        )
    })?;
    let mut parts = text.split(' ');
    let scheme = parts.next().unwrap_or_default();
    if !scheme.eq_ignore_ascii_case("token") {
        return Err(Error::NotAuthenticated);
    }
    let parts: Vec<&str> = parts.collect();
    match parts.as_slice() {
        [] | [""] => Err(Error::AuthenticationFailed(
            "Invalid token header. No credentials provided.",
        )),
        [key] if key.len() <= MAX_TOKEN_BYTES && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok((*key).to_owned())
        }
        [_] => Err(Error::AuthenticationFailed("Invalid token.")),
        _ => Err(Error::AuthenticationFailed(
            "Invalid token header. Token string should not contain spaces.",
        )),
    }
}

/// A typed request body, parsed from the raw bytes in one place.
pub trait FromBody: Sized {
    fn from_body(body: &[u8]) -> Result<Self, Error>;
}

/// The body of a password login.
pub struct LoginForm(pub Credentials);

/// The body of a registration (stricter: a new name and a new password).
pub struct RegistrationForm(pub Credentials);

/// The body of a route that takes none: read (with its limits) and ignored.
pub struct NoBody;

impl FromBody for LoginForm {
    fn from_body(body: &[u8]) -> Result<Self, Error> {
        Credentials::for_login(body).map(Self)
    }
}

impl FromBody for RegistrationForm {
    fn from_body(body: &[u8]) -> Result<Self, Error> {
        Credentials::for_registration(body).map(Self)
    }
}

impl FromBody for NoBody {
    fn from_body(_: &[u8]) -> Result<Self, Error> {
        Ok(Self)
    }
}

impl FromBody for TotpActivate {
    fn from_body(body: &[u8]) -> Result<Self, Error> {
        Self::parse(body)
    }
}

impl FromBody for TotpVerify {
    fn from_body(body: &[u8]) -> Result<Self, Error> {
        Self::parse(body)
    }
}

impl FromBody for TotpDeactivate {
    fn from_body(body: &[u8]) -> Result<Self, Error> {
        Self::parse(body)
    }
}

impl FromBody for RecoveryCodesRegenerate {
    fn from_body(body: &[u8]) -> Result<Self, Error> {
        Self::parse(body)
    }
}

impl FromBody for PasswordChange {
    fn from_body(body: &[u8]) -> Result<Self, Error> {
        Self::parse(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(e: Error) -> Vec<FieldError> {
        match e {
            Error::Fields(f) => f,
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn empty_body_is_an_empty_object_and_non_objects_are_parse_errors() {
        assert!(json_object(b"").expect("ok").is_empty());
        assert!(json_object(b"  \n").expect("ok").is_empty());
        for bad in [
            &b"[]"[..],
            b"null",
            b"\"x\"",
            b"{",
            b"{\"a\":1}x",
            b"\xff",
            b"\xef\xbb\xbf{}",
        ] {
            assert!(matches!(json_object(bad), Err(Error::Parse(_))), "{bad:?}");
        }
    }

    #[test]
    fn every_missing_field_is_reported() {
        let errors = fields(TotpVerify::parse(b"{}").err().expect("invalid"));
        let names: Vec<_> = errors.iter().map(|e| (e.field, e.code)).collect();
        assert_eq!(names, [("temp_token", "required"), ("token", "required")]);
    }

    #[test]
    fn codes_must_be_strings_of_six_ascii_digits() {
        for bad in [
            json!({"token": 123456}),
            json!({"token": null}),
            json!({"token": []}),
            json!({"token": "+12345"}),
            json!({"token": "1234567"}),
            json!({"token": "１２３４５６"}),
            json!({"token": ""}),
        ] {
            let body = serde_json::to_vec(&bad).expect("json");
            let errors = fields(TotpActivate::parse(&body).err().expect("invalid"));
            assert_eq!(errors[0].field, "token", "{bad}");
        }
        let ok = TotpActivate::parse(br#"{"token": " 012 345 "}"#).expect("valid");
        assert_eq!(ok.token.as_str(), "012345");
    }

    #[test]
    fn verify_tells_codes_from_recovery_codes() {
        let parsed = TotpVerify::parse(br#"{"temp_token":"t","token":"123456"}"#).expect("ok");
        assert!(matches!(parsed.token, VerifyCode::Totp(_)));
        let parsed =
            TotpVerify::parse(br#"{"temp_token":"t","token":"ABCD-EFGH-JKMN-PQRS"}"#).expect("ok");
        assert!(matches!(parsed.token, VerifyCode::Recovery(_)));
        assert!(TotpVerify::parse(br#"{"temp_token":"t","token":"12345"}"#).is_err());
    }

    #[test]
    fn usernames_are_normalized_and_deceptive_ones_refused() {
        assert_eq!(new_username("  jose\u{301} ").expect("ok"), "jos\u{e9}");
        for bad in [
            "",
            "   ",
            "admin\u{202E}gnp",
            "a\u{200B}b",
            "a\nb",
            &"x".repeat(151),
        ] {
            assert!(new_username(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            new_username("a:b c").expect("colon and space are fine"),
            "a:b c"
        );
    }

    #[test]
    fn registration_checks_password_length_both_ways() {
        let short = fields(
            Credentials::for_registration(br#"{"username":"a","password":"1234567"}"#)
                .err()
                .expect("short"),
        );
        assert_eq!(short[0].code, "min_length");
        let long = format!(r#"{{"username":"a","password":"{}"}}"#, "x".repeat(2000));
        let errors = fields(Credentials::for_login(long.as_bytes()).err().expect("long"));
        assert_eq!(errors[0].code, "max_length");
    }

    #[test]
    fn authorization_header_parsing_follows_drf() {
        let key = "a".repeat(64);
        let ok = format!("Token {key}");
        assert_eq!(login_key(&[ok.as_bytes()]).expect("ok"), key);
        assert_eq!(
            login_key(&[format!("token {key}").as_bytes()]).expect("ok"),
            key
        );
        assert_eq!(login_key(&[]), Err(Error::NotAuthenticated));
        assert_eq!(login_key(&[b"Bearer abc"]), Err(Error::NotAuthenticated));
        for bad in [&b"Token"[..], b"Token ", b"Token a b", b"Token \xff\xfe"] {
            assert!(
                matches!(login_key(&[bad]), Err(Error::AuthenticationFailed(_))),
                "{bad:?}"
            );
        }
        let huge = format!("Token {}", "a".repeat(70_000));
        assert!(matches!(
            login_key(&[huge.as_bytes()]),
            Err(Error::AuthenticationFailed(_))
        ));
        assert!(matches!(
            login_key(&[ok.as_bytes(), ok.as_bytes()]),
            Err(Error::AuthenticationFailed(_))
        ));
    }
}
