//! The rules of an account, pure: functions on the user record with the time passed in,
//! returning what changed or why not. No storage, no async, no HTTP — every rule is unit-tested
//! here on its own, and every store applies the same functions.
//!
//! Where each rule lives:
//! - replay of a time step, single-use recovery codes, "a success resets failures":
//!   [`second_factor`]
//! - failure counting, lock doubling, the hard lock: [`lockout`]
//! - temp tokens (lifetime, attempt cap, per-user cap) and the re-check of the password at the
//!   key's issue: [`login`]
//! - setup, activate, deactivate, recovery-code regeneration, reset, password change:
//!   [`enrolment`]
//! - key validity, lifetimes and revocation by epoch: [`keys`]
//! - the TOTP maths (RFC 4226/6238): [`totp`]; random tokens and recovery codes: [`secrets`]

pub mod audit;
pub mod enrolment;
pub mod keys;
pub mod lockout;
pub mod login;
pub mod second_factor;
pub mod secrets;
pub mod totp;
pub mod user;
