//! Guards for the HTTP server's connections that hyper does not provide: a deadline on answers a
//! client does not read, and a cap on connections per client address. Without them, a client
//! that pipelines requests and never reads holds its connection slot forever (hyper only times
//! out reading request heads), and one address can take every slot.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// An IO stream whose output must be delivered within `timeout`: from the moment a write or
/// flush cannot proceed (the client is not reading and the socket buffer is full) until
/// everything written has been flushed, at most `timeout` may pass; then writes fail with
/// `TimedOut` and hyper closes the connection. The deadline is cleared only by a completed
/// flush, not by each partial write, so a client that reads a byte now and then cannot stretch
/// it indefinitely.
pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Armed at the first write that had to wait; cleared when a flush completes.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
        }
    }

    /// The inner stream is waiting for the client: arm the deadline (once) and fail when it
    /// has passed. Polling the timer registers the task's waker, so hyper is woken to see the
    /// error even if the socket never becomes writable again.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read its answer within write_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.waiting(cx),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.waiting(cx),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.waiting(cx),
            Poll::Ready(result) => {
                // hyper flushes only once its own buffer is in the socket: delivered.
                self.deadline = None;
                Poll::Ready(result)
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => self.waiting(cx),
            ready => ready,
        }
    }
}

/// Open connections per client address, capped. Addresses in `exempt` (trusted proxies, which
/// carry many clients each) are not counted.
pub struct PerAddressCap {
    limit: usize,
    exempt: Vec<IpNet>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it frees the place.
pub struct AddressSlot {
    cap: Arc<PerAddressCap>,
    /// `None` for an exempt address.
    ip: Option<IpAddr>,
}

impl PerAddressCap {
    pub fn new(limit: usize, exempt: Vec<IpNet>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            exempt,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`, or `None` when it already has `limit` open.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d: count it as a.b.c.d.
        let ip = ip.to_canonical();
        if self.exempt.iter().any(|net| net.contains(&ip)) {
            return Some(AddressSlot {
                cap: Arc::clone(self),
                ip: None,
            });
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            cap: Arc::clone(self),
            ip: Some(ip),
        })
    }

    /// Open connections counted for `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut open = self.cap.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&ip) {
            *count -= 1;
            // Entries of addresses that left are removed, so the map holds only open ones.
            if *count == 0 {
                open.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn an_address_gets_at_most_limit_places_and_gets_them_back() {
        let cap = PerAddressCap::new(2, Vec::new());
        let a = cap.try_acquire(ip("192.0.2.1")).expect("first");
        let b = cap.try_acquire(ip("192.0.2.1")).expect("second");
        assert!(cap.try_acquire(ip("192.0.2.1")).is_none(), "third refused");
        assert!(
            cap.try_acquire(ip("192.0.2.2")).is_some(),
            "others unaffected"
        );
        drop(a);
        let c = cap.try_acquire(ip("192.0.2.1")).expect("a freed place");
        drop((b, c));
        assert_eq!(cap.open(ip("192.0.2.1")), 0);
        assert!(cap.open.lock().expect("lock").is_empty(), "no entry left");
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4_and_trusted_proxies_are_exempt() {
        let cap = PerAddressCap::new(1, vec!["10.0.0.0/8".parse().expect("net")]);
        let _v4 = cap.try_acquire(ip("192.0.2.1")).expect("first");
        assert!(cap.try_acquire(ip("::ffff:192.0.2.1")).is_none());
        let proxies: Vec<_> = (0..10)
            .map(|_| cap.try_acquire(ip("10.1.2.3")).expect("exempt"))
            .collect();
        assert_eq!(
            cap.open(ip("10.1.2.3")),
            0,
            "exempt addresses are not counted"
        );
        drop(proxies);
    }

    /// A peer that never reads: writes fail with TimedOut once the deadline passes.
    #[tokio::test]
    async fn a_write_the_peer_never_reads_times_out() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut guarded = WriteDeadline::new(near, Duration::from_millis(100));
        let started = std::time::Instant::now();
        let error = guarded
            .write_all(&[0u8; 64 * 1024])
            .await
            .expect_err("the buffer fills and nobody reads");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    /// A peer that reads, slowly but in time, gets everything; a completed flush clears the
    /// deadline, so later answers get a full `timeout` again.
    #[tokio::test]
    async fn a_peer_that_reads_gets_everything() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut guarded = WriteDeadline::new(near, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => return got.len(),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        for _ in 0..3 {
            guarded.write_all(&[1u8; 8 * 1024]).await.expect("written");
            guarded.flush().await.expect("flushed");
            assert!(guarded.deadline.is_none(), "a completed flush clears it");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        guarded.shutdown().await.expect("shutdown");
        drop(guarded);
        assert_eq!(reader.await.expect("reader"), 3 * 8 * 1024);
    }
}
