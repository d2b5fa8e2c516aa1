//! The docker compose deployments, for real, on the images built by
//! `compose/build-images.sh` (scripts/test.sh runs it):
//!
//! * `compose/docker-compose.yml` (one nats-server): its JetStream fsyncs
//!   every write (`/varz` says `sync_always`), a purchase, the wallet killed
//!   while a transaction is in doubt there and started again, then `down`
//!   (volumes kept) and `up` with the data found again.
//! * `compose/docker-compose.cluster.yml` (three nats-servers, two
//!   coordinator replicas on a replicated KV decision log): purchases, one
//!   nats node and one coordinator replica killed, purchases still commit,
//!   both started again, then money and stock add up and nothing stays in
//!   doubt.
//!
//! Ignored by a plain `cargo test`, which cannot know whether Docker and the
//! images are there; `scripts/test.sh` builds the images and runs them with
//! `--ignored` (unless `TWOPC_SKIP_DOCKER` is set), so a skipped run says
//! "ignored" instead of passing. They run one at a time (each starts a whole
//! system in Docker) and remove their containers and volumes when they end,
//! passed or failed.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use twopc_launcher::client::{request, Reply};
use twopc_schemas::api::{Balance, Outcome, PurchaseReply, PurchaseRequest, Stock};
use twopc_schemas::points::ParticipantDelay;
use twopc_schemas::{participant, subjects, Code};

const SINGLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/compose/docker-compose.yml");
const CLUSTER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/compose/docker-compose.cluster.yml"
);

/// Held by each test for its whole run: two systems in Docker at once on a
/// two-core machine would only make both slow.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `scenario` alone (see [`ONE_AT_A_TIME`]) on a runtime of its own.
fn run_alone(scenario: impl std::future::Future<Output = ()>) {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(scenario);
}

/// One compose project; dropping it runs `down -v` (containers, network and
/// volumes), also when the test failed.
struct Compose {
    file: &'static str,
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn command(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.args(["-f", self.file, "-p", &self.project])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .output()
            .expect("docker-compose runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed:\n{text}"
        );
        text
    }

    /// The container id of `service`.
    fn id(&self, service: &str) -> String {
        self.run(&["ps", "-q", service]).trim().to_owned()
    }

    /// `docker inspect` of `service`'s container with a Go template.
    fn inspect(&self, service: &str, format: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "--format", format, &self.id(service)])
            .output()
            .expect("docker runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn running(&self, service: &str) -> bool {
        self.inspect(service, "{{.State.Running}}") == "true"
    }

    /// Waits until `service`'s health check (`twopc ping <service>` inside
    /// its container) passes.
    async fn healthy(&self, service: &str) {
        until(
            &format!("{service} healthy"),
            Duration::from_secs(90),
            || async { self.inspect(service, "{{.State.Health.Status}}") == "healthy" },
        )
        .await;
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["down", "-v", "--timeout", "5"])
            .output();
    }
}

fn images_present() {
    let images = Command::new("docker")
        .args(["image", "inspect", "twopc:local", "twopc-nats:local"])
        .output()
        .expect("docker is needed for this test");
    assert!(
        images.status.success(),
        "images missing: run compose/build-images.sh (scripts/test.sh does)"
    );
}

/// Logs a step with the time since `start`.
fn step(start: Instant, what: &str) {
    eprintln!("--- [{:6.1} s] {what}", start.elapsed().as_secs_f64());
}

async fn until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ready(client: &async_nats::Client) {
    for (service, subject) in [
        ("coordinator", subjects::TX_STATUS),
        ("wallet", subjects::WALLET_BALANCE),
        ("order", subjects::ORDER_STOCK),
    ] {
        until(service, Duration::from_secs(90), || async {
            let req = async_nats::Request::new()
                .payload(b"{}".to_vec().into())
                .timeout(Some(Duration::from_millis(500)));
            client.send_request(subject, req).await.is_ok()
        })
        .await;
    }
}

