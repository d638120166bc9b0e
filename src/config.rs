//! Settings, layered: built-in defaults < `config.toml` < `TOTPD_*` environment < command-line
//! flags. Every key has one entry in `KEYS` (name, type, range), which drives the file parser,
//! the environment parser and the documentation test. Unknown keys and bad values are collected
//! and reported together, one line each, naming the key and where it came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::domain::lockout::LockPolicy;
use crate::domain::totp::MAX_SKEW;
use crate::limits::Rate;
use crate::service::password::Argon2Settings;
use crate::store::{DatabaseUrl, PostgresConfig, StoreConfig};

pub const ENV_PREFIX: &str = "TOTPD_";
/// The file read when neither `--config` nor `TOTPD_CONFIG` names one, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "config.toml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub issuer: String,
    pub allow_registration: bool,
    pub temp_token_ttl: u64,
    pub temp_token_attempts: u32,
    pub cache_capacity: u64,
    pub log_level: String,
    pub totp_skew: u64,
    pub argon2: Argon2Settings,
    /// Threads that may run Argon2 at once; 0 means one per CPU core but one.
    pub hash_threads: usize,
    pub max_connections: usize,
    /// Open connections served at once from one client address (trusted proxies are exempt).
    pub max_connections_per_ip: usize,
    pub header_read_timeout: u64,
    pub body_read_timeout: u64,
    /// Seconds an answer may wait on a client that does not read it before the connection is
    /// closed.
    pub write_timeout: u64,
    pub require_code_to_deactivate: bool,
    pub lockout: LockPolicy,
    /// Per client IP, for login, register, activate and verify.
    pub ip_rate: Rate,
    /// Per username, for failed password logins.
    pub login_failure_rate: Rate,
    pub rate_limit_max_entries: usize,
    pub trusted_proxies: Vec<IpNet>,
    /// Where the master key lives; `None` means `<data_dir>/master.key`.
    pub master_key_file: Option<PathBuf>,
    /// Master keys given directly (base64, comma-separated, the last one seals); wins over the file.
    pub master_key: Option<String>,
    pub key_ttl: u64,
    pub key_idle_ttl: u64,
    pub audit_retention_days: u64,
    pub log_format: LogFormat,
    /// PEM certificate chain and key: both set, the server speaks TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Who may read `/metrics`; empty means everyone who can reach the server.
    pub metrics_allow: Vec<IpNet>,
    /// Serve the self-service page at `/` (`src/web.rs`).
    pub web_ui: bool,
    /// Which store: the embedded sled database in `data_dir`, or PostgreSQL at `database_url`.
    pub store: StoreKind,
    /// Never logged whole: it prints with the password masked.
    pub database_url: Option<DatabaseUrl>,
    pub database_pool_size: usize,
    /// Milliseconds to wait for a database connection before answering 503.
    pub database_timeout_ms: u64,
    pub database_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sled,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// `hash_threads` with 0 resolved to the number of CPU cores.
    pub fn key_lifetime(&self) -> crate::domain::keys::KeyLifetime {
        crate::domain::keys::KeyLifetime {
            absolute: self.key_ttl,
            idle: self.key_idle_ttl,
        }
    }

    /// The master key file, with the default resolved against the data dir.
    pub fn master_key_path(&self) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }

    /// The store settings: where the store lives and how to reach it.
    pub fn store_config(&self) -> StoreConfig {
        match (self.store, &self.database_url) {
            (StoreKind::Postgres, Some(url)) => StoreConfig::Postgres(PostgresConfig {
                url: url.clone(),
                pool_size: self.database_pool_size,
                timeout: std::time::Duration::from_millis(self.database_timeout_ms),
                ca_file: self.database_ca_file.clone(),
            }),
            // `load` refuses postgres without a URL; a hand-built config falls back to sled.
            _ => StoreConfig::Sled {
                data_dir: self.data_dir.clone(),
                cache_capacity: self.cache_capacity,
            },
        }
    }

    /// `hash_threads` with 0 resolved to one less than the CPU cores (at least one), so that a
    /// flood of logins always leaves a core for everything else.
    pub fn hash_threads(&self) -> usize {
        match self.hash_threads {
            0 => {
                std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
            }
            n => n,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            data_dir: PathBuf::from("data"),
            issuer: "totpd".into(),
            allow_registration: false,
            temp_token_ttl: 300,
            temp_token_attempts: 5,
            cache_capacity: 16 * 1024 * 1024,
            log_level: "info".into(),
            totp_skew: 1,
            argon2: Argon2Settings::default(),
            hash_threads: 0,
            max_connections: 1024,
            max_connections_per_ip: 64,
            header_read_timeout: 10,
            body_read_timeout: 10,
            write_timeout: 10,
            require_code_to_deactivate: false,
            lockout: LockPolicy::default(),
            ip_rate: Rate {
                per_minute: 30,
                burst: 10,
            },
            login_failure_rate: Rate {
                per_minute: 30,
                burst: 10,
            },
            rate_limit_max_entries: 100_000,
            trusted_proxies: Vec::new(),
            master_key_file: None,
            master_key: None,
            key_ttl: 30 * DAY,
            key_idle_ttl: 7 * DAY,
            audit_retention_days: 90,
            log_format: LogFormat::Text,
            tls_cert: None,
            tls_key: None,
            metrics_allow: Vec::new(),
            web_ui: true,
            store: StoreKind::Sled,
            database_url: None,
            database_pool_size: 16,
            database_timeout_ms: 2000,
            database_ca_file: None,
        }
    }
}

