//! The load generator: closed-loop workers, one keep-alive HTTP/1.1 connection each (hyper's
//! client connection API, no pool, so a worker is exactly one connection), a warm-up that is not
//! recorded, then a fixed measuring window. Latency goes into an HDR histogram per worker.
//!
//! Why closed loop: a worker sends its next request only when the previous answer arrived, so
//! the concurrency is exact and the server is never asked for more than it can queue. The price
//! is coordinated omission when the server stalls; the p99.9 column is where that would show.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request a worker sends, and the status it must get back.
pub struct Req {
    pub method: Method,
    pub path: &'static str,
    /// `Authorization: Token <key>`.
    pub key: Option<String>,
    /// JSON, or empty for a body-less request.
    pub body: Bytes,
    pub expect: StatusCode,
}

impl Req {
    pub fn post(path: &'static str, body: String, expect: StatusCode) -> Self {
        Self {
            method: Method::POST,
            path,
            key: None,
            body: Bytes::from(body),
            expect,
        }
    }

    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }
}

/// Gives a worker its requests; `None` means its share of prepared data is used up.
pub type Source = Box<dyn FnMut() -> Option<Req> + Send>;

/// Timing of one scenario.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
}

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Requests answered inside the measuring window.
    pub requests: u64,
    /// Length of the measuring window (shorter when prepared data ran out).
    pub seconds: f64,
    pub latency: Histogram<u64>,
    /// Answers with a status other than the expected one, inside or outside the window.
    pub unexpected: u64,
    /// Connection or protocol errors (the worker reconnects).
    pub io_errors: u64,
    /// A worker ran out of prepared data before the window ended.
    pub exhausted: bool,
    /// Answers received, warm-up included.
    pub answered: u64,
    /// Server CPU time (user + system) per answered request, in microseconds, when measured.
    pub server_cpu_us: Option<f64>,
    /// Bytes the server wrote to storage per answered request, when measured.
    pub server_write_bytes: Option<f64>,
    /// Up to three examples of unexpected answers, for the log.
    pub samples: Vec<String>,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Latency at quantile `q` in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            return f64::NAN;
        }
        self.latency.value_at_quantile(q) as f64 / 1e6
    }

    pub fn errors(&self) -> u64 {
        self.unexpected + self.io_errors
    }
}

/// An outcome with nothing measured yet.
pub fn empty_outcome() -> Outcome {
    Outcome {
        requests: 0,
        seconds: 0.0,
        latency: histogram(),
        unexpected: 0,
        io_errors: 0,
        exhausted: false,
        answered: 0,
        server_cpu_us: None,
        server_write_bytes: None,
        samples: Vec::new(),
    }
}

/// Latency histogram in nanoseconds, 1 µs to 120 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 120_000_000_000, 3).expect("valid histogram bounds")
}

struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { sender })
    }

    async fn send(&mut self, req: &Req) -> Result<(StatusCode, Bytes), String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let mut builder = hyper::Request::builder()
            .method(req.method.clone())
            .uri(req.path)
            .header(HOST, "127.0.0.1");
        if !req.body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        if let Some(key) = &req.key {
            builder = builder.header(AUTHORIZATION, format!("Token {key}"));
        }
        let request = builder
            .body(Full::new(req.body.clone()))
            .map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

struct WorkerResult {
    requests: u64,
    answered: u64,
    latency: Histogram<u64>,
    unexpected: u64,
    io_errors: u64,
    exhausted: bool,
    /// When the worker stopped (the deadline, or when its data ran out).
    ended: Instant,
    samples: Vec<String>,
}

