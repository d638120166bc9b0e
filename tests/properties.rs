//! Property tests (proptest). Each property runs a fixed number of random cases and prints how
//! many passed:
//!
//! - TOTP: `hotp`, `code_at` and `verify` over random secrets, times and skews match a reference
//!   written out again here from RFC 2104 (HMAC), RFC 4226 §5.3 and RFC 6238 §4, and the
//!   independent `totp-rs` crate;
//! - base32 secrets and provisioning URIs round-trip through decoders written here and through
//!   `totp-rs`; recovery codes parse back from a reference Crockford encoding, in any case and
//!   with or without dashes and spaces;
//! - the request parsers never panic on arbitrary bytes and always answer an error whose status
//!   and code are in the README's error table; the same holds over HTTP against the real server.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseResult, TestRunner};
use serde_json::{Map, Value, json};
use sha1::{Digest, Sha1};
use totpd::domain::secrets::RecoveryCode;
use totpd::domain::totp::{self, Code, Secret};
use totpd::error::Error;
use totpd::service::input;

mod common;

use common::report;

/// Runs `test` on `cases` values of `strategy`; panics with the shrunk counter-example.
fn check<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) {
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("property `{name}` failed: {e}");
    }
    report(&format!("property {name}: {cases} cases passed"));
}

// ---- the reference TOTP, from the RFCs ----

/// HMAC-SHA-1 as RFC 2104 §2 defines it: block size 64, long keys hashed first.
fn reference_hmac_sha1(key: &[u8], message: &[u8]) -> [u8; 20] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..20].copy_from_slice(&Sha1::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha1::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let inner = inner.finalize();
    let mut outer = Sha1::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner);
    outer.finalize().into()
}

/// RFC 4226 §5.3: dynamic truncation of HMAC-SHA-1(K, C), modulo 10^digits.
fn reference_hotp(key: &[u8], counter: u64, digits: u32) -> u32 {
    let hs = reference_hmac_sha1(key, &counter.to_be_bytes());
    let offset = (hs[19] & 0x0f) as usize;
    let snum = (u32::from(hs[offset]) & 0x7f) << 24
        | u32::from(hs[offset + 1]) << 16
        | u32::from(hs[offset + 2]) << 8
        | u32::from(hs[offset + 3]);
    snum % 10u32.pow(digits)
}

/// RFC 6238 §4: T = floor(t / 30); the 6-digit code, zero padded.
fn reference_code(key: &[u8], t: u64) -> String {
    format!("{:06}", reference_hotp(key, t / 30, 6))
}

/// The latest step within `skew` of now whose code is `code` (steps below 0 or above the last
/// representable one do not exist).
fn reference_verify(key: &[u8], code: &str, now: u64, skew: u64) -> Option<u64> {
    let current = now / 30;
    (current.saturating_sub(skew)..=current.saturating_add(skew))
        .filter(|step| format!("{:06}", reference_hotp(key, *step, 6)) == code)
        .max()
}

/// Times near the epoch, anywhere, and near the end of u64.
fn any_time() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..300, any::<u64>(), (u64::MAX - 300)..=u64::MAX]
}

#[test]
fn hotp_matches_the_rfc_4226_reference_for_any_key_and_counter() {
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..130),
        any::<u64>(),
        6u32..=8,
    );
    check(
        "hotp = RFC 4226 reference",
        2000,
        strategy,
        |(key, counter, digits)| {
            prop_assert_eq!(
                totp::hotp(&key, counter, digits),
                reference_hotp(&key, counter, digits)
            );
            Ok(())
        },
    );
}

#[test]
fn codes_match_the_reference_and_totp_rs_for_any_secret_and_time() {
    let strategy = (prop::array::uniform20(any::<u8>()), any_time());
    check(
        "code_at = reference = totp-rs",
        2000,
        strategy,
        |(bytes, t)| {
            let secret = Secret::from_bytes(bytes.to_vec());
            let ours = totp::code_at(&secret, totp::step_at(t));
            let reference = reference_code(&bytes, t);
            prop_assert_eq!(ours.as_str(), reference.as_str());
            let other = totp_rs::Builder::new()
                .with_secret(bytes.to_vec())
                .with_account_name("p")
                .build()
                .expect("a valid totp-rs configuration");
            prop_assert_eq!(other.generate(t).to_string(), reference);
            Ok(())
        },
    );
}

/// A code to try at `now`: the code of a step near now (possibly outside the window), or any
/// six digits.
fn candidate_code() -> impl Strategy<Value = Result<i64, u32>> {
    prop_oneof![(-4i64..=4).prop_map(Ok), (0u32..1_000_000).prop_map(Err)]
}

