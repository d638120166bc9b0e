//! `totpd-bench`: starts the real `totpd` on temporary data dirs, prepares users itself, drives
//! HTTP load over loopback with many keep-alive connections, and reports every endpoint against
//! a constant-answer baseline route measured in the same run on the same server. See
//! BENCHMARKS.md for what it measures and the latest figures.
//!
//! Run it with `cargo run --release -p totpd-bench -- --quick` (about two
//! minutes) or without `--quick` (under ten). Nothing in `cargo test` depends on it.

mod core;
mod load;
mod pg;
mod report;
mod scenarios;
mod seed;
mod server;
mod sled_only;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use totpd::service::password::Argon2Settings;

use crate::load::Timing;
use crate::report::{CONCURRENCY, Memory, Results, Row, ScalePoint};
use crate::scenarios::Endpoint;
use crate::seed::{MainData, MainPlan, SeedTarget, Seeder};
use crate::server::{Reference, Server};

#[derive(Debug, Parser)]
#[command(
    name = "totpd-bench",
    about = "Benchmarks totpd over real HTTP against a baseline route measured in the same run"
)]
struct Args {
    /// Shorter scenarios and no 1 000 000-user data dir (about 2 minutes instead of 10)
    #[arg(long)]
    quick: bool,
    /// Where the CSV files, the SVG chart and results.md go
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    out: PathBuf,
    /// The totpd binary to test (built with --features bench) [default: the totpd next to this
    /// binary, which `cargo run` first brings up to date]
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,
    /// Threads of the load generator's runtime
    #[arg(long, value_name = "N", default_value_t = 1)]
    client_threads: usize,
    /// Where the temporary data dirs go [default: the system's temp dir]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the data dirs and server logs after the run
    #[arg(long)]
    keep: bool,
    /// Skip the criterion benchmark of the TOTP core
    #[arg(long)]
    skip_core: bool,
    /// Skip the endpoint scenarios
    #[arg(long)]
    skip_endpoints: bool,
    /// Skip the idle, memory, start-up and scale measurements
    #[arg(long)]
    skip_scale: bool,
    /// Measure only these endpoints (comma-separated names from the table; the baseline always
    /// runs). `mixed` names logins and verifies together, which also run when both `login` and
    /// `verify_valid` are named
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    only: Vec<String>,
    /// `postgres`: also run status, activate and verify (valid code) at c=16 and 64 on the
    /// PostgreSQL store, with one server and with two on the same database, beside the sled
    /// rows and against `pgbench` running a one-row UPDATE on that database
    #[arg(long, value_enum, default_value_t = StoreArg::Sled)]
    store: StoreArg,
    /// The PostgreSQL database for `--store postgres` (a schema of its own is created in it for
    /// the run and dropped at the end); its role needs CREATE on the database
    #[arg(long, value_name = "URL", required_if_eq("store", "postgres"))]
    database_url: Option<String>,
    /// `database_pool_size` of the PostgreSQL servers [default: the server's default]
    #[arg(long, value_name = "N")]
    database_pool_size: Option<usize>,
    /// The pgbench binary [default: pgbench on PATH, else the newest under
    /// /usr/lib/postgresql/*/bin]
    #[arg(long, value_name = "PATH")]
    pgbench: Option<PathBuf>,
}

/// The logins and the verifies of the verify-beside-logins scenario, at once.
const MIXED_LOGIN_CONCURRENCY: usize = 16;
const MIXED_VERIFY_CONCURRENCY: usize = 16;

/// How many times each scale point's verifies run on sled alone.
const SCALE_ALONE_ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreArg {
    Sled,
    Postgres,
}

/// The command line of this run, for the report, with any database password hidden.
fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if a.contains("://") || a.contains("password=") {
                totpd::store::postgres::redact_url(&a)
            } else {
                a
            }
        })
        .collect();
    if args.is_empty() {
        "cargo run --release -p totpd-bench".into()
    } else {
        format!("cargo run --release -p totpd-bench -- {}", args.join(" "))
    }
}

