//! `tracing` setup for the binaries: level from `RUST_LOG` (default `info`),
//! to stderr.

pub fn init(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Makes any panic abort the whole process after printing it. A panic
/// means a broken invariant (or a dead writer thread); a service that lost
/// a thread or a task must not keep answering. The process restarts and
/// recovers from its durable log instead.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!(%info, "panic: aborting the process");
        std::process::abort();
    }));
}
