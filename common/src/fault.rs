//! Fault injection for tests and chaos runs, armed from the environment.
//!
//! * `TWOPC_CRASH_AT=name[:n][,name[:n]...]` — the process aborts (SIGABRT,
//!   no unwinding, no destructors, nothing flushed) the `n`-th time (default
//!   first) it reaches the crash point `name`. That is as close to a power cut
//!   between two instructions as a test can get, and it is deterministic.
//! * `TWOPC_STOP_AT=name[:n][,name[:n]...]` — the process stops itself
//!   (raises SIGSTOP: every thread freezes, sockets stay open) the `n`-th
//!   time (default first) it reaches the crash point `name`, and only then:
//!   after a SIGCONT it goes on from that very point, and later hits pass.
//!   Every crash point is also a stop point. A test uses this to hold a
//!   process between two steps for as long as it likes (a replica paused
//!   after its window check, before its write) where a timed delay would
//!   race; it waits for the stop on the process state (`T` in
//!   `/proc/<pid>/stat`). Not in the faults file: a file entry stays armed
//!   and would stop at every hit.
//! * `TWOPC_DELAY=name:ms[,name:ms...]` — every time the process reaches the
//!   delay point `name` it sleeps `ms` milliseconds (a slow participant).
//!
//! * `TWOPC_FAULTS_FILE=path` — points armed at run time (the chaos runner
//!   writes this file): one entry per line or comma, `crash:name` or
//!   `delay:name:ms`. Re-read at most every [`FILE_REFRESH_MS`]. The same
//!   file can also step the process's wall clock: `clock_skew_ms:<signed
//!   ms>` is added to every [`crate::now_ms`] from the next re-read on (see
//!   [`clock_skew_ms`]), so a test can step the clock of a running process
//!   backwards or forwards the way NTP or an operator would.
//! * `TWOPC_BREAK=name[,name]` — deliberately broken protocol behaviour,
//!   only for proving that the checkers catch it (see [`broken`]).
//!
//! Point names are `<service>.<step>.<moment>`, listed in ARCHITECTURE.md.
//! Unarmed points cost one hash lookup in a map that is usually empty.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const CRASH_ENV: &str = "TWOPC_CRASH_AT";
pub const STOP_ENV: &str = "TWOPC_STOP_AT";
pub const DELAY_ENV: &str = "TWOPC_DELAY";
pub const FILE_ENV: &str = "TWOPC_FAULTS_FILE";
pub const BREAK_ENV: &str = "TWOPC_BREAK";
/// How stale the faults file may be.
pub const FILE_REFRESH_MS: u64 = 100;

struct Faults {
    /// Crash point name → hits remaining before the crash.
    crash: HashMap<String, AtomicU64>,
    /// Stop point name → hits remaining before the stop (0: done).
    stop: HashMap<String, AtomicU64>,
    /// Delay point name → sleep.
    delay: HashMap<String, Duration>,
    /// Whether `TWOPC_FAULTS_FILE` is set (points may be armed at run time).
    file: bool,
}

impl Faults {
    /// False in a normal deployment: then no point name is even formatted.
    fn any(&self) -> bool {
        self.file || !self.crash.is_empty() || !self.stop.is_empty() || !self.delay.is_empty()
    }
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
        stop: parse_list(STOP_ENV)
            .into_iter()
            .map(|(name, n)| (name, AtomicU64::new(n.unwrap_or(1).max(1))))
            .collect(),
        delay: parse_list(DELAY_ENV)
            .into_iter()
            .map(|(name, ms)| (name, Duration::from_millis(ms.unwrap_or(1000))))
            .collect(),
        file: std::env::var_os(FILE_ENV).is_some(),
    })
}

/// Points armed through the faults file.
#[derive(Default)]
struct FileFaults {
    crash: Vec<String>,
    delay: HashMap<String, Duration>,
    /// Added to the wall clock (`clock_skew_ms:<ms>`); 0 when absent.
    clock_skew_ms: i64,
}

struct FileState {
    path: Option<std::path::PathBuf>,
    read_at: Option<Instant>,
    faults: FileFaults,
}

fn parse_file(text: &str) -> FileFaults {
    let mut f = FileFaults::default();
    for item in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if let Some(name) = item.strip_prefix("crash:") {
            f.crash.push(name.to_owned());
        } else if let Some(rest) = item.strip_prefix("delay:") {
            if let Some((name, ms)) = rest.rsplit_once(':') {
                if let Ok(ms) = ms.parse() {
                    f.delay.insert(name.to_owned(), Duration::from_millis(ms));
                }
            }
        } else if let Some(ms) = item.strip_prefix("clock_skew_ms:") {
            if let Ok(ms) = ms.parse() {
                f.clock_skew_ms = ms;
            }
        }
    }
    f
}

/// Looks up the faults file (if configured), refreshing it when stale.
fn with_file<T>(f: impl FnOnce(&FileFaults) -> T) -> Option<T> {
    static STATE: OnceLock<Mutex<FileState>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        Mutex::new(FileState {
            path: std::env::var_os(FILE_ENV).map(Into::into),
            read_at: None,
            faults: FileFaults::default(),
        })
    });
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let path = st.path.clone()?;
    let stale = st
        .read_at
        .is_none_or(|t| t.elapsed() >= Duration::from_millis(FILE_REFRESH_MS));
    if stale {
        st.faults = parse_file(&std::fs::read_to_string(path).unwrap_or_default());
        st.read_at = Some(Instant::now());
    }
    Some(f(&st.faults))
}

