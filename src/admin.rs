//! Administration that works with or without a running server. Each command is an
//! `AdminRequest`; `Admin::execute` carries it out on a store. The CLI opens the data dir itself
//! when no server runs; when one does (sled lets one process hold the data dir), it sends the
//! request as one JSON line over the Unix socket `<data dir>/admin.sock` (mode 0600: only the
//! owner can administer) and the server executes it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::input;
use crate::models::{AuditEvent, EventKind, User};
use crate::password::PasswordHasher;
use crate::store::Store;

/// The socket a running server answers administration requests on.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminRequest {
    UserAdd {
        name: String,
        password: String,
    },
    UserList,
    UserRemove {
        name: String,
    },
    UserSetPassword {
        name: String,
        password: String,
    },
    UserResetTotp {
        name: String,
    },
    UserUnlock {
        name: String,
    },
    Backup {
        path: PathBuf,
    },
    Events {
        user: Option<String>,
        since: UnixTime,
        json: bool,
    },
}

/// The answer: text for stdout, or a one-line error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    pub output: String,
}

pub struct Admin<'a> {
    pub store: &'a Store,
    pub hasher: &'a PasswordHasher,
}

fn format_time(time: UnixTime) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(time)).to_string()
}

impl Admin<'_> {
    fn user(&self, raw: &str) -> Result<User, String> {
        let name = input::normalize_username(raw);
        self.store
            .user_by_name(&name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no user named {name:?}"))
    }

    fn event(&self, user: &User, outcome: &str, now: UnixTime) -> Result<(), String> {
        self.store
            .record_event(&AuditEvent {
                time: now,
                kind: EventKind::AdminAction,
                user_id: Some(user.id),
                username: Some(user.username.clone()),
                ip: None,
                outcome: outcome.to_owned(),
            })
            .map_err(|e| e.to_string())
    }

    fn password(raw: String) -> Result<String, String> {
        input::new_password(raw).map_err(|e| format!("invalid password: {}", e.message))
    }

    /// Carries out `request` (blocking: it may hash a password) and flushes before answering.
    pub fn execute(&self, request: AdminRequest, now: UnixTime) -> Result<String, String> {
        let output = match request {
            AdminRequest::UserAdd { name, password } => {
                let name = input::new_username(&name)
                    .map_err(|e| format!("invalid user name: {}", e.message))?;
                let password = Self::password(password)?;
                if self
                    .store
                    .user_by_name(&name)
                    .map_err(|e| e.to_string())?
                    .is_some()
                {
                    return Err(format!("a user named {name:?} already exists"));
                }
                let hash = self.hasher.hash_now(&password).map_err(|e| e.to_string())?;
                let user = self
                    .store
                    .create_user(&name, &hash, now)
                    .map_err(|e| e.to_string())?
                    .map_err(|_| format!("a user named {name:?} already exists"))?;
                self.store
                    .record_event(&AuditEvent {
                        time: now,
                        kind: EventKind::UserCreated,
                        user_id: Some(user.id),
                        username: Some(user.username.clone()),
                        ip: None,
                        outcome: "cli".into(),
                    })
                    .map_err(|e| e.to_string())?;
                format!("created user {name}\n")
            }
            AdminRequest::UserList => {
                let mut out = format!(
                    "{:<24} {:<6} {:<22} {}\n",
                    "NAME", "TOTP", "LOCKED UNTIL", "LAST LOGIN"
                );
                for user in self.store.users() {
                    let user = user.map_err(|e| e.to_string())?;
                    let locked = match user.failures.locked_until(now) {
                        Some(crate::attempt::HARD_LOCK) => "until recovery code".to_owned(),
                        Some(until) => format_time(until),
                        None => "-".to_owned(),
                    };
                    let totp = if user.totp.is_some() {
                        "on"
                    } else if user.pending.is_some() {
                        "setup"
                    } else {
                        "off"
                    };
                    out.push_str(&format!(
                        "{:<24} {:<6} {:<22} {}\n",
                        format!("{:?}", user.username).trim_matches('"'),
                        totp,
                        locked,
                        user.last_login.map_or("never".to_owned(), format_time)
                    ));
                }
                out
            }
            AdminRequest::UserRemove { name } => {
                let user = self.user(&name)?;
                self.store.remove_user(user.id).map_err(|e| e.to_string())?;
                self.event(&user, "user_removed", now)?;
                format!("removed user {}\n", user.username)
            }
            AdminRequest::UserSetPassword { name, password } => {
                let user = self.user(&name)?;
                let password = Self::password(password)?;
                let hash = self.hasher.hash_now(&password).map_err(|e| e.to_string())?;
                self.store
                    .change_password(user.id, &hash, None, now)
                    .map_err(|e| e.to_string())?;
                self.event(&user, "password_set", now)?;
                format!(
                    "set the password of {}; their keys were revoked\n",
                    user.username
                )
            }
            AdminRequest::UserResetTotp { name } => {
                let user = self.user(&name)?;
                self.store
                    .reset_totp(user.id, now)
                    .map_err(|e| e.to_string())?;
                self.event(&user, "totp_reset", now)?;
                format!(
                    "reset TOTP of {}: secret, recovery codes and lock cleared, keys revoked\n",
                    user.username
                )
            }
            AdminRequest::UserUnlock { name } => {
                let user = self.user(&name)?;
                self.store.unlock(user.id).map_err(|e| e.to_string())?;
                self.event(&user, "unlocked", now)?;
                format!("unlocked {}\n", user.username)
            }
            AdminRequest::Backup { path } => {
                let count = crate::backup::write(self.store, &path)?;
                format!("backed up {count} records to {}\n", path.display())
            }
            AdminRequest::Events { user, since, json } => {
                let user = user.map(|u| input::normalize_username(&u));
                let mut out = String::new();
                for event in self.store.events(since) {
                    let event = event.map_err(|e| e.to_string())?;
                    if user.is_some() && event.username != user {
                        continue;
                    }
                    out.push_str(&render_event(&event, json));
                    out.push('\n');
                }
                out
            }
        };
        self.store.flush_now().map_err(|e| e.to_string())?;
        Ok(output)
    }
}

