//! A deterministic simulation of twopc, in the manner of FoundationDB's
//! simulator and TigerBeetle's VOPR: one process, one thread, one seed.
//!
//! What runs is the production protocol code:
//! * the coordinator's [`Core`](twopc_coordinator::core::Core), event by
//!   event, with its commands carried out by a driver that mirrors
//!   `coordinator.rs` (prepares with the no-responders retry, delivery,
//!   the sweep of undelivered decisions, collection);
//! * the KV decision log ([`KvLog`](twopc_coordinator::kv::KvLog)) — claims,
//!   first-writer-wins records, re-reads after unknown answers,
//!   compare-and-set, collection — over [`kv::SimKv`], an in-memory store
//!   that loses answers, lands writes after their timeout and answers reads
//!   from a deposed leader;
//! * the participants' prepare and decide jobs (`participant::prepare_job`,
//!   `decide_job`) with the wallet's and the order service's real SQL on
//!   real (in-memory) SQLite databases, their recovery selection
//!   ([`Tracker`](twopc_participant::recovery::Tracker)) and collection.
//!
//! Around it, simulated: the network (latency, loss, duplication,
//! reordering, partitions, "no responders" for a process that is down),
//! time and each process's wall clock (skew, steps), process pauses,
//! crashes and restarts, and clients that retry by request id. Every
//! probability is drawn from the seed at the start of a run ([`Knobs`],
//! BUGGIFY-style), with short time constants (a window of 2 s, retention of
//! 8 s) so that expiry and collection happen in every schedule. After the
//! faults the network heals and the run goes on until nothing is in flight;
//! then [`check`] holds the outcome against the chaos runner's invariants.
//!
//! A run is a pure function of its seed and [`Config`]: `twopc sim --seed N`
//! replays one, and [`Outcome::trace_hash`] proves it.

pub mod check;
pub mod kv;
mod world;

pub use world::{run, Breaks, Config, Knobs, Outcome};
