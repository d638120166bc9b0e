//! The command line: `totpd [serve]` runs the server, `totpd user add NAME` creates an account.
//! Failures are one line on stderr and exit code 1; nothing panics at the operator.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::AppState;
use crate::clock::{Clock, SystemClock, UnixTime};
use crate::config::{Config, Flags};
use crate::input;
use crate::models::{AuditEvent, EventKind};
use crate::password::PasswordHasher;
use crate::sealing::{self, KeySource, Keyring, MasterKey, key_id_hex};
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "totpd",
    version,
    about = "A TOTP two-factor-authentication server"
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
    /// Re-seal every TOTP secret under a new master key (the server must be stopped)
    RotateKey,
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
enum UserCommand {
    /// Create a user; the password is asked for, or read from stdin
    Add {
        name: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
}

/// Parses the command line and runs the command.
pub fn run() -> ExitCode {
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
    let result = match cli.command {
        None | Some(Command::Serve { .. }) => serve(config),
        Some(Command::User(UserCommand::Add {
            name,
            password_stdin,
        })) => add_user(&config, &name, password_stdin),
        Some(Command::RotateKey) => rotate_key(&config),
        Some(Command::Events { user, since, json }) => {
            events(&config, user.as_deref(), since.as_deref(), json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("totpd: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn serve(config: Config) -> Result<(), String> {
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let listen = config.listen;
    let state = AppState::build(config, Arc::new(SystemClock)).map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "listening on http://{addr}");
        let _ = stdout.flush();
        tracing::info!(%addr, data_dir = %state.config.data_dir.display(), "serving");
        crate::server::serve(listener, state.clone(), shutdown_signal()).await;
        tracing::info!("shutting down: flushing the store");
        state
            .store
            .flush_now()
            .map_err(|e| format!("final flush failed: {e}"))
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn add_user(config: &Config, raw_name: &str, password_stdin: bool) -> Result<(), String> {
    let name =
        input::new_username(raw_name).map_err(|e| format!("invalid user name: {}", e.message))?;
    let password = if password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    } else {
        rpassword::prompt_password(format!("Password for {name}: "))
            .map_err(|e| format!("cannot read the password: {e}"))?
    };
    let password =
        input::new_password(password).map_err(|e| format!("invalid password: {}", e.message))?;
    let store = Store::open(&config.data_dir, config.cache_capacity).map_err(|e| e.to_string())?;
    if store
        .user_by_name(&name)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err(format!("a user named {name:?} already exists"));
    }
    let hasher = PasswordHasher::new(config.argon2, 1).map_err(|e| e.to_string())?;
    let hash = hasher.hash_now(&password).map_err(|e| e.to_string())?;
    let now = SystemClock.now();
    let user = store
        .create_user(&name, &hash, now)
        .map_err(|e| e.to_string())?
        .map_err(|_| format!("a user named {name:?} already exists"))?;
    store
        .record_event(&AuditEvent {
            time: now,
            kind: EventKind::UserCreated,
            user_id: Some(user.id),
            username: Some(user.username.clone()),
            ip: None,
            outcome: "cli".into(),
        })
        .map_err(|e| e.to_string())?;
    store.flush_now().map_err(|e| e.to_string())?;
    println!("created user {name}");
    Ok(())
}

/// Re-seals every secret under a new key. With a key file: appends a new key, re-seals, then
/// drops the old key (a crash in between leaves both keys in the file, and a rerun finishes).
/// With `TOTPD_MASTER_KEY`: re-seals under its last key, so rotation is `old,new` then `new`.
fn rotate_key(config: &Config) -> Result<(), String> {
    let store = Store::open(&config.data_dir, config.cache_capacity).map_err(|e| e.to_string())?;
    let (ring, source) = sealing::establish(config, &store)?;
    let ring = match &source {
        KeySource::Environment => ring,
        KeySource::File(path) => {
            let mut keys = ring.keys().to_vec();
            keys.push(MasterKey::generate().map_err(|e| e.to_string())?);
            sealing::write_key_file(path, &keys)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Keyring::new(keys).ok_or("no key")?
        }
    };
    let changed = store
        .reseal_all(|user_id, stored| {
            if ring.is_current(stored) {
                return Ok(None);
            }
            let secret = ring.open(user_id, stored)?;
            ring.seal(user_id, &secret).map(Some)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot re-seal: {e}"))?;
    sealing::write_check(&ring, &store)?;
    if let KeySource::File(path) = &source {
        sealing::write_key_file(path, std::slice::from_ref(ring.current()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    println!(
        "re-sealed {changed} secrets under master key {}",
        key_id_hex(&ring.current().id())
    );
    if source == KeySource::Environment && ring.keys().len() > 1 {
        println!("now set TOTPD_MASTER_KEY to the last key alone");
    }
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

fn format_time(time: UnixTime) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(time))
        .to_string()
}

fn events(
    config: &Config,
    user: Option<&str>,
    since: Option<&str>,
    json: bool,
) -> Result<(), String> {
    let since = since
        .map(|s| parse_since(s, SystemClock.now()))
        .transpose()?
        .unwrap_or(0);
    let user = user.map(input::normalize_username);
    let store = Store::open(&config.data_dir, config.cache_capacity).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    for event in store.events(since) {
        let event: AuditEvent = event.map_err(|e| e.to_string())?;
        if user.is_some() && event.username != user {
            continue;
        }
        let line = if json {
            serde_json::json!({
                "time": format_time(event.time),
                "event": event.kind.name(),
                "user": event.username,
                "ip": event.ip.map(|ip| ip.to_string()),
                "outcome": event.outcome,
            })
            .to_string()
        } else {
            format!(
                "{}  {:<26} {:<20} {:<15} {}",
                format_time(event.time),
                event.kind.name(),
                // Debug escapes control characters a username might carry.
                event
                    .username
                    .as_deref()
                    .map_or("-".to_owned(), |u| format!("{u:?}")),
                event.ip.map_or("-".to_owned(), |ip| ip.to_string()),
                event.outcome
            )
        };
        if writeln!(out, "{line}").is_err() {
            break; // a closed pipe (| head) is not an error
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_three_forms() {
        assert_eq!(parse_since("1700000000", 0), Ok(1_700_000_000));
        assert_eq!(parse_since("2h", 10_000), Ok(10_000 - 7_200));
        assert_eq!(parse_since("1970-01-02T00:00:00Z", 0), Ok(86_400));
        assert!(parse_since("yesterday-ish", 0).is_err());
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(format_time(86_400), "1970-01-02T00:00:00Z");
    }

    #[test]
    fn event_kinds_have_distinct_names() {
        let names: std::collections::HashSet<_> = EventKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), EventKind::ALL.len());
    }
}
