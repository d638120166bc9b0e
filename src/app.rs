//! The one start path, for `main` and for every test: [`Application::build`] opens the store,
//! establishes the master key, wires the service and binds the listener (and, where there are
//! Unix sockets, the admin socket); [`Application::run_until_stopped`] serves with the sweeper
//! beside it until the shutdown signal, then makes everything durable.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::clock::Clock;
use crate::config::Config;
use crate::http::{self, SharedState, State};
use crate::limits::Buckets;
use crate::metrics::Metrics;
use crate::service::password::PasswordHasher;
use crate::service::sealing::Keyring;
use crate::service::{Policy, Service, sealing};
use crate::store::{self, StoreConfig};

/// A built server: bound, not yet serving.
pub struct Application {
    state: SharedState,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    #[cfg(unix)]
    admin: Option<tokio::net::UnixListener>,
    addr: SocketAddr,
}

/// The store settings of a configuration.
pub fn store_config(config: &Config) -> StoreConfig {
    config.store_config()
}

/// The service of a configuration, on an open store (the CLI's offline commands use it too),
/// with the keyring the configuration names for that store.
pub async fn build_service(
    config: &Config,
    store: Arc<dyn store::Store>,
    hash_threads: usize,
    metrics: Arc<Metrics>,
) -> Result<Service, String> {
    let (keyring, _) = sealing::establish(
        config.master_key.as_deref(),
        &config.master_key_path(),
        store.as_ref(),
    )
    .await?;
    service_with(config, store, keyring, hash_threads, metrics).await
}

/// The service of a configuration with a given keyring (a key rotation brings its own).
async fn service_with(
    config: &Config,
    store: Arc<dyn store::Store>,
    keyring: Keyring,
    hash_threads: usize,
    metrics: Arc<Metrics>,
) -> Result<Service, String> {
    let argon2 = config.argon2;
    let hasher = tokio::task::spawn_blocking(move || PasswordHasher::new(argon2, hash_threads))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("invalid argon2 settings: {e}"))?;
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
    Ok(Service::new(
        store,
        hasher,
        keyring,
        policy,
        login_failures,
        metrics,
    ))
}

