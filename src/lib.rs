//! totpd: a TOTP two-factor-authentication server in one binary.
//!
//! It serves the AuthTOTP API (setup, activate, verify, deactivate) plus the password login that
//! starts a two-step login, and keeps every user, secret, token and recovery code in an embedded
//! sled database. Dependencies point one way:
//! `routes → handlers → service → {totp, store, models}`, with `error` and `clock` as leaves.
//! `main.rs` only calls [`cli::run`]; tests build the same [`AppState`] and call
//! [`server::serve`] on a port of their own.

pub mod admin;
pub mod attempt;
pub mod backup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod error;
pub mod group_commit;
pub mod handlers;
pub mod input;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod password;
pub mod qr;
pub mod routes;
pub mod sealing;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod totp;
pub mod warnings;

use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::limits::{Buckets, IpLimits};
use crate::metrics::Metrics;
use crate::password::{HashError, PasswordHasher};
use crate::service::{Policy, Service};
use crate::store::{OpenError, Store};

/// Everything a request needs, built once and shared (no global state).
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub store: Arc<Store>,
    pub service: Arc<Service>,
    pub ip_limits: Arc<IpLimits>,
    pub hasher: PasswordHasher,
    pub metrics: Arc<Metrics>,
}

/// Why the server could not be built.
#[derive(Debug)]
pub enum StartError {
    Store(OpenError),
    Hasher(HashError),
    MasterKey(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Store(e) => e.fmt(f),
            StartError::Hasher(e) => write!(f, "invalid argon2 settings: {e}"),
            StartError::MasterKey(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for StartError {}

impl AppState {
    /// Opens the store in `config.data_dir` and wires the service. Blocking (opens files, runs
    /// one Argon2 hash for the dummy); call it before serving or from `spawn_blocking`.
    pub fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let hasher = PasswordHasher::new(config.argon2, config.hash_threads())
            .map_err(StartError::Hasher)?;
        let store = Arc::new(
            Store::open(&config.data_dir, config.cache_capacity).map_err(StartError::Store)?,
        );
        let (keyring, _) = sealing::establish(&config, &store).map_err(StartError::MasterKey)?;
        let policy = Policy {
            issuer: config.issuer.clone(),
            allow_registration: config.allow_registration,
            temp_token_ttl: config.temp_token_ttl,
            temp_token_attempts: config.temp_token_attempts,
            totp_skew: config.totp_skew,
            require_code_to_deactivate: config.require_code_to_deactivate,
            lockout: config.lockout,
            key_lifetime: config.key_lifetime(),
        };
        let login_failures = Buckets::new(config.login_failure_rate, config.rate_limit_max_entries);
        let metrics = Arc::new(Metrics::new(routes::ROUTES.iter().map(|(_, path)| *path)));
        let service = Arc::new(Service::new(
            Arc::clone(&store),
            hasher.clone(),
            keyring,
            policy,
            login_failures,
            Arc::clone(&metrics),
        ));
        let ip_limits = Arc::new(Buckets::new(config.ip_rate, config.rate_limit_max_entries));
        Ok(Self {
            config: Arc::new(config),
            clock,
            store,
            service,
            ip_limits,
            hasher,
            metrics,
        })
    }
}