#[test]
fn verify_matches_the_reference_window_for_any_secret_time_and_skew() {
    let strategy = (
        prop::collection::vec(any::<u8>(), 1..40),
        any_time(),
        0u64..=totp::MAX_SKEW,
        candidate_code(),
    );
    check(
        "verify = reference window",
        3000,
        strategy,
        |(key, now, skew, candidate)| {
            let current = now / 30;
            let code = match candidate {
                Ok(offset) => match current.checked_add_signed(offset) {
                    Some(step) => format!("{:06}", reference_hotp(&key, step, 6)),
                    None => return Ok(()), // no such step
                },
                Err(digits) => format!("{digits:06}"),
            };
            let parsed = Code::parse(&code).expect("six digits parse");
            let secret = Secret::from_bytes(key.clone());
            let got = totp::verify(&secret, &parsed, now, skew);
            prop_assert_eq!(got, reference_verify(&key, &code, now, skew));
            if let Ok(offset) = candidate
                && offset.unsigned_abs() <= skew
            {
                prop_assert!(
                    got.is_some(),
                    "a code {offset} steps away is inside skew {skew}"
                );
            }
            Ok(())
        },
    );
}

#[test]
fn code_parsing_accepts_exactly_six_ascii_digits_after_removing_spaces() {
    let strategy = prop_oneof![any::<String>(), "[0-9 ]{0,10}", "[0-9０-９٠-٩+\\- \t]{5,8}"];
    check("Code::parse", 3000, strategy, |input| {
        let stripped: String = input.chars().filter(|c| *c != ' ').collect();
        let valid = stripped.len() == 6 && stripped.bytes().all(|b| b.is_ascii_digit());
        let parsed = Code::parse(&input);
        prop_assert_eq!(parsed.is_some(), valid, "{:?}", input);
        if let Some(code) = parsed {
            prop_assert_eq!(code.as_str(), stripped.as_str());
        }
        Ok(())
    });
}

// ---- base32 and the provisioning URI ----

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 §6 decoding without padding, written out again: five bits per symbol, big-endian.
fn reference_base32_decode(text: &str, alphabet: &[u8; 32]) -> Option<Vec<u8>> {
    let mut bits = 0u64;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let value = alphabet.iter().position(|a| *a == c)? as u64;
        bits = (bits << 5) | value;
        count += 5;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    // Leftover bits must be zero padding.
    (bits == 0).then_some(out)
}

fn reference_base32_encode(bytes: &[u8], alphabet: &[u8; 32]) -> String {
    let mut out = String::new();
    let mut bits = 0u64;
    let mut count = 0;
    for b in bytes {
        bits = (bits << 8) | u64::from(*b);
        count += 8;
        while count >= 5 {
            count -= 5;
            out.push(alphabet[((bits >> count) & 31) as usize] as char);
        }
        bits &= (1 << count) - 1;
    }
    if count > 0 {
        out.push(alphabet[((bits << (5 - count)) & 31) as usize] as char);
    }
    out
}

#[test]
fn secrets_round_trip_through_unpadded_base32() {
    let strategy = prop::collection::vec(any::<u8>(), 0..80);
    check("base32 round trip", 2000, strategy, |bytes| {
        let text = Secret::from_bytes(bytes.clone()).to_base32();
        prop_assert_eq!(text.len(), (bytes.len() * 8).div_ceil(5));
        prop_assert!(text.bytes().all(|c| BASE32.contains(&c)), "{}", text);
        prop_assert_eq!(&text, &reference_base32_encode(&bytes, BASE32));
        prop_assert_eq!(reference_base32_decode(&text, BASE32), Some(bytes.clone()));
        if !bytes.is_empty() {
            let decoded = totp_rs::Secret::try_from_base32(&text).expect("totp-rs decodes it");
            prop_assert_eq!(decoded.as_bytes(), &bytes[..]);
        }
        Ok(())
    });
}

/// RFC 3986 percent-decoding, written out again.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// (issuer, account, parameters), all percent-decoded.
type ParsedUri = (String, String, Vec<(String, String)>);

/// Splits `otpauth://totp/ISSUER:ACCOUNT?k=v&…` into the decoded label parts and the decoded
/// parameters, refusing anything that is not exactly that shape.
fn parse_uri(uri: &str) -> Option<ParsedUri> {
    let rest = uri.strip_prefix("otpauth://totp/")?;
    let (label, query) = rest.split_once('?')?;
    if query.contains('?') || uri.contains('#') {
        return None;
    }
    let (issuer, account) = label.split_once(':')?;
    if account.contains(':') {
        return None;
    }
    let params = query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((percent_decode(issuer)?, percent_decode(account)?, params))
}

