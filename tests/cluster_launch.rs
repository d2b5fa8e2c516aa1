//! A system on a 3-node JetStream cluster with two coordinator replicas, as
//! `twopc up --cluster 3` starts it: what each service is told (read back
//! from the running processes' environment), both replicas serving, one
//! replica killed and started again (the faults under load are in
//! `cluster.rs`).

mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use twopc_launcher::client::{request, Reply};
use twopc_launcher::{Kind, Nats, System, SystemConfig};
use twopc_schemas::api::{CreateProduct, CreateUser, Outcome, PurchaseReply, PurchaseRequest};

/// The environment a running process was started with.
fn environ(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn env_of(sys: &System, name: &str) -> BTreeMap<String, String> {
    environ(sys.services[name].proc.pid().expect("runs"))
}

async fn buy(sys: &System, request_id: &str) -> PurchaseReply {
    let req = PurchaseRequest {
        user: "alice".into(),
        sku: "book-1".into(),
        qty: 1,
        amount: 1_250,
        request_id: Some(request_id.into()),
    };
    match request(
        &sys.shop.client,
        &sys.shop.purchase_subject(),
        &req,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    {
        Reply::Ok(r) => r,
        Reply::Err(e) => panic!("purchase refused: {e:?}"),
    }
}

#[tokio::test]
async fn a_cluster_system_tells_each_service_every_node_and_runs_two_replicas() {
    let dir = tempfile::Builder::new()
        .prefix("twopc-test-cluster-")
        .tempdir()
        .unwrap();
    let mut cfg = SystemConfig::new(dir.path(), harness::bins());
    cfg.client_name = "twopc-test".into();
    cfg.nats = Nats::Cluster {
        nodes: 3,
        port: None,
    };
    cfg.coordinators = 2;
    let mut sys = System::start(cfg).await.unwrap();

    let cluster = sys.cluster().expect("a cluster");
    let urls = cluster.url_list();
    let monitors = cluster.monitor_urls().join(",");
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    assert_eq!(sys.url, urls);
    assert_eq!(sys.coordinator_count(), 2);
    assert_eq!(
        sys.services.keys().copied().collect::<Vec<_>>(),
        ["coordinator", "coordinator-2", "order", "wallet"]
    );
    for (i, name) in ["coordinator", "coordinator-2"].into_iter().enumerate() {
        assert_eq!(sys.coordinator(i).name, name);
        let env = env_of(&sys, name);
        assert_eq!(env["NATS_URL"], urls);
        assert_eq!(env["TWOPC_STORE"], "kv");
        assert_eq!(env["TWOPC_KV_REPLICAS"], "3");
        assert_eq!(env["TWOPC_NATS_MONITOR"], monitors);
        assert_eq!(
            env["TWOPC_DATA_DIR"],
            dir.path().join(name).display().to_string()
        );
        assert!(dir.path().join(format!("{name}.log")).is_file());
    }
    for name in ["wallet", "order"] {
        let env = env_of(&sys, name);
        assert_eq!(env["NATS_URL"], urls);
        assert!(!env.contains_key("TWOPC_STORE"), "{name}: {env:?}");
    }

    // Services connected to different nodes reach each other over routes.
    sys.seed(
        &[CreateUser {
            user: "alice".into(),
            balance: 10_000,
        }],
        &[CreateProduct {
            sku: "book-1".into(),
            price: 1_250,
            stock: 10,
        }],
        false,
    )
    .await
    .unwrap();
    assert_eq!(buy(&sys, "k-1").await.outcome, Outcome::Committed);

    // One replica down: the other serves; started again, both answer.
    sys.coordinator(0).proc.kill().unwrap();
    sys.wait_ready(Kind::Coordinator).await.unwrap();
    assert_eq!(buy(&sys, "k-2").await.outcome, Outcome::Committed);
    sys.coordinator(0).proc.start().unwrap();
    sys.wait_ready(Kind::Coordinator).await.unwrap();
    assert!(sys.coordinator(0).proc.is_running());

    sys.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_single_server_system_leaves_the_coordinator_on_sqlite() {
    let dir = tempfile::Builder::new()
        .prefix("twopc-test-single-")
        .tempdir()
        .unwrap();
    let mut cfg = SystemConfig::new(dir.path(), harness::bins());
    cfg.client_name = "twopc-test".into();
    let mut sys = System::start(cfg).await.unwrap();
    assert!(sys.cluster().is_none());
    let url = sys.nats_server().url();
    let env = env_of(&sys, "coordinator");
    assert_eq!(env["NATS_URL"], url);
    for key in ["TWOPC_STORE", "TWOPC_KV_REPLICAS", "TWOPC_NATS_MONITOR"] {
        assert!(!env.contains_key(key), "{key}: {env:?}");
    }
    sys.stop(Duration::from_secs(5)).await.unwrap();
}
