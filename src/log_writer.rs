//! Where log lines go: a buffer shared by every thread, written out in batches by a thread of
//! its own.
//!
//! Written by hand because the crate of the field does not batch in time: `tracing-appender`'s
//! `non_blocking` sends every line as its own `Vec` through a channel and wakes its thread for
//! it. Profiled under load (the status route at c=64), that thread and its wake-ups took about
//! 16 % of the server's CPU, most of it in the scheduler, and freeing each line on another
//! thread than the one that made it contended in malloc. Here a logger appends its line to one
//! buffer under a lock (no allocation once the buffer has grown, no system call), and the thread
//! is woken once per batch: when a line lands in an empty buffer, after which it waits
//! `GATHER` for more before it writes them all with one `write`.
//!
//! Nothing is dropped while the guard lives: when `LIMIT` bytes are waiting (the output is
//! stuck: a full pipe, a slow journald), loggers wait for room, as with a blocking writer. A
//! request never waits for the write itself otherwise. Dropping the guard writes what is left
//! and stops the thread, waiting at most `LAST_WRITE` for a stuck output (the process is
//! exiting: it must not hang on its log); lines logged after that are lost.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the thread lets lines gather after the first of a batch: the most a line is late.
const GATHER: Duration = Duration::from_millis(10);
/// Waiting bytes that cut the gathering short.
const EARLY: usize = 256 * 1024;
/// Waiting bytes beyond which loggers wait for the thread.
const LIMIT: usize = 8 * 1024 * 1024;
/// How long dropping the guard waits for the last lines to be written.
const LAST_WRITE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closing: bool,
    /// The thread has written its last batch and returned.
    finished: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the thread: the first line of a batch, `EARLY` reached, or closing.
    wake: Condvar,
    /// Wakes loggers waiting for room below `LIMIT`, and the guard waiting for the end.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writing end, cheap to clone; `io::Write` appends to the shared buffer.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Keeps the thread alive; dropping it writes the lines still waiting and joins the thread.
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the thread (named `name`) that writes to `out`.
pub fn batched<W: Write + Send + 'static>(
    out: W,
    name: &str,
) -> io::Result<(BatchedWriter, WriterGuard)> {
    let shared = Arc::new(Shared::default());
    let for_thread = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || write_batches(&for_thread, out))?;
    Ok((
        BatchedWriter {
            shared: Arc::clone(&shared),
        },
        WriterGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.lock();
            while pending.lines.is_empty() && !pending.closing {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let deadline = Instant::now() + GATHER;
            while pending.lines.len() < EARLY && !pending.closing {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                pending = shared
                    .wake
                    .wait_timeout(pending, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut pending.lines, &mut batch);
            pending.closing
        };
        shared.room.notify_all();
        // A write error (stderr closed) has nowhere to be reported; the lines are dropped.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        // After a burst, give the memory back rather than keep the largest batch ever seen.
        if batch.capacity() > EARLY {
            batch.shrink_to(EARLY);
        }
        if closing {
            shared.lock().finished = true;
            shared.room.notify_all();
            return;
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// As `&File` does: appending needs no exclusive access, so a logger borrows the writer
/// instead of cloning its `Arc` for every line.
impl Write for &BatchedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        while pending.lines.len() >= LIMIT && !pending.closing {
            pending = self
                .shared
                .room
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let before = pending.lines.len();
        pending.lines.extend_from_slice(buf);
        let after = pending.lines.len();
        drop(pending);
        // One wake-up per batch, one more if it grows large: notifying is a system call.
        if before == 0 || (before < EARLY && after >= EARLY) {
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedWriter {
    type Writer = &'a BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let mut pending = self.shared.lock();
        pending.closing = true;
        self.shared.wake.notify_one();
        self.shared.room.notify_all();
        let deadline = Instant::now() + LAST_WRITE;
        while !pending.finished {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                // Stuck in a write: leave the thread to the process's exit.
                return;
            };
            pending = self
                .shared
                .room
                .wait_timeout(pending, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(pending);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read while the thread writes to it, counting the writes.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.bytes.lock().expect("sink").extend_from_slice(buf);
            *self.writes.lock().expect("writes") += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().expect("sink").clone()).expect("utf-8")
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_batches() {
        let sink = Sink::default();
        let (writer, guard) = batched(sink.clone(), "test-log").expect("thread");
        std::thread::scope(|scope| {
            for t in 0..4 {
                let mut writer = writer.clone();
                scope.spawn(move || {
                    for i in 0..5_000 {
                        writer
                            .write_all(format!("thread {t} line {i}\n").as_bytes())
                            .expect("write");
                    }
                });
            }
        });
        drop(guard);
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000, "every line, nothing lost");
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> =
                (0..5_000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected, "each thread's lines whole and in order");
        }
        let writes = *sink.writes.lock().expect("writes");
        assert!(
            writes < 2_000,
            "{writes} writes for 20 000 lines: they are written in batches"
        );
    }

    #[test]
    fn a_line_is_written_soon_without_more_lines_or_the_guard() {
        let sink = Sink::default();
        let (mut writer, _guard) = batched(sink.clone(), "test-log").expect("thread");
        writer.write_all(b"alone\n").expect("write");
        let started = Instant::now();
        while sink.text().is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a lone line must not wait for company"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.text(), "alone\n");
    }

    /// An output that takes no bytes until it is released: loggers wait at `LIMIT` instead of
    /// growing the buffer without end or dropping lines.
    #[test]
    fn a_stuck_output_makes_loggers_wait_and_loses_nothing() {
        #[derive(Clone)]
        struct Stuck {
            open: Arc<(Mutex<bool>, Condvar)>,
            sink: Sink,
        }
        impl Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let (open, cond) = &*self.open;
                let mut open = open.lock().expect("gate");
                while !*open {
                    open = cond.wait(open).expect("gate");
                }
                self.sink.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let stuck = Stuck {
            open: Arc::new((Mutex::new(false), Condvar::new())),
            sink: sink.clone(),
        };
        let (writer, guard) = batched(stuck.clone(), "test-log").expect("thread");
        let line = [b'x'; 1023];
        let total = 3 * LIMIT / 1024;
        let logger = {
            let mut writer = writer.clone();
            std::thread::spawn(move || {
                for _ in 0..total {
                    writer.write_all(&line).expect("write");
                    writer.write_all(b"\n").expect("write");
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!logger.is_finished(), "the logger waits for room");
        let waiting = writer.shared.lock().lines.len();
        assert!(waiting <= LIMIT + 1024, "{waiting} bytes waiting: bounded");
        *stuck.open.0.lock().expect("gate") = true;
        stuck.open.1.notify_all();
        logger.join().expect("logger");
        drop(guard);
        assert_eq!(sink.bytes.lock().expect("sink").len(), total * 1024);
    }

    /// Shutdown does not hang on an output that never takes the last lines: the guard gives up
    /// after `LAST_WRITE`.
    #[test]
    fn dropping_the_guard_gives_up_on_a_stuck_output() {
        struct Never;
        impl Write for Never {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, guard) = batched(Never, "test-log").expect("thread");
        writer.write_all(b"never written\n").expect("write");
        let started = Instant::now();
        drop(guard);
        let took = started.elapsed();
        assert!(
            took >= LAST_WRITE && took < LAST_WRITE + Duration::from_secs(2),
            "{took:?}"
        );
    }
}