const DAY: u64 = 24 * 60 * 60;

/// A value as found in one source.
enum Raw<'a> {
    Toml(&'a toml::Value),
    Env(&'a str),
}

impl Raw<'_> {
    fn integer(&self, min: u64, max: u64) -> Result<u64, String> {
        let n = match self {
            Raw::Toml(toml::Value::Integer(i)) => u64::try_from(*i).ok(),
            Raw::Toml(_) => return Err("must be an integer".into()),
            Raw::Env(s) => s.trim().parse::<u64>().ok(),
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!("must be an integer from {min} to {max}")),
        }
    }

    fn boolean(&self) -> Result<bool, String> {
        match self {
            Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Raw::Env(s) if s.eq_ignore_ascii_case("true") || *s == "1" => Ok(true),
            Raw::Env(s) if s.eq_ignore_ascii_case("false") || *s == "0" => Ok(false),
            _ => Err("must be true or false".into()),
        }
    }

    /// A TOML array of strings, or a comma-separated environment value.
    fn list(&self) -> Result<Vec<String>, String> {
        match self {
            Raw::Toml(toml::Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or("must be a list of strings".to_owned())
                })
                .collect(),
            Raw::Toml(_) => Err("must be a list of strings".into()),
            Raw::Env(s) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect()),
        }
    }

    fn string(&self) -> Result<String, String> {
        match self {
            Raw::Toml(toml::Value::String(s)) => Ok(s.clone()),
            Raw::Toml(_) => Err("must be a string".into()),
            Raw::Env(s) => Ok((*s).to_owned()),
        }
    }
}

/// What a key holds and how it is stored into the configuration.
enum Kind {
    /// An integer from `min` to `max`.
    Integer {
        min: u64,
        max: u64,
        set: fn(&mut Config, u64),
    },
    Boolean(fn(&mut Config, bool)),
    /// A string, checked and stored by the function.
    Text(fn(&mut Config, String) -> Result<(), String>),
    /// IP addresses and CIDR networks: a TOML array, or comma-separated in the environment.
    Networks(fn(&mut Config, Vec<IpNet>)),
}

/// One configuration key.
pub struct Key {
    /// Dotted TOML name; the environment variable is `TOTPD_` + the name upper-cased with `_`
    /// for `.`.
    pub name: &'static str,
    kind: Kind,
}

impl Key {
    const fn integer(name: &'static str, min: u64, max: u64, set: fn(&mut Config, u64)) -> Key {
        Key {
            name,
            kind: Kind::Integer { min, max, set },
        }
    }

    const fn boolean(name: &'static str, set: fn(&mut Config, bool)) -> Key {
        Key {
            name,
            kind: Kind::Boolean(set),
        }
    }

    const fn text(name: &'static str, set: fn(&mut Config, String) -> Result<(), String>) -> Key {
        Key {
            name,
            kind: Kind::Text(set),
        }
    }

