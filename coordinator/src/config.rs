use std::path::PathBuf;

/// When the coordinator answers a purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplyAfter {
    Decision,
    Delivery,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// NATS server URL(s), comma-separated, as the nats CLI reads them.
    #[arg(long, env = "NATS_URL", default_value = twopc_common::nats::DEFAULT_URL)]
    pub nats_url: String,
    /// Folder for the coordinator's decision log (SQLite).
    #[arg(long, env = "TWOPC_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
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
}