#[test]
fn provisioning_uris_round_trip_for_any_issuer_and_account() {
    let strategy = (
        prop_oneof!["\\PC{1,30}", "[ -~]{1,30}", "[a-zA-Z0-9 :?&#/+=%@.]{1,20}"],
        prop_oneof![
            any::<String>(),
            "[ -~]{0,40}",
            "[a-zA-Z0-9 :?&#/+=%@.]{0,30}"
        ],
        prop::array::uniform20(any::<u8>()),
    );
    check(
        "provisioning URI round trip",
        2000,
        strategy,
        |(issuer, account, bytes)| {
            let secret = Secret::from_bytes(bytes.to_vec());
            let uri = totp::provisioning_uri(&issuer, &account, &secret);
            prop_assert!(uri.is_ascii(), "{}", uri);
            let (label_issuer, label_account, params) =
                parse_uri(&uri).ok_or_else(|| TestCaseError::fail(format!("malformed {uri}")))?;
            prop_assert_eq!(&label_issuer, &issuer);
            prop_assert_eq!(&label_account, &account);
            let names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
            prop_assert_eq!(names, ["secret", "issuer", "algorithm", "digits", "period"]);
            let value = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            prop_assert_eq!(
                reference_base32_decode(&value("secret"), BASE32),
                Some(bytes.to_vec())
            );
            prop_assert_eq!(value("issuer"), issuer.clone());
            prop_assert_eq!(value("algorithm"), "SHA1");
            prop_assert_eq!(value("digits"), "6");
            prop_assert_eq!(value("period"), "30");
            // An independent parser agrees wherever its own rules allow the names (no colon, a
            // non-empty account).
            if !issuer.contains(':') && !account.contains(':') && !account.is_empty() {
                let other = totp_rs::Totp::from_url(&uri)
                    .map_err(|e| TestCaseError::fail(format!("totp-rs refuses {uri}: {e}")))?;
                prop_assert_eq!(other.account_name(), account.as_str());
                prop_assert_eq!(other.issuer(), Some(issuer.as_str()));
                let now = 1_800_000_015;
                prop_assert_eq!(other.generate(now).to_string(), reference_code(&bytes, now));
            }
            Ok(())
        },
    );
}

/// Crockford's base32 as the README describes recovery codes: lower case, no i, l, o or u.
const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

#[test]
fn recovery_codes_parse_in_any_case_with_or_without_dashes() {
    let strategy = (
        prop::array::uniform10(any::<u8>()),
        prop::array::uniform10(any::<u8>()),
        any::<bool>(),
        0usize..4,
    );
    check(
        "recovery code parsing",
        2000,
        strategy,
        |(bytes, other, upper, separator)| {
            let plain = reference_base32_encode(&bytes, CROCKFORD);
            prop_assert_eq!(plain.len(), 16);
            let groups: Vec<&str> = (0..4).map(|i| &plain[i * 4..i * 4 + 4]).collect();
            let shown = groups.join("-");
            let typed = {
                let joined = groups.join(["-", "", " ", " - "][separator]);
                // Read aloud or copied by hand: 1 may come back as i or l, 0 as o.
                let joined = joined.replace('1', "l").replace('0', "O");
                if upper { joined.to_uppercase() } else { joined }
            };
            let canonical = RecoveryCode::parse(&shown);
            prop_assert!(canonical.is_some(), "{} does not parse", shown);
            prop_assert_eq!(RecoveryCode::parse(&typed), canonical.clone(), "{}", typed);
            let different = reference_base32_encode(&other, CROCKFORD);
            prop_assert_eq!(
                RecoveryCode::parse(&different) == canonical,
                other == bytes,
                "distinct codes must stay distinct"
            );
            Ok(())
        },
    );
}

#[test]
fn recovery_code_and_code_parsers_never_panic_on_any_string() {
    let strategy = prop_oneof![any::<String>(), "[0-9a-zA-Z -]{0,80}"];
    check("RecoveryCode::parse total", 3000, strategy, |input| {
        if let Some(code) = RecoveryCode::parse(&input) {
            // Whatever parses is 80 bits: 16 symbols once separators are gone.
            let symbols = input.chars().filter(|c| *c != '-' && *c != ' ').count();
            prop_assert_eq!(symbols, 16, "{:?}", input);
            prop_assert_eq!(RecoveryCode::parse(&input.to_lowercase()), Some(code));
        }
        let _ = Code::parse(&input);
        Ok(())
    });
}

