//! The storage port: [`Store`], a trait of storage operations over domain types, and its
//! backends. A store never decides a domain question: it reads records, and it applies a pure
//! domain function to one user atomically ([`Store::update_user`]: re-run on a conflict), then
//! writes whatever else that change asked for ([`Writes`]).
//!
//! Durability is the type's promise: every mutating method returns only once its write is
//! durable (the sled backend shares one flush and fsync among concurrent writers: group
//! commit; PostgreSQL commits with `synchronous_commit` on), so no caller can forget to wait.
//!
//! Backends: `sled` (embedded, the default: one process per data dir) and [`postgres`] (shared:
//! several instances serve one user base), chosen in `backends`. [`conformance`] holds the
//! tests every backend must pass.

mod backends;
pub mod codec;
pub mod conformance;
mod counts;
pub mod group_commit;
mod port;
pub mod postgres;
mod sled;

pub use backends::{StoreConfig, exists, holds_data, open, restore};
pub use port::{
    BackupRecord, Created, NOT_VERIFIED, OpenError, PoolStats, SCHEMA_VERSION, Store, StoreError,
    StoreStats, UserChange, Writes,
};
pub use postgres::{DatabaseUrl, PostgresConfig};
