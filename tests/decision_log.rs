//! The JetStream KV decision log passes the same suite as the SQLite one
//! (`twopc_coordinator::conformance`), against real nats-servers: one
//! server (replicas 1) and a 3-node cluster (replicas 3).

use std::time::Duration;

use twopc_coordinator::conformance;
use twopc_coordinator::kv::{KvConfig, KvLog};
use twopc_launcher::{NatsCluster, NatsServer};

async fn open(url: &str, bucket: &str, replicas: usize) -> KvLog {
    let client = twopc_common::nats::connect(url, "decision-log-test", &Default::default())
        .await
        .unwrap();
    KvLog::open(
        client,
        KvConfig {
            bucket: bucket.into(),
            replicas,
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_on_one_server_passes_the_decision_log_suite() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats"), None)
        .await
        .unwrap();
    let log = open(&nats.url(), "suite_r1", 1).await;
    conformance::run_all(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_on_a_three_node_cluster_passes_the_decision_log_suite() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(dir.path(), 3).await.unwrap();
    let log = open(&cluster.url_list(), "suite_r3", 3).await;
    conformance::run_all(&log).await;
}
