//! What a run found, as a table on stdout, CSV files, a Markdown summary and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use crate::core::CoreResult;
use crate::load::Outcome;
use crate::pg::{PgbenchRun, Usage};
use crate::scenarios::Endpoint;
use crate::sled_only::Ops;

pub const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// The PostgreSQL store's rows: these endpoints at these concurrencies.
pub const PG_CONCURRENCY: [usize; 2] = [16, 64];
pub const PG_ENDPOINTS: [Endpoint; 3] =
    [Endpoint::VerifyValid, Endpoint::Status, Endpoint::Activate];

/// One endpoint at one concurrency on the PostgreSQL store, with `instances` servers.
pub struct PgRow {
    pub instances: usize,
    pub endpoint: Endpoint,
    pub concurrency: usize,
    pub outcome: Outcome,
    pub usage: Usage,
}

/// The PostgreSQL part of a run (`--store postgres`).
pub struct PgResults {
    pub version: String,
    /// Connections per server.
    pub pool_size: usize,
    pub pgbench_seconds: u64,
    /// Whether PostgreSQL runs here, so its CPU time was measured.
    pub db_cpu_measured: bool,
    pub rows: Vec<PgRow>,
    /// pgbench before and after the totpd rows.
    pub pgbench: Vec<PgbenchRun>,
}

impl PgResults {
    /// pgbench's transactions/s at `concurrency`: the mean of the runs before and after.
    pub fn pgbench_tps(&self, concurrency: usize) -> f64 {
        let tps: Vec<f64> = self
            .pgbench
            .iter()
            .filter(|run| run.concurrency == concurrency)
            .map(|run| run.tps)
            .collect();
        if tps.is_empty() {
            f64::NAN
        } else {
            tps.iter().sum::<f64>() / tps.len() as f64
        }
    }

    pub fn row(&self, instances: usize, endpoint: Endpoint, c: usize) -> Option<&PgRow> {
        self.rows
            .iter()
            .find(|r| r.instances == instances && r.endpoint == endpoint && r.concurrency == c)
    }
}

pub struct Row {
    pub endpoint: Endpoint,
    pub concurrency: usize,
    pub outcome: Outcome,
}

pub struct Memory {
    /// (VmHWM, VmRSS) in bytes.
    pub peak: u64,
    pub current: u64,
}

pub struct ScalePoint {
    pub users: u64,
    pub startup: Duration,
    pub after_start: Memory,
    pub after_load: Memory,
    pub verify: Outcome,
    /// The same verifies' store operations on sled alone (`sled_only::scale_verify`): the
    /// round with the median p99, and every round's p99 in ms, lowest first.
    pub alone: Outcome,
    pub alone_p99s: Vec<f64>,
    pub concurrency: usize,
    /// (apparent, allocated) bytes of the data dir.
    pub dir_bytes: (u64, u64),
}

pub struct Results {
    pub machine: String,
    pub command: String,
    pub argon2: String,
    /// Seconds one Argon2 verification takes here, and the logins/s the cores allow.
    pub argon2_seconds: f64,
    pub argon2_capacity: f64,
    pub preparation: Vec<String>,
    pub rows: Vec<Row>,
    /// The baseline and the bare warp references measured again after the endpoints:
    /// (reference, concurrency, requests/s), the drift check.
    pub again: Vec<(Endpoint, usize, f64)>,
    /// The store operations of one durable request on sled alone: (which, concurrency, outcome).
    pub sled_only: Vec<(Ops, usize, Outcome)>,
    /// Logins and verifies at the same time.
    pub mixed: Option<(usize, Outcome, usize, Outcome)>,
    /// The mixed scenario's ceiling: verify's store operations on sled alone at this
    /// concurrency while password checks saturate the hasher, and the Argon2 runs per second
    /// they completed (`sled_only::verify_beside_hashing`).
    pub mixed_ceiling: Option<(usize, Outcome, f64)>,
    pub core: Option<CoreResult>,
    pub idle_startup: Duration,
    pub idle: Memory,
    /// The same idle server with Argon2 at 64 KiB: how much of the idle peak the dummy hash
    /// computed at start-up accounts for.
    pub idle_cheap_argon2: Option<Memory>,
    /// /proc/loadavg when the run started and when it ended (other work on the machine).
    pub load: (String, String),
    pub scale: Vec<ScalePoint>,
    pub binary_bytes: u64,
    pub binary_note: String,
    pub skipped: Vec<String>,
    pub elapsed: Duration,
    pub postgres: Option<PgResults>,
}

