//! The whole self-service flow in headless Chromium against the real `totpd` binary: log in, set
//! up, activate with a code computed from the secret read off the page, recovery codes (download,
//! print, shown once), a wrong code, an expired login, a recovery-code login and the codes left,
//! a lockout, the clock-drift hint for a code from a fast phone, the errors the server cannot be
//! made to give on demand, turning TOTP off, log out everywhere; at 320 px wide and in dark
//! mode. Any JavaScript error or CSP violation in the browser's console fails the test.
//! Screenshots of each step go to `target/web-screenshots/`.
//!
//! Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`); nothing is
//! downloaded. Without them the test is skipped with a message, except under CI (`CI` set), where
//! it fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use totp_rs::{Secret, Totp};
use totpd::clock::{Clock, SystemClock};

use crate::common;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse battery";
/// WebDriver's key codes.
const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";
/// How long a step may take to show its result.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The server's temp-token lifetime in this test (its minimum), so an expired login takes little
/// waiting.
const TEMP_TOKEN_TTL: u64 = 10;

fn find_in_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Kills the processes this test started, pass or fail.
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// TOTP codes for the secret read off the page. The server refuses a step at or before the last
/// one it accepted (replay), and accepts ±1 step around now; so each code is for a step after the
/// last one used, waiting for time to move when both nearby steps are spent.
struct Codes {
    totp: Totp,
    last_step: u64,
}

impl Codes {
    fn new(secret_base32: &str) -> Self {
        let secret = Secret::try_from_base32(secret_base32).expect("the page shows base32");
        let totp = totp_rs::Builder::new()
            .with_secret(secret)
            .with_account_name(USER)
            .build()
            .expect("a valid TOTP secret");
        Self { totp, last_step: 0 }
    }

    fn at_step(&self, step: u64) -> String {
        self.totp.generate(step * 30).to_string()
    }

    async fn fresh(&mut self) -> String {
        loop {
            let now = SystemClock.now();
            let step = now / 30;
            let want = (self.last_step + 1).max(step);
            if want <= step + 1 {
                self.last_step = want;
                return self.at_step(want);
            }
            let wait = (want - 1) * 30 - now;
            common::report(&format!("web: waiting {wait} s for the next TOTP step"));
            tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(200)).await;
        }
    }

    /// The code of `steps` steps after now, as a phone whose clock is that far fast shows it.
    fn ahead(&self, steps: u64) -> String {
        self.at_step(SystemClock.now() / 30 + steps)
    }

    /// A code the server refuses as plainly wrong: from 20 steps ahead (beyond any window, and
    /// beyond the 2–10 steps a clock-drift hint looks at), and unlike every nearby step's code.
    fn wrong(&self) -> String {
        let step = SystemClock.now() / 30;
        let near: Vec<String> = (step - 11..=step + 11).map(|s| self.at_step(s)).collect();
        (20..40)
            .map(|offset| self.at_step(step + offset))
            .find(|code| !near.contains(code))
            .expect("a code unlike the nearby ones")
    }
}

struct Browser {
    client: Client,
    /// chromedriver's URL and the session, for the two endpoints fantoccini does not wrap (the
    /// browser log and Chrome DevTools commands).
    driver: String,
    session: String,
    http: reqwest::Client,
    base: String,
    shots: PathBuf,
    shot_count: usize,
}

