//! Runtime pieces shared by the twopc services: named crash points, the
//! SQLite writer thread with group commit, NATS connection setup, retry
//! backoff and logging. Nothing here knows the protocol.

pub mod backoff;
pub mod contain;
pub mod db;
pub mod fault;
pub mod http;
pub mod logging;
pub mod nats;
pub mod refusals;

/// Milliseconds since the Unix epoch, for timestamps in the logs and the
/// databases. This is the wall clock: it can step backwards or forwards, so
/// nothing that measures an age or a timeout may use it (use
/// `std::time::Instant`). Tests step it with `clock_skew_ms:` in the faults
/// file ([`fault::clock_skew_ms`]).
pub fn now_ms() -> i64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    wall.saturating_add(fault::clock_skew_ms())
}

pub mod micro;
pub mod serve;
pub mod telemetry;
pub mod trace;