impl Application {
    /// Opens everything `config` names and binds `config.listen` (port 0 picks a free one).
    pub async fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Self, String> {
        // Checked before anything is created in the data dir.
        let tls = http::tls::acceptor(&config)?;
        let store_config = store_config(&config);
        let store = store::open(&store_config)
            .await
            .map_err(|e| e.to_string())?;
        let metrics = Arc::new(Metrics::new(
            http::routes::ROUTES.iter().map(|(_, path)| *path),
        ));
        let service =
            build_service(&config, store, config.hash_threads(), Arc::clone(&metrics)).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        // Only sled needs the socket: it lets one process hold the data dir, so the CLI asks
        // the server. With PostgreSQL the CLI opens the database itself.
        #[cfg(unix)]
        let admin = if store_config.single_process() {
            Some(admin::bind_socket(&config.data_dir)?)
        } else {
            None
        };
        let state = Arc::new(State {
            service: Arc::new(service),
            ip_limits: Buckets::new(config.ip_rate, config.rate_limit_max_entries),
            config,
            clock,
            metrics,
        });
        Ok(Self {
            state,
            listener,
            tls,
            #[cfg(unix)]
            admin,
            addr,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The use cases, for tests that prepare users without HTTP.
    pub fn service(&self) -> Arc<Service> {
        Arc::clone(&self.state.service)
    }

    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// The state the routes are built on (the test that holds the route table to the routes
    /// served builds each route filter from it).
    pub fn http_state(&self) -> SharedState {
        SharedState::clone(&self.state)
    }

    /// Serves until `shutdown` resolves, lets requests in flight finish, then makes every
    /// write durable.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> Result<(), String> {
        let state = self.state;
        let sweeper = tokio::spawn(sweep_expired(SharedState::clone(&state)));
        // The user counts for /metrics: unless the store kept them from its last clean close,
        // a full scan, so in the background (start-up stays fast).
        let counting = Arc::clone(&state.service);
        let counting = tokio::spawn(async move {
            if counting.store_stats().counts.is_some() {
                return;
            }
            if let Err(e) = counting.recount().await {
                tracing::warn!(error = %e, "counting users failed");
            }
        });
        #[cfg(unix)]
        let admin = self.admin.map(|listener| {
            tokio::spawn(admin::serve_socket(
                listener,
                Arc::clone(&state.service),
                Arc::clone(&state.clock),
            ))
        });
        http::server::serve(
            self.listener,
            self.tls,
            SharedState::clone(&state),
            shutdown,
        )
        .await;
        // When this returns, no task of the server holds the store any more, so that the data
        // dir can be opened again at once (a restart in the same process, as tests and
        // embedding programs do): the background tasks are ended and awaited. A count or a
        // sweep still scanning on its thread is stopped, and waited for, by the store's close.
        sweeper.abort();
        let _ = sweeper.await;
        counting.abort();
        let _ = counting.await;
        #[cfg(unix)]
        if let Some(admin) = admin {
            admin.abort();
            let _ = admin.await;
            let _ = std::fs::remove_file(admin::socket_path(&state.config.data_dir));
        }
        tracing::info!("shutting down: flushing the store");
        state
            .service
            .close()
            .await
            .map_err(|e| format!("final flush failed: {e}"))
    }
}

/// Once a minute, deletes expired temp tokens and keys and audit events past their retention,
/// so abandoned logins and old sessions do not pile up; once an hour, recounts the users. The
/// first sweep comes a minute after start, not at it: a scan of every key while the server
/// starts would compete with its first requests for a core and for sled's cache.
async fn sweep_expired(state: SharedState) {
    let every = Duration::from_secs(60);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut minutes = 0u64;
    let retention = state.config.audit_retention_days * 24 * 60 * 60;
    loop {
        tick.tick().await;
        minutes += 1;
        let now = state.clock.now();
        match state.service.sweep(now, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "expired records swept"),
            Err(e) => tracing::warn!(error = %e, "sweeping expired records failed"),
        }
        if minutes % 60 == 0 {
            if let Err(e) = state.service.recount().await {
                tracing::warn!(error = %e, "counting users failed");
            }
        }
    }
}

/// Opens the store for a command run without a server: the store and the service on it.
/// `Err(None)` when a server holds the (sled) data dir: the command then goes through its
/// socket. A PostgreSQL store is always opened directly, servers running or not.
pub async fn open_offline(config: &Config) -> Result<Arc<Service>, Option<String>> {
    let store_config = store_config(config);
    let store = match store::open(&store_config).await {
        Ok(store) => store,
        Err(store::OpenError::Locked(_)) => return Err(None),
        Err(e) => return Err(Some(e.to_string())),
    };
    let metrics = Arc::new(Metrics::new(std::iter::empty()));
    build_service(config, store, 1, metrics)
        .await
        .map(Arc::new)
        .map_err(Some)
}

/// Re-seals every secret under a new master key. With a key file: appends a new key,
/// re-seals, then drops the old key (a crash in between leaves both keys in the file, and a
/// rerun finishes). With `TOTPD_MASTER_KEY`: re-seals under its last key, so rotation is
/// `old,new` then `new`. Returns the lines to print.
pub async fn rotate_master_key(config: &Config) -> Result<String, String> {
    use crate::service::sealing::{KeySource, MasterKey, key_id_hex};
    let store_config = store_config(config);
    let store = match store::open(&store_config).await {
        Err(store::OpenError::Locked(path)) => {
            return Err(format!(
                "the data dir {} is in use by a running server: stop it to rotate the key",
                path.display()
            ));
        }
        other => other.map_err(|e| e.to_string())?,
    };
    let (ring, source) = sealing::establish(
        config.master_key.as_deref(),
        &config.master_key_path(),
        store.as_ref(),
    )
    .await?;
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
    let current = ring.current().clone();
    let several = ring.keys().len() > 1;
    let metrics = Arc::new(Metrics::new(std::iter::empty()));
    let service = service_with(config, Arc::clone(&store), ring, 1, metrics).await?;
    let changed = service
        .reseal_secrets()
        .await
        .map_err(|e| format!("cannot re-seal: {}", e.code()))?;
    service.write_key_check().await?;
    if let KeySource::File(path) = &source {
        sealing::write_key_file(path, std::slice::from_ref(&current))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    service.close().await.map_err(|e| e.to_string())?;
    let mut out = format!(
        "re-sealed {changed} secrets under master key {}\n",
        key_id_hex(&current.id())
    );
    if source == KeySource::Environment && several {
        out.push_str("now set TOTPD_MASTER_KEY to the last key alone\n");
    }
    Ok(out)
}
