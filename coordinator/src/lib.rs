//! The twopc coordinator.
//!
//! * [`phase`] — the protocol's pure decisions: from votes to a decision and
//!   the set of participants it must reach. No I/O; unit-tested.
//! * [`log`] — the durable decision log, first writer wins per transaction,
//!   behind the [`log::DecisionLog`] trait (SQLite today).
//! * [`coordinator`] — the driver: serves `shop.purchase`, `shop.tx` and
//!   `twopc.decision.*`, runs phase 1 and phase 2 over NATS, resumes delivery
//!   after a restart.

pub mod admission;
pub mod config;
pub mod conformance;
pub mod coordinator;
pub mod core;
pub mod kv;
pub mod log;
pub mod phase;
pub mod status;

pub use config::CoordinatorArgs;
pub use coordinator::run;
