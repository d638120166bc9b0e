//! The server under test: the real `totpd` binary as a child process (so its memory is its own),
//! on a data dir of the harness, configured only through `TOTPD_*` variables, stopped with
//! SIGTERM so it flushes like in production.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Settings every bench server gets, on top of the defaults (which stay, Argon2 included).
pub fn base_env(dir: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        // An empty config file, so a config.toml in the working directory is not read.
        (
            "TOTPD_CONFIG".into(),
            dir.join("empty.toml").display().to_string(),
        ),
        // The log level stays at its default (info): the one line per request is part of what
        // a default server costs. It goes to a file (see `Server::start`), as under systemd.
    ];
    // Abuse limits would throttle a load generator that sends everything from 127.0.0.1;
    // they are switched off only where this totpd has them.
    for (key, off) in OFF_SWITCHES {
        if totpd::config::KEYS.iter().any(|k| k.name == *key) {
            let var = format!("TOTPD_{}", key.replace('.', "_").to_ascii_uppercase());
            env.push((var, (*off).to_owned()));
        }
    }
    env
}

/// Config keys that would make the load unrepresentative, and the value that turns them off.
/// (The per-address connection cap too: every load connection comes from 127.0.0.1.)
const OFF_SWITCHES: &[(&str, &str)] = &[
    ("rate_limit.per_minute", "0"),
    ("max_connections_per_ip", "1000000"),
];

/// The names of the switches `base_env` applied, for the report.
pub fn switched_off() -> Vec<&'static str> {
    OFF_SWITCHES
        .iter()
        .filter(|(key, _)| totpd::config::KEYS.iter().any(|k| k.name == *key))
        .map(|(key, _)| *key)
        .collect()
}

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// From spawning the process to the first answered request.
    pub startup: Duration,
    log: PathBuf,
}

impl Server {
    /// Starts `bin` on `data_dir`, waits for its listening line, and times the first answer (a
    /// POST to the baseline route).
    pub fn start(bin: &Path, data_dir: &Path, env: &[(String, String)]) -> Result<Self, String> {
        let log = data_dir.with_extension("log");
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = Command::new(bin);
        for (name, _) in std::env::vars_os() {
            // Inherited TOTPD_* variables would change the server (unknown ones stop it).
            if name.to_string_lossy().starts_with("TOTPD_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(addr) = addr.filter(|_| read.is_ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "{} did not start: {line:?} {}",
                bin.display(),
                stderr.trim()
            ));
        };
        let mut server = Self {
            child,
            addr,
            startup: Duration::ZERO,
            log,
        };
        let answer = server.baseline_request()?;
        server.startup = spawned.elapsed();
        if !answer.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "the baseline route answered {:?}: was totpd built with --features bench?",
                answer.lines().next().unwrap_or_default()
            ));
        }
        Ok(server)
    }

    /// One baseline request on a fresh connection; returns the raw answer.
    fn baseline_request(&self) -> Result<String, String> {
        let body = r#"{"temp_token":"startup","token":"123456"}"#;
        let mut stream = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        write!(
            stream,
            "POST /api/v1/bench/baseline/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| e.to_string())?;
        Ok(answer)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (VmHWM, VmRSS) in bytes: the peak and current resident set.
    pub fn memory(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// SIGTERM, then wait for the final flush (SIGKILL after 60 s).
    pub fn stop(mut self) -> Result<(), String> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
                    return Err(format!("totpd exited with {status}: {}", stderr.trim()));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("totpd did not stop within 60 s of SIGTERM".into());
                }
            }
        }
    }
}

/// (apparent bytes, allocated bytes) of every file under `dir`.
pub fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return total;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (a, b) = dir_size(&entry.path());
            total.0 += a;
            total.1 += b;
        } else {
            total.0 += meta.len();
            total.1 += meta.blocks() * 512;
        }
    }
    total
}

/// The external reference: the `bare-warp` binary (a minimal warp 0.4 server, see
/// `src/bin/bare-warp.rs`) as a process of its own, so it pays for its own process exactly as
/// totpd does.
pub struct Reference {
    child: Child,
    pub addr: SocketAddr,
}

impl Reference {
    pub fn start(bin: &Path) -> Result<Self, String> {
        Self::start_with(bin, &[], Stdio::inherit())
    }

    /// Started with `args`, its stderr (the status ceiling's log) going to `stderr`.
    pub fn start_with(bin: &Path, args: &[&OsStr], stderr: Stdio) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        match line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse::<SocketAddr>().ok())
        {
            Some(addr) if read.is_ok() => Ok(Self { child, addr }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("{} did not start: {line:?}", bin.display()))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not stopped after 5 s.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
