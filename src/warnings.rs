//! Settings that are valid but risky. Each rule gives one line saying what is wrong and what
//! to do; `serve` logs them as warnings at start-up and `totpd check-config` prints them.

use std::path::Path;

use crate::config::Config;

/// OWASP Password Storage Cheat Sheet: Argon2id configurations of equal strength (memory in
/// KiB, iterations), all with p=1. A setting at or above any one of them is acceptable.
pub const OWASP_ARGON2_MINIMUMS: &[(u32, u32)] = &[
    (47_104, 1),
    (19_456, 2),
    (12_288, 3),
    (9_216, 4),
    (7_168, 5),
];

/// Every risky setting of `config`, one line each. `master_key_mode` is the permission bits of
/// the master key file when one is in use and exists (`None` with `TOTPD_MASTER_KEY`).
pub fn risky_settings(config: &Config, master_key_mode: Option<u32>) -> Vec<String> {
    let mut found = Vec::new();
    let everyone: Vec<String> = config
        .trusted_proxies
        .iter()
        .filter(|net| net.prefix_len() == 0)
        .map(ToString::to_string)
        .collect();
    if !everyone.is_empty() {
        found.push(format!(
            "trusted_proxies contains {}: every client may set X-Forwarded-For, so per-address \
             limits and the audit trail's addresses can be forged; list only your proxies",
            everyone.join(" and ")
        ));
    }
    let exposed = !config.listen.ip().is_loopback();
    if exposed && config.tls_cert.is_none() {
        found.push(format!(
            "listen = {} serves plain HTTP beyond loopback: passwords, codes and keys cross the \
             network in clear; set tls_cert and tls_key, or listen on loopback behind a TLS proxy",
            config.listen
        ));
    }
    if exposed && config.metrics_allow.is_empty() {
        found.push(format!(
            "metrics_allow is empty and listen = {} is not loopback: anyone who reaches the \
             server can read /metrics; list the addresses of your monitoring",
            config.listen
        ));
    }
    let argon2 = config.argon2;
    let strong = OWASP_ARGON2_MINIMUMS.iter().any(|&(memory, iterations)| {
        argon2.memory_kib >= memory && argon2.iterations >= iterations
    });
    if !strong {
        found.push(format!(
            "argon2 memory_kib = {}, iterations = {} is below OWASP's minimum (19456 KiB with 2 \
             iterations, or 12288/3, 9216/4, 7168/5, 47104/1): stolen password hashes would be \
             cheap to crack",
            argon2.memory_kib, argon2.iterations
        ));
    }
    if let Some(mode) = master_key_mode.filter(|mode| mode & 0o077 != 0) {
        found.push(format!(
            "the master key file {} has mode {:04o}: group or others can reach the key that \
             seals every TOTP secret; chmod 600 it",
            config.master_key_path().display(),
            mode & 0o7777
        ));
    }
    found
}

/// The permission bits of the master key file, when the configuration uses one and it exists.
pub fn master_key_mode(config: &Config) -> Option<u32> {
    if config.master_key.is_some() {
        return None;
    }
    file_mode(&config.master_key_path())
}

#[cfg(unix)]
fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|meta| meta.permissions().mode())
}

#[cfg(not(unix))]
fn file_mode(_path: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::password::Argon2Settings;

    fn with(change: impl FnOnce(&mut Config)) -> Vec<String> {
        let mut config = Config::default();
        change(&mut config);
        risky_settings(&config, Some(0o600))
    }

    #[test]
    fn the_defaults_are_not_risky() {
        assert_eq!(with(|_| {}), Vec::<String>::new());
    }

    #[test]
    fn trusting_every_address_as_a_proxy_is_risky() {
        for everyone in ["0.0.0.0/0", "::/0"] {
            let found = with(|c| {
                c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap(), everyone.parse().unwrap()]
            });
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(found[0].starts_with("trusted_proxies contains"));
            assert!(found[0].contains(everyone), "{}", found[0]);
        }
        assert!(with(|c| c.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()]).is_empty());
    }

    #[test]
    fn plain_http_and_open_metrics_beyond_loopback_are_risky() {
        let found = with(|c| c.listen = "0.0.0.0:8000".parse().unwrap());
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("plain HTTP"), "{}", found[0]);
        assert!(
            found[1].starts_with("metrics_allow is empty"),
            "{}",
            found[1]
        );
        // TLS and a metrics allow-list answer both.
        let found = with(|c| {
            c.listen = "[2001:db8::1]:443".parse().unwrap();
            c.tls_cert = Some("cert.pem".into());
            c.tls_key = Some("key.pem".into());
            c.metrics_allow = vec!["10.0.0.0/8".parse().unwrap()];
        });
        assert!(found.is_empty(), "{found:?}");
        // Loopback needs neither, over IPv4 or IPv6.
        assert!(with(|c| c.listen = "[::1]:8000".parse().unwrap()).is_empty());
        assert!(with(|c| c.listen = "127.0.0.2:8000".parse().unwrap()).is_empty());
    }

    #[test]
    fn argon2_below_every_owasp_row_is_risky() {
        let argon2 = |memory_kib, iterations| {
            with(|c| {
                c.argon2 = Argon2Settings {
                    memory_kib,
                    iterations,
                    parallelism: 1,
                }
            })
        };
        for &(memory, iterations) in OWASP_ARGON2_MINIMUMS {
            assert!(
                argon2(memory, iterations).is_empty(),
                "{memory}/{iterations}"
            );
            let below = argon2(memory - 1, iterations);
            // 47103/1 and 7167/5 are below every row; the others may meet a neighbour's.
            if iterations == 1 || iterations == 5 {
                assert_eq!(below.len(), 1, "{memory}/{iterations}: {below:?}");
            }
        }
        let found = argon2(64, 1);
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("argon2 memory_kib = 64, iterations = 1"));
        assert_eq!(argon2(19_455, 2).len(), 1, "just below the default row");
        assert!(
            argon2(12_288, 10).is_empty(),
            "more passes make up for memory"
        );
        assert_eq!(argon2(7_000, 100).len(), 1, "below every row's memory");
    }

    #[test]
    fn a_master_key_file_others_can_reach_is_risky() {
        let config = Config::default();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o100_644] {
            let found = risky_settings(&config, Some(mode));
            assert_eq!(found.len(), 1, "{mode:o}");
            assert!(found[0].contains("master key file"), "{}", found[0]);
            assert!(found[0].contains(&format!("{:04o}", mode & 0o7777)));
        }
        for mode in [0o600, 0o400, 0o100_600] {
            assert!(risky_settings(&config, Some(mode)).is_empty(), "{mode:o}");
        }
        assert!(risky_settings(&config, None).is_empty());
    }

    #[test]
    fn the_master_key_mode_is_read_only_for_a_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        assert_eq!(master_key_mode(&config), None, "no file yet");
        std::fs::write(config.master_key_path(), "key").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                config.master_key_path(),
                std::fs::Permissions::from_mode(0o644),
            )
            .expect("chmod");
            assert_eq!(master_key_mode(&config).map(|m| m & 0o777), Some(0o644));
        }
        config.master_key = Some("from the environment".into());
        assert_eq!(master_key_mode(&config), None, "the file is not used");
    }
}
