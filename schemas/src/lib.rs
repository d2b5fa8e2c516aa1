//! Every message that crosses NATS in twopc, and nothing else.
//!
//! **Architecture Invariant:** only this crate knows the wire format. The
//! public API (what the `nats` CLI sends) is JSON ([`api`]); the internal
//! protocol between coordinator and participants is postcard inside a
//! versioned envelope ([`protocol`]). Postcard is not self-describing, so
//! variants and fields of protocol types are never reordered or removed; new
//! ones are appended, and `golden` tests pin the bytes.

pub mod api;
pub mod client;
pub mod code;
pub mod ownership;
pub mod participant;
pub mod points;
pub mod protocol;
pub mod subjects;
pub mod tx;

pub use client::ClientName;
pub use code::Code;
pub use participant::{BranchState, ParticipantName};
