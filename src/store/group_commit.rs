//! Durability by group commit. A request that changed state calls `persist().await` before it
//! answers; one dedicated thread calls sled's blocking `flush()` and then wakes every request that
//! was waiting when that flush began, so one fsync acknowledges many writes.
//!
//! Why not `Tree::flush_async`: in sled 0.34.7 it deadlocks once more than one task awaits it
//! (sled issue 1308, fixed upstream but never released). Why not a `flush()` per request on the
//! blocking pool: measured about ten times slower under concurrency, and it ties up threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

/// Why a flush failed, as text: `sled::Error` is not `Clone` and every waiter gets a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushError(pub String);

impl std::fmt::Display for FlushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flush failed: {}", self.0)
    }
}

type Waiter = oneshot::Sender<Result<(), FlushError>>;

struct Queue {
    waiters: Vec<Waiter>,
    closed: bool,
    /// How many waiters the flusher is waiting for: 1 while it sleeps for work, its target
    /// while it holds a flush open, `usize::MAX` while it flushes (it looks at the queue
    /// again when done) or once it has been woken. A request wakes the flusher only when it
    /// brings the queue to this size, not on every `persist` (a scheduler trace showed the
    /// flusher woken, and asleep again, once per request while it held a flush open).
    wake_at: usize,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            waiters: Vec::new(),
            closed: false,
            wake_at: usize::MAX,
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    flushes: AtomicU64,
    acknowledged: AtomicU64,
}

/// The flusher thread and its queue of waiting requests.
pub struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the flusher thread; `flush` is called once per batch of waiters.
    pub fn start<F>(flush: F) -> std::io::Result<Self>
    where
        F: Fn() -> Result<(), String> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            flushes: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("totpd-flusher".into())
            .spawn(move || run(&worker, flush))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Resolves once every write this task made before the call is on disk.
    pub async fn persist(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut queue = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if queue.closed {
                return Err(FlushError("the store is shutting down".into()));
            }
            queue.waiters.push(tx);
            let wake = queue.waiters.len() >= queue.wake_at;
            if wake {
                queue.wake_at = usize::MAX;
            }
            wake
        };
        if wake {
            self.shared.wake.notify_one();
        }
        rx.await
            .unwrap_or_else(|_| Err(FlushError("the flusher stopped".into())))
    }

    /// (flushes done, requests acknowledged): their ratio is the batching achieved.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.shared.flushes.load(Ordering::Relaxed),
            self.shared.acknowledged.load(Ordering::Relaxed),
        )
    }
}

/// How long the flusher may hold a flush open for more waiters to join it.
const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_micros(200);

fn run<F: Fn() -> Result<(), String>>(shared: &Shared, flush: F) {
    // The size of the last batch: the concurrency the flusher has been seeing.
    let mut last_batch = 1;
    loop {
        let batch = {
            let mut queue = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            while queue.waiters.is_empty() && !queue.closed {
                queue.wake_at = 1;
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if queue.waiters.is_empty() {
                return; // closed and drained
            }
            // Under concurrency, hold the flush open briefly until about as many requests as
            // last time have joined: one flush then acknowledges many (each costs a write and a
            // sync, tens of microseconds). A lone client never waits: its last batch was one.
            if last_batch > 1 && queue.waiters.len() < last_batch {
                let target = last_batch;
                queue.wake_at = target;
                queue = shared
                    .wake
                    .wait_timeout_while(queue, COALESCE_WINDOW, |q| {
                        q.waiters.len() < target && !q.closed
                    })
                    .map(|(queue, _)| queue)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            queue.wake_at = usize::MAX;
            std::mem::take(&mut queue.waiters)
        };
        last_batch = batch.len();
        // Every waiter in `batch` registered after its writes, so this flush covers them.
        let result = flush().map_err(FlushError);
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        shared
            .acknowledged
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_waiters_share_flushes_and_all_complete() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let commit = Arc::new(
            GroupCommit::start(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                Ok(())
            })
            .expect("thread starts"),
        );
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let commit = Arc::clone(&commit);
                tokio::spawn(async move { commit.persist().await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("task ran"), Ok(()));
        }
        let (flushes, acknowledged) = commit.stats();
        assert_eq!(acknowledged, 200);
        assert_eq!(flushes as usize, calls.load(Ordering::SeqCst));
        assert!(
            flushes < 200,
            "200 waiters took {flushes} flushes: no batching"
        );
    }

    #[tokio::test]
    async fn a_failed_flush_reaches_every_waiter_of_its_batch() {
        let commit = GroupCommit::start(|| Err("disk full".into())).expect("thread starts");
        assert_eq!(commit.persist().await, Err(FlushError("disk full".into())));
    }

    #[tokio::test]
    async fn the_flush_happens_after_the_request_registered() {
        // A write made before persist() must be covered: the flush observes the write.
        let written = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicUsize::new(0));
        let (w, s) = (Arc::clone(&written), Arc::clone(&seen));
        let commit = GroupCommit::start(move || {
            s.store(w.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(())
        })
        .expect("thread starts");
        for i in 1..=20 {
            written.store(i, Ordering::SeqCst);
            commit.persist().await.expect("flushed");
            assert!(seen.load(Ordering::SeqCst) >= i);
        }
    }
}
