fn main() -> std::process::ExitCode {
    totpd::cli::run()
}
