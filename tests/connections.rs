//! Slow and hostile connections against the real binary (header and body timeouts set to 2 s):
//!
//! - 200 idle connections, slowloris clients dribbling a request head and clients dribbling a
//!   body do not stop a normal client, on a new connection each time, from logging in within a
//!   second; the server then closes the idle and slowloris connections and answers the slow
//!   bodies 408;
//! - oversized request heads (one huge header, too many headers, a huge request target, a head
//!   that never ends) and oversized bodies (declared, sent, chunked, an absurd length) get a 4xx
//!   within a couple of seconds, never a hang.
//!
//! Each test prints its figures.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

use common::report;

const TIMEOUT_SECONDS: u64 = 2;
const IDLE: usize = 200;
const SLOWLORIS: usize = 20;
const SLOW_BODIES: usize = 5;

struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = common::totpd(dir.path(), &dir.path().join("data"))
        .env("TOTPD_ALLOW_REGISTRATION", "true")
        .env("TOTPD_HEADER_READ_TIMEOUT", TIMEOUT_SECONDS.to_string())
        .env("TOTPD_BODY_READ_TIMEOUT", TIMEOUT_SECONDS.to_string())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn totpd");
    let listening =
        common::listening(&mut child, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    let addr = listening
        .base
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .expect("http://IP:PORT");
    Server {
        child,
        addr,
        _dir: dir,
    }
}

async fn register(addr: SocketAddr, name: &str) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/auth/register/"))
        .json(&json!({"username": name, "password": "password123"}))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), 201);
}

/// A password login on a new connection; panics unless it gets a key.
async fn login(addr: SocketAddr) -> Duration {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let started = Instant::now();
    let response = client
        .post(format!("http://{addr}/api/v1/auth/login/"))
        .json(&json!({"username": "alice", "password": "password123"}))
        .send()
        .await
        .expect("login answered");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    assert!(body["key"].is_string(), "{body}");
    started.elapsed()
}

/// Whether the server has closed `stream` (EOF, a reset, or an answer followed by EOF) within
/// `wait`; what it sent, if anything.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&received).into()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_do_not_stop_a_normal_login() {
    let server = start();
    let addr = server.addr;
    register(addr, "alice").await;

    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Slowloris: a request head, one byte every 100 ms, never finished.
    let mut slowloris = Vec::new();
    for i in 0..SLOWLORIS {
        slowloris.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let head = format!("POST /api/v1/auth/login/ HTTP/1.1\r\nHost: t\r\nX-Slow-{i}: ");
            stream.write_all(head.as_bytes()).await.expect("write");
            let started = Instant::now();
            // Until the server closes it, or far past the timeout.
            while started.elapsed() < Duration::from_secs(TIMEOUT_SECONDS * 4) {
                if stream.write_all(b"a").await.is_err() {
                    return Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut buf = [0u8; 512];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await
                {
                    return Some(started.elapsed());
                }
            }
            None
        }));
    }
    // Slow bodies: a complete head announcing 100 bytes, then one byte every 200 ms.
    let mut slow_bodies = Vec::new();
    for _ in 0..SLOW_BODIES {
        slow_bodies.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let head = "POST /api/v1/auth/login/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
            stream.write_all(head.as_bytes()).await.expect("write");
            let started = Instant::now();
            let mut received = Vec::new();
            let mut buf = [0u8; 4096];
            while started.elapsed() < Duration::from_secs(TIMEOUT_SECONDS * 4) {
                let _ = stream.write_all(b" ").await;
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        received.extend_from_slice(&buf[..n]);
                        if received.windows(4).any(|w| w == b"\r\n\r\n") && received.ends_with(b"}") {
                            break;
                        }
                    }
                    Err(_) => {}
                }
            }
            (started.elapsed(), String::from_utf8_lossy(&received).into_owned())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The normal client, ten times over a second and a half while all of that is going on.
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let took = login(addr).await;
        assert!(
            took < Duration::from_secs(1),
            "a login took {took:?} beside slow clients"
        );
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // The server lets go of them: idle and slowloris connections closed, slow bodies 408.
    let mut idle_closed = 0;
    for stream in &mut idle {
        if closed_within(stream, Duration::from_secs(TIMEOUT_SECONDS * 2))
            .await
            .is_some()
        {
            idle_closed += 1;
        }
    }
    let mut slowloris_cut = Vec::new();
    for task in slowloris {
        if let Some(after) = task.await.expect("task") {
            slowloris_cut.push(after);
        }
    }
    let mut timeouts = 0;
    for task in slow_bodies {
        let (after, answer) = task.await.expect("task");
        assert!(
            answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"),
            "a slow body after {after:?}: {answer:?}"
        );
        timeouts += 1;
    }
    let after = login(addr).await;
    assert!(after < Duration::from_secs(1));
    let longest_slowloris = slowloris_cut.iter().max().copied().unwrap_or_default();
    report(&format!(
        "slow connections: {IDLE} idle, {SLOWLORIS} slowloris, {SLOW_BODIES} slow bodies open; 11 logins \
         on new connections, slowest {:.0} ms (limit 1000 ms); {idle_closed}/{IDLE} idle and \
         {}/{SLOWLORIS} slowloris connections closed by the server (slowloris after at most {:.1} s, \
         timeout {TIMEOUT_SECONDS} s); {timeouts}/{SLOW_BODIES} slow bodies answered 408",
        slowest.as_secs_f64() * 1000.0,
        slowloris_cut.len(),
        longest_slowloris.as_secs_f64(),
    ));
    assert_eq!(
        idle_closed, IDLE,
        "idle connections are closed after the header timeout"
    );
    assert_eq!(
        slowloris_cut.len(),
        SLOWLORIS,
        "slowloris connections are cut"
    );
    assert!(
        longest_slowloris < Duration::from_secs(TIMEOUT_SECONDS + 2),
        "a slowloris connection lived {longest_slowloris:?}"
    );
}

