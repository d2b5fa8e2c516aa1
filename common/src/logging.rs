//! `tracing` setup for the binaries: level from `RUST_LOG` (default `info`),
//! to stderr.

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event, span fields (`tx`, `trace_id`) first.
    #[default]
    Human,
    /// One JSON object per line, with the fields of every enclosing span
    /// (`tx`, `trace_id`, `participant`) in `spans`.
    Json,
}

/// Installs the subscriber: level from `RUST_LOG` (else `default_level`),
/// to stderr, in `format`.
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
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
