//! The PostgreSQL side of the harness: a schema of its own for the run, what the database did
//! per request (its CPU time, write transactions, WAL bytes) and how busy the machine was, and
//! the physical reference: `pgbench` running a one-row `UPDATE` on the same database.

use std::path::{Path, PathBuf};
use std::process::Command;

use hdrhistogram::Histogram;
use tokio_postgres::{Client, NoTls};

/// Rows of the table `pgbench` updates (one at random per transaction).
pub const PGBENCH_ROWS: u64 = 100_000;

/// The one-row `UPDATE` pgbench runs: one statement, so one transaction (autocommit), one
/// round trip and one commit.
pub const PGBENCH_SCRIPT: &str = "\\set id random(1, 100000)\n\
                                  UPDATE bench_row SET n = n + 1 WHERE id = :id;\n";

async fn connect(url: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("cannot connect to the database: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A schema of its own for one run, in the database `--database-url` names: totpd's tables
/// and pgbench's go there, and it is dropped at the end (unless `--keep`).
pub struct Database {
    /// `--database-url` with `search_path` set to the schema.
    pub url: String,
    base: String,
    pub schema: String,
    client: Client,
}

impl Database {
    pub async fn create(base: &str) -> Result<Self, String> {
        let schema = format!("totpd_bench_{}", std::process::id());
        let client = connect(base).await?;
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .map_err(|e| format!("cannot create schema {schema}: {e}"))?;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        let client = connect(&url).await?;
        Ok(Self {
            url,
            base: base.to_owned(),
            schema,
            client,
        })
    }

    pub async fn drop_schema(&self) -> Result<(), String> {
        let admin = connect(&self.base).await?;
        admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await
            .map_err(|e| e.to_string())
    }

    /// pgbench's table: `PGBENCH_ROWS` rows, vacuumed and analysed.
    pub async fn create_pgbench_table(&self) -> Result<(), String> {
        self.client
            .batch_execute(&format!(
                "CREATE TABLE bench_row (id INT PRIMARY KEY, n BIGINT NOT NULL); \
                 INSERT INTO bench_row SELECT i, 0 FROM generate_series(1, {PGBENCH_ROWS}) i"
            ))
            .await
            .map_err(|e| e.to_string())?;
        self.client
            .batch_execute("VACUUM ANALYZE bench_row")
            .await
            .map_err(|e| e.to_string())
    }

    /// The PostgreSQL server version, e.g. "15.18".
    pub async fn version(&self) -> Result<String, String> {
        let row = self
            .client
            .query_one("SHOW server_version", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, String>(0))
    }

    /// The postmaster's pid, when the database runs on this machine (the parent of our
    /// backend).
    pub async fn postmaster(&self) -> Option<u32> {
        let row = self
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .ok()?;
        let backend = row.get::<_, i32>(0) as u32;
        let pid = u32::try_from(stat_field(backend, 1)?).ok()?;
        // Only if that really is a PostgreSQL process here (not a pid of another machine's).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "postgres").then_some(pid)
    }

    /// (the next transaction id, the WAL position in bytes): write transactions and WAL
    /// written between two readings. Read-only transactions take no transaction id.
    pub async fn counters(&self) -> Option<(i64, i64)> {
        let row = self
            .client
            .query_one(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, \
                 (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint",
                &[],
            )
            .await
            .ok()?;
        Some((row.get(0), row.get(1)))
    }
}

/// Field `index` (0: state, 1: ppid, ...) after the command name of /proc/PID/stat.
fn stat_field(pid: u32, index: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(index)?.parse().ok()
}

/// CPU seconds of the postmaster and all its children (backends, WAL writer, checkpointer...):
/// the live ones' own time, plus what the postmaster reaped from those that ended (its
/// cutime + cstime), so a backend that exits between two readings still counts.
pub fn cluster_cpu(postmaster: u32) -> f64 {
    let ticks = |pid: u32, from: usize, to: usize| -> f64 {
        (from..=to).filter_map(|i| stat_field(pid, i)).sum::<u64>() as f64 / 100.0
    };
    // utime, stime, cutime, cstime: fields 11 to 14 after the command name.
    let mut total = ticks(postmaster, 11, 14);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if stat_field(pid, 1) == Some(u64::from(postmaster)) {
            total += ticks(pid, 11, 12);
        }
    }
    total
}

/// (busy, total) jiffies of all cores, from /proc/stat.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// What the database and the machine did during a scenario.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// PostgreSQL's CPU time per request (µs), all its processes.
    pub db_cpu_us: Option<f64>,
    /// Write transactions (transaction ids) per request.
    pub xacts: Option<f64>,
    /// WAL bytes per request.
    pub wal_bytes: Option<f64>,
    /// Share of all cores busy (0 to 1), everything on the machine.
    pub busy: Option<f64>,
}

/// Readings before a scenario.
pub struct Meter {
    db_cpu: Option<f64>,
    counters: Option<(i64, i64)>,
    machine: Option<(u64, u64)>,
}

impl Meter {
    pub async fn start(db: &Database, postmaster: Option<u32>) -> Self {
        Self {
            db_cpu: postmaster.map(cluster_cpu),
            counters: db.counters().await,
            machine: machine_jiffies(),
        }
    }

    /// The usage since `start`, per request of `requests`.
    pub async fn stop(self, db: &Database, postmaster: Option<u32>, requests: u64) -> Usage {
        let n = requests.max(1) as f64;
        let db_cpu = postmaster.map(cluster_cpu);
        let counters = db.counters().await;
        let machine = machine_jiffies();
        Usage {
            db_cpu_us: self
                .db_cpu
                .zip(db_cpu)
                .map(|(before, after)| (after - before) * 1e6 / n),
            // The reading itself takes no transaction id.
            xacts: self
                .counters
                .zip(counters)
                .map(|(before, after)| (after.0 - before.0) as f64 / n),
            wal_bytes: self
                .counters
                .zip(counters)
                .map(|(before, after)| (after.1 - before.1) as f64 / n),
            busy: self.machine.zip(machine).and_then(|(before, after)| {
                let total = after.1.checked_sub(before.1)?;
                (total > 0).then(|| (after.0 - before.0) as f64 / total as f64)
            }),
        }
    }
}

/// `--pgbench`, else `pgbench` on PATH, else the newest under Debian's
/// /usr/lib/postgresql/*/bin.
pub fn find_pgbench(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    if let Some(paths) = std::env::var_os("PATH") {
        if let Some(found) = std::env::split_paths(&paths)
            .map(|d| d.join("pgbench"))
            .find(|p| p.is_file())
        {
            return Ok(found);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin/pgbench");
            bin.is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "pgbench not found: install PostgreSQL's client tools (Debian: postgresql) or pass \
         --pgbench PATH"
            .into()
    })
}

/// What one pgbench run measured.
#[derive(Debug, Clone)]
pub struct PgbenchRun {
    pub concurrency: usize,
    /// Transactions per second, without the initial connection time (pgbench's own figure).
    pub tps: f64,
    pub transactions: u64,
    pub failed: u64,
    /// Per-transaction latency from pgbench's log, in nanoseconds.
    pub latency: Histogram<u64>,
    pub usage: Usage,
}

impl PgbenchRun {
    pub fn ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            f64::NAN
        } else {
            self.latency.value_at_quantile(q) as f64 / 1e6
        }
    }
}