/// Sends `request` (in pieces, as the server takes it) and returns the status of the answer and
/// how long it took; `None` if nothing came within 5 s.
async fn answer_to(addr: SocketAddr, request: Vec<u8>) -> (Option<u16>, Duration, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.split();
    let started = Instant::now();
    let write = async {
        for chunk in request.chunks(8192) {
            if writer.write_all(chunk).await.is_err() {
                break; // the server answered and closed: fine
            }
        }
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    if received.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        received
    };
    let received = tokio::select! {
        received = read => received,
        () = write => unreachable!("the writer never finishes"),
        () = tokio::time::sleep(Duration::from_secs(5)) => Vec::new(),
    };
    let text = String::from_utf8_lossy(&received).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    (status, started.elapsed(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_bodies_get_a_4xx_not_a_hang() {
    let server = start();
    let addr = server.addr;
    let login = "POST /api/v1/auth/login/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nConnection: close\r\n";
    let big = "a".repeat(20 * 1024);
    let json_body = format!(r#"{{"username":"{big}","password":"x"}}"#);
    let many_headers: String = (0..300)
        .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(60)))
        .collect();
    let chunked: String = (0..40)
        .map(|_| format!("{:x}\r\n{}\r\n", 1024, "b".repeat(1024)))
        .collect::<String>()
        + "0\r\n\r\n";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "one 20 KiB header",
            format!("{login}X-Big: {big}\r\n\r\n").into_bytes(),
        ),
        (
            "300 headers, 20 KiB",
            format!("{login}{many_headers}\r\n").into_bytes(),
        ),
        (
            "a 20 KiB request target",
            format!("GET /{big} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").into_bytes(),
        ),
        (
            "a head that never ends (100 KiB, no line break)",
            format!("{login}X-Endless: {}", "z".repeat(100 * 1024)).into_bytes(),
        ),
        (
            "Content-Length 20000, body not sent",
            format!("{login}Content-Length: 20000\r\n\r\n").into_bytes(),
        ),
        (
            "a 20 KiB body",
            format!(
                "{login}Content-Length: {}\r\n\r\n{json_body}",
                json_body.len()
            )
            .into_bytes(),
        ),
        (
            "a 40 KiB chunked body",
            format!("{login}Transfer-Encoding: chunked\r\n\r\n{chunked}").into_bytes(),
        ),
        (
            "Content-Length 10^20",
            format!("{login}Content-Length: 100000000000000000000\r\n\r\n").into_bytes(),
        ),
    ];
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for (what, request) in cases {
        let (status, took, text) = answer_to(addr, request).await;
        lines.push(format!(
            "{what}: {} in {:.0} ms",
            status.map_or("no answer".to_owned(), |s| s.to_string()),
            took.as_secs_f64() * 1000.0
        ));
        if !status.is_some_and(|s| (400..500).contains(&s)) || took > Duration::from_secs(2) {
            failures.push(format!("{what}: {status:?} after {took:?}: {text:?}"));
        }
    }
    // Still serving.
    register(addr, "bob").await;
    report(&format!("oversized requests: {}", lines.join("; ")));
    assert!(failures.is_empty(), "{failures:#?}");
}
