//! Pure TOTP maths: HOTP (RFC 4226 §5), TOTP (RFC 6238 §4) with SHA-1, 6 digits and 30 s steps,
//! window verification (and, for the clock-drift hint, finding a code a few steps outside the
//! window), and the `otpauth://` provisioning URI (Google Authenticator Key URI format).
//! Nothing here reads the clock or touches storage.

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use crate::clock::UnixTime;

/// Digits of a code. Authenticator apps ignore other values, so this is not configurable.
pub const DIGITS: usize = 6;
/// Seconds per time step (RFC 6238 §5.2 recommends 30).
pub const PERIOD: u64 = 30;
/// Secret length: the HMAC-SHA-1 output size, as RFC 4226 §4 R6 recommends.
pub const SECRET_LEN: usize = 20;
/// The largest accepted `totp.skew` (steps either side of now).
pub const MAX_SKEW: u64 = 2;

/// A TOTP shared secret. `Debug` never prints the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// RFC 4648 base32, upper case, without `=` padding (as the Key URI format asks).
    pub fn to_base32(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(&self.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A code as typed by the user: exactly six ASCII digits once ASCII spaces are removed.
/// Kept as bytes and compared in constant time, never parsed to an integer (leading zeros matter).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Code([u8; DIGITS]);

impl Code {
    /// Accepts "123456" and "123 456"; refuses signs, Unicode digits, other lengths.
    pub fn parse(input: &str) -> Option<Self> {
        let mut digits = [0u8; DIGITS];
        let mut n = 0;
        for b in input.bytes().filter(|b| *b != b' ') {
            if !b.is_ascii_digit() || n == DIGITS {
                return None;
            }
            digits[n] = b;
            n += 1;
        }
        (n == DIGITS).then_some(Self(digits))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Code(<redacted>)")
    }
}

/// An HMAC-SHA-1 keyed with a secret once: each counter then costs two SHA-1 compressions.
fn keyed(key: &[u8]) -> Hmac<Sha1> {
    Hmac::<Sha1>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// RFC 4226 §5.3 from a keyed HMAC: the 8-byte big-endian counter, dynamic truncation.
fn truncated(mac: &Hmac<Sha1>, counter: u64) -> u32 {
    let mut mac = mac.clone();
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest[digest.len() - 1] & 0x0f);
    u32::from_be_bytes([
        digest[offset],
        digest[offset + 1],
        digest[offset + 2],
        digest[offset + 3],
    ]) & 0x7fff_ffff
}

/// RFC 4226 §5.3: HMAC-SHA-1 of the 8-byte big-endian counter, dynamic truncation, `mod 10^digits`.
pub fn hotp(key: &[u8], counter: u64, digits: u32) -> u32 {
    truncated(&keyed(key), counter) % 10u32.pow(digits)
}

/// Six ASCII digits of a value below 10^6, zero padded.
fn digits_of(mut value: u32) -> [u8; DIGITS] {
    let mut digits = [b'0'; DIGITS];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
    digits
}

/// RFC 6238 §4.2: the time step of a Unix time, T = floor(t / 30) with T0 = 0.
pub fn step_at(now: UnixTime) -> u64 {
    now / PERIOD
}

/// The six-digit code of a time step, zero padded.
pub fn code_at(secret: &Secret, step: u64) -> Code {
    Code(digits_of(hotp(secret.as_bytes(), step, DIGITS as u32)))
}

/// Checks `code` against the steps `now ± skew` — the current step first, then outwards — and
/// returns the step it matches. Each candidate is compared in constant time, and a code that
/// matches nothing is compared with every candidate, so timing reveals nothing about a wrong
/// code; it stops at a match, which reveals only which step a right code was for. Replay is the
/// caller's business: it must refuse a step at or before the last one it accepted (RFC 6238 §5.2).
pub fn verify(secret: &Secret, code: &Code, now: UnixTime, skew: u64) -> Option<u64> {
    let mac = keyed(secret.as_bytes());
    matching_step(&mac, code, step_at(now), 0..=skew)
}

/// How far from now a code is still recognised as one of the secret's, for the clock-drift
/// hint: ten steps (five minutes) either side. Wider would tell a guesser more about the codes
/// of nearby steps for little help (a phone off by more than five minutes is rare), and every
/// wrong code costs one HMAC per step looked at.
pub const DRIFT_STEPS: u64 = 10;

/// Where a code falls, for [`locate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Located {
    /// The code of this step, within `now ± skew`: what [`verify`] returns.
    InWindow(u64),
    /// The code of this step, outside the window but at most [`DRIFT_STEPS`] from now: most
    /// likely a device whose clock is off. Still a wrong code.
    Drifted(u64),
    /// No step within [`DRIFT_STEPS`] of now.
    Nowhere,
}

/// [`verify`], and for a code outside the window the step within [`DRIFT_STEPS`] of now it is
/// for, if any: the window first (so a code valid now is always found as such), then the steps
/// beyond it, nearest first. A wrong code is compared with every step up to `DRIFT_STEPS`
/// either side, whatever the skew, so its timing still reveals nothing.
pub fn locate(secret: &Secret, code: &Code, now: UnixTime, skew: u64) -> Located {
    let mac = keyed(secret.as_bytes());
    let current = step_at(now);
    if let Some(step) = matching_step(&mac, code, current, 0..=skew) {
        return Located::InWindow(step);
    }
    match matching_step(&mac, code, current, skew.saturating_add(1)..=DRIFT_STEPS) {
        Some(step) => Located::Drifted(step),
        None => Located::Nowhere,
    }
}

/// The first step `current ± d` (d in `distances`, `+d` before `-d`) whose code is `code`.
fn matching_step(
    mac: &Hmac<Sha1>,
    code: &Code,
    current: u64,
    distances: std::ops::RangeInclusive<u64>,
) -> Option<u64> {
    let mut steps = distances.flat_map(|d| {
        let behind = current.checked_sub(d).filter(|_| d > 0);
        [current.checked_add(d), behind].into_iter().flatten()
    });
    steps.find(|&step| {
        let candidate = digits_of(truncated(mac, step) % 1_000_000);
        bool::from(candidate.ct_eq(&code.0))
    })
}

/// How far ahead of the server's clock (negative: behind) a device seemed to be when it showed
/// the code of `step` at `now`, rounded to 10 s. The device's time was somewhere in the step's
/// 30 s, so this takes the middle of it; the sign and the rough size are what a person needs
/// to put the clock right.
pub fn drift_seconds(step: u64, now: UnixTime) -> i64 {
    let middle = i128::from(step) * i128::from(PERIOD) + i128::from(PERIOD / 2);
    let drift = middle - i128::from(now);
    // To the nearest 10 s, halves away from zero.
    let rounded = (drift + 5 * drift.signum()) / 10 * 10;
    i64::try_from(rounded).unwrap_or(if rounded < 0 { i64::MIN } else { i64::MAX })
}

/// Everything but RFC 3986's unreserved characters is percent-encoded, so a space is `%20`
/// (never `+`), and `:`, `?`, `&`, `#` and `/` in a name cannot change the URI's structure.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// `otpauth://totp/<issuer>:<account>?secret=…&issuer=…&algorithm=SHA1&digits=6&period=30`
pub fn provisioning_uri(issuer: &str, account: &str, secret: &Secret) -> String {
    let issuer = encode_component(issuer);
    format!(
        "otpauth://totp/{issuer}:{account}?secret={secret}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={PERIOD}",
        account = encode_component(account),
        secret = secret.to_base32(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SEED: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc4226_appendix_d_vectors() {
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (counter, want) in expected.iter().enumerate() {
            assert_eq!(
                hotp(RFC_SEED, counter as u64, 6),
                *want,
                "counter {counter}"
            );
        }
    }

    #[test]
    fn rfc6238_appendix_b_sha1_vectors_eight_digits() {
        let table = [
            (59u64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ];
        for (time, want) in table {
            assert_eq!(hotp(RFC_SEED, step_at(time), 8), want, "t={time}");
        }
    }

    #[test]
    fn six_digit_codes_keep_leading_zeros() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        assert_eq!(code_at(&secret, step_at(1234567890)).as_str(), "005924");
        assert_eq!(code_at(&secret, step_at(1111111109)).as_str(), "081804");
        assert_eq!(code_at(&secret, step_at(20000000000)).as_str(), "353130");
    }

    #[test]
    fn code_parsing_is_strict() {
        assert_eq!(Code::parse("005924").map(|c| c.0), Some(*b"005924"));
        assert_eq!(Code::parse("005 924").map(|c| c.0), Some(*b"005924"));
        assert_eq!(Code::parse(" 005924 ").map(|c| c.0), Some(*b"005924"));
        for bad in [
            "",
            "12345",
            "1234567",
            "+12345",
            "-12345",
            "12345a",
            "１２３４５６",
            "٠١٢٣٤٥",
            "12\t3456",
            "123456\n",
        ] {
            assert!(Code::parse(bad).is_none(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn window_accepts_exactly_skew_steps_each_side() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        let now = 1_000_000_015; // mid-step
        let step = step_at(now);
        for (offset, skew, accepted) in [
            (-2i64, 1u64, false),
            (-1, 1, true),
            (0, 1, true),
            (1, 1, true),
            (2, 1, false),
            (-1, 0, false),
            (1, 0, false),
            (0, 0, true),
            (-2, 2, true),
            (2, 2, true),
            (3, 2, false),
        ] {
            let target = step.checked_add_signed(offset).expect("in range");
            let code = code_at(&secret, target);
            let got = verify(&secret, &code, now, skew);
            assert_eq!(got.is_some(), accepted, "offset {offset} skew {skew}");
            if accepted {
                assert_eq!(got, Some(target));
            }
        }
    }

    #[test]
    fn window_edges_follow_step_boundaries() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        // 59 is the last second of step 1, 60 the first of step 2.
        let code_step0 = code_at(&secret, 0);
        assert_eq!(verify(&secret, &code_step0, 59, 1), Some(0));
        assert_eq!(verify(&secret, &code_step0, 60, 1), None);
        let code_step3 = code_at(&secret, 3);
        assert_eq!(verify(&secret, &code_step3, 59, 1), None);
        assert_eq!(verify(&secret, &code_step3, 60, 1), Some(3));
    }

    #[test]
    fn window_near_epoch_does_not_underflow() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        assert_eq!(verify(&secret, &code_at(&secret, 0), 0, 2), Some(0));
    }

    #[test]
    fn locate_finds_codes_up_to_ten_steps_away_outside_the_window() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        let now = 1_000_000_015;
        let step = step_at(now);
        for skew in [0, 1, 2] {
            for offset in -12i64..=12 {
                let target = step.checked_add_signed(offset).expect("in range");
                let want = match offset.unsigned_abs() {
                    d if d <= skew => Located::InWindow(target),
                    d if d <= DRIFT_STEPS => Located::Drifted(target),
                    _ => Located::Nowhere,
                };
                let code = code_at(&secret, target);
                assert_eq!(
                    locate(&secret, &code, now, skew),
                    want,
                    "offset {offset} skew {skew}"
                );
                let in_window = matches!(want, Located::InWindow(_)).then_some(target);
                assert_eq!(verify(&secret, &code, now, skew), in_window);
            }
        }
    }

    #[test]
    fn locate_near_the_epoch_does_not_underflow() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        assert_eq!(
            locate(&secret, &code_at(&secret, 10), 0, 1),
            Located::Drifted(10)
        );
        assert_eq!(
            locate(&secret, &code_at(&secret, 11), 0, 1),
            Located::Nowhere
        );
    }

    #[test]
    fn drift_is_measured_from_the_middle_of_the_step_and_rounded_to_ten_seconds() {
        // Mid-step, k steps off is k × 30 s.
        assert_eq!(drift_seconds(103, 100 * 30 + 15), 90);
        assert_eq!(drift_seconds(97, 100 * 30 + 15), -90);
        assert_eq!(drift_seconds(110, 100 * 30 + 15), 300);
        // At the start of a step the device was, on average, half a step further ahead.
        assert_eq!(drift_seconds(102, 100 * 30), 80);
        assert_eq!(drift_seconds(98, 100 * 30), -50);
        // At its last second, half a step less.
        assert_eq!(drift_seconds(102, 100 * 30 + 29), 50);
        assert_eq!(drift_seconds(98, 100 * 30 + 29), -70);
        assert_eq!(drift_seconds(u64::MAX, 0), i64::MAX);
    }

    #[test]
    fn secret_is_unpadded_upper_base32() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        assert_eq!(secret.to_base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn uri_has_every_parameter_and_encodes_spaces_as_percent_20() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        let uri = provisioning_uri("ACME Co", "john doe", &secret);
        assert_eq!(
            uri,
            "otpauth://totp/ACME%20Co:john%20doe?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=ACME%20Co&algorithm=SHA1&digits=6&period=30"
        );
        assert!(!uri.contains('+'));
    }

    #[test]
    fn uri_encodes_colons_reserved_characters_and_non_ascii() {
        let secret = Secret::from_bytes(RFC_SEED.to_vec());
        let uri = provisioning_uri("a:b", "evil?secret=AAAA&x=#/+", &secret);
        let (label, query) = uri
            .strip_prefix("otpauth://totp/")
            .and_then(|rest| rest.split_once('?'))
            .expect("label and query");
        assert_eq!(label, "a%3Ab:evil%3Fsecret%3DAAAA%26x%3D%23%2F%2B");
        assert_eq!(query.matches("secret=").count(), 1);
        assert!(!uri.contains('#'));
        let uri = provisioning_uri("Zoë", "josé", &secret);
        assert!(
            uri.starts_with("otpauth://totp/Zo%C3%AB:jos%C3%A9?"),
            "{uri}"
        );
        assert!(uri.contains("&issuer=Zo%C3%AB&"));
    }
}