pub const MIB: f64 = 1024.0 * 1024.0;

impl Results {
    pub fn row(&self, endpoint: Endpoint, concurrency: usize) -> Option<&Outcome> {
        self.rows
            .iter()
            .find(|r| r.endpoint == endpoint && r.concurrency == concurrency)
            .map(|r| &r.outcome)
    }

    /// A reference's requests/s at `concurrency` (the baseline or a bare warp route): the mean
    /// of the runs before and after the endpoints.
    pub fn reference_rps(&self, reference: Endpoint, concurrency: usize) -> f64 {
        let first = self
            .row(reference, concurrency)
            .map_or(f64::NAN, Outcome::rps);
        match self
            .again
            .iter()
            .find(|(e, c, _)| *e == reference && *c == concurrency)
        {
            Some((_, _, again)) => (first + again) / 2.0,
            None => first,
        }
    }

    /// The in-process baseline's requests/s at `concurrency`.
    pub fn baseline_rps(&self, concurrency: usize) -> f64 {
        self.reference_rps(Endpoint::Baseline, concurrency)
    }

    /// Requests/s of the bare warp route `endpoint` is compared with (GET for status).
    pub fn bare_rps(&self, endpoint: Endpoint, concurrency: usize) -> f64 {
        self.reference_rps(endpoint.reference(), concurrency)
    }

    fn baseline_ms(&self, concurrency: usize, q: f64) -> f64 {
        self.row(Endpoint::Baseline, concurrency)
            .map_or(f64::NAN, |o| o.ms(q))
    }

    pub fn sled_only(&self, ops: Ops, concurrency: usize) -> Option<&Outcome> {
        self.sled_only
            .iter()
            .find(|(o, c, _)| *o == ops && *c == concurrency)
            .map(|(_, _, outcome)| outcome)
    }

    pub fn scale_point(&self, users: u64) -> Option<&ScalePoint> {
        self.scale.iter().find(|p| p.users == users)
    }
}

fn ms(d: f64) -> String {
    if d.is_nan() {
        "-".into()
    } else if d >= 100.0 {
        format!("{d:.0}")
    } else if d >= 10.0 {
        format!("{d:.1}")
    } else {
        format!("{d:.2}")
    }
}

fn ratio(r: f64) -> String {
    if r.is_nan() {
        "-".into()
    } else if r >= 10.0 {
        format!("{r:.0}×")
    } else if r >= 0.1 {
        format!("{r:.2}×")
    } else {
        format!("{r:.3}×")
    }
}

fn rps(r: f64) -> String {
    format!("{r:.0}")
}

/// One target: what was measured against what was asked.
pub struct Target {
    pub name: String,
    pub measured: String,
    pub goal: String,
    pub met: Option<bool>,
}

impl Target {
    fn new(name: &str, measured: String, goal: &str, met: Option<bool>) -> Self {
        Self {
            name: name.into(),
            measured,
            goal: goal.into(),
            met,
        }
    }

    pub fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        }
    }
}

pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let at64 = |e: Endpoint| r.row(e, 64);
    for e in [
        Endpoint::VerifyValid,
        Endpoint::VerifyRecovery,
        Endpoint::VerifyWrong,
        Endpoint::Activate,
        Endpoint::Logout,
    ] {
        if let Some(o) = at64(e) {
            let share = o.rps() / r.bare_rps(e, 64);
            let p99 = o.ms(0.99);
            let ceiling = sled_counterpart(e)
                .and_then(|ops| r.sled_only(ops, 64))
                .map_or(String::new(), |s| {
                    format!(
                        "; sled alone (its store operations, group commit, fdatasync): {} req/s = {} of bare warp, p99 {} ms; the endpoint reaches {} of it",
                        rps(s.rps()),
                        ratio(s.rps() / r.bare_rps(e, 64)),
                        ms(s.ms(0.99)),
                        ratio(o.rps() / s.rps())
                    )
                });
            t.push(Target::new(
                &format!("{} (durable) at c=64 vs bare warp POST", e.name()),
                format!(
                    "{} req/s = {}, p99 {} ms{ceiling}",
                    rps(o.rps()),
                    ratio(share),
                    ms(p99)
                ),
                "≥ 0.50×, p99 < 5 ms",
                Some(share >= 0.5 && p99 < 5.0),
            ));
        }
    }
    for (e, goal, min) in [
        (Endpoint::Status, "≥ 0.80×", 0.8),
        (Endpoint::Setup, "≥ 0.50×", 0.5),
    ] {
        if let Some(o) = at64(e) {
            let share = o.rps() / r.bare_rps(e, 64);
            let status_ceiling = (e == Endpoint::Status)
                .then(|| r.row(Endpoint::StatusCeiling, 64))
                .flatten();
            let no_log = r.row(Endpoint::StatusCeilingNoLog, 64);
            let ceiling = sled_counterpart(e)
                .and_then(|ops| r.sled_only(ops, 64))
                .map_or(String::new(), |s| {
                    format!(
                        "; sled alone (its store operations, group commit, fdatasync): {} req/s = {} of bare warp; the endpoint reaches {} of it",
                        rps(s.rps()),
                        ratio(s.rps() / r.bare_rps(e, 64)),
                        ratio(o.rps() / s.rps())
                    )
                });
            t.push(Target::new(
                &format!(
                    "{} at c=64 vs bare warp {}",
                    e.name(),
                    if e == Endpoint::Status { "GET" } else { "POST" }
                ),
                format!(
                    "{} req/s = {}{ceiling}{}",
                    rps(o.rps()),
                    ratio(share),
                    status_ceiling.map_or(String::new(), |c| format!(
                        "; its ceiling (warp, its two sled reads and its log line, no totpd pipeline): {} req/s = {} of bare warp{}; the endpoint reaches {} of it",
                        rps(c.rps()),
                        ratio(c.rps() / r.bare_rps(e, 64)),
                        no_log.map_or(String::new(), |n| format!(
                            " (without the log line {} req/s = {})",
                            rps(n.rps()),
                            ratio(n.rps() / r.bare_rps(e, 64))
                        )),
                        ratio(o.rps() / c.rps())
                    ))
                ),
                goal,
                Some(share >= min),
            ));
        }
    }
    if let Some((lc, login, vc, verify)) = &r.mixed {
        t.push(Target::new(
            &format!("verify p99 while logins saturate (c={vc} verify + c={lc} login)"),
            format!(
                "{} ms ({} logins/s = {} of Argon2 capacity){}",
                ms(verify.ms(0.99)),
                rps(login.rps()),
                ratio(login.rps() / r.argon2_capacity),
                r.mixed_ceiling
                    .as_ref()
                    .map_or(String::new(), |(c, o, hashes)| format!(
                        "; sled alone (verify's store operations at c={c}, no HTTP) beside \
                         {hashes:.0} Argon2 runs/s on the server's hasher: p99 {} ms, {} req/s",
                        ms(o.ms(0.99)),
                        rps(o.rps())
                    ))
            ),
            "< 10 ms",
            Some(verify.ms(0.99) < 10.0),
        ));
    }
    if let Some(pg) = &r.postgres {
        let reference = pg.pgbench_tps(64);
        for instances in [1, 2] {
            let Some(row) = pg.row(instances, Endpoint::VerifyValid, 64) else {
                continue;
            };
            let (o, servers) = (&row.outcome, plural(instances, "server"));
            let share = o.rps() / reference;
            t.push(Target::new(
                &format!("PostgreSQL, {servers}: verify (valid code) req/s at c=64 vs pgbench"),
                format!(
                    "{} req/s vs {} tps = {}",
                    rps(o.rps()),
                    rps(reference),
                    ratio(share)
                ),
                "≥ 0.50×",
                Some(share >= 0.5),
            ));
            t.push(Target::new(
                &format!("PostgreSQL, {servers}: verify (valid code) p99 at c=64"),
                format!("{} ms", ms(o.ms(0.99))),
                "< 20 ms",
                Some(o.ms(0.99) < 20.0),
            ));
        }
    }
    if let Some(c) = &r.core {
        for (label, totpd, rs, _) in c.rows() {
            t.push(Target::new(
                &format!("TOTP core vs totp-rs, {label}"),
                format!("{totpd:.0} ns vs {rs:.0} ns = {}", ratio(totpd / rs)),
                "≤ 1.00×",
                Some(totpd / rs <= 1.0),
            ));
        }
    }
    t.push(Target::new(
        "idle peak RSS (VmHWM)",
        format!(
            "{:.1} MiB (now {:.1} MiB)",
            r.idle.peak as f64 / MIB,
            r.idle.current as f64 / MIB
        ),
        "< 20 MiB",
        (r.idle.peak > 0).then_some((r.idle.peak as f64) < 20.0 * MIB),
    ));
    let million = r.scale_point(1_000_000);
    t.push(Target::new(
        "peak RSS with 1 000 000 users (after verify load)",
        million.map_or("-".into(), |p| {
            format!("{:.1} MiB", p.after_load.peak as f64 / MIB)
        }),
        "< 128 MiB",
        million.map(|p| (p.after_load.peak as f64) < 128.0 * MIB),
    ));
    t.push(Target::new(
        "start-up to first answer with 1 000 000 users",
        million.map_or("-".into(), |p| {
            format!("{:.0} ms", p.startup.as_secs_f64() * 1e3)
        }),
        "< 1 s",
        million.map(|p| p.startup < Duration::from_secs(1)),
    ));
    let small = r.scale_point(1_000);
    let scale_ratio = match (small, million) {
        (Some(s), Some(m)) => m.verify.ms(0.99) / s.verify.ms(0.99),
        _ => f64::NAN,
    };
    t.push(Target::new(
        "verify p99 at 1 000 000 users vs 1 000",
        match (small, million) {
            (Some(s), Some(m)) => format!(
                "{} ms vs {} ms = {} (sled alone, median of {} rounds: {} ms vs {} ms = {}; rounds {} ms vs {} ms)",
                ms(m.verify.ms(0.99)),
                ms(s.verify.ms(0.99)),
                ratio(scale_ratio),
                m.alone_p99s.len(),
                ms(m.alone.ms(0.99)),
                ms(s.alone.ms(0.99)),
                ratio(m.alone.ms(0.99) / s.alone.ms(0.99)),
                m.alone_p99s.iter().map(|&v| ms(v)).collect::<Vec<_>>().join(" / "),
                s.alone_p99s.iter().map(|&v| ms(v)).collect::<Vec<_>>().join(" / "),
            ),
            _ => "-".into(),
        },
        "≤ 2.00×",
        (!scale_ratio.is_nan()).then_some(scale_ratio <= 2.0),
    ));
    t
}