/// A nats-server's `/varz` from its monitoring port on the host.
async fn varz(monitor_port: &str) -> Option<serde_json::Value> {
    let url = format!("http://127.0.0.1:{monitor_port}/varz");
    match twopc_launcher::http_get(&url, Duration::from_secs(2)).await {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Waits for the server's `/varz` and checks that its JetStream fsyncs
/// every write (`sync_interval: always`, from the config file).
async fn assert_sync_always(monitor_port: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let varz = loop {
        if let Some(v) = varz(monitor_port).await {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for /varz on 127.0.0.1:{monitor_port}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        varz["jetstream"]["config"]["sync_always"],
        serde_json::json!(true),
        "JetStream must fsync every write: {}",
        varz["jetstream"]
    );
    varz
}

async fn balance(client: &async_nats::Client, user: &str) -> Option<Balance> {
    match request(
        client,
        subjects::WALLET_BALANCE,
        &serde_json::json!({ "user": user }),
        Duration::from_secs(2),
    )
    .await
    {
        Ok(Reply::Ok(b)) => Some(b),
        _ => None,
    }
}

async fn stock(client: &async_nats::Client, sku: &str) -> Option<Stock> {
    match request(
        client,
        subjects::ORDER_STOCK,
        &serde_json::json!({ "sku": sku }),
        Duration::from_secs(2),
    )
    .await
    {
        Ok(Reply::Ok(s)) => Some(s),
        _ => None,
    }
}

async fn seed(
    client: &async_nats::Client,
    user: &str,
    balance: u64,
    sku: &str,
    price: u64,
    n: u64,
) {
    let _: Reply<Balance> = request(
        client,
        subjects::WALLET_CREATE_USER,
        &serde_json::json!({"user": user, "balance": balance}),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let _: Reply<Stock> = request(
        client,
        subjects::ORDER_CREATE_PRODUCT,
        &serde_json::json!({"sku": sku, "price": price, "stock": n}),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
}

/// Whether nothing is unfinished anywhere: the coordinator (whichever
/// replica answers; the undelivered decisions come from the shared log) and
/// each participant answer empty lists.
async fn nothing_in_doubt(client: &async_nats::Client) -> bool {
    let ask = |subject: String| async move {
        let r: Result<Reply<serde_json::Value>, _> = request(
            client,
            &subject,
            &serde_json::json!({}),
            Duration::from_secs(2),
        )
        .await;
        match r {
            Ok(Reply::Ok(v)) => Some(v),
            _ => None,
        }
    };
    let empty = |v: &serde_json::Value, field: &str| v[field].as_array().is_some_and(Vec::is_empty);
    let Some(c) = ask(subjects::IN_DOUBT.to_owned()).await else {
        return false;
    };
    if !empty(&c, "in_progress") || !empty(&c, "undelivered") {
        return false;
    }
    for p in [&participant::WALLET, &participant::ORDER] {
        match ask(subjects::participant_in_doubt(p)).await {
            Some(v) if empty(&v, "prepared") => {}
            _ => return false,
        }
    }
    true
}

#[test]
#[ignore = "needs Docker and the images from compose/build-images.sh; run by scripts/test.sh"]
fn compose_up_buy_kill_wallet_in_doubt_then_down_up_keeps_data() {
    run_alone(single_node());
}

async fn single_node() {
    let start = Instant::now();
    images_present();
    let ports: Vec<String> = twopc_launcher::free_ports(6, &[])
        .unwrap()
        .iter()
        .map(u16::to_string)
        .collect();
    let nats_port = ports[0].clone();
    let monitor_port = ports[1].clone();
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = make_creds(creds_dir.path(), &[]);
    let compose = Compose {
        file: SINGLE,
        project: format!("twopctest{}", std::process::id()),
        env: vec![
            ("TWOPC_CREDS".into(), creds.display().to_string()),
            ("NATS_PORT".into(), nats_port.clone()),
            ("NATS_MONITOR_PORT".into(), monitor_port.clone()),
            ("STATUS_PORT".into(), ports[2].clone()),
            ("METRICS_PORT_COORDINATOR".into(), ports[3].clone()),
            ("METRICS_PORT_WALLET".into(), ports[4].clone()),
            ("METRICS_PORT_ORDER".into(), ports[5].clone()),
            // The wallet applies decisions 3 s late: a window in which a
            // committed purchase is in doubt at the wallet.
            (
                "WALLET_DELAY".into(),
                format!("{}:3000", ParticipantDelay::Decide.at(&participant::WALLET)),
            ),
            // ... and the coordinator waits long enough for its late acks.
            ("DECIDE_TIMEOUT_MS".into(), "5000".into()),
        ],
    };
    step(start, "compose up (docker-compose.yml)");
    compose.run(&["up", "-d"]);
    // nats-server runs from compose/nats/single.conf: JetStream fsyncs
    // every write, which no command-line flag can ask for.
    assert_sync_always(&monitor_port).await;
    let url = format!("nats://127.0.0.1:{nats_port}");
    let (client, shop) = connect(&url, &creds).await;
    ready(&client).await;
    for service in ["coordinator", "wallet", "order"] {
        compose.healthy(service).await;
    }
    step(start, "up and healthy; nats reports sync_always");
    seed(&client, "dora", 100_000, "mug-1", 300, 50).await;

    let req = PurchaseRequest {
        user: "dora".into(),
        sku: "mug-1".into(),
        qty: 2,
        amount: 600,
        request_id: Some("compose-1".into()),
    };
    let reply = match request::<_, PurchaseReply>(
        &shop,
        &purchase_subject(),
        &req,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    {
        Reply::Ok(r) => r,
        Reply::Err(e) => panic!("{e:?}"),
    };
    assert_eq!(reply.outcome, Outcome::Committed, "{reply:?}");
    let b = balance(&client, "dora").await.unwrap();
    assert_eq!(
        (b.balance, b.held),
        (100_000, 600),
        "prepared, decision not yet applied: {b:?}"
    );

    step(
        start,
        "docker-compose kill wallet while it is in doubt; start it again",
    );
    compose.run(&["kill", "wallet"]);
    compose.run(&["start", "wallet"]);
    until(
        "the wallet resolves its in-doubt purchase",
        Duration::from_secs(60),
        || async {
            balance(&client, "dora")
                .await
                .is_some_and(|b| b.balance == 99_400 && b.held == 0)
        },
    )
    .await;
    let logs = compose.run(&["logs", "wallet"]);
    assert!(
        logs.contains("in-doubt transaction resolved by the coordinator"),
        "{logs}"
    );
    until("nothing left in doubt", Duration::from_secs(60), || {
        nothing_in_doubt(&client)
    })
    .await;

    step(start, "compose down (volumes kept), up again");
    drop(client);
    drop(shop);
    compose.run(&["down", "--timeout", "10"]);
    compose.run(&["up", "-d"]);
    let url = format!("nats://127.0.0.1:{nats_port}");
    let (client, shop) = connect(&url, &creds).await;
    ready(&client).await;
    let b = balance(&client, "dora").await.unwrap();
    assert_eq!(
        (b.balance, b.held),
        (99_400, 0),
        "the wallet's volume survived down/up"
    );
    assert!(
        stock(&client, "mug-1").await.is_some_and(|s| s.stock == 48),
        "the order volume survived"
    );
    // The idempotency record survived too: a retry is not charged again.
    let again = match request::<_, PurchaseReply>(
        &shop,
        &purchase_subject(),
        &req,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    {
        Reply::Ok(r) => r,
        Reply::Err(e) => panic!("{e:?}"),
    };
    assert!(again.duplicate && again.tx == reply.tx, "{again:?}");
    assert_eq!(balance(&client, "dora").await.unwrap().balance, 99_400);
    step(start, "done; compose down -v");
}

/// Every answer the client got, by request id.
#[derive(Default)]
struct Ledger {
    answers: HashMap<String, PurchaseReply>,
    purchases: HashMap<String, PurchaseRequest>,
}

impl Ledger {
    /// Keeps `reply` to `req`; a later answer for the same key must name
    /// the same transaction and outcome.
    fn record(&mut self, req: &PurchaseRequest, reply: &PurchaseReply) {
        let key = req.request_id.clone().expect("every purchase has a key");
        if let Some(first) = self.answers.get(&key) {
            assert!(
                first.tx == reply.tx && first.outcome == reply.outcome,
                "key {key} answered {first:?}, then {reply:?}"
            );
            return;
        }
        self.answers.insert(key.clone(), reply.clone());
        self.purchases.insert(key, req.clone());
    }

    /// Money and units of the purchases told `committed`.
    fn committed(&self) -> (u64, u64) {
        self.answers
            .iter()
            .filter(|(_, r)| r.outcome == Outcome::Committed)
            .map(|(k, _)| &self.purchases[k])
            .fold((0, 0), |(a, q), p| (a + p.amount, q + p.qty))
    }
}

/// Sends a purchase until it has a known outcome: a timeout, "no
/// responders", `outcome_unknown`, `busy` or `shutting_down` says nothing
/// about it, so it is sent again with the same request id. So is
/// `unavailable`, which changed nothing: the coordinator answers it when it
/// cannot look the request id up, as while the decision bucket elects a new
/// leader.
async fn buy(
    client: &async_nats::Client,
    ledger: &mut Ledger,
    req: &PurchaseRequest,
) -> PurchaseReply {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut unknown = vec![];
    loop {
        match request::<_, PurchaseReply>(client, &purchase_subject(), req, Duration::from_secs(6))
            .await
        {
            Ok(Reply::Ok(r)) => {
                if !unknown.is_empty() {
                    eprintln!(
                        "    {:?}: {:?} after {} unknown ({unknown:?})",
                        req.request_id,
                        r.outcome,
                        unknown.len()
                    );
                }
                ledger.record(req, &r);
                return r;
            }
            Ok(Reply::Err(e))
                if matches!(
                    e.error.code,
                    Code::OutcomeUnknown | Code::Busy | Code::ShuttingDown | Code::Unavailable
                ) =>
            {
                unknown.push(format!("{}: {}", e.error.code.as_str(), e.error.message));
            }
            Ok(Reply::Err(e)) => panic!("{:?}: {e:?}", req.request_id),
            Err(e) => unknown.push(format!("{e:#}")),
        }
        assert!(
            Instant::now() < deadline,
            "{:?}: no known outcome within 90 s: {unknown:?}",
            req.request_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many coordinator replicas answer `$SRV.PING.coordinator` (distinct
/// instance ids) within half a second. The health check cannot tell the
/// replicas apart (any replica's answer passes it); this can.
async fn coordinators_answering(client: &async_nats::Client) -> usize {
    let inbox = client.new_inbox();
    let Ok(mut answers) = client.subscribe(inbox.clone()).await else {
        return 0;
    };
    if client
        .publish_with_reply(
            twopc_common::micro::ping_subject("coordinator"),
            inbox,
            Vec::new().into(),
        )
        .await
        .is_err()
    {
        return 0;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut ids = BTreeSet::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if let Ok(p) = serde_json::from_slice::<twopc_common::micro::Ping>(&m.payload) {
            ids.insert(p.id);
        }
    }
    ids.len()
}

/// The decision bucket's stream: its replica count, whether all three
/// nodes hold a current copy (the leader and two current, online peers),
/// and its leader.
async fn decision_stream(client: &async_nats::Client) -> Option<(usize, bool, String)> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("KV_twopc_decisions").await.ok()?;
    let info = stream.cached_info();
    let cluster = info.cluster.as_ref()?;
    let mut names: BTreeSet<&str> = cluster.replicas.iter().map(|p| p.name.as_str()).collect();
    names.extend(cluster.leader.as_deref());
    let all_current = names == BTreeSet::from(["n1", "n2", "n3"])
        && cluster.replicas.iter().all(|p| p.current && !p.offline);
    Some((
        info.config.num_replicas,
        all_current,
        cluster.leader.clone().unwrap_or_default(),
    ))
}

#[test]
#[ignore = "needs Docker and the images from compose/build-images.sh; run by scripts/test.sh"]
fn compose_cluster_commits_with_a_nats_node_and_a_coordinator_down() {
    run_alone(cluster());
}

async fn cluster() {
    const USER: &str = "erin";
    const BALANCE: u64 = 1_000_000;
    const SKU: &str = "cup-1";
    const PRICE: u64 = 250;
    const STOCK: u64 = 1_000;
    let start = Instant::now();
    images_present();
    let ports: Vec<String> = twopc_launcher::free_ports(12, &[])
        .unwrap()
        .iter()
        .map(u16::to_string)
        .collect();
    let (nats_ports, monitor_ports) = (&ports[0..3], &ports[3..6]);
    let mut env: Vec<(String, String)> = vec![];
    for i in 0..3 {
        env.push((format!("NATS_PORT_{}", i + 1), nats_ports[i].clone()));
        env.push((
            format!("NATS_MONITOR_PORT_{}", i + 1),
            monitor_ports[i].clone(),
        ));
    }
    for (i, name) in [
        "STATUS_PORT_1",
        "STATUS_PORT_2",
        "METRICS_PORT_COORDINATOR_1",
        "METRICS_PORT_COORDINATOR_2",
        "METRICS_PORT_WALLET",
        "METRICS_PORT_ORDER",
    ]
    .into_iter()
    .enumerate()
    {
        env.push((name.into(), ports[6 + i].clone()));
    }
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = make_creds(creds_dir.path(), &["n1:6222", "n2:6222", "n3:6222"]);
    env.push(("TWOPC_CREDS".into(), creds.display().to_string()));
    let compose = Compose {
        file: CLUSTER,
        project: format!("twopccluster{}", std::process::id()),
        env,
    };
    step(start, "compose up (docker-compose.cluster.yml)");
    compose.run(&["up", "-d"]);
    // Three servers of one cluster, each with its own name, each fsyncing
    // every JetStream write.
    let mut names = BTreeSet::new();
    for port in monitor_ports {
        let varz = assert_sync_always(port).await;
        assert_eq!(varz["cluster"]["name"], "twopc", "{}", varz["cluster"]);
        names.insert(varz["server_name"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(
        names,
        BTreeSet::from(["n1".into(), "n2".into(), "n3".into()])
    );
    let urls = nats_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let (client, shop) = connect(&urls, &creds).await;
    ready(&client).await;
    for service in ["coordinator-1", "coordinator-2", "wallet", "order"] {
        compose.healthy(service).await;
    }
    until(
        "both coordinator replicas answer",
        Duration::from_secs(90),
        || async { coordinators_answering(&client).await == 2 },
    )
    .await;
    step(
        start,
        "cluster up, every service healthy, both coordinators answer",
    );
    let Some((3, _, leader)) = decision_stream(&client).await else {
        panic!("the decision bucket has a copy on each node")
    };
    // The node that leads the decision bucket goes down: the harder case,
    // the bucket's stream elects a new leader before it takes writes again.
    let victim = match leader.as_str() {
        "n1" | "n2" | "n3" => leader,
        other => panic!("the decision bucket's leader is {other:?}"),
    };
    seed(&client, USER, BALANCE, SKU, PRICE, STOCK).await;
    let mut ledger = Ledger::default();
    let purchase = |key: String, qty: u64| PurchaseRequest {
        user: USER.into(),
        sku: SKU.into(),
        qty,
        amount: qty * PRICE,
        request_id: Some(key),
    };
    let mut first = None;
    for i in 0..3 {
        let req = purchase(format!("before-{i}"), 1 + i);
        let r = buy(&shop, &mut ledger, &req).await;
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
        first.get_or_insert((req, r));
    }

    step(
        start,
        &format!("kill nats node {victim} (the decision bucket's leader) and coordinator-2"),
    );
    compose.run(&["kill", &victim, "coordinator-2"]);
    assert!(!compose.running(&victim) && !compose.running("coordinator-2"));
    // Purchases go on with two of three nats nodes and one coordinator.
    // A purchase caught in the switch may abort (a participant reconnecting
    // does not vote in time) or be unknown for a while (retried with its
    // key until it is known); the run needs five committed ones.
    let outage = Instant::now();
    let (mut committed, mut aborted, mut took) = (0, vec![], vec![]);
    let mut i = 0;
    while committed < 5 {
        assert!(
            outage.elapsed() < Duration::from_secs(120),
            "{committed} purchases committed in 120 s with {victim} and coordinator-2 \
             down; aborted: {aborted:?}"
        );
        let sent = Instant::now();
        let r = buy(&shop, &mut ledger, &purchase(format!("during-{i}"), 1)).await;
        took.push(format!("{:.2}", sent.elapsed().as_secs_f64()));
        match r.outcome {
            Outcome::Committed => committed += 1,
            Outcome::Aborted => {
                let code = r.reason.as_ref().map(|r| r.code);
                assert!(
                    matches!(
                        code,
                        Some(Code::Timeout | Code::Unavailable | Code::PresumedAbort)
                    ),
                    "only an unreachable participant may abort a purchase here: {r:?}"
                );
                aborted.push(code);
            }
        }
        i += 1;
    }
    assert!(
        !compose.running(&victim) && !compose.running("coordinator-2"),
        "{victim} and coordinator-2 stayed down"
    );
    step(
        start,
        &format!(
            "{committed} committed, {} aborted ({aborted:?}) in {:.1} s with {victim} and \
             coordinator-2 down; each took (s): {}",
            aborted.len(),
            outage.elapsed().as_secs_f64(),
            took.join(" ")
        ),
    );

    step(start, &format!("start {victim}, then coordinator-2"));
    compose.run(&["start", &victim]);
    // The node is back in the cluster with a current copy of the decisions.
    until(
        &format!("{victim} holds a current copy of the decision bucket"),
        Duration::from_secs(90),
        || async {
            decision_stream(&client)
                .await
                .is_some_and(|(replicas, current, _)| replicas == 3 && current)
        },
    )
    .await;
    // A coordinator starts only once every server's /varz answers; the
    // restarted node's does again.
    compose.run(&["start", "coordinator-2"]);
    until(
        "both coordinator replicas answer",
        Duration::from_secs(90),
        || async { coordinators_answering(&client).await == 2 },
    )
    .await;
    compose.healthy("coordinator-2").await;
    step(
        start,
        &format!("{victim} current again, both coordinators answer"),
    );
    for i in 0..3 {
        let r = buy(&shop, &mut ledger, &purchase(format!("after-{i}"), 2)).await;
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    }
    // A key answered before the outage gets its first answer back, from
    // whichever replica: the decision log is shared and survived.
    let (req, reply) = first.expect("a purchase before the outage");
    let again = buy(&shop, &mut ledger, &req).await;
    assert!(again.duplicate && again.tx == reply.tx, "{again:?}");

    until("nothing in doubt anywhere", Duration::from_secs(60), || {
        nothing_in_doubt(&client)
    })
    .await;
    // Conservation: exactly the purchases told `committed` were applied.
    let (spent, taken) = ledger.committed();
    let b = balance(&client, USER).await.expect("balance");
    assert_eq!((b.balance, b.held), (BALANCE - spent, 0), "{b:?}");
    let s = stock(&client, SKU).await.expect("stock");
    assert_eq!((s.stock, s.reserved), (STOCK - taken, 0), "{s:?}");
    step(
        start,
        &format!(
            "balances and stock add up over {} purchases ({} committed); nothing in doubt; \
             compose down -v",
            ledger.answers.len(),
            ledger
                .answers
                .values()
                .filter(|r| r.outcome == Outcome::Committed)
                .count()
        ),
    );
}

/// The default shop client's purchase subject.
fn purchase_subject() -> String {
    subjects::purchase(
        &twopc_schemas::ClientName::new(twopc_schemas::client::DEFAULT_CLIENT).expect("valid"),
    )
}

/// `twopc auth init` into `dir/creds`, as the compose files' comments say
/// to do before the first `up` (with the cluster's routes).
fn make_creds(dir: &std::path::Path, routes: &[&str]) -> std::path::PathBuf {
    let creds = dir.join("creds");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twopc"));
    cmd.args(["auth", "init", "--dir", creds.to_str().unwrap()]);
    for r in routes {
        cmd.args(["--route", r]);
    }
    let out = cmd.output().expect("twopc auth init runs");
    assert!(
        out.status.success(),
        "twopc auth init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    creds
}

/// The admin and the shop client's connections, with their seeds; and the
/// server refuses a connection without one.
async fn connect(url: &str, creds: &std::path::Path) -> (async_nats::Client, async_nats::Client) {
    let as_id =
        |name: &str| twopc_common::nats::AuthArgs::nkey_file(creds.join(format!("{name}.nk")));
    let admin = twopc_common::nats::connect(url, "twopc-test", &as_id("admin"))
        .await
        .unwrap();
    let shop = twopc_common::nats::connect(url, "twopc-test-shop", &as_id("web"))
        .await
        .unwrap();
    let anonymous = twopc_common::nats::connect_with(
        url,
        &twopc_common::nats::ConnectSettings::fail_fast("twopc-test-anonymous"),
    )
    .await;
    assert!(anonymous.is_err(), "compose's nats-server lets anyone in");
    (admin, shop)
}
