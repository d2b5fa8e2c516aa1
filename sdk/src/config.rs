//! Flags and environment shared by the participant services.

use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct ParticipantArgs {
    /// NATS server URL(s), comma-separated, as the nats CLI reads them.
    #[arg(long, env = "NATS_URL", default_value = twopc_common::nats::DEFAULT_URL)]
    pub nats_url: String,
    /// NATS credentials (--nkey/NATS_NKEY, --creds), inbox prefix and TLS.
    #[command(flatten)]
    pub auth: twopc_common::nats::AuthArgs,
    /// Folder for this service's SQLite database.
    #[arg(long, env = "TWOPC_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// A prepared transaction older than this is in doubt and is resolved by
    /// asking the coordinator.
    #[arg(long, env = "TWOPC_IN_DOUBT_AFTER_MS", default_value_t = 5_000)]
    pub in_doubt_after_ms: u64,
    /// How often to look for in-doubt transactions.
    #[arg(long, env = "TWOPC_RECOVERY_INTERVAL_MS", default_value_t = 1_000)]
    pub recovery_interval_ms: u64,
    /// Timeout of one decision query to the coordinator.
    #[arg(long, env = "TWOPC_DECISION_TIMEOUT_MS", default_value_t = 2_000)]
    pub decision_timeout_ms: u64,
    /// A prepare is accepted only within this long of the transaction's
    /// start (its UUIDv7 time); see ARCHITECTURE.md, "The retention rule".
    #[arg(long, env = "TWOPC_TX_WINDOW_MS", default_value_t = twopc_schemas::protocol::TxWindow::DEFAULT.window_ms)]
    pub tx_window_ms: i64,
    /// Decided branches are deleted this long after their last change; must
    /// exceed the window plus the clock skew.
    #[arg(long, env = "TWOPC_RETENTION_MS", default_value_t = twopc_schemas::protocol::TxWindow::DEFAULT.retention_ms)]
    pub retention_ms: i64,
    /// The clock skew between machines the window rule tolerates.
    #[arg(long, env = "TWOPC_MAX_SKEW_MS", default_value_t = twopc_schemas::protocol::TxWindow::DEFAULT.max_skew_ms)]
    pub max_skew_ms: i64,
    /// Most requests handled at once per subject; more get `busy`.
    #[arg(long, env = "TWOPC_MAX_INFLIGHT", default_value_t = 4_096)]
    pub max_inflight: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, env = "TWOPC_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How long this instance's hold on its participant name lasts without
    /// renewal (renewed every quarter of it). A standby on another host
    /// takes over from a silent owner after this long; one on the same
    /// host and folder at once when the owner's process is gone.
    #[arg(long, env = "TWOPC_LEASE_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    pub lease_ms: u64,
    /// Take the participant's name for this data folder even though it
    /// belongs to another data store, once that store's owner is gone (for
    /// a store lost for good). Never takes a live owner's name.
    #[arg(long, env = "TWOPC_REPLACE_STORE")]
    pub replace_store: bool,
    /// Log format: `human` or `json` (level from RUST_LOG).
    #[arg(long, env = "TWOPC_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: twopc_common::logging::LogFormat,
}

impl ParticipantArgs {
    pub fn lease_settings(&self) -> crate::ownership::LeaseSettings {
        crate::ownership::LeaseSettings {
            lease_ms: self.lease_ms,
            replace_store: self.replace_store,
        }
    }

    /// The window settings, checked (`retention > window + skew`).
    pub fn tx_window(&self) -> Result<twopc_schemas::protocol::TxWindow, String> {
        twopc_schemas::protocol::TxWindow::new(
            self.tx_window_ms,
            self.retention_ms,
            self.max_skew_ms,
        )
    }
}
