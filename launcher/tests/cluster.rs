//! A real 3-node JetStream cluster on loopback: every node fsyncs each
//! write (`sync_interval: always`, read back from `/varz`), keeps or elects
//! a meta leader with one node down (the leader included), and a killed
//! node comes back on its ports with its store and rejoins.

use std::time::{Duration, Instant};

use twopc_launcher::{http_get, NatsCluster, NatsServer};

const GET_TIMEOUT: Duration = Duration::from_secs(2);

async fn get_json(url: &str) -> serde_json::Value {
    let (status, body) = http_get(url, GET_TIMEOUT).await.unwrap();
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: {e}: {body}"))
}

async fn varz(node: &NatsServer) -> serde_json::Value {
    get_json(&format!("{}/varz", node.monitor_url())).await
}

#[tokio::test]
async fn three_nodes_sync_always_and_a_killed_node_rejoins() {
    let dir = tempfile::Builder::new()
        .prefix("twopc-cluster-")
        .tempdir()
        .unwrap();
    let started = Instant::now();
    let mut cluster = NatsCluster::start(dir.path(), 3).await.unwrap();
    eprintln!(
        "--- 3 nodes up with a meta leader in {:?}",
        started.elapsed()
    );

    assert_eq!(cluster.urls().len(), 3);
    assert_eq!(cluster.url_list(), cluster.urls().join(","));
    let mut names = vec![];
    for node in &cluster.nodes {
        let v = varz(node).await;
        assert_eq!(
            v["jetstream"]["config"]["sync_always"],
            true,
            "{}: {}",
            node.url(),
            v["jetstream"]
        );
        assert_eq!(v["cluster"]["name"], "twopc", "{}", v["cluster"]);
        assert_eq!(v["port"], node.port);
        names.push(v["server_name"].as_str().unwrap().to_owned());
    }
    let jsz = get_json(&format!("{}/jsz", cluster.monitor_urls()[1])).await;
    assert_eq!(
        jsz["meta_cluster"]["cluster_size"], 3,
        "{}",
        jsz["meta_cluster"]
    );

    let leader = cluster.live_leader().await.unwrap();
    eprintln!("--- kill node 0 (meta leader: {leader}); the other two keep or elect one");
    cluster.kill(0).unwrap();
    assert!(!cluster.proc(0).is_running());
    let started = Instant::now();
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    let leader = cluster.live_leader().await.unwrap();
    assert_ne!(leader, cluster.nodes[0].name, "a dead node leads no one");
    eprintln!(
        "--- nodes 1 and 2 agree on {leader} in {:?}",
        started.elapsed()
    );

    eprintln!("--- restart node 0 on its ports with its store");
    let started = Instant::now();
    cluster.restart(0).await.unwrap();
    eprintln!(
        "--- node 0 back, all three current with {} in {:?}",
        cluster.live_leader().await.unwrap(),
        started.elapsed()
    );
    let v = varz(&cluster.nodes[0]).await;
    assert_eq!(v["server_name"], names[0].as_str(), "same name, same peer");
    assert_eq!(v["jetstream"]["config"]["sync_always"], true);
    for node in &cluster.nodes {
        assert!(
            node.jetstream_ready().await.is_ok(),
            "{} has a meta leader",
            node.url()
        );
    }
    let jsz = get_json(&format!("{}/jsz", cluster.monitor_urls()[0])).await;
    assert_eq!(
        jsz["meta_cluster"]["cluster_size"], 3,
        "{}",
        jsz["meta_cluster"]
    );

    // The survivors of a dead leader keep naming it (and answering healthz
    // 200) for a while: the wait must see a new, live leader.
    let leader = cluster.live_leader().await.unwrap();
    let l = cluster.nodes.iter().position(|n| n.name == leader).unwrap();
    eprintln!("--- kill the meta leader, node {l}; the other two elect another");
    cluster.kill(l).unwrap();
    let started = Instant::now();
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    let new_leader = cluster.live_leader().await.unwrap();
    assert_ne!(new_leader, leader);
    eprintln!("--- {new_leader} leads after {:?}", started.elapsed());
    let started = Instant::now();
    cluster.restart(l).await.unwrap();
    eprintln!("--- node {l} back in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_single_server_runs_jetstream_with_sync_always_and_restarts() {
    let dir = tempfile::Builder::new()
        .prefix("twopc-single-")
        .tempdir()
        .unwrap();
    let mut server = NatsServer::start(dir.path(), None).await.unwrap();
    let v = varz(&server).await;
    assert_eq!(
        v["jetstream"]["config"]["sync_always"], true,
        "{}",
        v["jetstream"]
    );
    let store = v["jetstream"]["config"]["store_dir"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        store.starts_with(dir.path().join("js").to_str().unwrap()),
        "{store}"
    );
    assert!(v["cluster"]["name"].is_null(), "{}", v["cluster"]);
    let (port, monitor) = (server.port, server.monitor_port);
    server.restart().await.unwrap();
    assert_eq!((server.port, server.monitor_port), (port, monitor));
    let v = varz(&server).await;
    assert_eq!(v["jetstream"]["config"]["store_dir"], store.as_str());
}

/// Routes each node has now (`/routez`).
async fn routes(node: &NatsServer) -> usize {
    get_json(&format!("{}/routez", node.monitor_url())).await["num_routes"]
        .as_u64()
        .unwrap_or(0) as usize
}

/// A node cut off from its peers (iptables on the sending user of each
/// node's route packets) loses its routes, the other two keep theirs to
/// each other and elect without it, and it rejoins when reconnected. Where
/// nodes cannot be isolated (not root, no iptables), it says so and checks
/// nothing.
#[tokio::test]
async fn an_isolated_node_loses_its_routes_and_rejoins() {
    if let Err(why) = NatsCluster::can_isolate() {
        eprintln!("--- SKIPPED: nodes cannot be isolated here: {why}");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("twopc-cluster-iso-")
        .tempdir()
        .unwrap();
    let mut cluster = NatsCluster::start_with(dir.path(), 3, None, true, None, None)
        .await
        .unwrap();
    for node in &cluster.nodes {
        assert!(routes(node).await >= 2, "{} before", node.name);
    }
    cluster.isolate(0).unwrap();
    assert!(cluster.is_isolated(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cut = routes(&cluster.nodes[0]).await;
        let others = [
            routes(&cluster.nodes[1]).await,
            routes(&cluster.nodes[2]).await,
        ];
        if cut == 0 && others.iter().all(|&r| r >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 still has {cut} routes; others {others:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The other two still have a live meta leader among themselves.
    let leader = loop {
        if let Ok(Some(l)) = cluster.nodes[1].meta_leader().await {
            if l != cluster.nodes[0].name {
                break l;
            }
        }
        assert!(Instant::now() < deadline, "no leader without node 0");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("--- node 0 cut off; the others follow {leader}");
    cluster.reconnect(0).unwrap();
    loop {
        if routes(&cluster.nodes[0]).await >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "node 0 never rejoined");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
}
