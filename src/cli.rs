//! The command line. `totpd [serve]` runs the server; the other commands administer a data dir
//! and work the same whether or not a server holds it (see `admin`). Failures are one line on
//! stderr and exit code 1; nothing panics at the operator.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::admin::{self, AdminRequest};
use crate::app::{self, Application};
use crate::clock::{Clock, SystemClock, UnixTime};
use crate::config::{Config, Flags, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "totpd",
    version,
    about = "A TOTP two-factor-authentication server in one binary",
    after_help = "Every command but serve works whether or not a server holds the data dir: \
                  with one running, it is done by the server through <data dir>/admin.sock. \
                  With store = \"postgres\" the commands open the database themselves."
)]
struct Cli {
    /// Config file [env: TOTPD_CONFIG] [default: ./config.toml when it exists]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Data directory [env: TOTPD_DATA_DIR] [default: ./data]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default command)
    Serve {
        /// Address to listen on [env: TOTPD_LISTEN] [default: 127.0.0.1:8000]; port 0 picks a free port
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Manage users
    #[command(subcommand)]
    User(UserCommand),
    /// Write a consistent backup of all data to FILE while the server keeps serving (the master
    /// key is not in it: back it up apart)
    Backup { file: PathBuf },
    /// Restore a backup into an empty data dir (the server must not run)
    Restore { file: PathBuf },
    /// Exit 0 when the server at the configured address answers /healthz (for container probes)
    Healthcheck,
    /// Re-seal every TOTP secret under a new master key (the server must not run)
    RotateKey,
    /// List risky settings (the warnings serve logs at start-up); exit 1 when there is one
    CheckConfig,
    /// Create or update the PostgreSQL schema (servers also do it when they start)
    Migrate {
        /// Print the SQL that would run, and change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Move data between stores
    #[command(subcommand)]
    Store(StoreCommand),
    /// Print the audit trail of security events
    Events {
        /// Only this user's events
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// From this time on: RFC 3339 (2026-11-27T10:00:00Z), an age (90m, 12h, 7d) or Unix seconds
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy every record into an empty store and compare the counts (stop the servers first)
    Copy {
        /// The source: sled:DIR or postgres:URL
        #[arg(long, value_name = "STORE")]
        from: String,
        /// The empty target: sled:DIR or postgres:URL
        #[arg(long, value_name = "STORE")]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user; the password is asked for, or read from stdin
    Add {
        name: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users: name, TOTP state, locked until, last login
    List,
    /// Delete a user and everything of theirs
    Remove { name: String },
    /// Set a user's password (revokes their keys); asked for, or read from stdin
    SetPassword {
        name: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// For a lost phone: clear the user's secret, recovery codes and lock, and revoke their keys
    ResetTotp { name: String },
    /// End a user's lock after too many failed codes
    Unlock { name: String },
}

/// Parses the command line and runs the command.
pub fn run() -> ExitCode {
    // Everything totpd creates (sled's files, the master key, backups, the admin socket) is for
    // its user alone; sled creates its files with the process umask, so set it before anything.
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let listen = match &cli.command {
        Some(Command::Serve { listen }) => listen.clone(),
        _ => None,
    };
    let flags = Flags {
        config: cli.config.clone(),
        data_dir: cli.data_dir.clone(),
        listen,
    };
    let config = match Config::load(&flags, std::env::vars()) {
        Ok(config) => config,
        Err(problems) => {
            for problem in problems {
                eprintln!("totpd: {problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    match execute(cli.command, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("totpd: {}", message.trim_end());
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Option<Command>, config: &Config) -> Result<(), String> {
    let now = SystemClock.now();
    let request = match command {
        None | Some(Command::Serve { .. }) => return serve(config.clone()),
        Some(Command::Restore { file }) => return restore(config, &file),
        Some(Command::Healthcheck) => return healthcheck(config),
        Some(Command::RotateKey) => return rotate_key(config),
        Some(Command::CheckConfig) => return check_config(config),
        Some(Command::Migrate { dry_run }) => return migrate(config, dry_run),
        Some(Command::Store(StoreCommand::Copy { from, to })) => {
            return copy_store(config, &from, &to);
        }
        Some(Command::User(UserCommand::Add {
            name,
            password_stdin,
        })) => {
            let password = read_password(&name, password_stdin)?;
            AdminRequest::UserAdd { name, password }
        }
        Some(Command::User(UserCommand::List)) => AdminRequest::UserList,
        Some(Command::User(UserCommand::Remove { name })) => AdminRequest::UserRemove { name },
        Some(Command::User(UserCommand::SetPassword {
            name,
            password_stdin,
        })) => {
            let password = read_password(&name, password_stdin)?;
            AdminRequest::UserSetPassword { name, password }
        }
        Some(Command::User(UserCommand::ResetTotp { name })) => {
            AdminRequest::UserResetTotp { name }
        }
        Some(Command::User(UserCommand::Unlock { name })) => AdminRequest::UserUnlock { name },
        Some(Command::Backup { file }) => AdminRequest::Backup {
            path: absolute(&file)?,
        },
        Some(Command::Events { user, since, json }) => AdminRequest::Events {
            user,
            since: since
                .map(|s| parse_since(&s, now))
                .transpose()?
                .unwrap_or(0),
            json,
        },
    };
    let output = administer(config, request, now)?;
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error.
    let _ = stdout.write_all(output.as_bytes());
    Ok(())
}

/// A runtime for the commands: multi-threaded, as the server's.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Runs `request` on the data dir: directly when no server holds it, else through the server.
fn administer(config: &Config, request: AdminRequest, now: UnixTime) -> Result<String, String> {
    runtime()?.block_on(async {
        match app::open_offline(config).await {
            Ok(service) => {
                let result = admin::execute(&service, request, now).await;
                service.close().await.map_err(|e| e.to_string())?;
                result
            }
            Err(None) => admin::call(&admin::socket_path(&config.data_dir), &request),
            Err(Some(e)) => Err(e),
        }
    })
}

/// The server writes backups, so a relative path must be made absolute here.
fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_password(name: &str, from_stdin: bool) -> Result<String, String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        Ok(line.trim_end_matches(['\n', '\r']).to_owned())
    } else {
        rpassword::prompt_password(format!("Password for {name}: "))
            .map_err(|e| format!("cannot read the password: {e}"))
    }
}

/// Logs go to stderr through a writer thread (`log_writer`): a request formats its line on the
/// worker and appends it to a shared buffer, but never waits for the write itself (a slow
/// journald or pipe would otherwise stall the async workers); the thread writes the lines in
/// batches. Nothing is dropped: when the output falls far behind, loggers wait. The returned
/// guard writes the lines still waiting when it is dropped, so the caller keeps it for the life
/// of the process.
fn init_logging(config: &Config) -> Result<crate::log_writer::WriterGuard, String> {
    let (writer, guard) = crate::log_writer::batched(std::io::stderr(), "totpd-log")
        .map_err(|e| format!("cannot start the log thread: {e}"))?;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    Ok(guard)
}

fn serve(config: Config) -> Result<(), String> {
    // Dropped when serve returns, after the runtime: the last lines (shutdown) are written.
    let _log_guard = init_logging(&config)?;
    runtime()?.block_on(async move {
        let data_dir = config.data_dir.clone();
        let app = Application::build(config, Arc::new(SystemClock)).await?;
        // After build, so a master key file made on this first start is looked at too.
        let master_key_mode = crate::warnings::master_key_mode(app.config());
        for warning in crate::warnings::risky_settings(app.config(), master_key_mode) {
            tracing::warn!(target: "totpd::config", "risky setting: {warning}");
        }
        let shutdown = shutdown_signal()?;
        let addr = app.local_addr();
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "listening on {}://{addr}", app.scheme());
        let _ = stdout.flush();
        tracing::info!(%addr, data_dir = %data_dir.display(), "serving");
        app.run_until_stopped(shutdown).await
    })
}

/// Installs the SIGINT and SIGTERM handlers now (so a signal that arrives right after the
/// listening line is not lost to the default action) and resolves when one arrives.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate =
            signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        let mut interrupt =
            signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Prints the risky settings, one per line. Exit code 1 when there is one, so a deployment
/// script can stop on it; nothing is created or opened.
fn check_config(config: &Config) -> Result<(), String> {
    let warnings =
        crate::warnings::risky_settings(config, crate::warnings::master_key_mode(config));
    if warnings.is_empty() {
        println!("no risky settings");
        return Ok(());
    }
    for warning in &warnings {
        println!("{warning}");
    }
    Err(format!("{} risky settings", warnings.len()))
}

fn restore(config: &Config, file: &Path) -> Result<(), String> {
    let count = runtime()?.block_on(crate::admin::backup::restore(
        file,
        &app::store_config(config),
    ))?;
    println!(
        "restored {count} records into {}; the master key that sealed them must be in place \
         before the server starts",
        app::store_config(config).describe()
    );
    Ok(())
}

/// GET /healthz on the configured address over plain HTTP (or TLS when configured).
fn healthcheck(config: &Config) -> Result<(), String> {
    let status = crate::http::tls::probe_health(config, Duration::from_secs(3))?;
    if status == 200 {
        Ok(())
    } else {
        Err(format!("/healthz answered {status}"))
    }
}

/// Re-seals every secret under a new master key (see `app::rotate_master_key`).
fn rotate_key(config: &Config) -> Result<(), String> {
    let out = runtime()?.block_on(app::rotate_master_key(config))?;
    print!("{out}");
    Ok(())
}

/// Applies the pending migrations of the PostgreSQL schema, or prints their SQL.
fn migrate(config: &Config, dry_run: bool) -> Result<(), String> {
    use crate::store::{StoreConfig, postgres};
    let StoreConfig::Postgres(pg) = app::store_config(config) else {
        return Err(
            "migrate is for store = \"postgres\": a sled store migrates itself when it opens"
                .into(),
        );
    };
    let pending = runtime()?.block_on(async {
        let mut client = postgres::connect(&pg).await.map_err(|e| e.to_string())?;
        postgres::migrate(&mut client, dry_run)
            .await
            .map_err(|e| e.to_string())
    })?;
    let mut stdout = std::io::stdout().lock();
    if pending.is_empty() {
        let _ = writeln!(
            stdout,
            "the schema of {} is up to date (version {})",
            pg.url,
            postgres::latest_version()
        );
    }
    for migration in pending {
        if dry_run {
            let _ = writeln!(
                stdout,
                "-- migration {} (would run in one transaction)\n{}",
                migration.name,
                migration.sql.trim_end()
            );
        } else {
            let _ = writeln!(stdout, "applied migration {}", migration.name);
        }
    }
    Ok(())
}

/// `totpd store copy --from … --to …` (see `admin::copy`).
fn copy_store(config: &Config, from: &str, to: &str) -> Result<(), String> {
    let from = admin::copy::parse_location(from, config.cache_capacity)
        .map_err(|e| format!("--from: {e}"))?;
    let to =
        admin::copy::parse_location(to, config.cache_capacity).map_err(|e| format!("--to: {e}"))?;
    let out = runtime()?.block_on(admin::copy::copy(&from, &to))?;
    print!("{out}");
    Ok(())
}

/// Parses `--since`: RFC 3339, an age such as `7d`, or Unix seconds.
fn parse_since(text: &str, now: UnixTime) -> Result<UnixTime, String> {
    if let Ok(seconds) = text.parse::<UnixTime>() {
        return Ok(seconds);
    }
    if let Ok(age) = humantime::parse_duration(text) {
        return Ok(now.saturating_sub(age.as_secs()));
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            format!("--since {text:?}: expected RFC 3339 time, an age like 7d, or Unix seconds")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::audit::EventKind;

    #[test]
    fn since_accepts_three_forms() {
        assert_eq!(parse_since("1700000000", 0), Ok(1_700_000_000));
        assert_eq!(parse_since("2h", 10_000), Ok(10_000 - 7_200));
        assert_eq!(parse_since("1970-01-02T00:00:00Z", 0), Ok(86_400));
        assert!(parse_since("yesterday-ish", 0).is_err());
    }

    #[test]
    fn event_kinds_have_distinct_names() {
        let names: std::collections::HashSet<_> = EventKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), EventKind::ALL.len());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
