//! HTTP: warp filters for what every route needs (request context, throttling, authentication,
//! the JSON body), one documented filter per route, plain handlers, and the hyper server loop
//! around them (timeouts, connection cap, TLS, graceful shutdown, request id, metrics, log).
//!
//! - [`filters`]: the cross-cutting filters; a route is composed of them, so it cannot forget
//!   authentication or throttling.
//! - [`routes`]: the route table and one filter function per route.
//! - [`handlers`]: typed input in, JSON out; they never see a `Request`.
//! - [`server`]: the connection loop; [`tls`]: certificates; [`qr`]: the QR code of setup.
//! - [`web`]: the self-service page, three embedded files that only call the API.

pub mod connection;
pub mod filters;
pub mod handlers;
pub mod qr;
pub mod routes;
pub mod server;
pub mod tls;
pub mod web;

use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::limits::IpLimits;
use crate::metrics::Metrics;
use crate::service::Service;

/// Everything a request needs, built once per server and shared behind one `Arc`.
pub struct State {
    pub service: Arc<Service>,
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub ip_limits: IpLimits,
    pub metrics: Arc<Metrics>,
}

pub type SharedState = Arc<State>;