    const fn networks(name: &'static str, set: fn(&mut Config, Vec<IpNet>)) -> Key {
        Key {
            name,
            kind: Kind::Networks(set),
        }
    }

    pub fn env_var(&self) -> String {
        format!(
            "{ENV_PREFIX}{}",
            self.name.replace('.', "_").to_ascii_uppercase()
        )
    }

    fn apply(&self, config: &mut Config, raw: &Raw<'_>) -> Result<(), String> {
        match self.kind {
            Kind::Integer { min, max, set } => set(config, raw.integer(min, max)?),
            Kind::Boolean(set) => set(config, raw.boolean()?),
            Kind::Text(set) => set(config, raw.string()?)?,
            Kind::Networks(set) => set(config, networks(raw)?),
        }
        Ok(())
    }
}

const GIB: u64 = 1024 * 1024 * 1024;

/// An optional path: empty means unset.
fn optional_path(s: String) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Every key, in the order `config.toml` documents them.
pub const KEYS: &[Key] = &[
    Key::text("listen", |c, s| {
        c.listen = s
            .parse()
            .map_err(|_| format!("must be IP:PORT, like 127.0.0.1:8000 (got {s:?})"))?;
        Ok(())
    }),
    Key::text("data_dir", |c, s| {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        c.data_dir = PathBuf::from(s);
        Ok(())
    }),
    Key::text("store", |c, s| {
        c.store = match s.as_str() {
            "sled" => StoreKind::Sled,
            "postgres" => StoreKind::Postgres,
            _ => return Err("must be \"sled\" or \"postgres\"".into()),
        };
        Ok(())
    }),
    // The message never repeats the value: it may hold the password.
    Key::text("database_url", |c, s| {
        if s.is_empty() {
            c.database_url = None;
            return Ok(());
        }
        s.parse::<tokio_postgres::Config>().map_err(|e| {
            format!("is not a PostgreSQL URL like postgres://user:password@host/db ({e})")
        })?;
        c.database_url = Some(DatabaseUrl::new(s));
        Ok(())
    }),
    Key::integer("database_pool_size", 1, 1000, |c, v| {
        c.database_pool_size = v as usize;
    }),
    Key::integer("database_timeout_ms", 50, 600_000, |c, v| {
        c.database_timeout_ms = v;
    }),
    Key::text("database_ca_file", |c, s| {
        c.database_ca_file = optional_path(s);
        Ok(())
    }),
    Key::text("issuer", |c, s| {
        if s.trim().is_empty() || s.chars().count() > 64 || s.chars().any(char::is_control) {
            return Err("must be 1 to 64 characters without control characters".into());
        }
        c.issuer = s;
        Ok(())
    }),
    Key::boolean("allow_registration", |c, v| c.allow_registration = v),
    Key::boolean("web_ui", |c, v| c.web_ui = v),
    Key::integer("temp_token_ttl", 10, 3600, |c, v| c.temp_token_ttl = v),
    Key::integer("temp_token_attempts", 1, 20, |c, v| {
        c.temp_token_attempts = v as u32;
    }),
    Key::integer("cache_capacity", 1024 * 1024, 64 * GIB, |c, v| {
        c.cache_capacity = v;
    }),
    Key::text("log_level", |c, s| {
        tracing_subscriber::EnvFilter::try_new(&s)
            .map_err(|e| format!("is not a valid filter ({e})"))?;
        c.log_level = s;
        Ok(())
    }),
    Key::text("log_format", |c, s| {
        c.log_format = match s.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err("must be \"text\" or \"json\"".into()),
        };
        Ok(())
    }),
    Key::integer("hash_threads", 0, 256, |c, v| c.hash_threads = v as usize),
    Key::integer("max_connections", 1, 1_000_000, |c, v| {
        c.max_connections = v as usize;
    }),
    Key::integer("max_connections_per_ip", 1, 1_000_000, |c, v| {
        c.max_connections_per_ip = v as usize;
    }),
    Key::integer("header_read_timeout", 1, 600, |c, v| {
        c.header_read_timeout = v;
    }),
    Key::integer("body_read_timeout", 1, 600, |c, v| c.body_read_timeout = v),
    Key::integer("write_timeout", 1, 600, |c, v| c.write_timeout = v),
    Key::integer("key_ttl", 60, 10 * 365 * DAY, |c, v| c.key_ttl = v),
    Key::integer("key_idle_ttl", 60, 10 * 365 * DAY, |c, v| {
        c.key_idle_ttl = v
    }),
    Key::text("master_key_file", |c, s| {
        c.master_key_file = optional_path(s);
        Ok(())
    }),
    Key::text("master_key", |c, s| {
        if s.trim().is_empty() {
            c.master_key = None;
            return Ok(());
        }
        for key in s.split(',') {
            crate::service::sealing::MasterKey::parse(key)?;
        }
        c.master_key = Some(s);
        Ok(())
    }),
    Key::text("tls_cert", |c, s| {
        c.tls_cert = optional_path(s);
        Ok(())
    }),
    Key::text("tls_key", |c, s| {
        c.tls_key = optional_path(s);
        Ok(())
    }),
    Key::networks("trusted_proxies", |c, v| c.trusted_proxies = v),
    Key::networks("metrics_allow", |c, v| c.metrics_allow = v),
    Key::integer("audit_retention_days", 1, 36_500, |c, v| {
        c.audit_retention_days = v;
    }),
    Key::integer("rate_limit.per_minute", 0, 1_000_000, |c, v| {
        c.ip_rate.per_minute = v as u32;
    }),
    Key::integer("rate_limit.burst", 1, 1_000_000, |c, v| {
        c.ip_rate.burst = v as u32;
    }),
    Key::integer(
        "rate_limit.login_failures_per_minute",
        0,
        1_000_000,
        |c, v| {
            c.login_failure_rate.per_minute = v as u32;
        },
    ),
    Key::integer("rate_limit.login_failures_burst", 1, 1_000_000, |c, v| {
        c.login_failure_rate.burst = v as u32;
    }),
    Key::integer("rate_limit.max_entries", 100, 100_000_000, |c, v| {
        c.rate_limit_max_entries = v as usize;
    }),
    Key::integer("lockout.threshold", 1, 100, |c, v| {
        c.lockout.threshold = v as u32;
    }),
    Key::integer("lockout.base_seconds", 1, 30 * DAY, |c, v| {
        c.lockout.base_seconds = v;
    }),
    Key::integer("lockout.max_seconds", 1, 365 * DAY, |c, v| {
        c.lockout.max_seconds = v;
    }),
    // NIST SP 800-63B §5.2.2: no more than 100 consecutive failures.
    Key::integer("lockout.hard_limit", 1, 100, |c, v| {
        c.lockout.hard_limit = v as u32;
    }),
    Key::boolean("totp.require_code_to_deactivate", |c, v| {
        c.require_code_to_deactivate = v;
    }),
    Key::integer("totp.skew", 0, MAX_SKEW, |c, v| c.totp_skew = v),
    Key::integer("argon2.memory_kib", 8, 4 * 1024 * 1024, |c, v| {
        c.argon2.memory_kib = v as u32;
    }),
    Key::integer("argon2.iterations", 1, 100, |c, v| {
        c.argon2.iterations = v as u32;
    }),
    Key::integer("argon2.parallelism", 1, 64, |c, v| {
        c.argon2.parallelism = v as u32;
    }),
];

