//! Administration that works with or without a running server, and the backup file
//! ([`backup`]). Each command is an `AdminRequest`; `execute` carries it out through the
//! service. The CLI opens the data dir itself when no server runs; when one does (sled lets one
//! process hold the data dir), it sends the request as one JSON line over the Unix socket
//! `<data dir>/admin.sock` (mode 0600: only the owner can administer) and the server executes it.

pub mod backup;
pub mod copy;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, UnixTime};
use crate::domain::audit::AuditEvent;
use crate::domain::lockout::HARD_LOCK;
use crate::error::Error;
use crate::service::input;
use crate::service::{Ctx, Service, UserTotpState};

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

fn format_time(time: UnixTime) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(time)).to_string()
}

/// The one-line text of a failed admin command.
fn admin_error(error: Error, name: &str) -> String {
    match error {
        Error::NotFound => format!("no user named {name:?}"),
        Error::Fields(fields) if fields.iter().any(|f| f.code == "unique") => {
            format!("a user named {name:?} already exists")
        }
        Error::Unavailable => "the store is unavailable (see the log)".to_owned(),
        other => format!("failed: {}", other.code()),
    }
}

/// Carries out `request` through the service; `now` is the time of the request.
pub async fn execute(
    service: &Service,
    request: AdminRequest,
    now: UnixTime,
) -> Result<String, String> {
    let ctx = Ctx { now, ip: None };
    let output = match request {
        AdminRequest::UserAdd { name, password } => {
            let name = input::new_username(&name)
                .map_err(|e| format!("invalid user name: {}", e.message))?;
            let password = new_password(password)?;
            service
                .create_user(&name, password, "cli", &ctx)
                .await
                .map_err(|e| admin_error(e, &name))?;
            format!("created user {name}\n")
        }
        AdminRequest::UserList => {
            let mut out = format!(
                "{:<24} {:<6} {:<22} {}\n",
                "NAME", "TOTP", "LOCKED UNTIL", "LAST LOGIN"
            );
            let users = service
                .list_users(now)
                .await
                .map_err(|e| admin_error(e, ""))?;
            for user in users {
                let locked = match user.locked_until {
                    Some(HARD_LOCK) => "until recovery code".to_owned(),
                    Some(until) => format_time(until),
                    None => "-".to_owned(),
                };
                let totp = match user.totp {
                    UserTotpState::On => "on",
                    UserTotpState::SetupPending => "setup",
                    UserTotpState::Off => "off",
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
            let name = input::normalize_username(&name);
            let user = service
                .remove_user(&name, &ctx)
                .await
                .map_err(|e| admin_error(e, &name))?;
            format!("removed user {}\n", user.username)
        }
        AdminRequest::UserSetPassword { name, password } => {
            let name = input::normalize_username(&name);
            let password = new_password(password)?;
            let user = service
                .set_password(&name, password, &ctx)
                .await
                .map_err(|e| admin_error(e, &name))?;
            format!(
                "set the password of {}; their keys were revoked\n",
                user.username
            )
        }
        AdminRequest::UserResetTotp { name } => {
            let name = input::normalize_username(&name);
            let user = service
                .reset_totp(&name, &ctx)
                .await
                .map_err(|e| admin_error(e, &name))?;
            format!(
                "reset TOTP of {}: secret, recovery codes and lock cleared, keys revoked\n",
                user.username
            )
        }
        AdminRequest::UserUnlock { name } => {
            let name = input::normalize_username(&name);
            let user = service
                .unlock(&name, &ctx)
                .await
                .map_err(|e| admin_error(e, &name))?;
            format!("unlocked {}\n", user.username)
        }
        AdminRequest::Backup { path } => {
            let count = backup::write(service, &path).await?;
            format!("backed up {count} records to {}\n", path.display())
        }
        AdminRequest::Events { user, since, json } => {
            let user = user.map(|u| input::normalize_username(&u));
            let events = service
                .audit_trail(since, user.as_deref())
                .await
                .map_err(|e| admin_error(e, ""))?;
            let mut out = String::new();
            for event in events {
                out.push_str(&render_event(&event, json));
                out.push('\n');
            }
            out
        }
    };
    Ok(output)
}

fn new_password(raw: String) -> Result<String, String> {
    input::new_password(raw).map_err(|e| format!("invalid password: {}", e.message))
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
pub async fn serve_socket(
    listener: tokio::net::UnixListener,
    service: Arc<Service>,
    clock: Arc<dyn Clock>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    let own_uid = rustix::process::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (service, clock) = (Arc::clone(&service), Arc::clone(&clock));
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
                Ok(request) => match execute(&service, request, clock.now()).await {
                    Ok(output) => AdminResponse { ok: true, output },
                    Err(output) => AdminResponse { ok: false, output },
                },
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