/// The pgbench command line (without the log options and the URL), for the report.
pub fn pgbench_command(concurrency: usize, seconds: u64) -> String {
    format!("pgbench -n -c {concurrency} -j 1 -T {seconds} -f update.sql")
}

/// Runs pgbench at `concurrency` for `seconds` with the one-row update, one client thread (as
/// the harness's load generator), logging every transaction's latency under `dir`.
pub fn pgbench(
    bin: &Path,
    url: &str,
    dir: &Path,
    concurrency: usize,
    seconds: u64,
) -> Result<(f64, u64, u64, Histogram<u64>), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let script = dir.join("update.sql");
    std::fs::write(&script, PGBENCH_SCRIPT).map_err(|e| e.to_string())?;
    let prefix = dir.join(format!("log-c{concurrency}"));
    let output = Command::new(bin)
        .args(["-n", "-c", &concurrency.to_string(), "-j", "1"])
        .args(["-T", &seconds.to_string()])
        .arg("-f")
        .arg(&script)
        .arg("-l")
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let field = |prefix: &str| {
        stdout.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
    };
    let tps = field("tps = ").ok_or_else(|| format!("no tps in pgbench's output: {stdout}"))?;
    let transactions = field("number of transactions actually processed:").unwrap_or(0.0) as u64;
    let failed = field("number of failed transactions:").unwrap_or(0.0) as u64;
    let mut latency =
        Histogram::new_with_bounds(1_000, 120_000_000_000, 3).map_err(|e| e.to_string())?;
    let stem = prefix
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&stem) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).map_err(|e| e.to_string())?;
        // client_id transaction_no time_us script_no time_epoch time_us_fraction
        for line in text.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|f| f.parse::<u64>().ok())
            {
                let _ = latency.record(us.max(1) * 1_000);
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
    Ok((tps, transactions, failed, latency))
}
