//! Starts and controls a twopc system of real processes: a `nats-server`
//! (or a JetStream cluster of them) and the coordinator (one or more
//! replicas), wallet and order binaries, each with its own data folder and
//! log file. `twopc up` runs one for people; the end-to-end tests
//! run one per test and kill, stop and restart its processes with real
//! signals.
//!
//! [`System::start`] with a [`SystemConfig`] is the one way to start a
//! system; [`process`] holds the processes it is made of, [`cluster`] the
//! nats-server cluster, [`tls`] the optional TLS; `twopc_common::http` has the GET that reads the
//! servers' monitoring endpoints.

pub mod auth;
pub mod client;
pub mod cluster;
pub mod process;
pub mod system;
pub mod tls;

pub use cluster::NatsCluster;
pub use process::{
    find_nats_server, free_port, free_ports, signal, Binaries, NatsServer, Proc, ServerConfig,
    ServerTls,
};
pub use system::{
    seed, CoordinatorSettings, DecisionStore, Kind, Nats, ParticipantSettings, ReplyAfter, Service,
    System, SystemConfig,
};
pub use tls::TlsFiles;
pub use twopc_common::http::http_get;