/// How long and how big: `--quick` or the full run.
struct Plan {
    timing: Timing,
    mixed: Timing,
    /// Durable writes before the endpoint scenarios, not recorded.
    settle: Timing,
    main: MainPlan,
    /// What the PostgreSQL store gets: status keys, activations and verifies only.
    postgres: MainPlan,
    /// Seconds of each pgbench run.
    pgbench_seconds: u64,
    scale: Vec<u64>,
    /// Verifies per scale point, at `scale_concurrency`.
    scale_requests: usize,
    scale_concurrency: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let f = if quick { 1 } else { 3 };
        Self {
            timing: Timing {
                warmup: Duration::from_millis(if quick { 250 } else { 500 }),
                measure: Duration::from_millis(if quick { 1000 } else { 3000 }),
            },
            settle: Timing {
                warmup: Duration::ZERO,
                measure: Duration::from_secs(if quick { 2 } else { 4 }),
            },
            mixed: Timing {
                warmup: Duration::from_millis(500),
                measure: Duration::from_secs(if quick { 2 } else { 5 }),
            },
            main: MainPlan {
                per_worker: 64,
                setup: 30_000 * f,
                activate: 60_000 * f,
                valid_users: 20_000 * f,
                valid_per_user: 3,
                recovery_users: 6_000 * f,
                wrong_tokens: 15_000 * f,
                logout: 60_000 * f,
            },
            postgres: MainPlan {
                per_worker: 64,
                activate: 20_000 * f,
                valid_users: 12_000 * f,
                valid_per_user: 3,
                ..MainPlan::default()
            },
            pgbench_seconds: if quick { 3 } else { 5 },
            scale: if quick {
                vec![1_000, 100_000]
            } else {
                vec![1_000, 100_000, 1_000_000]
            },
            scale_requests: 3_000,
            scale_concurrency: 16,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("totpd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(String::new(), |kib| {
            format!(", {:.0} GiB RAM", kib / 1024.0 / 1024.0)
        });
    format!("{cores} cores, {model}{mem}, Linux")
}

/// The profile directory this binary was built into, and the cargo flag that selects it.
fn profile_of(exe_dir: &Path) -> (String, Vec<String>) {
    let name = exe_dir
        .file_name()
        .map_or("debug".into(), |n| n.to_string_lossy().into_owned());
    let flags = match name.as_str() {
        "debug" => vec![],
        "release" => vec!["--release".into()],
        other => vec!["--profile".into(), other.into()],
    };
    (name, flags)
}

/// The server binary: `--server`, else the `totpd` next to this binary. `cargo run --bin
/// totpd-bench` builds only this binary, so when cargo started us, we ask it to bring `totpd` up
/// to date too, with the same profile, features and target dir.
fn server_binary(args: &Args) -> Result<(PathBuf, String), String> {
    if let Some(path) = &args.server {
        return Ok((path.clone(), "given with --server".into()));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no directory for this binary")?;
    let (profile, flags) = profile_of(dir);
    let bin = dir.join("totpd");
    if let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) {
        let target_dir = dir.parent().ok_or("no target dir")?;
        eprintln!("building totpd (profile {profile}, --features bench) with cargo …");
        let status = Command::new(cargo)
            .current_dir(manifest)
            .args([
                "build",
                "-p",
                "totpd",
                "-p",
                "totpd-bench",
                "--features",
                "totpd/bench",
                "--bin",
                "totpd",
                "--bin",
                "bare-warp",
            ])
            .args(&flags)
            .arg("--target-dir")
            .arg(target_dir)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err("building totpd failed".into());
        }
    }
    if !bin.exists() {
        return Err(format!(
            "{} does not exist: build it with `cargo build --release --features bench` or pass --server",
            bin.display()
        ));
    }
    Ok((bin, format!("profile {profile}, features bench")))
}

/// The `bare-warp` next to this binary (`cargo run` built it with `totpd`, see `server_binary`).
fn bare_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .ok_or("no directory for this binary")?
        .join("bare-warp");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} does not exist: build it with `cargo build --release -p totpd-bench`",
            bin.display()
        ))
    }
}

/// Median seconds of one Argon2 run with `settings` on this machine.
fn argon2_seconds(settings: Argon2Settings) -> Result<f64, String> {
    let hasher =
        totpd::service::password::PasswordHasher::new(settings, 1).map_err(|e| e.to_string())?;
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let _ = hasher.hash_now(seed::PASSWORD);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// The first three fields of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn memory(server: &Server) -> Memory {
    let (peak, current) = server.memory();
    Memory { peak, current }
}

