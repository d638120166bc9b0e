//! Background work that must yield to requests: the calling thread's scheduling priority is
//! lowered, so a request's thread preempts it whenever both want a core.

/// The nice value of background threads (password hashing, full scans): below every other
/// thread of the server, but not the lowest (19), so that logins still get a share of a
/// machine that verifies flood.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to `BACKGROUND_NICE` (on Linux,
/// `setpriority` on a thread id applies to that thread alone; elsewhere it would lower the
/// whole process, so it is left). There is no way back without privileges: call it only on a
/// thread of its own.
pub fn lower_this_thread(what: &str) {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE)
    {
        tracing::warn!("could not lower the priority of the {what} thread: {e}");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = what;
}

/// Runs `work` on a thread of its own named `name`, at `BACKGROUND_NICE`, and gives back its
/// result: for housekeeping that may take a core for seconds (a scan of every record) and must
/// not take it from requests, as the blocking pool (normal priority) would. `work` and what
/// it holds are dropped on that thread before the result is sent.
pub async fn run_in_background<T, F>(name: &str, what: &'static str, work: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_this_thread(what);
            let _ = done.send(work());
        })?;
    result
        .await
        .map_err(|_| std::io::Error::other(format!("the {what} thread stopped without a result")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_work_runs_on_its_own_thread_below_requests() {
        let (name, nice) = run_in_background("totpd-test-bg", "test", || {
            let name = std::thread::current().name().map(str::to_owned);
            #[cfg(target_os = "linux")]
            let nice =
                rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0);
            #[cfg(not(target_os = "linux"))]
            let nice = BACKGROUND_NICE;
            (name, nice)
        })
        .await
        .expect("the thread starts and answers");
        assert_eq!(name.as_deref(), Some("totpd-test-bg"));
        // Never above the background level (a process started at a higher nice keeps it).
        assert!(
            nice >= BACKGROUND_NICE,
            "background work ran at nice {nice}"
        );
    }

    #[tokio::test]
    async fn a_panic_in_background_work_is_an_error_not_a_hang() {
        let result: std::io::Result<()> =
            run_in_background("totpd-test-panic", "test", || panic!("boom")).await;
        assert!(result.is_err());
    }
}
