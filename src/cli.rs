//! The command line: `totpd [serve]` runs the server, `totpd user add NAME` creates an account.
//! Failures are one line on stderr and exit code 1; nothing panics at the operator.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::AppState;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Flags};
use crate::input;
use crate::password::PasswordHasher;
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
    store
        .create_user(&name, &hash, SystemClock.now())
        .map_err(|e| e.to_string())?
        .map_err(|_| format!("a user named {name:?} already exists"))?;
    store.flush_now().map_err(|e| e.to_string())?;
    println!("created user {name}");
    Ok(())
}
