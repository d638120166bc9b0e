//! The audit trail's entries: what happened, to whom, from where. Never a secret.

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::domain::user::UserId;

/// One entry of the audit trail. Never holds a code, key, token, password or secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub time: UnixTime,
    pub kind: EventKind,
    pub user_id: Option<UserId>,
    pub username: Option<String>,
    pub ip: Option<std::net::IpAddr>,
    /// `ok` or why not: `wrong_code`, `replay`, `locked`, …
    pub outcome: String,
}

/// What happened. Append new kinds at the end: the index is what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Login,
    TempTokenIssued,
    Verify,
    ReplayRefused,
    LockStarted,
    RecoveryCodeUsed,
    Setup,
    Activate,
    Deactivate,
    RecoveryCodesRegenerated,
    KeyRevoked,
    PasswordChanged,
    UserCreated,
    AdminAction,
}

impl EventKind {
    pub const ALL: [EventKind; 14] = [
        EventKind::Login,
        EventKind::TempTokenIssued,
        EventKind::Verify,
        EventKind::ReplayRefused,
        EventKind::LockStarted,
        EventKind::RecoveryCodeUsed,
        EventKind::Setup,
        EventKind::Activate,
        EventKind::Deactivate,
        EventKind::RecoveryCodesRegenerated,
        EventKind::KeyRevoked,
        EventKind::PasswordChanged,
        EventKind::UserCreated,
        EventKind::AdminAction,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Login => "login",
            EventKind::TempTokenIssued => "temp_token_issued",
            EventKind::Verify => "verify",
            EventKind::ReplayRefused => "replay_refused",
            EventKind::LockStarted => "lock_started",
            EventKind::RecoveryCodeUsed => "recovery_code_used",
            EventKind::Setup => "setup",
            EventKind::Activate => "activate",
            EventKind::Deactivate => "deactivate",
            EventKind::RecoveryCodesRegenerated => "recovery_codes_regenerated",
            EventKind::KeyRevoked => "key_revoked",
            EventKind::PasswordChanged => "password_changed",
            EventKind::UserCreated => "user_created",
            EventKind::AdminAction => "admin_action",
        }
    }
}
