//! Starts and controls a twopc system of real processes: a `nats-server`
//! and the coordinator, wallet and order binaries, each with its own data
//! folder and log file. `twopc up` runs one for people; the end-to-end tests
//! run one per test and kill, stop and restart its processes with real
//! signals.
//!
//! [`System::start`] with a [`SystemConfig`] is the one way to start a
//! system; [`process`] holds the processes it is made of.

pub mod client;
pub mod process;
pub mod system;

pub use process::{find_nats_server, free_port, signal, Binaries, NatsServer, Proc};
pub use system::{
    seed, CoordinatorSettings, Kind, Nats, ParticipantSettings, ReplyAfter, Service, System,
    SystemConfig,
};
