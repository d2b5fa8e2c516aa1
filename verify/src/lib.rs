//! Verification tooling for twopc, kept apart from the services it checks:
//!
//! * [`check`] — the invariants, over a [`check::Snapshot`] assembled from
//!   each service's own snapshot reader;
//! * [`check_shipping`] — the same for the Go shipping participant, over
//!   its own SQLite file;
//! * [`chaos`] — the chaos runner: a purchase workload, a seeded nemesis,
//!   heal, quiescence and a report;
//! * [`bench`] — `twopc bench`: throughput and latency with same-run
//!   baselines;
//! * [`proxy`] — a per-service TCP proxy to NATS whose link can be cut or
//!   stalled one way.
//!
//! Systems are started through `twopc-launcher`.

pub mod bench;
pub mod chaos;
pub mod check;
pub mod check_shipping;
pub mod proxy;
