use std::path::PathBuf;

/// When the coordinator answers a purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplyAfter {
    Decision,
    Delivery,
}

/// Where decisions are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// One SQLite file in the data folder: one coordinator, one disk.
    Sqlite,
    /// JetStream KV (replicated on a NATS cluster): any number of
    /// coordinator replicas share it.
    Kv,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// NATS server URL(s), comma-separated, as the nats CLI reads them.
    #[arg(long, env = "NATS_URL", default_value = twopc_common::nats::DEFAULT_URL)]
    pub nats_url: String,
    /// NATS credentials (--nkey/NATS_NKEY, --creds), inbox prefix and TLS.
    #[command(flatten)]
    pub auth: twopc_common::nats::AuthArgs,
    /// Folder for the coordinator's decision log (SQLite).
    #[arg(long, env = "TWOPC_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Where decisions are kept: `sqlite` (one coordinator) or `kv`
    /// (JetStream KV, shared by coordinator replicas).
    #[arg(long, env = "TWOPC_STORE", value_enum, default_value = "sqlite")]
    pub store: Store,
    /// The KV bucket of decisions (`--store kv`).
    #[arg(long, env = "TWOPC_KV_BUCKET", default_value = crate::kv::DEFAULT_BUCKET)]
    pub kv_bucket: String,
    /// Copies of each decision in KV: 3 on a 3-node cluster, 1 on one server.
    #[arg(long, env = "TWOPC_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// Bound of one KV request; a decision write not confirmed in time is
    /// an unknown outcome (the client hears `outcome_unknown`).
    #[arg(long, env = "TWOPC_KV_TIMEOUT_MS", default_value_t = 2_000)]
    pub kv_timeout_ms: u64,
    /// Monitoring URLs of the NATS servers (comma-separated, e.g.
    /// http://127.0.0.1:8222): with `--store kv` the coordinator reads each
    /// server's /varz and refuses to start unless JetStream runs with
    /// `sync_interval: always`. Without them it cannot check, and says so.
    #[arg(long, env = "TWOPC_NATS_MONITOR", value_delimiter = ',')]
    pub nats_monitor: Vec<String>,
    /// Start even if a server's JetStream does not fsync every write
    /// (acknowledged decisions can then be lost in a power failure).
    #[arg(long, env = "TWOPC_ALLOW_UNSYNCED_JETSTREAM", default_value_t = false)]
    pub allow_unsynced_jetstream: bool,
    /// A commit is recorded only within this long of the transaction's
    /// start; past it, a decision query is answered from the log without
    /// writing. See ARCHITECTURE.md, "The retention rule".
    #[arg(long, env = "TWOPC_TX_WINDOW_MS", default_value_t = twopc_schemas::protocol::TxWindow::DEFAULT.window_ms)]
    pub tx_window_ms: i64,
    /// Decisions every participant acknowledged, and request ids, are
    /// deleted this long after the decision (so a retry with a request id
    /// gets its first outcome for this long); must exceed the window plus
    /// the clock skew.
    #[arg(long, env = "TWOPC_RETENTION_MS", default_value_t = twopc_schemas::protocol::TxWindow::DEFAULT.retention_ms)]
    pub retention_ms: i64,
    /// The clock skew between machines the window rule tolerates.
    #[arg(long, env = "TWOPC_MAX_SKEW_MS", default_value_t = twopc_schemas::protocol::TxWindow::DEFAULT.max_skew_ms)]
    pub max_skew_ms: i64,
    /// How often to look for recorded decisions that no live replica is
    /// delivering (a replica died mid-delivery) and deliver them.
    /// Each sweep reads every record in a KV bucket, so it is not frequent:
    /// participants in doubt ask for their decisions on their own; the
    /// sweep is what completes a dead replica's records (so they can be
    /// collected) and tells participants that are not in doubt.
    #[arg(long, env = "TWOPC_SWEEP_INTERVAL_MS", default_value_t = 60_000)]
    pub sweep_interval_ms: u64,
    /// How long to wait for each participant's vote. No answer is a no vote.
    #[arg(long, env = "TWOPC_PREPARE_TIMEOUT_MS", default_value_t = 2_000)]
    pub prepare_timeout_ms: u64,
    /// Timeout of one decision delivery attempt (retried until acknowledged).
    #[arg(long, env = "TWOPC_DECIDE_TIMEOUT_MS", default_value_t = 1_000)]
    pub decide_timeout_ms: u64,
    /// First retry delay of decision delivery; doubles up to the cap.
    #[arg(long, env = "TWOPC_RETRY_BASE_MS", default_value_t = 50)]
    pub retry_base_ms: u64,
    /// Largest retry delay of decision delivery.
    #[arg(long, env = "TWOPC_RETRY_CAP_MS", default_value_t = 5_000)]
    pub retry_cap_ms: u64,
    /// When the client hears the outcome: `decision` — as soon as the
    /// decision is durable (the commit point; participants apply it within
    /// a round trip), or `delivery` — after the first delivery round, so a
    /// committed reply normally means applied everywhere.
    #[arg(
        long,
        env = "TWOPC_REPLY_AFTER",
        value_enum,
        default_value = "decision"
    )]
    pub reply_after: ReplyAfter,
    /// Most purchases in flight; more are answered `busy`.
    #[arg(long, env = "TWOPC_MAX_INFLIGHT", default_value_t = 1_024)]
    pub max_inflight: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, env = "TWOPC_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Log format: `human` or `json` (level from RUST_LOG).
    #[arg(long, env = "TWOPC_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: twopc_common::logging::LogFormat,
    /// Serve the status page at http://ADDR/ (e.g. 127.0.0.1:8080).
    #[arg(long, env = "TWOPC_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
    /// The participants a transaction may name (comma-separated). A
    /// transaction naming another is refused `unknown_participant` before
    /// anything is sent: a prepare to a name nobody serves would only time
    /// out. Checked in memory, no store read per transaction.
    #[arg(
        long,
        env = "TWOPC_PARTICIPANTS",
        value_delimiter = ',',
        default_value = "wallet,order"
    )]
    pub participants: Vec<twopc_schemas::ParticipantName>,
    /// Which participants each client may name, `web=wallet,order;ops=*`
    /// (`forbidden` otherwise). Unset: every client may name every
    /// participant of `TWOPC_PARTICIPANTS`.
    #[arg(long, env = "TWOPC_CLIENT_GRANTS", value_parser = parse_grants)]
    pub client_grants: Option<twopc_schemas::tx::Grants>,
}

fn parse_grants(s: &str) -> Result<twopc_schemas::tx::Grants, String> {
    twopc_schemas::tx::Grants::parse(s)
}

impl CoordinatorArgs {
    /// The window settings, checked (`retention > window + skew`).
    pub fn tx_window(&self) -> Result<twopc_schemas::protocol::TxWindow, String> {
        twopc_schemas::protocol::TxWindow::new(
            self.tx_window_ms,
            self.retention_ms,
            self.max_skew_ms,
        )
    }
}
