//! Prometheus metrics, kept in memory in atomics allocated at start: requests by route and status, latency
//! histograms by route, verify outcomes, lockouts. Gauges that live in the store (users, users
//! with TOTP active, database size) are read when `/metrics` is scraped.
//!
//! Rendered by hand rather than with `prometheus-client`, which writes OpenMetrics text (another
//! content type, `# EOF`, renamed counters) and would change what existing scrapers read.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::StoreStats;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How a verify ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    Ok,
    WrongCode,
    /// A wrong code that is the code of a time a few steps away: a device's clock is off.
    ClockSkew,
    Replay,
    InvalidTempToken,
    Locked,
}

impl VerifyOutcome {
    const ALL: [VerifyOutcome; 6] = [
        VerifyOutcome::Ok,
        VerifyOutcome::WrongCode,
        VerifyOutcome::ClockSkew,
        VerifyOutcome::Replay,
        VerifyOutcome::InvalidTempToken,
        VerifyOutcome::Locked,
    ];

    fn label(self) -> &'static str {
        match self {
            VerifyOutcome::Ok => "ok",
            VerifyOutcome::WrongCode => "wrong_code",
            VerifyOutcome::ClockSkew => "clock_skew",
            VerifyOutcome::Replay => "replay",
            VerifyOutcome::InvalidTempToken => "invalid_temp_token",
            VerifyOutcome::Locked => "locked",
        }
    }
}

/// What one route has seen: answers by status, and a latency histogram.
struct RouteStats {
    name: &'static str,
    /// Indexed by status − 100 (every HTTP status is 100 to 599).
    statuses: Vec<AtomicU64>,
    /// Answers per latency bucket, not cumulative (one atomic add per request instead of one
    /// per bound above it, on counters both workers write); `render` sums them up.
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Microseconds.
    sum: AtomicU64,
}

impl RouteStats {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            statuses: (100..600).map(|_| AtomicU64::new(0)).collect(),
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

/// The label of requests to no known route.
pub const OTHER_ROUTE: &str = "other";

/// Every counter is an atomic, allocated when the server starts: recording takes no lock.
pub struct Metrics {
    /// One per route, then `other`.
    routes: Vec<RouteStats>,
    verify: [AtomicU64; 6],
    lockouts: AtomicU64,
}

impl Metrics {
    /// Metrics for these routes (path templates) and `other`.
    pub fn new(routes: impl IntoIterator<Item = &'static str>) -> Self {
        Self {
            routes: routes
                .into_iter()
                .chain([OTHER_ROUTE])
                .map(RouteStats::new)
                .collect(),
            verify: Default::default(),
            lockouts: AtomicU64::new(0),
        }
    }

