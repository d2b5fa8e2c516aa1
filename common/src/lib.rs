//! Runtime pieces shared by the twopc services: named crash points, the
//! SQLite writer thread with group commit, NATS connection setup, retry
//! backoff and logging. Nothing here knows the protocol.

pub mod backoff;
pub mod db;
pub mod fault;
pub mod logging;
pub mod nats;

/// Milliseconds since the Unix epoch, for timestamps in the logs.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub mod micro;
pub mod serve;
pub mod telemetry;
pub mod trace;
