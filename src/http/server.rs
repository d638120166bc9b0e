//! The HTTP/1.1 server around the warp routes. warp's own `serve` sets no timeouts and no
//! connection limit, so totpd drives hyper itself: a header-read timeout (which also closes idle
//! keep-alive connections), a write timeout for answers a client does not read, caps on open
//! connections in all and per client address, optional TLS, graceful shutdown that
//! finishes requests in flight, and one layer every request passes through — it gets a request
//! id (`X-Request-Id`), its client address, is counted in the metrics and logged in one line.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use warp::http::HeaderValue;

use super::SharedState;
use super::connection::{PerAddressCap, WriteDeadline};
use super::filters::{Authorization, ClientAddr};
use super::routes::{Dispatch, route_label};
use crate::limits::client_ip;

/// How long shutdown waits for requests in flight before it gives up on them.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) accepted; beyond it hyper answers 431.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Serves `state` on `listener` (over TLS when `tls` is given) until `shutdown` resolves, then
/// stops accepting, lets requests in flight finish (up to a deadline) and returns.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: SharedState,
    shutdown: impl Future<Output = ()>,
) {
    // The routes are built once and shared: a request clones one `Arc` (its route's filter).
    let routes = Arc::new(Dispatch::new(&state));
    let permits = Arc::new(Semaphore::new(state.config.max_connections));
    let per_address = PerAddressCap::new(
        state.config.max_connections_per_ip,
        state.config.trusted_proxies.clone(),
    );
    let write_timeout = Duration::from_secs(state.config.write_timeout);
    let graceful = GracefulShutdown::new();
    let header_timeout = Duration::from_secs(state.config.header_read_timeout);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Beyond its share, a client's new connection is closed at once (its global permit is
        // released with it), so one address cannot take every slot.
        let Some(address_slot) = per_address.try_acquire(peer.ip()) else {
            tracing::debug!(%peer, "connection closed: too many open from this address");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let routes = Arc::clone(&routes);
        let state = SharedState::clone(&state);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            handle(
                Arc::clone(&routes),
                SharedState::clone(&state),
                peer,
                request,
            )
        });
        let http = http.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let stream = WriteDeadline::new(stream, write_timeout);
                    let connection =
                        watcher.watch(http.serve_connection(TokioIo::new(stream), service));
                    finish(connection.await, peer);
                }
                Some(acceptor) => {
                    // The handshake counts against the header timeout too.
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let stream = WriteDeadline::new(stream, write_timeout);
                            let connection =
                                watcher.watch(http.serve_connection(TokioIo::new(stream), service));
                            finish(connection.await, peer);
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
            drop(address_slot);
        });
    }

    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN_DEADLINE:?}; stopping anyway");
    }
}

fn finish(result: Result<(), hyper::Error>, peer: SocketAddr) {
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// The layer every request passes through: request id, routes, metrics, one log line.
async fn handle(
    routes: Arc<Dispatch>,
    state: SharedState,
    peer: SocketAddr,
    mut request: hyper::Request<Incoming>,
) -> Result<warp::reply::Response, Infallible> {
    use tower_service::Service as _;
    let started = Instant::now();
    let id = RequestId::new();
    let method = request.method().clone();
    let route = route_label(request.uri().path());
    let forwarded: Vec<&str> = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = client_ip(Some(peer), &forwarded, &state.config.trusted_proxies);
    let authorization = Authorization::of(request.headers());
    request.extensions_mut().insert(ClientAddr { peer, ip });
    request.extensions_mut().insert(authorization);
    let mut service = warp::service(routes.route(request.uri().path()).clone());
    let mut response = service.call(request).await?;
    if let Ok(value) = HeaderValue::from_bytes(id.as_bytes()) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state.metrics.record_request(route, status, elapsed);
    tracing::info!(
        target: "totpd::http",
        %method,
        route,
        status,
        latency_us = elapsed.as_micros() as u64,
        request_id = id.as_str(),
        "request"
    );
    Ok(response)
}

/// A request id: 64 random bits as 16 lowercase hex digits, on the stack (no `String` per
/// request; the header value and the log line borrow it).
struct RequestId([u8; 16]);

impl RequestId {
    fn new() -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut n = rand::random::<u64>();
        let mut digits = [0u8; 16];
        for digit in digits.iter_mut().rev() {
            *digit = HEX[(n & 0xf) as usize];
            n >>= 4;
        }
        Self(digits)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}