/// IP addresses and CIDR networks.
fn networks(raw: &Raw<'_>) -> Result<Vec<IpNet>, String> {
    raw.list()?
        .iter()
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{item:?} is not an IP address or CIDR network"))
        })
        .collect()
}

/// What the command line says; `None` leaves the layers below in charge.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
}

impl Config {
    /// Builds the configuration from the flags, the environment (`env`, usually
    /// `std::env::vars()`) and the config file they point to. Every problem is reported.
    pub fn load(
        flags: &Flags,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<String>> {
        let env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let mut config = Config::default();
        let mut problems = Vec::new();

        let explicit = flags
            .config
            .clone()
            .or_else(|| env.get("TOTPD_CONFIG").map(PathBuf::from));
        let file = match explicit {
            Some(path) => Some(path),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        if let Some(path) = file {
            match std::fs::read_to_string(&path) {
                Ok(text) => problems.extend(config.apply_toml(&text, &path)),
                Err(e) => problems.push(format!("cannot read config file {}: {e}", path.display())),
            }
        }

        for (var, value) in &env {
            if var == "TOTPD_CONFIG" {
                continue;
            }
            match KEYS.iter().find(|k| k.env_var() == *var) {
                Some(key) => {
                    if let Err(e) = key.apply(&mut config, &Raw::Env(value)) {
                        problems.push(format!("{var}: {e}"));
                    }
                }
                None => problems.push(format!(
                    "{var}: unknown setting (known: TOTPD_CONFIG and {})",
                    KEYS.iter().map(Key::env_var).collect::<Vec<_>>().join(", ")
                )),
            }
        }

        if let Some(dir) = &flags.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(listen) = &flags.listen {
            if let Err(e) = apply_key(&mut config, "listen", &Raw::Env(listen)) {
                problems.push(format!("--listen: {e}"));
            }
        }

        if config.tls_cert.is_some() != config.tls_key.is_some() {
            problems.push("tls_cert and tls_key must be set together".into());
        }
        if config.store == StoreKind::Postgres && config.database_url.is_none() {
            problems.push("store = \"postgres\" needs database_url (TOTPD_DATABASE_URL)".into());
        }
        if config.lockout.max_seconds < config.lockout.base_seconds {
            problems.push("lockout.max_seconds must be at least lockout.base_seconds".into());
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Applies a TOML document; returns the problems found, each prefixed with the file name.
    fn apply_toml(&mut self, text: &str, path: &Path) -> Vec<String> {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let message = e.to_string().replace('\n', " ");
                return vec![format!(
                    "{}: not valid TOML: {}",
                    path.display(),
                    message.trim()
                )];
            }
        };
        let mut flat = Vec::new();
        flatten("", &table, &mut flat);
        flat.into_iter()
            .filter_map(|(name, value)| {
                apply_key(self, &name, &Raw::Toml(value))
                    .err()
                    .map(|e| format!("{}: {name}: {e}", path.display()))
            })
            .collect()
    }
}

fn apply_key(config: &mut Config, name: &str, raw: &Raw<'_>) -> Result<(), String> {
    match KEYS.iter().find(|k| k.name == name) {
        Some(key) => key.apply(config, raw),
        None => Err("unknown key".into()),
    }
}

/// `[totp] skew = 1` becomes `("totp.skew", 1)`.
fn flatten<'a>(prefix: &str, table: &'a toml::Table, out: &mut Vec<(String, &'a toml::Value)>) {
    for (key, value) in table {
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => flatten(&name, inner, out),
            other => out.push((name, other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("totpd.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    fn flags_for(path: &Path) -> Flags {
        Flags {
            config: Some(path.to_path_buf()),
            ..Flags::default()
        }
    }

    #[test]
    fn precedence_is_flag_then_env_then_file_then_default() {
        let (_dir, path) = write_config(
            "listen = \"127.0.0.1:1111\"\ndata_dir = \"from-file\"\nissuer = \"File\"\n[totp]\nskew = 2\n",
        );
        let mut flags = flags_for(&path);
        let vars = env(&[
            ("TOTPD_LISTEN", "127.0.0.1:2222"),
            ("TOTPD_DATA_DIR", "from-env"),
            ("TOTPD_TOTP_SKEW", "0"),
        ]);
        let config = Config::load(&flags, vars.clone()).expect("valid");
        assert_eq!(config.listen.port(), 2222);
        assert_eq!(config.data_dir, PathBuf::from("from-env"));
        assert_eq!(config.issuer, "File");
        assert_eq!(config.totp_skew, 0);
        assert_eq!(config.temp_token_ttl, 300, "default kept");
        flags.listen = Some("127.0.0.1:3333".into());
        flags.data_dir = Some("from-flag".into());
        let config = Config::load(&flags, vars).expect("valid");
        assert_eq!(config.listen.port(), 3333);
        assert_eq!(config.data_dir, PathBuf::from("from-flag"));
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_key_and_source() {
        let (_dir, path) =
            write_config("colour = \"blue\"\ntemp_token_ttl = \"soon\"\n[totp]\nskew = 9\n");
        let problems = Config::load(
            &flags_for(&path),
            env(&[("TOTPD_ALLOW_REGISTRATION", "maybe"), ("TOTPD_BOGUS", "1")]),
        )
        .expect_err("invalid");
        assert_eq!(problems.len(), 5, "{problems:#?}");
        let all = problems.join("\n");
        for needle in [
            "colour: unknown key",
            "temp_token_ttl: must be an integer",
            "totp.skew: must be an integer from 0 to 2",
            "TOTPD_ALLOW_REGISTRATION: must be true or false",
            "TOTPD_BOGUS: unknown setting",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
    }

    #[test]
    fn a_missing_explicit_file_and_bad_toml_are_errors() {
        let problems = Config::load(&flags_for(Path::new("/nonexistent/totpd.toml")), env(&[]))
            .expect_err("missing");
        assert!(problems[0].contains("cannot read config file"));
        let (_dir, path) = write_config("listen = ");
        let problems = Config::load(&flags_for(&path), env(&[])).expect_err("bad toml");
        assert!(problems[0].contains("not valid TOML"), "{problems:?}");
    }

    #[test]
    fn bad_listen_flag_is_reported() {
        let flags = Flags {
            listen: Some("localhost".into()),
            ..Flags::default()
        };
        let problems = Config::load(&flags, env(&[])).expect_err("bad");
        assert!(problems[0].starts_with("--listen: must be IP:PORT"));
    }

    #[test]
    fn postgres_needs_a_url_and_never_shows_its_password() {
        let problems = Config::load(&Flags::default(), env(&[("TOTPD_STORE", "postgres")]))
            .expect_err("no url");
        assert!(problems[0].contains("needs database_url"), "{problems:?}");
        let problems = Config::load(
            &Flags::default(),
            env(&[(
                "TOTPD_DATABASE_URL",
                "postgres://u:hunter2@h/db?sslmode=bogus",
            )]),
        )
        .expect_err("bad url");
        assert!(problems[0].starts_with("TOTPD_DATABASE_URL: is not a PostgreSQL URL"));
        assert!(!problems[0].contains("hunter2"), "{problems:?}");
        let config = Config::load(
            &Flags::default(),
            env(&[
                ("TOTPD_STORE", "postgres"),
                ("TOTPD_DATABASE_URL", "postgres://u:hunter2@h/db"),
                ("TOTPD_DATABASE_POOL_SIZE", "4"),
            ]),
        )
        .expect("valid");
        let StoreConfig::Postgres(pg) = config.store_config() else {
            panic!("a postgres store")
        };
        assert_eq!(pg.pool_size, 4);
        assert_eq!(pg.url.expose(), "postgres://u:hunter2@h/db");
        for shown in [format!("{config:?}"), config.store_config().describe()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("u:***@h"), "{shown}");
        }
    }

    #[test]
    fn env_names_follow_the_key_names() {
        let names: Vec<String> = KEYS.iter().map(Key::env_var).collect();
        assert!(names.contains(&"TOTPD_TOTP_SKEW".to_owned()));
        assert!(names.contains(&"TOTPD_ARGON2_MEMORY_KIB".to_owned()));
        assert!(names.contains(&"TOTPD_TEMP_TOKEN_TTL".to_owned()));
    }

    /// The sample `config.toml` in the repository documents every key with its env var, and
    /// loading it gives exactly the defaults.
    #[test]
    fn sample_config_documents_every_key_and_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let text = std::fs::read_to_string(&path).expect("config.toml exists");
        for key in KEYS {
            let leaf = key.name.rsplit('.').next().unwrap_or(key.name);
            assert!(
                text.lines().any(|l| l
                    .trim_start()
                    .trim_start_matches('#')
                    .trim_start()
                    .starts_with(&format!("{leaf} ="))),
                "config.toml does not set {}",
                key.name
            );
            assert!(
                text.contains(&key.env_var()),
                "config.toml does not name {}",
                key.env_var()
            );
        }
        let config = Config::load(&flags_for(&path), env(&[])).expect("sample is valid");
        assert_eq!(config, Config::default());
    }
}
