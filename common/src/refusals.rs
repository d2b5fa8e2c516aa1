//! Log lines about refused requests, rate-limited, so that a flood of bad
//! input cannot flood the log.
//!
//! Per (endpoint, code), the first [`PER_WINDOW`] refusals of each
//! [`WINDOW_MS`] window are logged; the rest are counted, and the first
//! refusal logged after the window says how many were left out ("suppressed
//! N refusals of <code> on <endpoint> in the last 10 s"). If the flood stops
//! within a window, that window's count is never logged: the metric
//! `twopc_refusals_total{endpoint, code}` counts every refusal, logged or
//! not. Keys are `&'static str`s named by the code, never by the request, so
//! their number is fixed whatever arrives.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

/// Refusals logged per (endpoint, code) and window.
pub const PER_WINDOW: u32 = 10;
/// The window.
pub const WINDOW_MS: u64 = 10_000;

/// What to do with one refusal's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it; first say that `suppressed` refusals of the same key were
    /// left out since the last logged one (if any were).
    Log { suppressed: u64 },
    /// Leave it out (it is counted).
    Quiet,
}

/// The limiter: pure, with the time passed in (monotonic milliseconds).
#[derive(Debug)]
pub struct RefusalLog {
    per_window: u32,
    window_ms: u64,
    keys: HashMap<(&'static str, &'static str), Window>,
}

#[derive(Debug)]
struct Window {
    start_ms: u64,
    logged: u32,
    /// Left out since the last logged refusal of this key.
    suppressed: u64,
}

impl RefusalLog {
    pub fn new(per_window: u32, window_ms: u64) -> Self {
        RefusalLog {
            per_window,
            window_ms,
            keys: HashMap::new(),
        }
    }

    /// One refusal of `code` on `endpoint` at `now_ms`.
    pub fn admit(&mut self, now_ms: u64, endpoint: &'static str, code: &'static str) -> Admit {
        let w = self.keys.entry((endpoint, code)).or_insert(Window {
            start_ms: now_ms,
            logged: 0,
            suppressed: 0,
        });
        if now_ms.saturating_sub(w.start_ms) >= self.window_ms {
            w.start_ms = now_ms;
            w.logged = 0;
        }
        if w.logged < self.per_window {
            w.logged += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            Admit::Quiet
        }
    }
}

/// The process's limiter and the clock it reads.
static PROCESS: LazyLock<(Instant, Mutex<RefusalLog>)> = LazyLock::new(|| {
    (
        Instant::now(),
        Mutex::new(RefusalLog::new(PER_WINDOW, WINDOW_MS)),
    )
});

/// Counts a refusal of `code` on `endpoint`, and runs `log` (which logs
/// it) unless this key has logged [`PER_WINDOW`] refusals in the current
/// window; before it, a line says how many were left out.
pub fn refused(endpoint: &'static str, code: &'static str, log: impl FnOnce()) {
    metrics::counter!("twopc_refusals_total", "endpoint" => endpoint, "code" => code).increment(1);
    let (started, limiter) = &*PROCESS;
    let now_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let admit = limiter
        .lock()
        .expect("refusal log lock")
        .admit(now_ms, endpoint, code);
    if let Admit::Log { suppressed } = admit {
        if suppressed > 0 {
            tracing::warn!(
                endpoint,
                code,
                suppressed,
                "suppressed {suppressed} refusals of {code} on {endpoint} in the last {} s",
                WINDOW_MS / 1000
            );
        }
        log();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_the_first_few_per_window_then_one_summary() {
        let mut l = RefusalLog::new(3, 10_000);
        let mut logged = 0;
        for i in 0..1_000u64 {
            match l.admit(i, "purchase", "invalid") {
                Admit::Log { suppressed } => {
                    assert_eq!(suppressed, 0);
                    logged += 1;
                }
                Admit::Quiet => {}
            }
        }
        assert_eq!(logged, 3, "three lines in the first window, not a thousand");
        // Another key has its own budget.
        assert_eq!(
            l.admit(999, "purchase", "busy"),
            Admit::Log { suppressed: 0 }
        );
        assert_eq!(
            l.admit(999, "prepare", "invalid"),
            Admit::Log { suppressed: 0 }
        );
        // Next window: logged again, with the count of what was left out.
        assert_eq!(
            l.admit(10_000, "purchase", "invalid"),
            Admit::Log { suppressed: 997 }
        );
        assert_eq!(
            l.admit(10_001, "purchase", "invalid"),
            Admit::Log { suppressed: 0 }
        );
        assert_eq!(
            l.admit(10_002, "purchase", "invalid"),
            Admit::Log { suppressed: 0 }
        );
        assert_eq!(l.admit(10_003, "purchase", "invalid"), Admit::Quiet);
    }

    #[test]
    fn a_trickle_is_always_logged() {
        let mut l = RefusalLog::new(2, 1_000);
        for i in 0..100u64 {
            assert_eq!(
                l.admit(i * 600, "decide", "bad_message"),
                Admit::Log { suppressed: 0 }
            );
        }
    }
}
