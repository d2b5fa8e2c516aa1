//! Prometheus metrics. Each service serves `/metrics` on `--metrics-addr`
//! when given. Metric names (all prefixed `twopc_`) are listed in the
//! README; counters end in `_total`, latencies are histograms in seconds.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Latency buckets, seconds: 100 µs to 10 s.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Batch-size buckets (jobs per fsync).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the Prometheus recorder with an HTTP listener on `addr`. Must
/// run inside the tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_S)?
        .set_buckets_for_metric(Matcher::Full("twopc_log_batch_size".into()), BATCH_BUCKETS)?
        .install()?;
    describe();
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "twopc_transactions_begun_total",
        "Purchases that became transactions."
    );
    describe_counter!(
        "twopc_transactions_committed_total",
        "Transactions decided commit."
    );
    describe_counter!(
        "twopc_transactions_aborted_total",
        "Transactions decided abort, by reason code."
    );
    describe_gauge!(
        "twopc_decisions_undelivered",
        "Decisions not yet acknowledged by every participant."
    );
    describe_histogram!(
        "twopc_prepare_seconds",
        Unit::Seconds,
        "Phase 1: all prepares, at the coordinator."
    );
    describe_histogram!(
        "twopc_decision_seconds",
        Unit::Seconds,
        "Recording the decision durably."
    );
    describe_histogram!(
        "twopc_purchase_seconds",
        Unit::Seconds,
        "A purchase from request to reply, at the coordinator."
    );
    describe_counter!(
        "twopc_delivery_retries_total",
        "Decision deliveries retried after no acknowledgement."
    );
    describe_counter!(
        "twopc_votes_total",
        "Votes cast by this participant, by vote."
    );
    describe_counter!(
        "twopc_decisions_applied_total",
        "Decisions applied by this participant."
    );
    describe_counter!(
        "twopc_recoveries_total",
        "In-doubt transactions resolved by asking the coordinator."
    );
    describe_gauge!(
        "twopc_in_doubt",
        "Prepared transactions older than the in-doubt threshold."
    );
    describe_histogram!(
        "twopc_log_batch_size",
        "Jobs per SQLite transaction (one fsync) in the log."
    );
    describe_histogram!(
        "twopc_log_commit_seconds",
        Unit::Seconds,
        "Time to make one batch durable (COMMIT)."
    );
}