impl Browser {
    async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .expect("script runs")
    }

    async fn js_async(&self, script: &str) -> Value {
        self.client
            .execute_async(script, vec![])
            .await
            .expect("async script runs")
    }

    async fn cdp(&self, cmd: &str, params: Value) {
        let response = self
            .http
            .post(format!(
                "{}/session/{}/goog/cdp/execute",
                self.driver, self.session
            ))
            .json(&json!({ "cmd": cmd, "params": params }))
            .send()
            .await
            .expect("cdp command");
        assert!(response.status().is_success(), "{cmd}: {response:?}");
    }

    /// The browser's console since the last call: fails on any JavaScript error, CSP violation or
    /// warning. The one expected entry is Chrome's note of an API answer with a 4xx status (a
    /// wrong code is a 400), which it logs for every failed fetch.
    async fn check_console(&self, step: &str) {
        let response: Value = self
            .http
            .post(format!("{}/session/{}/se/log", self.driver, self.session))
            .json(&json!({ "type": "browser" }))
            .send()
            .await
            .expect("browser log")
            .json()
            .await
            .expect("log JSON");
        let entries = response["value"].as_array().expect("log entries");
        let bad: Vec<&Value> = entries
            .iter()
            .filter(|entry| {
                let level = entry["level"].as_str().unwrap_or("");
                let message = entry["message"].as_str().unwrap_or("");
                let expected_api_status = entry["source"] == "network"
                    && message.contains("/api/v1/")
                    && message.contains("the server responded with a status of 4");
                matches!(level, "SEVERE" | "WARNING") && !expected_api_status
            })
            .collect();
        assert!(bad.is_empty(), "browser console at {step}: {bad:#?}");
    }

    /// A screenshot under `target/web-screenshots/`, numbered in step order; also checks the
    /// console and that no secret went into the page's URL.
    async fn shot(&mut self, name: &str) {
        self.shot_count += 1;
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self
            .shots
            .join(format!("{:02}-{name}.png", self.shot_count));
        std::fs::write(&path, png).expect("write screenshot");
        let url = self.client.current_url().await.expect("url");
        assert_eq!(url.as_str(), format!("{}/", self.base), "the URL changed");
        self.check_console(name).await;
    }

    /// The displayed elements matching an XPath.
    async fn visible(&self, xpath: &str) -> Vec<Element> {
        let mut shown = Vec::new();
        for element in self
            .client
            .find_all(Locator::XPath(xpath))
            .await
            .expect("find")
        {
            if element.is_displayed().await.unwrap_or(false) {
                shown.push(element);
            }
        }
        shown
    }

    /// The one displayed element matching an XPath, waiting for it.
    async fn one(&self, xpath: &str, what: &str) -> Element {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let mut shown = self.visible(xpath).await;
            if shown.len() == 1 {
                return shown.remove(0);
            }
            assert!(
                Instant::now() < deadline,
                "{} visible {what}; page says:\n{}",
                shown.len(),
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The input whose visible label says `label`.
    async fn field(&self, label: &str) -> Element {
        let label = self
            .one(
                &format!("//label[normalize-space()='{label}']"),
                &format!("label {label:?}"),
            )
            .await;
        let id = label.attr("for").await.expect("attr").expect("label for");
        self.client
            .find(Locator::Id(&id))
            .await
            .expect("labelled input")
    }

    async fn button(&self, text: &str) -> Element {
        self.one(
            &format!("//button[normalize-space()='{text}']"),
            &format!("button {text:?}"),
        )
        .await
    }

    async fn fill(&self, label: &str, value: &str) {
        let input = self.field(label).await;
        input.clear().await.expect("clear");
        input.send_keys(value).await.expect("type");
    }

    async fn press(&self, text: &str) {
        self.button(text).await.click().await.expect("click");
    }

    /// What a person sees (hidden parts excluded).
    async fn page_text(&self) -> String {
        self.js("return document.body.innerText;", vec![])
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The text of the visible `role="alert"` regions.
    async fn alerts(&self) -> String {
        self.js(
            "return [...document.querySelectorAll('[role=alert]')]
                .filter((e) => e.offsetParent !== null).map((e) => e.innerText).join('\\n');",
            vec![],
        )
        .await
        .as_str()
        .unwrap_or("")
        .to_owned()
    }

    async fn wait_for_text(&self, needle: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let text = self.page_text().await;
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the page, which says:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for an alert containing `needle`; checks no alert shows a raw JSON body.
    async fn wait_for_alert(&self, needle: &str) -> String {
        self.wait_for_alert_where(needle, |text| text.contains(needle))
            .await
    }

    async fn wait_for_alert_where(&self, needle: &str, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let text = self.alerts().await;
            if found(&text) {
                assert!(
                    !text.contains('{') && !text.contains("\"code\""),
                    "raw JSON in {text:?}"
                );
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no alert {needle:?}; alerts say {text:?}; page says:\n{}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn session_key(&self) -> Value {
        self.js("return sessionStorage.getItem('totpd.key');", vec![])
            .await
    }

    async fn log_in(&self) {
        self.fill("Username", USER).await;
        self.fill("Password", PASSWORD).await;
        self.press("Log in").await;
    }

    async fn log_out(&self) {
        self.press("Log out").await;
        self.wait_for_text("You are logged out.").await;
        assert_eq!(self.session_key().await, Value::Null, "key dropped");
    }

    /// Logs in with a recovery code; returns the notice about the codes left.
    async fn recovery_login(&self, code: &str, left: usize) -> String {
        self.log_in().await;
        self.fill("Code", code).await;
        self.press("Verify").await;
        let expected =
            format!("You logged in with a recovery code. {left} recovery codes are left.");
        self.wait_for_text(&expected).await;
        self.page_text().await
    }

    /// Makes the page's next API call answer `status` with `body` (or fail like a network
    /// error when `status` is 0), for the answers a test cannot get from the real server on
    /// demand. Only for this page load, through WebDriver: the page's CSP is untouched.
    async fn stub_next_fetch(&self, status: u16, retry_after: Option<u64>, body: Value) {
        self.js(
            "const [status, retryAfter, body] = arguments;
             const real = window.fetch;
             window.fetch = function () {
               window.fetch = real;
               if (status === 0) return Promise.reject(new TypeError('Failed to fetch'));
               const headers = { 'Content-Type': 'application/json' };
               if (retryAfter !== null) headers['Retry-After'] = String(retryAfter);
               return Promise.resolve(new Response(JSON.stringify(body), { status, headers }));
             };",
            vec![json!(status), json!(retry_after), body],
        )
        .await;
    }

    /// At a 320 px wide phone-like viewport: nothing scrolls sideways.
    async fn check_narrow(&mut self, name: &str) {
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 320, "height": 720, "deviceScaleFactor": 1, "mobile": true }),
        )
        .await;
        let widths = self
            .js(
                "return [document.documentElement.clientWidth, document.documentElement.scrollWidth];",
                vec![],
            )
            .await;
        self.shot(&format!("{name}-320px")).await;
        self.cdp("Emulation.clearDeviceMetricsOverride", json!({}))
            .await;
        assert_eq!(widths[0], 320, "the viewport is 320 px wide");
        assert!(
            widths[1].as_u64().expect("width") <= 320,
            "{name} scrolls sideways at 320 px: {widths}"
        );
    }
}

async fn start_chromedriver(chromedriver: &Path, reaper: &mut Reaper) -> String {
    let port = free_port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    reaper.0.push(child);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = http.get(format!("{url}/status")).send().await {
            if let Ok(status) = response.json::<Value>().await {
                if status["value"]["ready"] == true {
                    return url;
                }
            }
        }
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tools, or `None` after saying loudly why the test does not run (a failure under CI).
fn tools() -> Option<(PathBuf, PathBuf)> {
    let chromedriver = find_in_path(&["chromedriver"]);
    let chromium = find_in_path(&["chromium", "chromium-browser"]);
    match (chromedriver, chromium) {
        (Some(driver), Some(browser)) => Some((driver, browser)),
        _ => {
            let message = "chromium and chromedriver are not installed (Debian: apt-get install \
                           chromium chromium-driver): the browser test of the self-service page \
                           did NOT run";
            assert!(std::env::var_os("CI").is_none(), "{message}");
            common::report(&format!("\n!!!!! SKIPPED: {message} !!!!!\n"));
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_in_chromium() {
    let Some((chromedriver, chromium)) = tools() else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let profile = tempfile::tempdir().expect("profile dir");
    let mut reaper = Reaper(Vec::new());

    let mut server = common::totpd(dir.path(), &data_dir)
        // A lock after 3 wrong codes, so the test reaches it quickly.
        .env("TOTPD_LOCKOUT_THRESHOLD", "3")
        // So "Turn off" meets the server asking for a code.
        .env("TOTPD_TOTP_REQUIRE_CODE_TO_DEACTIVATE", "true")
        .env("TOTPD_TEMP_TOKEN_TTL", TEMP_TOKEN_TTL.to_string())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start totpd");
    let listening = common::listening(&mut server, Duration::from_secs(20));
    reaper.0.push(server);
    let base = listening.expect("totpd listening").base;
    crate::add_user(dir.path(), &data_dir, USER, PASSWORD);

    let driver = start_chromedriver(&chromedriver, &mut reaper).await;
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless",
                // Tests may run as root in a container, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1000,1100",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    // fantoccini's rustls client (never used for TLS here: chromedriver is plain HTTP) needs a
    // process-wide crypto provider when more than one is compiled in.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let client = ClientBuilder::rustls()
        .expect("rustls connector")
        .capabilities(capabilities.as_object().expect("object").clone())
        .connect(&driver)
        .await
        .expect("a Chromium session");
    let session = client
        .session_id()
        .await
        .expect("session id")
        .expect("a session");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("web-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let closer = client.clone();
    let mut b = Browser {
        client,
        driver,
        session,
        http: reqwest::Client::new(),
        base: base.clone(),
        shots,
        shot_count: 0,
    };
    // The flow runs as a task so that, should it fail, the browser is still closed before
    // chromedriver is killed (killing chromedriver alone would leave Chromium running).
    let outcome = tokio::spawn(async move {
        flow(&mut b).await;
        b.shots
    })
    .await;
    let _ = closer.close().await;
    drop(reaper);
    match outcome {
        Ok(shots) => common::report(&format!(
            "web: the browser flow took {:.1} s; screenshots in {}",
            started.elapsed().as_secs_f64(),
            shots.display()
        )),
        Err(failure) => std::panic::resume_unwind(failure.into_panic()),
    }
}

async fn flow(b: &mut Browser) {
    b.client
        .goto(&format!("{}/", b.base))
        .await
        .expect("open the page");

    // Keyboard only: the page starts in the username field; Tab moves to the password and to
    // "Log in", whose focus ring shows; Enter submits.
    b.wait_for_text("Log in").await;
    let active = b.client.active_element().await.expect("focus");
    assert_eq!(
        active.attr("id").await.expect("id").as_deref(),
        Some("login-username")
    );
    active.send_keys(USER).await.expect("type");
    active.send_keys(TAB).await.expect("tab");
    let active = b.client.active_element().await.expect("focus");
    active.send_keys(PASSWORD).await.expect("type");
    active.send_keys(TAB).await.expect("tab");
    let focused = b
        .js(
            "const e = document.activeElement; const s = getComputedStyle(e);
             return [e.textContent, s.outlineStyle, s.outlineWidth];",
            vec![],
        )
        .await;
    assert_eq!(focused[0], "Log in", "Tab reaches the button");
    assert_eq!(focused[1], "solid", "a visible focus ring: {focused}");
    b.shot("login-keyboard").await;
    b.check_narrow("login").await;
    b.client
        .active_element()
        .await
        .expect("focus")
        .send_keys(ENTER)
        .await
        .expect("enter");
    b.wait_for_text("Two-factor authentication is off.").await;
    assert!(
        b.session_key().await.is_string(),
        "the key is in sessionStorage"
    );
    let storage = b
        .js("return [localStorage.length, document.cookie];", vec![])
        .await;
    assert_eq!(
        storage,
        json!([0, ""]),
        "nothing kept beyond sessionStorage"
    );
    b.shot("status-off").await;

    // Set up: the QR code image and the secret, grouped in fours.
    b.press("Set up").await;
    let secret_element = b.one("//*[@aria-label='Secret key']", "secret key").await;
    let grouped = secret_element.text().await.expect("secret text");
    let groups: Vec<&str> = grouped.split(' ').collect();
    assert!(groups.len() >= 8, "a 160-bit secret: {grouped:?}");
    assert!(
        groups[..groups.len() - 1].iter().all(|g| g.len() == 4)
            && groups.last().unwrap().len() <= 4,
        "grouped in fours: {grouped:?}"
    );
    let secret: String = groups.concat();
    let qr = b
        .one(
            "//img[@alt='QR code for your authenticator app']",
            "QR code",
        )
        .await;
    let src = qr.attr("src").await.expect("src").expect("a src");
    assert!(src.starts_with("data:image/svg+xml;base64,"), "{src:.40}");
    let rendered = b
        .js_async(
            "const done = arguments[arguments.length - 1];
             const img = document.getElementById('qr-code');
             img.decode().then(() => done(img.naturalWidth), () => done(0));",
        )
        .await;
    assert!(
        rendered.as_u64().unwrap_or(0) > 0,
        "the QR code image loads"
    );
    b.shot("setup").await;
    b.check_narrow("setup").await;
    let mut codes = Codes::new(&secret);

    // Activate with a code from the secret on the page; the recovery codes are shown once.
    let code = codes.fresh().await;
    b.fill("Code", &code).await;
    b.press("Activate").await;
    b.wait_for_text("Your recovery codes").await;
    let recovery = recovery_codes(b).await;
    assert_eq!(recovery.len(), 10, "{recovery:?}");
    b.wait_for_text("Two-factor authentication is on. 10 recovery codes left.")
        .await;
    b.shot("recovery-codes").await;
    b.check_narrow("recovery-codes").await;

    // Dark mode follows the system.
    b.cdp(
        "Emulation.setEmulatedMedia",
        json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
    )
    .await;
    let background = b
        .js(
            "return getComputedStyle(document.body).backgroundColor;",
            vec![],
        )
        .await;
    assert_eq!(background, "rgb(21, 22, 26)", "dark background");
    b.shot("recovery-codes-dark").await;
    b.cdp("Emulation.setEmulatedMedia", json!({ "features": [] }))
        .await;

    // Download: a text file made in the page from a Blob. The hooks catch the file instead of
    // letting the headless browser save it.
    b.js(
        "window.testDownloads = [];
         const create = URL.createObjectURL.bind(URL);
         URL.createObjectURL = (blob) => { const url = create(blob); window.testDownloads.push(blob); return url; };
         HTMLAnchorElement.prototype.click = function () {
           window.testDownloadLink = { name: this.download, href: this.href };
         };
         window.print = () => { window.testPrinted = (window.testPrinted || 0) + 1; };",
        vec![],
    )
    .await;
    b.press("Download").await;
    let link = b.js("return window.testDownloadLink;", vec![]).await;
    assert_eq!(link["name"], "recovery-codes.txt");
    assert!(
        link["href"].as_str().unwrap_or("").starts_with("blob:"),
        "{link}"
    );
    let file = b
        .js_async(
            "const done = arguments[arguments.length - 1];
             window.testDownloads[0].text().then(done);",
        )
        .await;
    let file = file.as_str().expect("file text");
    for code in &recovery {
        assert!(
            file.contains(code.as_str()),
            "{code} missing from the file:\n{file}"
        );
    }
    assert!(file.contains(USER), "the file names the account");
    // Print: the browser's print, with only the codes on paper.
    b.press("Print").await;
    assert_eq!(b.js("return window.testPrinted;", vec![]).await, 1);
    b.cdp("Emulation.setEmulatedMedia", json!({ "media": "print" }))
        .await;
    let printed = b.page_text().await;
    b.cdp("Emulation.setEmulatedMedia", json!({ "media": "" }))
        .await;
    assert!(printed.contains(&recovery[0]), "codes printed");
    for absent in [
        "Log out",
        "Regenerate recovery codes",
        "Download",
        "Two-factor authentication is on",
    ] {
        assert!(!printed.contains(absent), "{absent:?} on paper:\n{printed}");
    }

    // Shown once: a reload keeps the login (sessionStorage) but not the codes.
    b.client.refresh().await.expect("reload");
    b.wait_for_text("Two-factor authentication is on. 10 recovery codes left.")
        .await;
    assert!(
        !b.page_text().await.contains(&recovery[0]),
        "codes shown again"
    );
    b.shot("reloaded").await;

    b.log_out().await;
    b.shot("logged-out").await;

    // A wrong code gets the wrong-code sentence next to the field.
    b.log_in().await;
    b.wait_for_text("Enter your code").await;
    b.shot("verify").await;
    b.fill("Code", &codes.wrong()).await;
    b.press("Verify").await;
    b.wait_for_alert("That code is not right").await;
    b.shot("wrong-code").await;

    // An expired login: back to the login form with the reason.
    tokio::time::sleep(Duration::from_secs(TEMP_TOKEN_TTL + 1)).await;
    b.fill("Code", &codes.at_step(SystemClock.now() / 30)).await;
    b.press("Verify").await;
    b.wait_for_alert("Your login has expired. Please log in again.")
        .await;
    b.field("Password").await;
    b.shot("login-expired").await;

    // Log in with TOTP.
    b.log_in().await;
    let code = codes.fresh().await;
    b.fill("Code", &code).await;
    b.press("Verify").await;
    b.wait_for_text("Two-factor authentication is on. 10 recovery codes left.")
        .await;
    b.shot("verified").await;

    // Regenerate recovery codes: asks for a code, shows a new set once.
    b.press("Regenerate recovery codes").await;
    b.wait_for_alert("Enter the 6-digit code from your app, or a recovery code.")
        .await;
    let code = codes.fresh().await;
    b.fill("Code", &code).await;
    b.press("Regenerate recovery codes").await;
    b.wait_for_text("New recovery codes are ready").await;
    let fresh_set = recovery_codes(b).await;
    assert_eq!(fresh_set.len(), 10);
    assert!(fresh_set.iter().all(|c| !recovery.contains(c)), "a new set");
    b.shot("regenerated").await;
    b.log_out().await;

    // A recovery-code login says how many are left.
    let mut spare = fresh_set.into_iter();
    b.recovery_login(&spare.next().expect("code"), 9).await;
    b.shot("recovery-login").await;
    b.log_out().await;

    // A lockout: the third wrong code in a row locks; the sentence gives the wait from
    // Retry-After (15 minutes by default) and a recovery code still gets in.
    b.log_in().await;
    let mut locked = String::new();
    for attempt in 1..=4 {
        b.fill("Code", &codes.wrong()).await;
        b.press("Verify").await;
        let text = b
            .wait_for_alert_where("the wrong-code or locked sentence", |text| {
                text.contains("That code is not right") || text.contains("Too many wrong codes")
            })
            .await;
        if text.contains("locked") {
            assert!(attempt >= 3, "locked after {attempt} wrong codes");
            locked = text;
            break;
        }
    }
    assert!(
        locked.contains("Too many wrong codes: this account is locked. Try again in 15 minutes."),
        "{locked:?}"
    );
    assert!(
        locked.contains("You can also use a recovery code."),
        "{locked:?}"
    );
    b.shot("locked").await;
    b.fill("Code", &spare.next().expect("code")).await;
    b.press("Verify").await;
    b.wait_for_text("You logged in with a recovery code. 8 recovery codes are left.")
        .await;
    b.log_out().await;

    // Few codes left: the page suggests regenerating them.
    for left in (3..=7).rev() {
        b.recovery_login(&spare.next().expect("code"), left).await;
        if left > 3 {
            b.log_out().await;
        }
    }
    let page = b.page_text().await;
    assert!(
        page.contains(
            "3 recovery codes are left. Few are left: regenerate your recovery codes below."
        ),
        "{page}"
    );
    assert!(page.contains("Two-factor authentication is on. 3 recovery codes left. Few are left"));
    b.shot("few-codes-left").await;

    // The clock-drift hint, from the real server: the code of five steps ahead is what a phone
    // 150 s fast shows. The server's sentence, shown as is, says which way and what to do.
    b.fill("Code", &codes.ahead(5)).await;
    b.press("Regenerate recovery codes").await;
    let text = b.wait_for_alert("your device's clock seems about").await;
    assert!(
        text.contains("seconds ahead of the server's")
            && text.contains("seconds fast. Set it to update automatically, then try a new code."),
        "{text:?}"
    );
    b.shot("clock-skew").await;

    // The answers the real server cannot be made to give here, each as a sentence by the field.
    let cases = [
        (
            429,
            Some(42),
            json!({ "detail": "Request was throttled. Expected available in 42 seconds.", "code": "throttled" }),
            "Too many attempts from this network. Please wait 42 seconds and try again.",
        ),
        (
            503,
            None,
            json!({ "detail": "The store is unavailable; try again.", "code": "service_unavailable" }),
            "The server is unavailable at the moment. Please try again in a minute.",
        ),
        (
            0,
            None,
            Value::Null,
            "The server could not be reached. Check your connection and try again.",
        ),
    ];
    for (status, retry_after, body, expected) in cases {
        b.stub_next_fetch(status, retry_after, body).await;
        b.fill("Code", "123456").await;
        b.press("Regenerate recovery codes").await;
        b.wait_for_alert(expected).await;
    }

    // Turn off: the server requires a code (TOTPD_TOTP_REQUIRE_CODE_TO_DEACTIVATE) and the page
    // says so; with a recovery code it goes.
    b.fill("Code", "").await;
    b.press("Turn off").await;
    b.wait_for_alert(
        "Enter a code from your app, or a recovery code, to turn off two-factor authentication.",
    )
    .await;
    b.shot("turn-off-needs-code").await;
    b.fill("Code", &spare.next().expect("code")).await;
    b.press("Turn off").await;
    b.wait_for_text("Two-factor authentication is off. Your other sessions were logged out.")
        .await;
    b.wait_for_text("Set up").await;
    b.shot("turned-off").await;

    // Log out everywhere: a key from another client dies with the page's.
    let other: Value = b
        .http
        .post(format!("{}/api/v1/auth/login/", b.base))
        .json(&json!({ "username": USER, "password": PASSWORD }))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("JSON");
    let other_key = other["key"]
        .as_str()
        .expect("a key without TOTP")
        .to_owned();
    b.press("Log out everywhere").await;
    b.wait_for_text("You are logged out on every device.").await;
    assert_eq!(b.session_key().await, Value::Null, "key dropped");
    let status = b
        .http
        .get(format!("{}/api/v1/auth/totp/", b.base))
        .header("Authorization", format!("Token {other_key}"))
        .send()
        .await
        .expect("status")
        .status();
    assert_eq!(
        status,
        reqwest::StatusCode::FORBIDDEN,
        "the other key is revoked"
    );
    b.shot("logged-out-everywhere").await;
}

async fn recovery_codes(b: &Browser) -> Vec<String> {
    let list = b
        .one("//ol[@aria-label='Recovery codes']", "recovery code list")
        .await;
    let mut codes = Vec::new();
    for item in list.find_all(Locator::Css("li")).await.expect("list items") {
        codes.push(item.text().await.expect("code"));
    }
    codes
}