fn optional(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn optional2(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.0} %", v * 100.0))
}

/// The PostgreSQL table (`--store postgres`): pgbench's one-row UPDATE, then each endpoint on
/// sled, on PostgreSQL with one server and with two, every rate also as a share of pgbench's
/// transactions/s at the same concurrency.
pub fn postgres_table(r: &Results) -> String {
    let Some(pg) = &r.postgres else {
        return String::new();
    };
    let mut s = String::from(
        "| store | endpoint | c | req/s | × pgbench | p50 ms | p99 ms | p99.9 ms | errors | requests | totpd CPU µs/req | PostgreSQL CPU µs/req | write xacts/req | WAL B/req | machine busy |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for (i, run) in pg.pgbench.iter().enumerate() {
        let when = if i < PG_CONCURRENCY.len() {
            "before"
        } else {
            "after"
        };
        let u = &run.usage;
        let _ = writeln!(
            s,
            "| pgbench ({when}) | one-row UPDATE | {} | {} | {} | {} | {} | {} | {} | {} | - | {} | {} | {} | {} |",
            run.concurrency,
            rps(run.tps),
            ratio(run.tps / pg.pgbench_tps(run.concurrency)),
            ms(run.ms(0.5)),
            ms(run.ms(0.99)),
            ms(run.ms(0.999)),
            run.failed,
            run.transactions,
            optional(u.db_cpu_us),
            optional2(u.xacts),
            optional(u.wal_bytes),
            percent(u.busy),
        );
    }
    let mut line = |store: &str, e: Endpoint, c: usize, o: &Outcome, u: Option<&Usage>| {
        let exhausted = if o.exhausted { " ¹" } else { "" };
        let _ = writeln!(
            s,
            "| {store} | {} | {c} | {} | {} | {} | {} | {} | {} | {}{exhausted} | {} | {} | {} | {} | {} |",
            e.name(),
            rps(o.rps()),
            ratio(o.rps() / pg.pgbench_tps(c)),
            ms(o.ms(0.5)),
            ms(o.ms(0.99)),
            ms(o.ms(0.999)),
            o.errors(),
            o.requests,
            optional(o.server_cpu_us),
            optional(u.and_then(|u| u.db_cpu_us)),
            optional2(u.and_then(|u| u.xacts)),
            optional(u.and_then(|u| u.wal_bytes)),
            percent(u.and_then(|u| u.busy)),
        );
    };
    for e in PG_ENDPOINTS {
        for c in PG_CONCURRENCY {
            if let Some(o) = r.row(e, c) {
                line("sled", e, c, o, None);
            }
            for instances in [1, 2] {
                if let Some(row) = pg.row(instances, e, c) {
                    let store = format!("postgres, {}", plural(instances, "server"));
                    line(&store, e, c, &row.outcome, Some(&row.usage));
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "\nPostgreSQL {} on the same machine, `synchronous_commit` on; {} pooled connections per \
         totpd server (two servers: the load split evenly between them, totpd CPU is both \
         together); pgbench: `{}` (and c=16) on a {}-row table, one client thread like the \
         harness, × pgbench uses the mean of its runs before and after. PostgreSQL CPU: the \
         postmaster and all its processes{}; write xacts: transaction ids taken (read-only \
         transactions take none); machine busy: all cores, load generator and everything else \
         included.",
        pg.version,
        pg.pool_size,
        crate::pg::pgbench_command(64, pg.pgbench_seconds),
        crate::pg::PGBENCH_ROWS,
        if pg.db_cpu_measured {
            ""
        } else {
            " (not measured: the database is not on this machine)"
        },
    );
    s
}

/// The endpoint table as Markdown (also printed).
pub fn endpoint_table(r: &Results) -> String {
    let mut s = String::from(
        "| endpoint | c | req/s | × baseline | × bare warp | pipeline ² | p50 ms | p99 ms | p99.9 ms | p99 × baseline | errors | requests | server CPU µs/req | written B/req |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut line = |name: &str, endpoint: Endpoint, c: usize, o: &Outcome| {
        let exhausted = if o.exhausted { " ¹" } else { "" };
        let (base, bare) = (
            o.rps() / r.baseline_rps(c),
            o.rps() / r.bare_rps(endpoint, c),
        );
        let _ = writeln!(
            s,
            "| {name} | {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{exhausted} | {} | {} |",
            rps(o.rps()),
            ratio(base),
            ratio(bare),
            ratio(base - bare),
            ms(o.ms(0.5)),
            ms(o.ms(0.99)),
            ms(o.ms(0.999)),
            ratio(o.ms(0.99) / r.baseline_ms(c, 0.99)),
            o.errors(),
            o.requests,
            optional(o.server_cpu_us),
            optional(o.server_write_bytes),
        );
    };
    for row in &r.rows {
        line(
            row.endpoint.name(),
            row.endpoint,
            row.concurrency,
            &row.outcome,
        );
    }
    if let Some((lc, login, vc, verify)) = &r.mixed {
        line("login, with verify alongside", Endpoint::Login, *lc, login);
        line(
            "verify_valid, with logins alongside",
            Endpoint::VerifyValid,
            *vc,
            verify,
        );
    }
    s
}

/// The sled-only operations that match an endpoint (verify with a recovery code does the same
/// operations as with a valid code, plus one audit event; activate the same as setup).
fn sled_counterpart(e: Endpoint) -> Option<Ops> {
    match e {
        Endpoint::VerifyValid | Endpoint::VerifyRecovery => Some(Ops::VerifyValid),
        Endpoint::VerifyWrong => Some(Ops::VerifyWrong),
        Endpoint::Logout => Some(Ops::Logout),
        // activate does what setup does to the store: the key and the user read, one
        // compare-and-swap of the user, one event.
        Endpoint::Setup | Endpoint::Activate => Some(Ops::Setup),
        _ => None,
    }
}

pub fn other_tables(r: &Results) -> String {
    let mut s = String::new();
    if !r.sled_only.is_empty() {
        let _ = writeln!(
            s,
            "The store operations of one durable request on sled alone (same sled config, \
             totpd's group commit with a real fdatasync, same concurrency, no HTTP; a runtime \
             with one worker per core; CPU is the harness process's):\n\n\
             | operations of | what | c | req/s | × bare warp POST | p50 ms | p99 ms | CPU µs/req | written B/req | endpoint req/s | endpoint ÷ sled alone |\n\
             |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
        );
        for (ops, c, o) in &r.sled_only {
            let endpoint = match ops {
                Ops::VerifyValid => Endpoint::VerifyValid,
                Ops::VerifyWrong => Endpoint::VerifyWrong,
                Ops::Logout => Endpoint::Logout,
                Ops::Setup => Endpoint::Setup,
            };
            let e = r.row(endpoint, *c).map_or(f64::NAN, Outcome::rps);
            let _ = writeln!(
                s,
                "| {} | {} | {c} | {} | {} | {} | {} | {} | {} | {} | {} |",
                ops.name(),
                ops.describe(),
                rps(o.rps()),
                ratio(o.rps() / r.reference_rps(Endpoint::BarePost, *c)),
                ms(o.ms(0.5)),
                ms(o.ms(0.99)),
                optional(o.server_cpu_us),
                optional(o.server_write_bytes),
                rps(e),
                ratio(e / o.rps()),
            );
        }
        s.push('\n');
    }
    if let Some((c, o, hashes)) = &r.mixed_ceiling {
        let _ = writeln!(
            s,
            "verify's store operations on sled alone at c={c} while password checks saturate \
             the server's own hasher ({hashes:.0} Argon2 runs/s, its threads at the server's \
             background priority): {} req/s, p50 {} ms, p99 {} ms, p99.9 {} ms, CPU {} µs/req \
             (the ceiling of verify beside logins)\n",
            rps(o.rps()),
            ms(o.ms(0.5)),
            ms(o.ms(0.99)),
            ms(o.ms(0.999)),
            optional(o.server_cpu_us),
        );
    }
    if let Some(c) = &r.core {
        let _ = writeln!(
            s,
            "TOTP verification (±1 step, criterion median per call):\n\n\
             | case | totpd | totp-rs | totpd ÷ totp-rs | proposed change | proposed ÷ totp-rs |\n\
             |---|--:|--:|--:|--:|--:|"
        );
        for (label, totpd, rs, proposed) in c.rows() {
            let _ = writeln!(
                s,
                "| {label} | {totpd:.0} ns | {rs:.0} ns | {} | {proposed:.0} ns | {} |",
                ratio(totpd / rs),
                ratio(proposed / rs)
            );
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Memory, size and scale (verify with valid codes, each user drawn at random from all):\n\n\
         | users | start-up to first answer | RSS after start (peak) | verify c | verify req/s | verify p50 ms | verify p99 ms | p99 × 1 000-user p99 | sled alone req/s | sled alone p99 ms (median of rounds) | its p99 × 1 000-user | peak RSS after verify | data dir | bytes/user |\n\
         |--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    let _ = writeln!(
        s,
        "| 0 (idle) | {:.0} ms | {:.1} MiB ({:.1} MiB) | - | - | - | - | - | - | - | - | - | - | - |",
        r.idle_startup.as_secs_f64() * 1e3,
        r.idle.current as f64 / MIB,
        r.idle.peak as f64 / MIB
    );
    if let Some(m) = &r.idle_cheap_argon2 {
        let _ = writeln!(
            s,
            "| 0 (idle, Argon2 m=64 KiB: diagnostic) | - | {:.1} MiB ({:.1} MiB) | - | - | - | - | - | - | - | - | - | - | - |",
            m.current as f64 / MIB,
            m.peak as f64 / MIB
        );
    }
    let small = r.scale_point(1_000);
    let small_p99 = small.map_or(f64::NAN, |p| p.verify.ms(0.99));
    let small_alone_p99 = small.map_or(f64::NAN, |p| p.alone.ms(0.99));
    for p in &r.scale {
        let _ = writeln!(
            s,
            "| {} | {:.0} ms | {:.1} MiB ({:.1} MiB) | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.0} |",
            p.users,
            p.startup.as_secs_f64() * 1e3,
            p.after_start.current as f64 / MIB,
            p.after_start.peak as f64 / MIB,
            p.concurrency,
            rps(p.verify.rps()),
            ms(p.verify.ms(0.5)),
            ms(p.verify.ms(0.99)),
            ratio(p.verify.ms(0.99) / small_p99),
            rps(p.alone.rps()),
            ms(p.alone.ms(0.99)),
            ratio(p.alone.ms(0.99) / small_alone_p99),
            p.after_load.peak as f64 / MIB,
            p.dir_bytes.1 as f64 / MIB,
            p.dir_bytes.1 as f64 / p.users as f64,
        );
    }
    let _ = writeln!(
        s,
        "\ntotpd binary: {:.2} MiB ({})",
        r.binary_bytes as f64 / MIB,
        r.binary_note
    );
    s
}

pub fn targets_table(r: &Results) -> String {
    let mut s = String::from("| target | measured | goal | verdict |\n|---|---|---|---|\n");
    for t in targets(r) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.name,
            t.measured,
            t.goal,
            t.verdict()
        );
    }
    s
}

/// The whole summary in Markdown: `results.md`, which BENCHMARKS.md quotes.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# totpd-bench results\n");
    let _ = writeln!(s, "- machine: {}", r.machine);
    let _ = writeln!(
        s,
        "- load average (1, 5, 15 min) at the start: {}; at the end: {}",
        r.load.0, r.load.1
    );
    let _ = writeln!(s, "- command: `{}`", r.command);
    let _ = writeln!(
        s,
        "- server Argon2id: {} (one verification takes {:.1} ms here: at most {:.0} logins/s on the hash pool)",
        r.argon2,
        r.argon2_seconds * 1e3,
        r.argon2_capacity
    );
    for p in &r.preparation {
        let _ = writeln!(s, "- {p}");
    }
    for skipped in &r.skipped {
        let _ = writeln!(s, "- skipped: {skipped}");
    }
    let _ = writeln!(s, "- run time: {:.0} s\n", r.elapsed.as_secs_f64());
    let _ = writeln!(s, "{}", endpoint_table(r));
    let drift: Vec<String> = r
        .again
        .iter()
        .map(|(e, c, again)| {
            let first = r.row(*e, *c).map_or(f64::NAN, Outcome::rps);
            format!(
                "{} c={c}: {} then {} req/s",
                e.name(),
                rps(first),
                rps(*again)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "Ratios use each reference's mean of a run before and a run after the endpoints ({}). \
         × bare warp: against the separate minimal warp process (`bare-warp`), GET for status, \
         POST with the same JSON body for every other endpoint. \
         ¹ prepared data ran out before the window ended; the rate is over the time it lasted. \
         ² × baseline − × bare warp: how much of the ratio the in-process baseline hides, the \
         cost of totpd's request pipeline (connection handling, request id, metrics, log line, \
         filters) that the baseline pays too.\n",
        drift.join("; ")
    );
    if r.postgres.is_some() {
        let _ = writeln!(s, "## PostgreSQL store\n\n{}", postgres_table(r));
    }
    let _ = writeln!(s, "{}", other_tables(r));
    let _ = writeln!(s, "## Targets\n\n{}", targets_table(r));
    s
}

pub fn endpoints_csv(r: &Results) -> String {
    let mut s = String::from(
        "endpoint,route,concurrency,durable,requests,seconds,rps,rps_vs_baseline,rps_vs_bare_warp,p50_ms,p99_ms,p999_ms,p50_vs_baseline,p99_vs_baseline,p999_vs_baseline,errors,data_ran_out,server_cpu_us_per_request,server_bytes_written_per_request\n",
    );
    let mut line = |name: &str, endpoint: Endpoint, c: usize, durable: bool, o: &Outcome| {
        let route = endpoint.route();
        let _ = writeln!(
            s,
            "{name},{route},{c},{durable},{},{:.3},{:.1},{:.4},{:.4},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{}",
            o.requests,
            o.seconds,
            o.rps(),
            o.rps() / r.baseline_rps(c),
            o.rps() / r.bare_rps(endpoint, c),
            o.ms(0.5),
            o.ms(0.99),
            o.ms(0.999),
            o.ms(0.5) / r.baseline_ms(c, 0.5),
            o.ms(0.99) / r.baseline_ms(c, 0.99),
            o.ms(0.999) / r.baseline_ms(c, 0.999),
            o.errors(),
            o.exhausted,
            o.server_cpu_us.map_or(String::new(), |v| format!("{v:.1}")),
            o.server_write_bytes
                .map_or(String::new(), |v| format!("{v:.0}")),
        );
    };
    for row in &r.rows {
        line(
            row.endpoint.name(),
            row.endpoint,
            row.concurrency,
            row.endpoint.durable(),
            &row.outcome,
        );
    }
    if let Some((lc, login, vc, verify)) = &r.mixed {
        line("login_with_verify", Endpoint::Login, *lc, true, login);
        line(
            "verify_valid_with_logins",
            Endpoint::VerifyValid,
            *vc,
            true,
            verify,
        );
    }
    s
}

pub fn summary_csv(r: &Results) -> String {
    let mut s = String::from("metric,value,unit\n");
    let mut put = |metric: &str, value: f64, unit: &str| {
        let _ = writeln!(s, "{metric},{value:.3},{unit}");
    };
    put("argon2_verify", r.argon2_seconds * 1e3, "ms");
    put("argon2_capacity", r.argon2_capacity, "logins/s");
    if let Some(c) = &r.core {
        put("totp_verify_valid_totpd", c.totpd_valid, "ns");
        put("totp_verify_valid_totp_rs", c.totp_rs_valid, "ns");
        put("totp_verify_valid_proposed", c.proposed_valid, "ns");
        put("totp_verify_wrong_totpd", c.totpd_wrong, "ns");
        put("totp_verify_wrong_totp_rs", c.totp_rs_wrong, "ns");
        put("totp_verify_wrong_proposed", c.proposed_wrong, "ns");
    }
    put("idle_startup", r.idle_startup.as_secs_f64() * 1e3, "ms");
    put("idle_vmhwm", r.idle.peak as f64 / MIB, "MiB");
    put("idle_vmrss", r.idle.current as f64 / MIB, "MiB");
    for p in &r.scale {
        let u = p.users;
        put(
            &format!("users_{u}_startup"),
            p.startup.as_secs_f64() * 1e3,
            "ms",
        );
        put(
            &format!("users_{u}_vmrss_after_start"),
            p.after_start.current as f64 / MIB,
            "MiB",
        );
        put(
            &format!("users_{u}_vmhwm_after_verify"),
            p.after_load.peak as f64 / MIB,
            "MiB",
        );
        put(&format!("users_{u}_verify_rps"), p.verify.rps(), "req/s");
        put(&format!("users_{u}_verify_p50"), p.verify.ms(0.5), "ms");
        put(&format!("users_{u}_verify_p99"), p.verify.ms(0.99), "ms");
        put(
            &format!("users_{u}_sled_alone_verify_rps"),
            p.alone.rps(),
            "req/s",
        );
        put(
            &format!("users_{u}_sled_alone_verify_p99"),
            p.alone.ms(0.99),
            "ms",
        );
        put(
            &format!("users_{u}_verify_errors"),
            p.verify.errors() as f64,
            "",
        );
        put(
            &format!("users_{u}_data_dir"),
            p.dir_bytes.1 as f64 / MIB,
            "MiB",
        );
        put(
            &format!("users_{u}_bytes_per_user"),
            p.dir_bytes.1 as f64 / u as f64,
            "B",
        );
    }
    put("binary_size", r.binary_bytes as f64 / MIB, "MiB");
    s
}

/// One endpoint at one concurrency, as charted.
struct Point {
    concurrency: f64,
    rps: f64,
    p99: f64,
}

/// requests/s and p99 against concurrency, one line per endpoint, the baseline in black.
pub fn chart(r: &Results, path: &Path) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    let series: Vec<(Endpoint, Vec<Point>)> = Endpoint::ALL
        .iter()
        .map(|&endpoint| {
            let points = CONCURRENCY
                .iter()
                .filter_map(|&c| {
                    let rps = if matches!(
                        endpoint,
                        Endpoint::Baseline | Endpoint::BareGet | Endpoint::BarePost
                    ) {
                        r.reference_rps(endpoint, c)
                    } else {
                        r.row(endpoint, c)?.rps()
                    };
                    let p99 = r.row(endpoint, c)?.ms(0.99);
                    Some(Point {
                        concurrency: c as f64,
                        rps,
                        p99,
                    })
                })
                .collect();
            (endpoint, points)
        })
        .collect();
    let bounds = |pick: &dyn Fn(&Point) -> f64| {
        let values = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(pick))
            .filter(|v| v.is_finite() && *v > 0.0);
        let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if lo > hi {
            (0.1, 10.0)
        } else {
            (lo / 2.0, hi * 2.0)
        }
    };
    let root = SVGBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let root = root
        .titled(
            &format!(
                "totpd: requests/s and p99 latency against concurrency ({})",
                r.machine
            ),
            ("sans-serif", 18),
        )
        .map_err(e)?;
    let (left, right) = root.split_horizontally(600);
    for (i, area) in [left, right].into_iter().enumerate() {
        let pick = |p: &Point| if i == 0 { p.rps } else { p.p99 };
        let label = if i == 0 {
            "requests/s (log)"
        } else {
            "p99 latency, ms (log)"
        };
        let (lo, hi) = bounds(&pick);
        let mut chart = ChartBuilder::on(&area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.8f64..90f64).log_scale(), (lo..hi).log_scale())
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("concurrency (connections)")
            .y_desc(label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 10.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()
            .map_err(e)?;
        for (n, (endpoint, points)) in series.iter().enumerate() {
            let color = if *endpoint == Endpoint::Baseline {
                BLACK.to_rgba()
            } else {
                Palette99::pick(n).to_rgba()
            };
            let width = if *endpoint == Endpoint::Baseline {
                3
            } else {
                2
            };
            let xy: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.concurrency, pick(p)))
                .filter(|p| p.1.is_finite() && p.1 > 0.0)
                .collect();
            let drawn = chart
                .draw_series(LineSeries::new(xy.clone(), color.stroke_width(width)))
                .map_err(e)?;
            if i == 1 {
                drawn.label(endpoint.name()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
                });
            }
            chart
                .draw_series(xy.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(e)?;
        }
        if i == 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}