async fn worker(
    addr: SocketAddr,
    mut source: Source,
    window_start: Instant,
    deadline: Instant,
) -> WorkerResult {
    let mut result = WorkerResult {
        requests: 0,
        answered: 0,
        latency: histogram(),
        unexpected: 0,
        io_errors: 0,
        exhausted: false,
        ended: deadline,
        samples: Vec::new(),
    };
    let mut conn = None;
    while Instant::now() < deadline {
        let Some(req) = source() else {
            result.exhausted = true;
            result.ended = Instant::now();
            break;
        };
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(addr).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    result.io_errors += 1;
                    note(&mut result.samples, e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        let answer = c.send(&req).await;
        let elapsed = started.elapsed();
        match answer {
            Ok((status, body)) => {
                result.answered += 1;
                if status != req.expect {
                    result.unexpected += 1;
                    note(
                        &mut result.samples,
                        format!(
                            "{} {}: expected {}, got {status} {}",
                            req.method,
                            req.path,
                            req.expect.as_u16(),
                            String::from_utf8_lossy(&body)
                        ),
                    );
                }
                if started >= window_start {
                    result.requests += 1;
                    let _ = result.latency.record(elapsed.as_nanos() as u64);
                }
            }
            Err(e) => {
                result.io_errors += 1;
                note(
                    &mut result.samples,
                    format!("{} {}: {e}", req.method, req.path),
                );
                conn = None;
            }
        }
    }
    result
}

fn note(samples: &mut Vec<String>, sample: String) {
    if samples.len() < 3 {
        samples.push(sample);
    }
}

/// CPU time (user + system) process `pid` has used, in seconds (`None`: the process is gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses; utime and stime
    // are the 14th and 15th fields, in clock ticks of 1/100 s.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Bytes process `pid` caused to be written to storage so far (`write_bytes` of /proc/PID/io).
pub fn write_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// Runs one worker per source against `addr` for `timing`, then merges what they measured;
/// with `server` (its pid), also the server's CPU time per request.
pub async fn run(
    addr: SocketAddr,
    sources: Vec<Source>,
    timing: Timing,
    server: Option<u32>,
) -> Outcome {
    let pids: Vec<u32> = server.into_iter().collect();
    run_on(&[addr], sources, timing, &pids).await
}

/// CPU seconds of all of `pids`, or `None` when any is gone (or there are none).
fn total_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

fn total_written(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| write_bytes(p)).sum()
}

/// [`run`] with the load split between several servers: worker `i` talks to
/// `addrs[i % addrs.len()]`, and the server columns add up the CPU time and writes of all of
/// `servers` (their pids).
pub async fn run_on(
    addrs: &[SocketAddr],
    sources: Vec<Source>,
    timing: Timing,
    servers: &[u32],
) -> Outcome {
    let cpu_before = total_cpu(servers);
    let written_before = total_written(servers);
    let start = Instant::now();
    let window_start = start + timing.warmup;
    let deadline = window_start + timing.measure;
    let handles: Vec<_> = sources
        .into_iter()
        .enumerate()
        .map(|(i, source)| {
            let addr = addrs[i % addrs.len()];
            tokio::spawn(worker(addr, source, window_start, deadline))
        })
        .collect();
    let mut outcome = empty_outcome();
    let mut last_end = window_start;
    for handle in handles {
        let Ok(r) = handle.await else {
            outcome.io_errors += 1;
            continue;
        };
        outcome.requests += r.requests;
        outcome.answered += r.answered;
        let _ = outcome.latency.add(&r.latency);
        outcome.unexpected += r.unexpected;
        outcome.io_errors += r.io_errors;
        outcome.exhausted |= r.exhausted;
        last_end = last_end.max(r.ended);
        for s in r.samples {
            note(&mut outcome.samples, s);
        }
    }
    outcome.seconds = last_end
        .saturating_duration_since(window_start)
        .as_secs_f64();
    if let (Some(before), Some(after)) = (cpu_before, total_cpu(servers)) {
        if outcome.answered > 0 {
            outcome.server_cpu_us = Some((after - before) * 1e6 / outcome.answered as f64);
        }
    }
    if let (Some(before), Some(after)) = (written_before, total_written(servers)) {
        if outcome.answered > 0 {
            outcome.server_write_bytes =
                Some(after.saturating_sub(before) as f64 / outcome.answered as f64);
        }
    }
    outcome
}