// ---- the request parsers and the documented errors ----

/// (status, code) pairs of the README's error table, read from the README itself so the test
/// follows the documentation.
fn documented_errors() -> BTreeSet<(u16, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let table = readme
        .split("### Error codes")
        .nth(1)
        .expect("an `### Error codes` section");
    let mut pairs = BTreeSet::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(status) = cells.get(1).and_then(|c| c.parse::<u16>().ok()) else {
            continue;
        };
        for (i, part) in cells[2].split('`').enumerate() {
            if i % 2 == 1 {
                pairs.insert((status, part.to_owned()));
            }
        }
    }
    assert!(
        pairs.len() >= 20 && pairs.contains(&(400, "parse_error".to_owned())),
        "the README's error table was not found or changed shape: {pairs:?}"
    );
    pairs
}

/// An error from a parser: a documented 4xx, in one of the three DRF shapes.
fn assert_documented(
    documented: &BTreeSet<(u16, String)>,
    error: &Error,
    input: &[u8],
) -> TestCaseResult {
    let status = error.status().as_u16();
    prop_assert!(
        (400..500).contains(&status),
        "{:?} on {:?}",
        error,
        String::from_utf8_lossy(input)
    );
    prop_assert!(
        documented.contains(&(status, error.code().to_owned())),
        "undocumented {} {} on {:?}",
        status,
        error.code(),
        String::from_utf8_lossy(input)
    );
    let body = error.body();
    let object = body.as_object().expect("an object");
    prop_assert_eq!(object.get("code"), Some(&json!(error.code())));
    let shape = object.get("detail").is_some_and(Value::is_string)
        || object
            .iter()
            .any(|(k, v)| k != "code" && v.as_array().is_some_and(|a| !a.is_empty()));
    prop_assert!(shape, "{}", body);
    Ok(())
}

const FIELDS: [&str; 6] = [
    "username",
    "password",
    "token",
    "temp_token",
    "current_password",
    "new_password",
];

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::from),
        "[0-9 ]{0,9}".prop_map(Value::from),
        "[0-9a-zA-Z -]{14,22}".prop_map(Value::from),
        "\\PC{0,200}".prop_map(Value::from),
        (1usize..2000).prop_map(|n| Value::from("x".repeat(n))),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request body: raw bytes, any JSON, or an object with the API's field names and arbitrary
/// values, possibly cut short or padded with junk.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        any_json().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        api_object(),
        well_formed(),
        (
            api_object(),
            0usize..64,
            prop::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(mut bytes, cut, junk)| {
                bytes.truncate(bytes.len().saturating_sub(cut));
                bytes.extend(junk);
                bytes
            }),
    ]
}

/// A JSON object with some of the API's field names and arbitrary values.
fn api_object() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((prop::sample::select(&FIELDS[..]), any_json()), 0..5).prop_map(
        |fields| {
            let map: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            serde_json::to_vec(&Value::Object(map)).expect("json")
        },
    )
}

/// An object with every field of the API as a plausible string, so the input passes the parsers
/// and reaches the use cases.
fn well_formed() -> impl Strategy<Value = Vec<u8>> {
    let string = prop_oneof![
        "[0-9]{6}",
        "[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}",
        "[a-zA-Z0-9_-]{8,64}",
        "\\PC{1,40}",
    ];
    prop::collection::vec(string, FIELDS.len()).prop_map(|values| {
        let map: Map<String, Value> = FIELDS
            .iter()
            .zip(values)
            .map(|(k, v)| ((*k).to_owned(), Value::from(v)))
            .collect();
        serde_json::to_vec(&Value::Object(map)).expect("json")
    })
}

