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
