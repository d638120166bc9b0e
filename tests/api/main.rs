//! One integration-test binary. Each module starts the real server (in this process, on
//! 127.0.0.1:0, with its own temp data dir and manual clock) or the real binary, and talks HTTP.
//! Codes are computed by the independent `totp-rs` crate from the provisioning URI.

#[path = "../common/mod.rs"]
mod common;
mod helpers;

/// Lockouts, throttles, sealed secrets, key lifetimes, step-up, hostile input, audit trail.
mod abuse;
/// Password login, registration, logout, login keys.
mod auth;
/// The clock-drift hint (`clock_skew`) at every code-taking route, and the steps it spends.
mod clock_skew;
/// The framework-level errors: 404, 405, 413, 415, parse errors, body-less POSTs, headers.
mod http;
/// Operations: OpenAPI document, QR codes, health, metrics, request ids, backup, TLS.
mod operations;
/// The binary: CLI, listening line, config errors, restart and kill -9 durability.
mod process;
/// Parallel double-spends of temp tokens, time steps, recovery codes and activation.
mod races;
/// The defects of the outside review (issue 10), as the attacks and accidents that showed them.
mod review;
/// setup, activate, verify, deactivate and status: the spec's flow and its rules.
mod totp_flow;