#[test]
fn request_parsers_never_panic_and_answer_a_documented_4xx() {
    let documented = documented_errors();
    let accepted = AtomicUsize::new(0);
    let refused = AtomicUsize::new(0);
    check(
        "request parsers on arbitrary bodies",
        4000,
        any_body(),
        |body| {
            let results: [Result<(), Error>; 8] = [
                input::json_object(&body).map(drop),
                input::Credentials::for_login(&body).map(drop),
                input::Credentials::for_registration(&body).map(drop),
                input::TotpActivate::parse(&body).map(drop),
                input::TotpVerify::parse(&body).map(drop),
                input::TotpDeactivate::parse(&body).map(drop),
                input::RecoveryCodesRegenerate::parse(&body).map(drop),
                input::PasswordChange::parse(&body).map(drop),
            ];
            for result in &results {
                match result {
                    Ok(()) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert_documented(&documented, e, &body)?;
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        },
    );
    let (accepted, refused) = (accepted.into_inner(), refused.into_inner());
    report(&format!(
        "  (parser answers: {accepted} accepted, {refused} documented 4xx)"
    ));
    assert!(
        accepted > 0 && refused > 0,
        "the inputs exercised both outcomes"
    );
}

#[test]
fn the_authorization_header_parser_answers_a_key_or_a_documented_403() {
    let documented = documented_errors();
    let value = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80),
        "(Token|token|TOKEN|Bearer|) ?[ -~]{0,300}".prop_map(String::into_bytes),
    ];
    let strategy = prop::collection::vec(value, 0..3);
    check("Authorization header parser", 3000, strategy, |values| {
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        match input::login_key(&refs) {
            Ok(key) => {
                prop_assert_eq!(refs.len(), 1);
                prop_assert!(key.len() <= 256 && key.bytes().all(|b| b.is_ascii_graphic()));
                let text = String::from_utf8_lossy(refs[0]).to_lowercase();
                prop_assert_eq!(text, format!("token {}", key.to_lowercase()));
            }
            Err(e) => {
                prop_assert_eq!(e.status().as_u16(), 403);
                assert_documented(&documented, &e, refs.concat().as_slice())?;
            }
        }
        Ok(())
    });
}

// ---- the same over HTTP ----

/// The routes a random body is sent to, and whether they get the user's key. None of them can
/// succeed with random input: there is no TOTP to activate, deactivate or verify, registration
/// is off, and the password is not guessable.
const ROUTES: [(&str, bool); 8] = [
    ("/api/v1/auth/login/", false),
    ("/api/v1/auth/register/", false),
    ("/api/v1/auth/totp/verify/", false),
    ("/api/v1/auth/totp/activate/", true),
    ("/api/v1/auth/totp/deactivate/", true),
    ("/api/v1/auth/totp/recovery-codes/", true),
    ("/api/v1/auth/password/", true),
    ("/api/v1/auth/totp/activate/", false),
];

const CONTENT_TYPES: [Option<&str>; 5] = [
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("APPLICATION/JSON"),
    Some("text/plain"),
    None,
];

#[test]
fn the_server_answers_arbitrary_bodies_with_a_documented_4xx_json_error() {
    let documented = documented_errors();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, key) = runtime.block_on(start_server(&dir));
    let client = reqwest::Client::new();
    let statuses = std::sync::Mutex::new(BTreeSet::new());
    let strategy = (0..ROUTES.len(), 0..CONTENT_TYPES.len(), any_body());
    check(
        "HTTP routes on arbitrary bodies",
        1500,
        strategy,
        |(route, content_type, body)| {
            let (path, with_key) = ROUTES[route];
            let mut request = client.post(format!("{base}{path}")).body(body.clone());
            if with_key {
                request = request.header("Authorization", format!("Token {key}"));
            }
            if let Some(content_type) = CONTENT_TYPES[content_type] {
                request = request.header("Content-Type", content_type);
            }
            let (status, text) = runtime.block_on(async {
                let response = request.send().await.expect("answered");
                let status = response.status().as_u16();
                (status, response.text().await.expect("body"))
            });
            let answer: Value = serde_json::from_str(&text)
                .map_err(|_| TestCaseError::fail(format!("{status} not JSON: {text:?}")))?;
            let code = answer["code"].as_str().unwrap_or_default().to_owned();
            prop_assert!(
                documented.contains(&(status, code.clone())) && (400..500).contains(&status),
                "{} {} answered {} {}",
                path,
                String::from_utf8_lossy(&body),
                status,
                text
            );
            statuses.lock().expect("lock").insert((status, code));
            Ok(())
        },
    );
    report(&format!(
        "  (distinct answers: {:?})",
        statuses.lock().expect("lock")
    ));
    drop(runtime);
}

/// The real server in this process on a free port, with a user who has a login key and no TOTP.
async fn start_server(dir: &tempfile::TempDir) -> (String, String) {
    use totpd::clock::{Clock, ManualClock};
    let clock = ManualClock::new(1_800_000_015);
    let config = common::quick_config(dir.path().join("data"));
    let (base, service) = common::serve_in_process(config, clock.clone()).await;
    let ctx = totpd::service::Ctx {
        now: clock.now(),
        ip: None,
    };
    service
        .create_user("alice", "password123".to_owned(), "test", &ctx)
        .await
        .expect("user");
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/auth/login/"))
        .json(&json!({"username": "alice", "password": "password123"}))
        .send()
        .await
        .expect("login");
    let body: Value = response.json().await.expect("json");
    let key = body["key"].as_str().expect("a key").to_owned();
    (base, key)
}
