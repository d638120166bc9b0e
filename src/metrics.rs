//! Prometheus metrics, kept in memory with atomics: requests by route and status, latency
//! histograms by route, verify outcomes, lockouts. Gauges that live in the store (users, users
//! with TOTP active, database size) are read when `/metrics` is scraped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How a verify ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    Ok,
    WrongCode,
    Replay,
    InvalidTempToken,
    Locked,
}

impl VerifyOutcome {
    const ALL: [VerifyOutcome; 5] = [
        VerifyOutcome::Ok,
        VerifyOutcome::WrongCode,
        VerifyOutcome::Replay,
        VerifyOutcome::InvalidTempToken,
        VerifyOutcome::Locked,
    ];

    fn label(self) -> &'static str {
        match self {
            VerifyOutcome::Ok => "ok",
            VerifyOutcome::WrongCode => "wrong_code",
            VerifyOutcome::Replay => "replay",
            VerifyOutcome::InvalidTempToken => "invalid_temp_token",
            VerifyOutcome::Locked => "locked",
        }
    }
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Microseconds.
    sum: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<HashMap<(&'static str, u16), u64>>,
    latency: Mutex<HashMap<&'static str, &'static Histogram>>,
    verify: [AtomicU64; 5],
    lockouts: AtomicU64,
}

/// The numbers that live in the store, read at scrape time.
pub struct StoreGauges {
    pub users: u64,
    pub totp_active: u64,
    pub database_bytes: u64,
}

impl Metrics {
    /// Counts one answered request on `route` (a path template, or "other").
    pub fn record_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((route, status))
            .or_insert(0) += 1;
        let histogram = *self
            .latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route)
            // One histogram per route, for the life of the process: the set of routes is fixed.
            .or_insert_with(|| Box::leak(Box::default()));
        let seconds = elapsed.as_secs_f64();
        for (bucket, bound) in histogram.buckets.iter().zip(BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        histogram.count.fetch_add(1, Ordering::Relaxed);
        histogram
            .sum
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn record_verify(&self, outcome: VerifyOutcome) {
        let index = VerifyOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.verify[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_lockout(&self) {
        self.lockouts.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, gauges: &StoreGauges) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP totpd_http_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE totpd_http_requests_total counter\n");
        let mut requests: Vec<_> = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        requests.sort();
        for ((route, status), count) in requests {
            let _ = writeln!(
                out,
                "totpd_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        out.push_str("# HELP totpd_http_request_duration_seconds Time to answer, by route.\n");
        out.push_str("# TYPE totpd_http_request_duration_seconds histogram\n");
        let mut latency: Vec<_> = self
            .latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        latency.sort_by_key(|(route, _)| *route);
        for (route, histogram) in latency {
            for (bucket, bound) in histogram.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "totpd_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {}",
                    bucket.load(Ordering::Relaxed)
                );
            }
            let count = histogram.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "totpd_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "totpd_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                histogram.sum.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "totpd_http_request_duration_seconds_count{{route=\"{route}\"}} {count}"
            );
        }
        out.push_str("# HELP totpd_verify_total Verify requests by outcome.\n");
        out.push_str("# TYPE totpd_verify_total counter\n");
        for (outcome, count) in VerifyOutcome::ALL.iter().zip(&self.verify) {
            let _ = writeln!(
                out,
                "totpd_verify_total{{outcome=\"{}\"}} {}",
                outcome.label(),
                count.load(Ordering::Relaxed)
            );
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "totpd_lockouts_total",
            "counter",
            "Locks started after too many failed codes.",
            self.lockouts.load(Ordering::Relaxed),
        );
        gauge(&mut out, "totpd_users", "gauge", "Users.", gauges.users);
        gauge(
            &mut out,
            "totpd_users_totp_active",
            "gauge",
            "Users with TOTP active.",
            gauges.totp_active,
        );
        gauge(
            &mut out,
            "totpd_database_bytes",
            "gauge",
            "Bytes the database files take.",
            gauges.database_bytes,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let metrics = Metrics::default();
        metrics.record_request("/api/v1/auth/totp/verify/", 200, Duration::from_micros(800));
        metrics.record_request("/api/v1/auth/totp/verify/", 200, Duration::from_millis(30));
        metrics.record_request("/api/v1/auth/totp/verify/", 400, Duration::from_millis(1));
        metrics.record_verify(VerifyOutcome::Replay);
        metrics.record_lockout();
        let text = metrics.render(&StoreGauges {
            users: 3,
            totp_active: 2,
            database_bytes: 4096,
        });
        for line in [
            "totpd_http_requests_total{route=\"/api/v1/auth/totp/verify/\",status=\"200\"} 2",
            "totpd_http_requests_total{route=\"/api/v1/auth/totp/verify/\",status=\"400\"} 1",
            "totpd_http_request_duration_seconds_bucket{route=\"/api/v1/auth/totp/verify/\",le=\"0.001\"} 2",
            "totpd_http_request_duration_seconds_bucket{route=\"/api/v1/auth/totp/verify/\",le=\"0.025\"} 2",
            "totpd_http_request_duration_seconds_bucket{route=\"/api/v1/auth/totp/verify/\",le=\"0.05\"} 3",
            "totpd_http_request_duration_seconds_count{route=\"/api/v1/auth/totp/verify/\"} 3",
            "totpd_verify_total{outcome=\"replay\"} 1",
            "totpd_verify_total{outcome=\"ok\"} 0",
            "totpd_lockouts_total 1",
            "totpd_users 3",
            "totpd_users_totp_active 2",
            "totpd_database_bytes 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
