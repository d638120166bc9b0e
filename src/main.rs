fn main() -> std::process::ExitCode {
    totpd::ops::cli::run()
}
