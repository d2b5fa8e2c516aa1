//! The participant side of twopc: one library ([`participant`]) that owns
//! the protocol — the durable prepare log, idempotent decisions, tombstones
//! and in-doubt recovery — and two services built on it, [`wallet`] and
//! [`order`], which only say how to hold, apply and release their resources.

pub mod branch;
pub mod config;
pub mod order;
pub mod ownership;
pub mod participant;
pub mod recovery;
pub mod wallet;

pub use config::ParticipantArgs;
