//! The `twopc` package: the CLI, the three service binaries (thin mains over
//! the `twopc-coordinator` and `twopc-participants` crates), and
//! [`launcher`], which starts a whole system of real processes — used by
//! `twopc up` and by the end-to-end tests alike.

pub mod bench;
pub mod chaos;
pub mod check;
pub mod client;
pub mod launcher;
pub mod proxy;
