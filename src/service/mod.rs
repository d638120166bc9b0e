//! The use cases, named by what a person does: create an account, log in, turn on two-factor
//! authentication, verify a code, turn it off, and what an administrator does. The only way in,
//! for HTTP and for the admin commands alike. Each loads the user through the store, runs the
//! domain's pure function inside the store's atomic change, records audit events with it, and
//! returns once the store made it durable.

mod account;
mod administration;
mod core;
pub mod input;
pub mod password;
pub mod sealing;
mod two_factor;

pub use account::LoginResult;
pub use administration::{UserSummary, UserTotpState};
pub use core::{Ctx, Policy, Service, Session};
pub use two_factor::{TotpSetup, TotpStatus, Verified};
