//! The `twopc` package: the CLI and the three service binaries (thin mains
//! over the `twopc-coordinator` and `twopc-participants` crates).
//!
//! The launcher lives in `twopc-launcher` and the verification tooling in
//! `twopc-verify`; they are re-exported here under their old paths so that
//! tests written against `twopc::check` and friends keep compiling. New code
//! imports from the crates themselves.

pub use twopc_launcher as launcher;
pub use twopc_launcher::client;
pub use twopc_verify::{bench, chaos, check, proxy};