fn progress(label: &str, o: &load::Outcome) {
    eprintln!(
        "  {label:<28} {:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  server CPU {:>5.0} µs/req  writes {:>6.0} B/req  errors {}{}",
        o.rps(),
        o.ms(0.5),
        o.ms(0.99),
        o.ms(0.999),
        o.server_cpu_us.unwrap_or(f64::NAN),
        o.server_write_bytes.unwrap_or(f64::NAN),
        o.errors(),
        if o.exhausted { "  (data ran out)" } else { "" }
    );
    for sample in &o.samples {
        eprintln!("    {sample}");
    }
}

/// What every phase needs.
struct Bench<'a> {
    args: &'a Args,
    plan: Plan,
    bin: PathBuf,
    /// The external reference, `bare-warp`, built next to this binary.
    bare: PathBuf,
    env: Vec<(String, String)>,
    work: PathBuf,
    hash: String,
    runtime: tokio::runtime::Runtime,
}

fn run(args: &Args) -> Result<(), String> {
    let (bin, binary_note) = server_binary(args)?;
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("totpd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    std::fs::write(work.join("empty.toml"), "").map_err(|e| e.to_string())?;

    let argon2 = Argon2Settings::default();
    // The server's own default for `hash_threads` (0: one per core but one).
    let hash_threads = totpd::config::Config::default().hash_threads();
    let argon2_seconds = argon2_seconds(argon2)?;
    let mut results = Results {
        machine: machine(),
        command: command_line(),
        argon2: format!(
            "m={} KiB, t={}, p={} (the defaults), {hash_threads} hashes at once",
            argon2.memory_kib, argon2.iterations, argon2.parallelism
        ),
        argon2_seconds,
        argon2_capacity: hash_threads as f64 / argon2_seconds,
        preparation: Vec::new(),
        rows: Vec::new(),
        again: Vec::new(),
        sled_only: Vec::new(),
        mixed: None,
        mixed_ceiling: None,
        core: None,
        idle_startup: Duration::ZERO,
        idle: Memory {
            peak: 0,
            current: 0,
        },
        idle_cheap_argon2: None,
        load: (load_average(), String::new()),
        scale: Vec::new(),
        binary_bytes: std::fs::metadata(&bin).map_or(0, |m| m.len()),
        binary_note,
        skipped: Vec::new(),
        elapsed: Duration::ZERO,
        postgres: None,
    };
    eprintln!("machine: {}", results.machine);
    eprintln!("server: {}", bin.display());
    eprintln!(
        "argon2id {}: {:.1} ms per hash here",
        results.argon2,
        argon2_seconds * 1e3
    );
    let off = server::switched_off();
    if !off.is_empty() {
        results.preparation.push(format!(
            "switched off for the bench servers (every request comes from 127.0.0.1): {}; all \
             other settings are the defaults",
            off.join(", ")
        ));
    }
    let bench = Bench {
        args,
        plan: Plan::new(args.quick),
        bin,
        bare: bare_binary()?,
        env: server::base_env(&work),
        work: work.clone(),
        hash: seed::password_hash(argon2)?,
        runtime,
    };

    if args.skip_core {
        results
            .skipped
            .push("the TOTP core benchmark (--skip-core)".into());
    } else {
        eprintln!("\n== TOTP core (criterion)");
        results.core = Some(core::run(&work.join("criterion"), args.quick)?);
    }
    if args.skip_endpoints {
        results
            .skipped
            .push("the endpoint scenarios (--skip-endpoints)".into());
    } else {
        bench.endpoints(&mut results)?;
    }
    if args.store == StoreArg::Postgres {
        bench.postgres(&mut results)?;
    }
    if args.skip_scale {
        results
            .skipped
            .push("idle memory, start-up and scale (--skip-scale)".into());
    } else {
        bench.idle(&mut results)?;
        bench.scale(&mut results)?;
    }

    results.elapsed = started.elapsed();
    results.load.1 = load_average();
    println!("\n{}", report::endpoint_table(&results));
    if results.postgres.is_some() {
        println!("{}", report::postgres_table(&results));
    }
    println!("{}", report::other_tables(&results));
    println!("{}", report::targets_table(&results));
    let write = |name: &str, text: String| {
        let path = args.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write("endpoints.csv", report::endpoints_csv(&results))?;
    write("summary.csv", report::summary_csv(&results))?;
    write("results.md", report::markdown(&results))?;
    report::chart(&results, &args.out.join("endpoints.svg"))?;
    println!(
        "wrote {}/endpoints.csv, summary.csv, results.md and endpoints.svg; run time {:.0} s",
        args.out.display(),
        results.elapsed.as_secs_f64()
    );
    if args.keep {
        println!("data dirs and server logs kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

impl Bench<'_> {
    fn wanted(&self, endpoint: Endpoint) -> bool {
        endpoint == Endpoint::Baseline || self.args.only.is_empty() || self.named(endpoint.name())
    }

    /// Whether `--only` names `name` (an endpoint, `mixed`, or a store operation of sled alone).
    fn named(&self, name: &str) -> bool {
        self.args.only.iter().any(|n| n == name)
    }

    /// Logins and verifies together: the verify p99 while logins saturate the hash pool.
    fn wanted_mixed(&self) -> bool {
        self.args.only.is_empty()
            || self.named("mixed")
            || (self.named(Endpoint::Login.name()) && self.named(Endpoint::VerifyValid.name()))
    }

    /// Every endpoint at every concurrency against the baseline, on one server; then logins
    /// and verifies together; then the baseline again.
    fn endpoints(&self, results: &mut Results) -> Result<(), String> {
        eprintln!("\n== endpoints");
        let dir = self.work.join("main");
        let prep = Instant::now();
        let seeder = Seeder::open(&SeedTarget::Sled(&dir), &self.hash)?;
        let data = seeder.main_data(&self.plan.main)?;
        seeder.finish()?;
        let m = &self.plan.main;
        results.preparation.push(format!(
            "prepared in {:.1} s straight into the store before the server started: {} users to \
             log in as (no TOTP, so login answers a key) and as many login keys for status; {} users \
             with a login key and no TOTP (setup, once each); {} users with a pending setup and a \
             key (activate, once each); {} enrolled users with {} \
             temp tokens each, whose last used step is 0 so the codes of now-1, now and now+1 are \
             all fresh (verify, valid code); {} enrolled users with 10 recovery codes and 10 temp \
             tokens (verify, recovery code); {} enrolled users with a temp token each, sent {} \
             wrong codes (all a temp token allows, fewer than a lockout needs)",
            prep.elapsed().as_secs_f64(),
            m.per_worker,
            m.setup,
            m.activate,
            m.valid_users,
            m.valid_per_user,
            m.recovery_users,
            m.wrong_tokens,
            seed::wrong_per_token()
        ));
        eprintln!("  {}", results.preparation.last().map_or("", |s| s));
        let server = Server::start(&self.bin, &dir, &self.env)?;
        let (addr, pid) = (server.addr, Some(server.pid()));
        let reference = Reference::start(&self.bare)?;
        let timing = self.plan.timing;
        // The references and the in-process baseline, before the endpoints and again after
        // them, so drift during the run shows and the ratios use the mean of both.
        let references = |results: &mut Results, again: bool| {
            for c in CONCURRENCY {
                for (endpoint, addr, pid) in [
                    (Endpoint::BareGet, reference.addr, Some(reference.pid())),
                    (Endpoint::BarePost, reference.addr, Some(reference.pid())),
                    (Endpoint::Baseline, addr, pid),
                ] {
                    let sources = scenarios::sources(endpoint, &data, c);
                    let outcome = self.runtime.block_on(load::run(addr, sources, timing, pid));
                    let label = if again { " again" } else { "" };
                    progress(&format!("{}{label} c={c}", endpoint.name()), &outcome);
                    if again {
                        results.again.push((endpoint, c, outcome.rps()));
                    } else {
                        results.rows.push(Row {
                            endpoint,
                            concurrency: c,
                            outcome,
                        });
                    }
                }
            }
        };
        // sled's one-time housekeeping after a bulk load (a snapshot, segment cleaning) lands on
        // the first writes and can stall them for seconds: absorb it before measuring.
        let settle = scenarios::sources(Endpoint::Setup, &data, 16);
        let settled = self
            .runtime
            .block_on(load::run(addr, settle, self.plan.settle, pid));
        progress("settle (setup c=16)", &settled);
        results.preparation.push(format!(
            "before the scenarios, {:.0} s of setups at c=16, not recorded, let sled finish its \
             one-time housekeeping after the bulk preparation (the first writes after it stalled \
             for seconds)",
            self.plan.settle.measure.as_secs_f64()
        ));
        references(results, false);
        for endpoint in Endpoint::ALL
            .into_iter()
            .filter(|e| *e != Endpoint::Baseline && self.wanted(*e))
        {
            for c in CONCURRENCY {
                let sources = scenarios::sources(endpoint, &data, c);
                let outcome = self.runtime.block_on(load::run(addr, sources, timing, pid));
                progress(&format!("{} c={c}", endpoint.name()), &outcome);
                results.rows.push(Row {
                    endpoint,
                    concurrency: c,
                    outcome,
                });
            }
        }
        if self.wanted_mixed() {
            let (login_c, verify_c) = (MIXED_LOGIN_CONCURRENCY, MIXED_VERIFY_CONCURRENCY);
            let login = scenarios::sources(Endpoint::Login, &data, login_c);
            let verify = scenarios::sources(Endpoint::VerifyValid, &data, verify_c);
            let mixed = self.plan.mixed;
            let (login, verify) = self.runtime.block_on(async {
                tokio::join!(
                    load::run(addr, login, mixed, None),
                    load::run(addr, verify, mixed, None)
                )
            });
            progress(&format!("login c={login_c} (with verify)"), &login);
            progress(&format!("verify c={verify_c} (with logins)"), &verify);
            results.mixed = Some((login_c, login, verify_c, verify));
        }
        references(results, true);
        reference.stop();
        server.stop()?;
        if self.wanted(Endpoint::Status) {
            self.status_ceiling(&dir, &data, results)?;
        }
        if self.wanted_mixed() {
            self.sled_only_beside_hashing(results)?;
        }
        self.sled_only(results)
    }

    /// Status's ceiling (`bare-warp --status-store`) on the main data dir, now that the server
    /// has let go of it, at the endpoints' concurrencies.
    fn status_ceiling(
        &self,
        dir: &Path,
        data: &MainData,
        results: &mut Results,
    ) -> Result<(), String> {
        for (endpoint, extra) in [
            (Endpoint::StatusCeiling, None),
            (Endpoint::StatusCeilingNoLog, Some("--no-log")),
        ] {
            let log = self.work.join("status-ceiling.log");
            let stderr =
                std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let mut args = vec!["--status-store".as_ref(), dir.as_os_str()];
            args.extend(extra.map(std::ffi::OsStr::new));
            let ceiling = Reference::start_with(&self.bare, &args, stderr.into())?;
            for c in CONCURRENCY {
                let sources = scenarios::sources(endpoint, data, c);
                let outcome = self.runtime.block_on(load::run(
                    ceiling.addr,
                    sources,
                    self.plan.timing,
                    Some(ceiling.pid()),
                ));
                progress(&format!("{} c={c}", endpoint.name()), &outcome);
                results.rows.push(Row {
                    endpoint,
                    concurrency: c,
                    outcome,
                });
            }
            ceiling.stop();
        }
        Ok(())
    }

    /// The store operations of the durable requests on sled alone (see `sled_only`), at the
    /// endpoints' concurrencies, right after them.
    fn sled_only(&self, results: &mut Results) -> Result<(), String> {
        let wanted: Vec<_> = sled_only::Ops::ALL
            .into_iter()
            .filter(|ops| self.args.only.is_empty() || self.named(ops.name()))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        eprintln!("\n== sled only (the store operations of one request, group commit, fdatasync)");
        let cache = totpd::config::Config::default().cache_capacity;
        let m = &self.plan.main;
        let (dir, data) = self.sled_only_data(
            "sled-only",
            MainPlan {
                per_worker: 1,
                setup: m.setup,
                valid_users: m.valid_users,
                valid_per_user: m.valid_per_user,
                wrong_tokens: m.wrong_tokens,
                logout: m.logout,
                ..MainPlan::default()
            },
        )?;
        let runs: Vec<_> = wanted
            .into_iter()
            .flat_map(|ops| CONCURRENCY.map(|c| (ops, c)))
            .collect();
        let timing = sled_only::timing(self.plan.timing);
        for (ops, c, outcome) in sled_only::run(&dir, cache, &data, &runs, timing)? {
            progress(&format!("sled-only {} c={c}", ops.name()), &outcome);
            results.sled_only.push((ops, c, outcome));
        }
        Ok(())
    }

    /// A data dir of the work dir named `name`, prepared with `plan` for sled alone.
    fn sled_only_data(&self, name: &str, plan: MainPlan) -> Result<(PathBuf, MainData), String> {
        let dir = self.work.join(name);
        let seeder = Seeder::open(&SeedTarget::Sled(&dir), &self.hash)?;
        let data = seeder.main_data(&plan)?;
        seeder.finish()?;
        Ok((dir, data))
    }

    /// The ceiling of the verify-beside-logins target: verify's store operations on sled
    /// alone at the mixed scenario's verify concurrency, while as many password checks as it
    /// has logins keep the server's own hasher saturated; in a data dir of its own holding only
    /// the verifies' users.
    fn sled_only_beside_hashing(&self, results: &mut Results) -> Result<(), String> {
        eprintln!("\n== sled only beside the saturated hasher");
        let m = &self.plan.main;
        let (dir, data) = self.sled_only_data(
            "sled-only-hashing",
            MainPlan {
                per_worker: 1,
                valid_users: m.valid_users,
                valid_per_user: m.valid_per_user,
                ..MainPlan::default()
            },
        )?;
        let config = totpd::config::Config::default();
        let hasher = totpd::service::password::PasswordHasher::new(
            Argon2Settings::default(),
            config.hash_threads(),
        )
        .map_err(|e| e.to_string())?;
        let hashing = sled_only::Hashing {
            hasher,
            concurrency: MIXED_LOGIN_CONCURRENCY,
        };
        let (outcome, hashes) = sled_only::verify_beside_hashing(
            &dir,
            config.cache_capacity,
            &data,
            MIXED_VERIFY_CONCURRENCY,
            &hashing,
            self.plan.mixed,
        )?;
        progress(
            &format!(
                "sled-only verify_valid c={MIXED_VERIFY_CONCURRENCY} beside {hashes:.0} Argon2 runs/s"
            ),
            &outcome,
        );
        results.mixed_ceiling = Some((MIXED_VERIFY_CONCURRENCY, outcome, hashes));
        Ok(())
    }

    /// The PostgreSQL store: pgbench's one-row UPDATE at c=16 and 64 (before and after), then
    /// status, activate and verify with one server and with two on the same database.
    fn postgres(&self, results: &mut Results) -> Result<(), String> {
        eprintln!("\n== PostgreSQL");
        let url = self
            .args
            .database_url
            .as_deref()
            .ok_or("--store postgres needs --database-url")?;
        let pgbench = pg::find_pgbench(self.args.pgbench.as_deref())?;
        let db = self.runtime.block_on(pg::Database::create(url))?;
        let measured = self.postgres_on(&db, &pgbench, results);
        if self.args.keep {
            eprintln!("  schema {} kept", db.schema);
        } else if let Err(e) = self.runtime.block_on(db.drop_schema()) {
            eprintln!("  could not drop schema {}: {e}", db.schema);
        }
        measured
    }

    fn pgbench_runs(
        &self,
        db: &pg::Database,
        bin: &Path,
        postmaster: Option<u32>,
    ) -> Result<Vec<pg::PgbenchRun>, String> {
        let mut runs = Vec::new();
        for c in report::PG_CONCURRENCY {
            let meter = self.runtime.block_on(pg::Meter::start(db, postmaster));
            let dir = self.work.join("pgbench");
            let seconds = self.plan.pgbench_seconds;
            let (tps, transactions, failed, latency) = pg::pgbench(bin, &db.url, &dir, c, seconds)?;
            let usage = self
                .runtime
                .block_on(meter.stop(db, postmaster, transactions));
            let run = pg::PgbenchRun {
                concurrency: c,
                tps,
                transactions,
                failed,
                latency,
                usage,
            };
            eprintln!(
                "  pgbench c={c:<3} {tps:>8.0} tps  p50 {:>7.2} ms  p99 {:>7.2} ms  failed {failed}  \
                 PostgreSQL CPU {:>5.0} µs/xact  xids {:.2}/xact  machine busy {:.0} %",
                run.ms(0.5),
                run.ms(0.99),
                usage.db_cpu_us.unwrap_or(f64::NAN),
                usage.xacts.unwrap_or(f64::NAN),
                usage.busy.unwrap_or(f64::NAN) * 100.0,
            );
            runs.push(run);
        }
        Ok(runs)
    }

    fn postgres_on(
        &self,
        db: &pg::Database,
        pgbench: &Path,
        results: &mut Results,
    ) -> Result<(), String> {
        let rt = &self.runtime;
        let version = rt.block_on(db.version())?;
        let postmaster = rt.block_on(db.postmaster());
        eprintln!(
            "  PostgreSQL {version}, schema {}, {}; {}",
            db.schema,
            match postmaster {
                Some(pid) => format!("postmaster pid {pid} (its CPU time is measured)"),
                None => "not on this machine (its CPU time is not measured)".into(),
            },
            pgbench.display()
        );
        rt.block_on(db.create_pgbench_table())?;
        let mut pgbench_runs = self.pgbench_runs(db, pgbench, postmaster)?;

        let shared = self.work.join("pg-shared");
        std::fs::create_dir_all(&shared).map_err(|e| format!("{}: {e}", shared.display()))?;
        let master_key = shared.join("master.key");
        let prep = Instant::now();
        let target = SeedTarget::Postgres {
            url: &db.url,
            master_key: &master_key,
        };
        let seeder = Seeder::open(&target, &self.hash)?;
        let m = &self.plan.postgres;
        let data = seeder.main_data(m)?;
        seeder.finish()?;
        let prepared = format!(
            "PostgreSQL: prepared in {:.1} s through the store's `import` (one transaction per \
             record, 16 at once): {} login keys for status; {} users with a pending setup and a \
             key (activate, once each); {} enrolled users with {} temp tokens each (verify, valid \
             code)",
            prep.elapsed().as_secs_f64(),
            m.per_worker,
            m.activate,
            m.valid_users,
            m.valid_per_user
        );
        eprintln!("  {prepared}");

        let mut env = self.env.clone();
        env.push(("TOTPD_STORE".into(), "postgres".into()));
        env.push(("TOTPD_DATABASE_URL".into(), db.url.clone()));
        env.push((
            "TOTPD_MASTER_KEY_FILE".into(),
            master_key.display().to_string(),
        ));
        if let Some(n) = self.args.database_pool_size {
            env.push(("TOTPD_DATABASE_POOL_SIZE".into(), n.to_string()));
        }
        let pool_size = self
            .args
            .database_pool_size
            .unwrap_or(totpd::config::Config::default().database_pool_size);
        let mut rows = Vec::new();
        for instances in [1, 2] {
            let mut servers = Vec::new();
            for i in 1..=instances {
                // A data dir of its own per server (its admin socket); the master key is shared.
                let dir = self.work.join(format!("pg-{instances}-{i}"));
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                servers.push(Server::start(&self.bin, &dir, &env)?);
            }
            let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
            let pids: Vec<_> = servers.iter().map(Server::pid).collect();
            for endpoint in report::PG_ENDPOINTS.into_iter().filter(|e| self.wanted(*e)) {
                for c in report::PG_CONCURRENCY {
                    let sources = scenarios::sources(endpoint, &data, c);
                    let meter = rt.block_on(pg::Meter::start(db, postmaster));
                    let outcome =
                        rt.block_on(load::run_on(&addrs, sources, self.plan.timing, &pids));
                    let usage = rt.block_on(meter.stop(db, postmaster, outcome.answered));
                    progress(
                        &format!("pg×{instances} {} c={c}", endpoint.name()),
                        &outcome,
                    );
                    eprintln!(
                        "    PostgreSQL CPU {:>5.0} µs/req  xids {:.2}/req  WAL {:.0} B/req  machine busy {:.0} %",
                        usage.db_cpu_us.unwrap_or(f64::NAN),
                        usage.xacts.unwrap_or(f64::NAN),
                        usage.wal_bytes.unwrap_or(f64::NAN),
                        usage.busy.unwrap_or(f64::NAN) * 100.0,
                    );
                    rows.push(report::PgRow {
                        instances,
                        endpoint,
                        concurrency: c,
                        outcome,
                        usage,
                    });
                }
            }
            for server in servers {
                server.stop()?;
            }
        }
        eprintln!("  pgbench again");
        pgbench_runs.extend(self.pgbench_runs(db, pgbench, postmaster)?);
        results.preparation.push(prepared);
        results.postgres = Some(report::PgResults {
            version,
            pool_size,
            pgbench_seconds: self.plan.pgbench_seconds,
            db_cpu_measured: postmaster.is_some(),
            rows,
            pgbench: pgbench_runs,
        });
        Ok(())
    }

    /// Memory and start-up of a server on an empty data dir.
    fn idle(&self, results: &mut Results) -> Result<(), String> {
        eprintln!("\n== idle server");
        let idle = Server::start(&self.bin, &self.work.join("idle"), &self.env)?;
        std::thread::sleep(Duration::from_millis(300));
        results.idle_startup = idle.startup;
        results.idle = memory(&idle);
        idle.stop()?;
        let mut env = self.env.clone();
        env.push(("TOTPD_ARGON2_MEMORY_KIB".into(), "64".into()));
        let cheap = Server::start(&self.bin, &self.work.join("idle-cheap"), &env)?;
        std::thread::sleep(Duration::from_millis(300));
        results.idle_cheap_argon2 = Some(memory(&cheap));
        cheap.stop()?;
        eprintln!(
            "  start-up {:.0} ms, VmHWM {:.1} MiB, VmRSS {:.1} MiB",
            results.idle_startup.as_secs_f64() * 1e3,
            results.idle.peak as f64 / report::MIB,
            results.idle.current as f64 / report::MIB
        );
        Ok(())
    }

    /// One data dir grown from 1 000 enrolled users up; at each size a fresh server's start-up,
    /// memory and verify latency.
    fn scale(&self, results: &mut Results) -> Result<(), String> {
        eprintln!("\n== scale");
        if self.args.quick {
            results
                .skipped
                .push("the 1 000 000-user data dir (--quick)".into());
        }
        let plan = &self.plan;
        let dir = self.work.join("scale");
        let mut seeded = 0;
        for &users in &plan.scale {
            let prep = Instant::now();
            let seeder = Seeder::open(&SeedTarget::Sled(&dir), &self.hash)?;
            seeder.scale_users(seeded, users, 2)?;
            seeded = users;
            let sample = plan.scale_requests.min(users as usize);
            let per_user = plan.scale_requests.div_ceil(sample);
            let pool = seeder.scale_tokens(users, sample, per_user)?;
            seeder.finish()?;
            let dir_bytes = server::dir_size(&dir);
            eprintln!(
                "  {users} enrolled users prepared in {:.1} s, data dir {:.1} MiB",
                prep.elapsed().as_secs_f64(),
                dir_bytes.1 as f64 / report::MIB
            );
            let server = Server::start(&self.bin, &dir, &self.env)?;
            let after_start = memory(&server);
            let c = plan.scale_concurrency;
            let pool = seed::pool(pool);
            let sources = (0..c)
                .map(|_| scenarios::valid_source(pool.clone()))
                .collect();
            let timing = Timing {
                warmup: Duration::ZERO,
                measure: Duration::from_secs(60),
            };
            let verify =
                self.runtime
                    .block_on(load::run(server.addr, sources, timing, Some(server.pid())));
            let after_load = memory(&server);
            progress(&format!("verify c={c}, {users} users"), &verify);
            eprintln!(
                "  start-up {:.0} ms, VmRSS after start {:.1} MiB, VmHWM after verify {:.1} MiB",
                server.startup.as_secs_f64() * 1e3,
                after_start.current as f64 / report::MIB,
                after_load.peak as f64 / report::MIB
            );
            let startup = server.startup;
            server.stop()?;
            // The same verifies on sled alone, for users drawn afresh, on the database opened
            // afresh: how much of the scale point's p99 is sled's. A p99 of 3 000 requests is
            // noisy, so sled alone runs three times (fresh users, reopened database) and the
            // round with the median p99 stands for it.
            let cache = totpd::config::Config::default().cache_capacity;
            let mut rounds = Vec::new();
            for round in 1..=SCALE_ALONE_ROUNDS {
                let seeder = Seeder::open(&SeedTarget::Sled(&dir), &self.hash)?;
                let alone_users = seeder.scale_tokens(users, sample, per_user)?;
                seeder.finish()?;
                let alone = sled_only::scale_verify(&dir, cache, alone_users, c, timing)?;
                progress(
                    &format!("sled alone #{round}, verify c={c}, {users} users"),
                    &alone,
                );
                rounds.push(alone);
            }
            rounds.sort_by(|a, b| a.ms(0.99).total_cmp(&b.ms(0.99)));
            let alone_p99s = rounds.iter().map(|o| o.ms(0.99)).collect();
            let alone = rounds.swap_remove(rounds.len() / 2);
            results.scale.push(ScalePoint {
                users,
                startup,
                after_start,
                after_load,
                verify,
                alone,
                alone_p99s,
                concurrency: c,
                dir_bytes,
            });
        }
        results.preparation.push(format!(
            "scale users are enrolled the same way (sealed secret, 10 recovery code hashes) but \
             without the audit events of their enrolment, which the retention sweep would \
             delete anyway; each scale point sends {} verifies at c={} for users drawn at random \
             from all of them (at 1 000 users each verifies 3 times: steps now-1, now, now+1)",
            plan.scale_requests, plan.scale_concurrency
        ));
        Ok(())
    }
}
