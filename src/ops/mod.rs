//! Operating totpd: the command line ([`cli`]), administration with or without a running server
//! ([`admin`]), and the backup file ([`backup`]). Everything here goes through the service.

pub mod admin;
pub mod backup;
pub mod cli;