    /// Counts one answered request on `route` (a path template, or anything else as `other`).
    pub fn record_request(&self, route: &str, status: u16, elapsed: Duration) {
        let Some(stats) = self
            .routes
            .iter()
            .find(|r| r.name == route)
            .or_else(|| self.routes.last())
        else {
            return;
        };
        if let Some(counter) = stats.statuses.get(usize::from(status).wrapping_sub(100)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|&bound| seconds <= bound) {
            stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        stats.count.fetch_add(1, Ordering::Relaxed);
        stats
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
    /// The text of every family; the store's figures (`stats`) are read at scrape time, and
    /// the user gauges read 0 until the count after start is done.
    pub fn render(&self, stats: &StoreStats) -> String {
        let (users, totp_active) = stats.counts.unwrap_or((0, 0));
        let mut out = String::new();
        out.push_str(
            "# HELP totpd_http_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE totpd_http_requests_total counter\n");
        for route in &self.routes {
            for (offset, count) in route.statuses.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "totpd_http_requests_total{{route=\"{}\",status=\"{}\"}} {count}",
                        route.name,
                        offset + 100
                    );
                }
            }
        }
        out.push_str("# HELP totpd_http_request_duration_seconds Time to answer, by route.\n");
        out.push_str("# TYPE totpd_http_request_duration_seconds histogram\n");
        for route in self
            .routes
            .iter()
            .filter(|r| r.count.load(Ordering::Relaxed) > 0)
        {
            let name = route.name;
            let mut cumulative = 0;
            for (bucket, bound) in route.buckets.iter().zip(BUCKETS) {
                cumulative += bucket.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "totpd_http_request_duration_seconds_bucket{{route=\"{name}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            // Read after the buckets, and never below them: a request recorded meanwhile
            // must not make +Inf smaller than a finite bucket.
            let count = route.count.load(Ordering::Relaxed).max(cumulative);
            let _ = writeln!(
                out,
                "totpd_http_request_duration_seconds_bucket{{route=\"{name}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "totpd_http_request_duration_seconds_sum{{route=\"{name}\"}} {}",
                route.sum.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "totpd_http_request_duration_seconds_count{{route=\"{name}\"}} {count}"
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
        gauge(&mut out, "totpd_users", "gauge", "Users.", users);
        gauge(
            &mut out,
            "totpd_users_totp_active",
            "gauge",
            "Users with TOTP active.",
            totp_active,
        );
        gauge(
            &mut out,
            "totpd_store_flushes_total",
            "counter",
            "Group-commit flushes of the store.",
            stats.flushes,
        );
        gauge(
            &mut out,
            "totpd_store_acknowledged_writes_total",
            "counter",
            "Requests whose writes a flush made durable (per flush: the batching achieved).",
            stats.acknowledged_writes,
        );
        gauge(
            &mut out,
            "totpd_database_bytes",
            "gauge",
            "Bytes the database files take.",
            stats.bytes_on_disk,
        );
        if let Some(pool) = &stats.pool {
            for (name, kind, help, value) in [
                (
                    "totpd_db_pool_max_size",
                    "gauge",
                    "Connections the pool may open.",
                    pool.max_size,
                ),
                (
                    "totpd_db_pool_connections",
                    "gauge",
                    "Connections open.",
                    pool.size,
                ),
                (
                    "totpd_db_pool_idle",
                    "gauge",
                    "Open connections not in use.",
                    pool.available,
                ),
                (
                    "totpd_db_pool_waiting",
                    "gauge",
                    "Requests waiting for a connection.",
                    pool.waiting,
                ),
                (
                    "totpd_db_pool_timeouts_total",
                    "counter",
                    "Requests that got no connection in time (answered 503).",
                    pool.timeouts,
                ),
                (
                    "totpd_db_errors_total",
                    "counter",
                    "Store operations that failed in the database or its connection.",
                    pool.errors,
                ),
            ] {
                gauge(&mut out, name, kind, help, value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PoolStats;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let metrics = Metrics::new(["/api/v1/auth/totp/verify/", "/healthz"]);
        metrics.record_request("/api/v1/auth/totp/verify/", 200, Duration::from_micros(800));
        metrics.record_request("/api/v1/auth/totp/verify/", 200, Duration::from_millis(30));
        metrics.record_request("/api/v1/auth/totp/verify/", 400, Duration::from_millis(1));
        metrics.record_request("/wp-admin/", 404, Duration::from_micros(50));
        // Slower than the last bucket: only in +Inf.
        metrics.record_request("/wp-admin/", 404, Duration::from_secs(3));
        metrics.record_verify(VerifyOutcome::Replay);
        metrics.record_lockout();
        let text = metrics.render(&StoreStats {
            counts: Some((3, 2)),
            bytes_on_disk: 4096,
            flushes: 7,
            acknowledged_writes: 40,
            pool: Some(PoolStats {
                max_size: 16,
                size: 4,
                available: 3,
                waiting: 0,
                timeouts: 2,
                errors: 5,
            }),
        });
        for line in [
            "totpd_http_requests_total{route=\"/api/v1/auth/totp/verify/\",status=\"200\"} 2",
            "totpd_http_requests_total{route=\"/api/v1/auth/totp/verify/\",status=\"400\"} 1",
            "totpd_http_request_duration_seconds_bucket{route=\"/api/v1/auth/totp/verify/\",le=\"0.001\"} 2",
            "totpd_http_request_duration_seconds_bucket{route=\"/api/v1/auth/totp/verify/\",le=\"0.025\"} 2",
            "totpd_http_request_duration_seconds_bucket{route=\"/api/v1/auth/totp/verify/\",le=\"0.05\"} 3",
            "totpd_http_request_duration_seconds_count{route=\"/api/v1/auth/totp/verify/\"} 3",
            "totpd_http_requests_total{route=\"other\",status=\"404\"} 2",
            "totpd_http_request_duration_seconds_bucket{route=\"other\",le=\"0.0005\"} 1",
            "totpd_http_request_duration_seconds_bucket{route=\"other\",le=\"2.5\"} 1",
            "totpd_http_request_duration_seconds_bucket{route=\"other\",le=\"+Inf\"} 2",
            "totpd_verify_total{outcome=\"replay\"} 1",
            "totpd_verify_total{outcome=\"ok\"} 0",
            "totpd_lockouts_total 1",
            "totpd_users 3",
            "totpd_users_totp_active 2",
            "totpd_database_bytes 4096",
            "totpd_store_flushes_total 7",
            "totpd_store_acknowledged_writes_total 40",
            "totpd_db_pool_max_size 16",
            "totpd_db_pool_connections 4",
            "totpd_db_pool_idle 3",
            "totpd_db_pool_waiting 0",
            "totpd_db_pool_timeouts_total 2",
            "totpd_db_errors_total 5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
