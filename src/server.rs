//! The HTTP/1.1 server around the warp routes. warp's own `serve` sets no timeouts and no
//! connection limit, so totpd drives hyper itself: a header-read timeout (which also closes idle
//! keep-alive connections), a cap on open connections, graceful shutdown that finishes requests
//! in flight, and the client's address handed to the routes as a request extension.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service as _;

use crate::AppState;

/// The peer address of the connection a request came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// How long shutdown waits for requests in flight before it gives up on them.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) accepted; beyond it hyper answers 431.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Serves `state` on `listener` until `shutdown` resolves, then stops accepting, lets requests
/// in flight finish (up to a deadline) and returns.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()>) {
    let routes = warp::service(crate::routes::routes(state.clone()));
    let permits = Arc::new(Semaphore::new(state.config.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(state.config.header_read_timeout))
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    let sweeper = tokio::spawn(sweep_expired(state.clone()));
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
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            routes.clone().call(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }

    drop(listener);
    sweeper.abort();
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN_DEADLINE:?}; stopping anyway");
    }
}

/// Once a minute, deletes expired temp tokens and keys and audit events past their retention,
/// so abandoned logins and old sessions do not pile up.
async fn sweep_expired(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let now = state.clock.now();
        let store = Arc::clone(&state.store);
        let lifetime = state.config.key_lifetime();
        let cutoff = now.saturating_sub(state.config.audit_retention_days * 24 * 60 * 60);
        match tokio::task::spawn_blocking(move || store.sweep(now, lifetime, cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(removed = n, "expired records swept"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping expired records failed"),
            Err(e) => tracing::warn!(error = %e, "the sweeper task failed"),
        }
    }
}
