//! totpd: a TOTP two-factor-authentication server in one binary.
//!
//! It serves the AuthTOTP API (setup, activate, verify, deactivate) plus the password login
//! that starts a two-step login. The layers, each pointing only down:
//!
//! - [`cli`]: the command line.
//! - [`app`]: the one start path ([`app::Application`]), used by `main` and by every test.
//! - [`http`]: warp filters, one filter per route, handlers, the server loop; [`admin`]: the
//!   administrator's commands, their Unix socket, and the backup file — the two front ends.
//! - [`service`]: the use cases; the only way in, for HTTP and for the admin commands.
//! - [`domain`]: the account's rules, pure (no storage, no async, no HTTP).
//! - [`store`]: the `Store` trait over domain types and its backends.
//!
//! Leaves used across layers: [`clock`] (the only reader of wall time), [`config`], [`error`]
//! (the API's one error type), [`limits`] (token buckets), [`log_writer`] (log lines written
//! in batches), [`metrics`], [`priority`] (background threads yield to requests).

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod limits;
pub mod log_writer;
pub mod metrics;
pub mod priority;
pub mod service;
pub mod store;
pub mod warnings;
