//! The TOTP core on its own: criterion times one verification (±1 step, from the code as typed)
//! by totpd's `totp::verify` and by the `totp-rs` crate in the same process, for a valid code of
//! the current step and for a wrong code. A third line times the change proposed in
//! BENCHMARKS.md (HMAC key schedule once per verification, two SHA-1 compressions per step, digits
//! without a heap allocation), checked against the other two before it is timed.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::Criterion;
use sha1::Sha1;
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Builder};
use totpd::domain::totp::{self, Code, DIGITS, PERIOD, Secret};

/// Median nanoseconds per verification.
#[derive(Debug, Clone, Copy)]
pub struct CoreResult {
    pub totpd_valid: f64,
    pub totp_rs_valid: f64,
    pub proposed_valid: f64,
    pub totpd_wrong: f64,
    pub totp_rs_wrong: f64,
    pub proposed_wrong: f64,
}

impl CoreResult {
    pub fn rows(&self) -> [(&'static str, f64, f64, f64); 2] {
        [
            (
                "valid code",
                self.totpd_valid,
                self.totp_rs_valid,
                self.proposed_valid,
            ),
            (
                "wrong code",
                self.totpd_wrong,
                self.totp_rs_wrong,
                self.proposed_wrong,
            ),
        ]
    }
}

/// SHA-1's initial state (FIPS 180-4 §5.3.1).
const SHA1_IV: [u32; 5] = [
    0x6745_2301,
    0xEFCD_AB89,
    0x98BA_DCFE,
    0x1032_5476,
    0xC3D2_E1F0,
];

/// The SHA-1 states after the HMAC key's inner and outer pad blocks (RFC 2104 §2): computed once
/// per verification instead of once per step.
fn keyed_states(secret: &[u8]) -> ([u32; 5], [u32; 5]) {
    let mut key = [0u8; 64];
    if secret.len() > 64 {
        use sha1::Digest;
        key[..20].copy_from_slice(&Sha1::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let (mut inner, mut outer) = (SHA1_IV, SHA1_IV);
    let ipad: [u8; 64] = key.map(|b| b ^ 0x36);
    let opad: [u8; 64] = key.map(|b| b ^ 0x5c);
    sha1::compress(&mut inner, &[ipad.into()]);
    sha1::compress(&mut outer, &[opad.into()]);
    (inner, outer)
}

/// HMAC-SHA-1 of an 8-byte counter from the keyed states: two compressions, no allocation.
fn hmac_step(inner: &[u32; 5], outer: &[u32; 5], counter: u64) -> [u8; 20] {
    // One padded block each: message, 0x80, zeros, the message length in bits with the pad
    // block counted.
    let mut block = [0u8; 64];
    block[..8].copy_from_slice(&counter.to_be_bytes());
    block[8] = 0x80;
    block[56..].copy_from_slice(&((64u64 + 8) * 8).to_be_bytes());
    let mut state = *inner;
    sha1::compress(&mut state, &[block.into()]);
    let mut block = [0u8; 64];
    for (chunk, word) in block.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    block[20] = 0x80;
    block[56..].copy_from_slice(&((64u64 + 20) * 8).to_be_bytes());
    let mut state = *outer;
    sha1::compress(&mut state, &[block.into()]);
    let mut digest = [0u8; 20];
    for (chunk, word) in digest.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

/// The proposed verification: the same window and the same constant-time comparison of every
/// candidate, with the key schedule done once and the digits written without a heap allocation.
fn proposed_verify(secret: &[u8], typed: &str, now: u64, skew: u64) -> Option<u64> {
    let mut code = [0u8; DIGITS];
    let mut n = 0;
    for b in typed.bytes().filter(|b| *b != b' ') {
        if !b.is_ascii_digit() || n == DIGITS {
            return None;
        }
        code[n] = b;
        n += 1;
    }
    if n != DIGITS {
        return None;
    }
    let (inner, outer) = keyed_states(secret);
    let current = now / PERIOD;
    let mut matched = None;
    for step in current.saturating_sub(skew)..=current.saturating_add(skew) {
        let digest = hmac_step(&inner, &outer, step);
        let offset = usize::from(digest[19] & 0x0f);
        let mut value = u32::from_be_bytes([
            digest[offset],
            digest[offset + 1],
            digest[offset + 2],
            digest[offset + 3],
        ]) & 0x7fff_ffff;
        let mut candidate = [b'0'; DIGITS];
        for digit in candidate.iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
        if bool::from(candidate.ct_eq(&code)) {
            matched = Some(step);
        }
    }
    matched
}

fn totpd_verify(secret: &Secret, typed: &str, now: u64) -> Option<u64> {
    Code::parse(typed).and_then(|code| totp::verify(secret, &code, now, 1))
}

pub fn run(dir: &Path, quick: bool) -> Result<CoreResult, String> {
    let bytes = totpd::domain::secrets::random_bytes::<{ totp::SECRET_LEN }>()
        .map_err(|e| e.to_string())?
        .to_vec();
    let secret = Secret::from_bytes(bytes.clone());
    let rs = Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(30)
        .with_secret(bytes.clone())
        .build()
        .map_err(|e| format!("totp-rs: {e}"))?;
    let now: u64 = 1_700_000_015;
    let valid = totp::code_at(&secret, totp::step_at(now))
        .as_str()
        .to_owned();
    let window: Vec<String> = (totp::step_at(now) - 1..=totp::step_at(now) + 1)
        .map(|s| totp::code_at(&secret, s).as_str().to_owned())
        .collect();
    let wrong = (0..1_000_000u32)
        .map(|n| format!("{n:06}"))
        .find(|c| !window.contains(c))
        .ok_or("no wrong code")?;

    // The three must agree before their speed means anything: on every step of the window
    // and around it, for many secrets.
    for i in 0..300u64 {
        let bytes = totpd::domain::secrets::random_bytes::<{ totp::SECRET_LEN }>()
            .map_err(|e| e.to_string())?
            .to_vec();
        let secret = Secret::from_bytes(bytes.clone());
        let t = now + i * 7919;
        for step in totp::step_at(t) - 2..=totp::step_at(t) + 2 {
            let code = totp::code_at(&secret, step);
            let a = totp::verify(&secret, &code, t, 1);
            let b = proposed_verify(&bytes, code.as_str(), t, 1);
            if a != b {
                return Err(format!("the proposed verification disagrees: {a:?} {b:?}"));
            }
        }
    }
    for code in [&valid, &wrong] {
        let a = totpd_verify(&secret, code, now);
        let b = rs.check(code, now);
        let c = proposed_verify(&bytes, code, now, 1);
        if a != b || a != c {
            return Err(format!(
                "implementations disagree on {code}: {a:?} {b:?} {c:?}"
            ));
        }
    }

    let (warm_up, measure, samples) = if quick {
        (Duration::from_millis(300), Duration::from_millis(700), 20)
    } else {
        (Duration::from_secs(1), Duration::from_secs(3), 50)
    };
    let mut criterion = Criterion::default()
        .output_directory(dir)
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .sample_size(samples)
        .without_plots();
    let mut group = criterion.benchmark_group("totp_verify");
    for (label, code) in [("valid", &valid), ("wrong", &wrong)] {
        group.bench_function(format!("totpd_{label}"), |b| {
            b.iter(|| totpd_verify(black_box(&secret), black_box(code), black_box(now)))
        });
        group.bench_function(format!("totp-rs_{label}"), |b| {
            b.iter(|| black_box(&rs).check(black_box(code), black_box(now)))
        });
        group.bench_function(format!("proposed_{label}"), |b| {
            b.iter(|| proposed_verify(black_box(&bytes), black_box(code), black_box(now), 1))
        });
    }
    group.finish();

    let median = |id: &str| -> Result<f64, String> {
        let path = dir.join("totp_verify").join(id).join("new/estimates.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        json["median"]["point_estimate"]
            .as_f64()
            .ok_or_else(|| format!("{}: no median", path.display()))
    };
    Ok(CoreResult {
        totpd_valid: median("totpd_valid")?,
        totp_rs_valid: median("totp-rs_valid")?,
        proposed_valid: median("proposed_valid")?,
        totpd_wrong: median("totpd_wrong")?,
        totp_rs_wrong: median("totp-rs_wrong")?,
        proposed_wrong: median("proposed_wrong")?,
    })
}