fn die(name: &str) -> ! {
    // eprintln, not tracing: a non-blocking log writer might not flush
    // before the abort, and tests read this line.
    eprintln!("CRASH POINT {name}: aborting the process");
    std::process::abort();
}

/// Counts one hit of a stop point with `remaining` hits to go: true for
/// the hit that brings it to 0; it then stays at 0, so no later hit stops.
fn this_hit_stops(remaining: &AtomicU64) -> bool {
    remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1)) == Ok(1)
}

/// Stops the process here (SIGSTOP to itself) and returns once it is
/// continued (SIGCONT).
fn stop(name: &str) {
    // eprintln, not tracing, as for crash points: tests read this line.
    eprintln!("STOP POINT {name}: stopping the process (SIGSTOP); SIGCONT resumes it");
    // SAFETY: raise(3) with a valid signal number; no memory is involved.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
    eprintln!("STOP POINT {name}: continued");
}

/// Aborts the process here if the crash point `name` is armed and due, or
/// stops it here if the point is armed as a stop point (`TWOPC_STOP_AT`)
/// and due. `name` is formatted only when some fault is armed at all, so
/// call sites may pass `format_args!` on hot paths.
pub fn crash_point(name: impl std::fmt::Display) {
    let f = faults();
    if !f.any() {
        return;
    }
    let name = name.to_string();
    if f.stop.get(&name).is_some_and(this_hit_stops) {
        stop(&name);
    }
    if let Some(remaining) = f.crash.get(&name) {
        if remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            die(&name);
        }
    }
    if with_file(|f| f.crash.contains(&name)) == Some(true) {
        die(&name);
    }
}

/// How long to sleep at the delay point `name`, if it is armed (the caller
/// sleeps, so that a `format_args!` name need not live across an await).
pub fn delay_for(name: impl std::fmt::Display) -> Option<Duration> {
    let f = faults();
    if !f.any() {
        return None;
    }
    let name = name.to_string();
    let d = f
        .delay
        .get(&name)
        .copied()
        .or_else(|| with_file(|f| f.delay.get(&name).copied()).flatten())?;
    tracing::warn!(point = %name, delay_ms = d.as_millis() as u64, "injected delay");
    Some(d)
}

/// Milliseconds to add to the wall clock, as the faults file says now (0
/// without a faults file). Only [`crate::now_ms`] calls this, so every wall
/// timestamp in the process steps together, while `Instant` (the monotonic
/// clock) is untouched — just as when the real clock is stepped. A change
/// is announced on stderr (`CLOCK SKEW <ms> ms`), which tests wait for.
pub fn clock_skew_ms() -> i64 {
    if !faults().file {
        return 0;
    }
    static ANNOUNCED: AtomicI64 = AtomicI64::new(0);
    let skew = with_file(|f| f.clock_skew_ms).unwrap_or(0);
    if ANNOUNCED.swap(skew, Ordering::SeqCst) != skew {
        // eprintln, not tracing, as for crash points: tests read this line.
        eprintln!("CLOCK SKEW {skew} ms: the wall clock is stepped");
    }
    skew
}

/// True when the deliberate protocol break `name` is switched on with
/// `TWOPC_BREAK`. Breaks exist only so that tests can prove the invariant
/// checkers catch a broken protocol; never set one in a deployment.
pub fn broken(name: &str) -> bool {
    static BREAKS: OnceLock<Vec<String>> = OnceLock::new();
    BREAKS
        .get_or_init(|| {
            let v: Vec<String> = parse_list(BREAK_ENV).into_iter().map(|(n, _)| n).collect();
            if !v.is_empty() {
                eprintln!("WARNING: protocol deliberately broken for testing: {v:?}");
            }
            v
        })
        .iter()
        .any(|b| b == name)
}

/// Lists the armed points, for the startup log line.
pub fn armed() -> Vec<String> {
    let f = faults();
    let mut v: Vec<String> = f
        .crash
        .keys()
        .map(|k| format!("crash:{k}"))
        .chain(f.stop.keys().map(|k| format!("stop:{k}")))
        .chain(f.delay.keys().map(|k| format!("delay:{k}")))
        .collect();
    if let Some(path) = std::env::var_os(FILE_ENV) {
        v.push(format!("file:{}", path.to_string_lossy()));
    }
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_point_stops_at_its_nth_hit_only() {
        let remaining = AtomicU64::new(2);
        let hits: Vec<bool> = (0..5).map(|_| this_hit_stops(&remaining)).collect();
        assert_eq!(hits, [false, true, false, false, false]);
        assert_eq!(remaining.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn faults_file_entries_parse() {
        let f = parse_file(
            "crash:wallet.prepare.after_durable\ndelay:order.prepare:250, junk,delay:x:y",
        );
        assert_eq!(f.crash, vec!["wallet.prepare.after_durable"]);
        assert_eq!(
            f.delay.get("order.prepare"),
            Some(&Duration::from_millis(250))
        );
        assert_eq!(f.delay.len(), 1);
        assert_eq!(f.clock_skew_ms, 0);
        assert_eq!(
            parse_file("clock_skew_ms:-3600000").clock_skew_ms,
            -3_600_000
        );
    }
}
