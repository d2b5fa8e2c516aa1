//! Fault injection for tests and chaos runs, armed from the environment.
//!
//! * `TWOPC_CRASH_AT=name[:n][,name[:n]...]` — the process aborts (SIGABRT,
//!   no unwinding, no destructors, nothing flushed) the `n`-th time (default
//!   first) it reaches the crash point `name`. That is as close to a power cut
//!   between two instructions as a test can get, and it is deterministic.
//! * `TWOPC_DELAY=name:ms[,name:ms...]` — every time the process reaches the
//!   delay point `name` it sleeps `ms` milliseconds (a slow participant).
//!
//! Point names are `<service>.<step>.<moment>`, listed in ARCHITECTURE.md.
//! Unarmed points cost one hash lookup in a map that is usually empty.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub const CRASH_ENV: &str = "TWOPC_CRASH_AT";
pub const DELAY_ENV: &str = "TWOPC_DELAY";

struct Faults {
    /// Crash point name → hits remaining before the crash.
    crash: HashMap<String, AtomicU64>,
    /// Delay point name → sleep.
    delay: HashMap<String, Duration>,
}

fn parse_list(var: &str) -> Vec<(String, Option<u64>)> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.rsplit_once(':') {
            Some((name, n)) => match n.parse() {
                Ok(n) => (name.to_owned(), Some(n)),
                Err(_) => (item.to_owned(), None),
            },
            None => (item.to_owned(), None),
        })
        .collect()
}

fn faults() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| Faults {
        crash: parse_list(CRASH_ENV)
            .into_iter()
            .map(|(name, n)| (name, AtomicU64::new(n.unwrap_or(1).max(1))))
            .collect(),
        delay: parse_list(DELAY_ENV)
            .into_iter()
            .map(|(name, ms)| (name, Duration::from_millis(ms.unwrap_or(1000))))
            .collect(),
    })
}

/// Aborts the process here if the crash point `name` is armed and due.
pub fn crash_point(name: &str) {
    let Some(remaining) = faults().crash.get(name) else {
        return;
    };
    if remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
        // eprintln, not tracing: a non-blocking log writer might not flush
        // before the abort, and tests read this line.
        eprintln!("CRASH POINT {name}: aborting the process");
        std::process::abort();
    }
}

/// Sleeps here if the delay point `name` is armed.
pub async fn delay_point(name: &str) {
    if let Some(d) = faults().delay.get(name) {
        tracing::warn!(
            point = name,
            delay_ms = d.as_millis() as u64,
            "injected delay"
        );
        tokio::time::sleep(*d).await;
    }
}

/// Lists the armed points, for the startup log line.
pub fn armed() -> Vec<String> {
    let f = faults();
    let mut v: Vec<String> = f
        .crash
        .keys()
        .map(|k| format!("crash:{k}"))
        .chain(f.delay.keys().map(|k| format!("delay:{k}")))
        .collect();
    v.sort();
    v
}