/// One line of `totpd events`: aligned text, or a JSON object.
pub fn render_event(event: &AuditEvent, json: bool) -> String {
    if json {
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
    }
}

/// Sends `request` to the server listening on `socket` and returns its answer.
pub fn call(socket: &Path, request: &AdminRequest) -> Result<String, String> {
    #[cfg(unix)]
    {
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
            format!(
                "the data dir is in use by another totpd process, and its admin socket {} does not answer ({e})",
                socket.display()
            )
        })?;
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(|e| e.to_string())?;
        let mut writer = &stream;
        let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
        line.push('\n');
        writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot talk to the server: {e}"))?;
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .map_err(|e| format!("no answer from the server: {e}"))?;
        let response: AdminResponse = serde_json::from_str(&answer)
            .map_err(|_| "the server sent an unreadable answer".to_owned())?;
        if response.ok {
            Ok(response.output)
        } else {
            Err(response.output)
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (socket, request);
        Err("the data dir is in use by a running server".into())
    }
}

/// Binds `<data dir>/admin.sock` with mode 0600. Call it while holding the data dir's lock: a
/// stale socket left by a killed server is replaced.
#[cfg(unix)]
pub fn bind_socket(data_dir: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    // bind() creates the socket with the process umask and chmod comes after: under umask 077
    // it is owner-only from its first instant. (The umask is process-wide; anything another
    // thread creates meanwhile is owner-only too, which is what totpd wants anyway, and
    // `cli::run` has set 077 already. It matters for servers started as a library.)
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let bound = tokio::net::UnixListener::bind(&path);
    rustix::process::umask(previous);
    let listener =
        bound.map_err(|e| format!("cannot create the admin socket {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict the admin socket {}: {e}", path.display()))?;
    Ok(listener)
}

/// Whether a client of the admin socket running as `peer_uid` may administer a server running
/// as `own_uid`: only the same user. (The socket's mode says the same; this holds even if the
/// file's mode or a directory above it were loosened.)
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid
}

/// Answers administration requests on `listener` until the task is dropped.
#[cfg(unix)]
pub async fn serve_socket(listener: tokio::net::UnixListener, state: crate::AppState) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    let own_uid = rustix::process::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            // SO_PEERCRED: the uid the kernel recorded when the client connected.
            let refusal = match stream.peer_cred() {
                Ok(peer) if peer_allowed(peer.uid(), own_uid) => None,
                Ok(peer) => {
                    tracing::warn!(
                        peer_uid = peer.uid(),
                        peer_pid = peer.pid(),
                        own_uid,
                        "admin socket: refused a client running as another user"
                    );
                    Some(format!(
                        "refused: the server administers only for its own user (uid {own_uid}); \
                         run the command as that user"
                    ))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: cannot identify a client; refused");
                    Some("refused: the client could not be identified".to_owned())
                }
            };
            let (read, mut write) = stream.into_split();
            if let Some(output) = refusal {
                let response = AdminResponse { ok: false, output };
                let mut answer = serde_json::to_string(&response).unwrap_or_default();
                answer.push('\n');
                let _ = write.write_all(answer.as_bytes()).await;
                return;
            }
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read).take(1024 * 1024);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let response = match serde_json::from_str::<AdminRequest>(&line) {
                Ok(request) => {
                    let now = state.clock.now();
                    let result = tokio::task::spawn_blocking(move || {
                        Admin {
                            store: &state.store,
                            hasher: &state.hasher,
                        }
                        .execute(request, now)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("the command failed: {e}")));
                    match result {
                        Ok(output) => AdminResponse { ok: true, output },
                        Err(output) => AdminResponse { ok: false, output },
                    }
                }
                Err(_) => AdminResponse {
                    ok: false,
                    output: "unknown admin request".into(),
                },
            };
            let mut answer = serde_json::to_string(&response).unwrap_or_default();
            answer.push('\n');
            let _ = write.write_all(answer.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_servers_own_user_may_administer() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(1001, 1000));
        assert!(
            !peer_allowed(0, 1000),
            "not even root: run the command as the server's user"
        );
        assert!(!peer_allowed(1000, 0));
    }
}
