//! The storage port: [`Store`], a trait of storage operations over domain types, and its
//! backends. A store never decides a domain question: it reads records, and it applies a pure
//! domain function to one user atomically ([`Store::update_user`]: re-run on a conflict), then
//! writes whatever else that change asked for ([`Writes`]).
//!
//! Durability is the type's promise: every mutating method returns only once its write is
//! durable (the sled backend shares one flush and fsync among concurrent writers: group
//! commit), so no caller can forget to wait for it.
//!
//! Backends: [`sled`](self::sled) (embedded, the default). [`conformance`] holds the tests
//! every backend must pass.

mod backends;
pub mod codec;
pub mod conformance;
pub mod group_commit;
mod port;
mod sled;

pub use backends::{StoreConfig, exists, open, restore};
pub use port::{
    BackupRecord, OpenError, SCHEMA_VERSION, Store, StoreError, StoreStats, UserChange,
    UsernameTaken, Writes,
};
