//! The chaos runner: a real system under a concurrent purchase workload
//! while a seeded nemesis injects faults, then heal, quiescence and every
//! invariant of [`crate::check`].
//!
//! Faults, chosen at random by weight (one or several at once, never two on
//! the same target):
//! * `kill` — SIGKILL a service, restart it after up to a second;
//! * `pause` — SIGSTOP a service for up to several seconds, then SIGCONT (it
//!   keeps its TCP connections and subscriptions);
//! * `nats_restart` — SIGKILL nats-server, restart it on the same port;
//! * `partition` — cut one service's link to NATS (a proxy per service)
//!   for a while;
//! * `slow` — delay a participant's prepare or decide handling beyond the
//!   prepare timeout (armed at run time through the faults file);
//! * `crash_point` — arm one named crash point; the service aborts when it
//!   reaches it and is restarted;
//! * `duplicate` — start a second instance of a participant: on a new,
//!   empty data folder (it must refuse to serve and exit), or on the
//!   participant's own folder as a rolling restart (it stands by, takes
//!   over when the original is stopped by SIGTERM or SIGKILL, and hands
//!   the name back); what each instance does is checked from its log
//!   (`duplicate_instances`).
//!
//! With [`Config::shipping`] (`twopc chaos --with-shipping PATH`), the Go
//! shipping participant (`go/shipping`) runs beside them as a supervised
//! process, a share of the purchases become three-branch transactions
//! (wallet, order, shipping), the faults `kill`, `pause`, `partition` and
//! `crash_point` may hit it (never `slow` or `duplicate`: it reads no faults
//! file and keeps no owner lease), and its SQLite file is checked too
//! ([`crate::check_shipping`]).
//!
//! The fault schedule (kinds, targets, durations) comes from the seed; the
//! interleaving with the workload depends on timing, as in any real run.

mod duplicate;
mod nemesis;
mod report;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use twopc_launcher::{
    free_port, seed, Binaries, CoordinatorSettings, Kind, Nats, ParticipantSettings, Service,
    System, SystemConfig,
};
use twopc_schemas::api::{CreateProduct, CreateUser};

pub use nemesis::{crash_points, FaultKind};
pub use report::{InvariantResult, Report};

use crate::check::{self, Initial, Snapshot};
use crate::check_shipping::{self, ShippingSnapshot};
use crate::proxy::Proxy;
use nemesis::{heal_all, nemesis, supervise, SHIPPING, TARGETS};
use report::result;
use workload::{worker, Heard, Stats};

/// Everything a chaos run can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// Seeds the fault schedule and the workload's choices.
    pub seed: u64,
    /// How long faults are injected and new purchases started.
    pub duration: Duration,
    /// Purchases in flight at once.
    pub concurrency: usize,
    pub users: usize,
    pub products: usize,
    /// Opening balance of each user, minor units.
    pub balance: u64,
    /// Opening stock of each product.
    pub stock: u64,
    /// Share of purchases that quote a wrong price (bound to abort).
    pub bad_share: f64,
    /// The client's timeout for one attempt.
    pub client_timeout: Duration,
    /// Retries with the same request id after a timeout.
    pub max_retries: u32,
    /// Share of answered purchases sent again later, same request id and
    /// body, as a client does that never saw the answer: the coordinator
    /// must give every send of a key the same transaction and outcome.
    pub resend_share: f64,
    /// Mean time between fault starts.
    pub fault_interval: Duration,
    /// Most faults active at once.
    pub max_active_faults: usize,
    /// Relative weight of each fault kind (missing or 0: never).
    pub weights: BTreeMap<FaultKind, u32>,
    /// Bound on the wait for quiescence after healing.
    pub quiesce_timeout: Duration,
    /// Where databases and logs go; a temporary folder when `None`.
    pub data_dir: Option<PathBuf>,
    /// The service binaries.
    pub bins: Binaries,
    /// Services that kill, pause, partition, slow and crash-point faults may
    /// hit (default: all three).
    pub targets: Vec<Kind>,
    /// Extra environment per service (for example a deliberate break).
    pub extra_env: Vec<(Kind, String, String)>,
    /// Prints progress lines to stderr.
    pub verbose: bool,
    /// Run on a JetStream cluster of this many nodes, with the decisions in
    /// replicated KV and [`Config::coordinators`] replicas (`None`: one
    /// nats-server, one coordinator on SQLite).
    pub cluster: Option<usize>,
    /// Coordinator replicas (on a cluster).
    pub coordinators: usize,
    /// The Go shipping participant's binary (`target/go/twopc-shipping`):
    /// when set, it runs as a third participant, and a share of the
    /// purchases are three-branch transactions. `None`: the purchase
    /// workload alone, as before.
    pub shipping: Option<PathBuf>,
    /// With shipping: share of requests sent as three-branch transactions.
    pub transaction_share: f64,
    /// With shipping: delivery slots created, and each one's capacity.
    pub slots: usize,
    pub slot_capacity: u64,
    /// With shipping: extra environment of the shipping service (the
    /// window settings).
    pub shipping_env: Vec<(String, String)>,
}

impl Config {
    pub fn new(bins: Binaries) -> Config {
        Config {
            seed: rand::rng().random(),
            duration: Duration::from_secs(60),
            concurrency: 16,
            users: 10,
            products: 5,
            balance: 1_000_000_000,
            stock: 1_000_000,
            bad_share: 0.1,
            client_timeout: Duration::from_secs(3),
            max_retries: 3,
            resend_share: 0.33,
            fault_interval: Duration::from_millis(700),
            max_active_faults: 2,
            weights: FaultKind::SINGLE.into_iter().map(|k| (k, 1)).collect(),
            quiesce_timeout: Duration::from_secs(60),
            data_dir: None,
            bins,
            targets: TARGETS.to_vec(),
            extra_env: vec![],
            verbose: true,
            cluster: None,
            coordinators: 1,
            shipping: None,
            transaction_share: 0.5,
            slots: 4,
            slot_capacity: 1_000_000_000,
            shipping_env: vec![],
        }
    }

    /// Refuses fault kinds the run's setup cannot inject.
    pub fn check(&self) -> anyhow::Result<()> {
        let allowed: &[FaultKind] = if self.cluster.is_some() {
            &FaultKind::CLUSTER
        } else {
            &FaultKind::SINGLE
        };
        for (kind, w) in &self.weights {
            if *w > 0 && !allowed.contains(kind) {
                anyhow::bail!(
                    "fault {} cannot be injected {} (allowed: {})",
                    kind.name(),
                    if self.cluster.is_some() {
                        "on a cluster"
                    } else {
                        "on one server"
                    },
                    allowed
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Ok(())
    }
}

/// The processes under test.
struct Cluster {
    sys: System,
    /// Processes beside the system's services, by name: the shipping
    /// service. Supervised, healed and hit by faults like the services.
    extra: BTreeMap<&'static str, twopc_launcher::Proc>,
    /// Targets a fault is working on; the supervisor leaves them alone.
    busy: BTreeSet<&'static str>,
}

struct Shared {
    cluster: Mutex<Cluster>,
    client: async_nats::Client,
    proxies: BTreeMap<&'static str, Proxy>,
    faults_files: BTreeMap<&'static str, PathBuf>,
    faults: Mutex<BTreeMap<String, u64>>,
    /// Faults counted by variant (`duplicate_fresh`, ...).
    fault_variants: Mutex<BTreeMap<String, u64>>,
    /// Promises of the ownership lease that a duplicate fault saw broken.
    duplicate_violations: Mutex<Vec<String>>,
    /// How long ownership steps took in duplicate faults, in ms, by step.
    ownership_ms: Mutex<BTreeMap<String, Vec<u64>>>,
    unexpected_exits: AtomicU64,
    verbose: bool,
}

impl Shared {
    fn say(&self, s: &str) {
        if self.verbose {
            eprintln!("{s}");
        }
    }

    /// Runs `f` on the process of service `target` (by name: each
    /// coordinator replica has its own), under the cluster lock.
    fn with_proc<T>(&self, target: &str, f: impl FnOnce(&mut twopc_launcher::Proc) -> T) -> T {
        let mut c = self.cluster.lock().expect("lock");
        let c = &mut *c;
        match c.extra.get_mut(target) {
            Some(p) => f(p),
            None => {
                let s: &mut Service = c.sys.services.get_mut(target).expect("a service");
                f(&mut s.proc)
            }
        }
    }

    fn count_variant(&self, variant: &str) {
        *self
            .fault_variants
            .lock()
            .expect("lock")
            .entry(variant.into())
            .or_default() += 1;
    }

    /// A fault saw the system break a promise: the run fails.
    fn violation(&self, what: String) {
        self.say(&format!("nemesis: VIOLATION: {what}"));
        self.duplicate_violations.lock().expect("lock").push(what);
    }

    fn timing(&self, step: &str, took: Duration) {
        self.ownership_ms
            .lock()
            .expect("lock")
            .entry(step.into())
            .or_default()
            .push(took.as_millis() as u64);
    }

    fn count(&self, kind: FaultKind) {
        *self
            .faults
            .lock()
            .expect("lock")
            .entry(kind.name().into())
            .or_default() += 1;
    }
}

/// The system's settings for a chaos run: short timeouts, so that faults
/// resolve within the run, and a faults file per service that the nemesis
/// writes at run time.
fn system_config(
    cfg: &Config,
    root: &Path,
    nats_port: u16,
    faults_files: &BTreeMap<&'static str, PathBuf>,
    proxies: &BTreeMap<&'static str, Proxy>,
) -> SystemConfig {
    let mut sc = SystemConfig::new(root, cfg.bins.clone());
    sc.nats = match cfg.cluster {
        Some(nodes) => Nats::Cluster { nodes, port: None },
        None => Nats::Start {
            port: Some(nats_port),
        },
    };
    sc.coordinators = cfg.coordinators.max(1);
    sc.cluster_isolatable = cfg.cluster.is_some()
        && cfg
            .weights
            .get(&FaultKind::NodePartition)
            .is_some_and(|w| *w > 0);
    sc.client_name = "twopc-chaos".into();
    if cfg.shipping.is_some() {
        sc.more_participants =
            vec![twopc_schemas::ParticipantName::new(SHIPPING).expect("a participant name")];
    }
    sc.coordinator = CoordinatorSettings {
        prepare_timeout_ms: Some(1_000),
        decide_timeout_ms: Some(500),
        retry_base_ms: Some(20),
        retry_cap_ms: Some(1_000),
        ..Default::default()
    };
    let participant = ParticipantSettings {
        in_doubt_after_ms: Some(2_000),
        recovery_interval_ms: Some(250),
        decision_timeout_ms: Some(500),
        ..Default::default()
    };
    sc.wallet = participant.clone();
    sc.order = participant;
    for kind in Kind::ALL {
        let mut extra = vec![(
            "TWOPC_FAULTS_FILE".to_owned(),
            faults_files[kind.name()].display().to_string(),
        )];
        if kind == Kind::Coordinator {
            // Undelivered decisions of a replica that stays down are taken
            // over within the quiescence wait.
            extra.push(("TWOPC_SWEEP_INTERVAL_MS".to_owned(), "2000".to_owned()));
            if cfg.shipping.is_some() {
                extra.push((
                    "TWOPC_PARTICIPANTS".to_owned(),
                    format!("wallet,order,{SHIPPING}"),
                ));
            }
        }
        extra.extend(
            cfg.extra_env
                .iter()
                .filter(|(k, _, _)| *k == kind)
                .map(|(_, key, value)| (key.clone(), value.clone())),
        );
        match kind {
            Kind::Coordinator => sc.coordinator.extra_env = extra,
            Kind::Wallet => sc.wallet.extra_env = extra,
            Kind::Order => sc.order.extra_env = extra,
        }
        if let Some(proxy) = proxies.get(kind.name()) {
            sc.nats_url_of.insert(kind, proxy.url());
        }
    }
    sc
}

/// The state of the databases: the decisions from SQLite, or from the
/// replicated KV bucket on a cluster.
async fn snapshot(
    root: &Path,
    cluster: bool,
    client: async_nats::Client,
) -> anyhow::Result<Snapshot> {
    if cluster {
        Snapshot::read_with_kv(root, client, twopc_coordinator::kv::DEFAULT_BUCKET).await
    } else {
        Snapshot::read(root)
    }
}

/// Runs a chaos experiment and reports. An `Err` means the experiment
/// itself could not run (no nats-server, a service would not start), not
/// that an invariant failed.
pub async fn run(mut cfg: Config) -> anyhow::Result<Report> {
    cfg.check()?;
    if cfg
        .weights
        .get(&FaultKind::NodePartition)
        .is_some_and(|w| *w > 0)
    {
        if let Err(why) = twopc_launcher::NatsCluster::can_isolate() {
            eprintln!("chaos: node_partition left out: nodes cannot be isolated here ({why})");
            cfg.weights.insert(FaultKind::NodePartition, 0);
        }
    }
    let started = Instant::now();
    let (_tmp, root) = match &cfg.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.canonicalize()?)
        }
        None => {
            let t = tempfile::Builder::new().prefix("twopc-chaos-").tempdir()?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    // Each service reaches NATS through its own proxy, so the nemesis can
    // cut one link; the proxies need the server's port before it starts.
    let nats_port = free_port()?;
    let mut proxies = BTreeMap::new();
    let mut faults_files = BTreeMap::new();
    for kind in Kind::ALL {
        if cfg.cluster.is_none() {
            proxies.insert(kind.name(), Proxy::start(nats_port).await?);
        }
        let file = root.join(format!("{}.faults", kind.name()));
        std::fs::write(&file, "")?;
        faults_files.insert(kind.name(), file);
    }
    if cfg.cluster.is_none() && cfg.shipping.is_some() {
        proxies.insert(SHIPPING, Proxy::start(nats_port).await?);
    }
    let sys = System::start(system_config(
        &cfg,
        &root,
        nats_port,
        &faults_files,
        &proxies,
    ))
    .await?;
    let client = sys.client.clone();
    let shop = sys.shop.clone();
    let mut extra = BTreeMap::new();
    let mut slot_capacity = BTreeMap::new();
    if let Some(bin) = &cfg.shipping {
        let url = proxies
            .get(SHIPPING)
            .map_or_else(|| sys.url.clone(), |p| p.url());
        extra.insert(
            SHIPPING,
            start_shipping(&cfg, bin, &sys, &root, url, &client).await?,
        );
        for i in 0..cfg.slots.max(1) {
            let slot = format!("slot-{i}");
            create_slot(&client, &slot, cfg.slot_capacity).await?;
            slot_capacity.insert(slot, cfg.slot_capacity);
        }
    }
    let shared = Arc::new(Shared {
        cluster: Mutex::new(Cluster {
            sys,
            extra,
            busy: BTreeSet::new(),
        }),
        client: client.clone(),
        proxies,
        faults_files,
        faults: Mutex::new(BTreeMap::new()),
        fault_variants: Mutex::new(BTreeMap::new()),
        duplicate_violations: Mutex::new(vec![]),
        ownership_ms: Mutex::new(BTreeMap::new()),
        unexpected_exits: AtomicU64::new(0),
        verbose: cfg.verbose,
    });

    // Seed users and products through the typed create requests.
    let mut initial = Initial::default();
    let users: Vec<CreateUser> = (0..cfg.users)
        .map(|i| CreateUser {
            user: format!("user-{i}"),
            balance: cfg.balance,
        })
        .collect();
    let products: Vec<CreateProduct> = (0..cfg.products)
        .map(|i| CreateProduct {
            sku: format!("sku-{i}"),
            price: 100 + 37 * i as u64,
            stock: cfg.stock,
        })
        .collect();
    seed(&client, &users, &products, true).await?;
    for u in &users {
        initial.balances.insert(u.user.clone(), u.balance);
    }
    let mut catalogue = vec![];
    for p in &products {
        initial.products.insert(p.sku.clone(), (p.price, p.stock));
        catalogue.push((p.sku.clone(), p.price));
    }
    shared.say(&format!(
        "--- chaos: seed {}, {:?}, concurrency {}, {} users, {} products",
        cfg.seed, cfg.duration, cfg.concurrency, cfg.users, cfg.products
    ));

    let deadline = Instant::now() + cfg.duration;
    let stats = Arc::new(Stats::default());
    let heard = Arc::new(Heard::default());
    let mut workers = vec![];
    for w in 0..cfg.concurrency {
        workers.push(tokio::spawn(worker(
            w,
            cfg.clone(),
            shop.clone(),
            catalogue.clone(),
            deadline,
            stats.clone(),
            heard.clone(),
        )));
    }
    let supervisor = tokio::spawn(supervise(shared.clone()));
    nemesis(&cfg, shared.clone(), deadline).await;

    // Heal: the nemesis's fault tasks have all ended (each heals its own
    // fault); make sure nothing is left paused, cut, armed or down.
    shared.say("--- heal everything");
    heal_all(&shared);
    let healed = Instant::now();
    for w in workers {
        w.await?;
    }
    let read = || snapshot(&root, cfg.cluster.is_some(), client.clone());
    let shipping_db = root.join(SHIPPING).join("shipping.db");
    let read_shipping = || {
        cfg.shipping
            .as_ref()
            .map(|_| ShippingSnapshot::read(&shipping_db))
            .transpose()
    };
    let quiescent_at = loop {
        if let (Ok(s), Ok(sh)) = (read().await, read_shipping()) {
            if s.quiescent() && sh.as_ref().is_none_or(ShippingSnapshot::quiescent) {
                break Some(Instant::now());
            }
        }
        if healed.elapsed() > cfg.quiesce_timeout {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    supervisor.abort();
    let snapshot = read().await?;
    let shipping = read_shipping()?;
    let told = heard.told.lock().expect("lock").clone();
    let replies = heard.replies.lock().expect("lock").clone();
    let mut invariants = vec![
        result("atomicity", check::atomicity(&snapshot)),
        result("conservation", check::conservation(&initial, &snapshot)),
        result("no_holds_or_in_doubt_left", check::no_holds_left(&snapshot)),
        result("client_view", check::client_view(&told, &snapshot)),
        result(
            "request_id_client_view",
            check::request_id_client_view(&replies, &snapshot),
        ),
    ];
    if let Some(sh) = &shipping {
        let keys = heard.three_keys.lock().expect("lock").clone();
        let told_three = heard.told_three.lock().expect("lock").clone();
        let mut left = check_shipping::no_holds_left(sh);
        left.extend(shipping_in_doubt(&client).await);
        invariants.extend([
            result(
                "shipping_atomicity",
                check_shipping::atomicity(&snapshot, sh, &keys),
            ),
            result(
                "shipping_conservation",
                check_shipping::conservation(&slot_capacity, sh),
            ),
            result("shipping_no_holds_in_doubt", left),
            result(
                "shipping_client_view",
                check_shipping::client_view(&told_three, &replies, &snapshot, sh, &keys),
            ),
        ]);
    }
    if cfg
        .weights
        .get(&FaultKind::Duplicate)
        .is_some_and(|w| *w > 0)
    {
        let seen = shared.duplicate_violations.lock().expect("lock").clone();
        invariants.push(result("duplicate_instances", seen));
    }
    if quiescent_at.is_none() {
        invariants.push(result(
            "quiescence_reached",
            vec![format!(
                "not quiescent {:?} after healing",
                cfg.quiesce_timeout
            )],
        ));
    }
    let ok = invariants.iter().all(|i| i.ok);
    let report = Report {
        seed: cfg.seed,
        duration_s: started.elapsed().as_secs_f64(),
        attempted: stats.attempted.load(Ordering::Relaxed),
        committed: stats.committed.load(Ordering::Relaxed),
        aborted: stats.aborted.load(Ordering::Relaxed),
        unknown_to_client: stats.unknown.load(Ordering::Relaxed),
        retries: stats.retries.load(Ordering::Relaxed),
        error_replies: stats.error_replies.load(Ordering::Relaxed),
        resends: stats.resends.load(Ordering::Relaxed),
        resends_different_tx: stats.resends_different_tx.load(Ordering::Relaxed),
        abort_codes: stats.abort_codes.lock().expect("lock").clone(),
        transactions: cfg.shipping.as_ref().map(|_| report::TxCounts {
            attempted: stats.tx.attempted.load(Ordering::Relaxed),
            committed: stats.tx.committed.load(Ordering::Relaxed),
            aborted: stats.tx.aborted.load(Ordering::Relaxed),
            unknown_to_client: stats.tx.unknown.load(Ordering::Relaxed),
            abort_codes: stats.tx.abort_codes.lock().expect("lock").clone(),
        }),
        faults: shared.faults.lock().expect("lock").clone(),
        fault_variants: shared.fault_variants.lock().expect("lock").clone(),
        ownership_ms: shared.ownership_ms.lock().expect("lock").clone(),
        unexpected_exits: shared.unexpected_exits.load(Ordering::Relaxed),
        heal_to_quiescent_ms: quiescent_at.map(|t| t.duration_since(healed).as_millis() as u64),
        invariants,
        data_dir: root.display().to_string(),
        ok,
    };
    // Stop everything (dropping the cluster kills the processes).
    drop(shared);
    Ok(report)
}

/// Starts the Go shipping participant beside the system (its identity
/// made by the launcher, its data in `<root>/shipping`, its log
/// `<root>/shipping.log`), and waits until it answers `shipping.slot`.
async fn start_shipping(
    cfg: &Config,
    bin: &Path,
    sys: &System,
    root: &Path,
    url: String,
    client: &async_nats::Client,
) -> anyhow::Result<twopc_launcher::Proc> {
    let dir = root.join(SHIPPING);
    std::fs::create_dir_all(&dir)?;
    let mut env = vec![
        ("NATS_URL".to_owned(), url),
        ("TWOPC_DATA_DIR".to_owned(), dir.display().to_string()),
        // As the Rust participants in a chaos run.
        ("TWOPC_IN_DOUBT_AFTER_MS".to_owned(), "2000".to_owned()),
        ("TWOPC_RECOVERY_INTERVAL_MS".to_owned(), "250".to_owned()),
        ("TWOPC_DECISION_TIMEOUT_MS".to_owned(), "500".to_owned()),
    ];
    if let Some(c) = &sys.creds {
        env.push((
            "NATS_NKEY".to_owned(),
            c.seed_file(SHIPPING).display().to_string(),
        ));
    }
    env.extend(cfg.shipping_env.iter().cloned());
    let mut p = twopc_launcher::Proc::new(
        SHIPPING,
        bin,
        vec![],
        env,
        root.join(format!("{SHIPPING}.log")),
    );
    p.start()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Any answer will do, a refusal (no such slot) too.
        let probe = serde_json::json!({"slot": "probe"});
        if twopc_launcher::client::request::<_, serde_json::Value>(
            client,
            "shipping.slot",
            &probe,
            Duration::from_secs(1),
        )
        .await
        .is_ok()
        {
            return Ok(p);
        }
        if !p.is_running() {
            anyhow::bail!("shipping exited during start; log:\n{}", p.log());
        }
        if Instant::now() > deadline {
            anyhow::bail!("shipping not ready after 30 s; log:\n{}", p.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One JSON request to the shipping service's public subjects: its answer,
/// or its refusal (an error reply) as an `Err` too.
async fn shipping_json(
    client: &async_nats::Client,
    subject: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use twopc_launcher::client::{request, Reply};
    match request::<_, serde_json::Value>(client, subject, body, Duration::from_secs(2)).await? {
        Reply::Ok(v) => Ok(v),
        Reply::Err(e) => anyhow::bail!("{subject} refused: {e:?}"),
    }
}

async fn create_slot(client: &async_nats::Client, slot: &str, capacity: u64) -> anyhow::Result<()> {
    let body = serde_json::json!({"slot": slot, "capacity": capacity});
    let v = shipping_json(client, "shipping.slots.create", &body).await?;
    anyhow::ensure!(
        v["capacity"].as_u64() == Some(capacity),
        "shipping.slots.create answered {v}"
    );
    Ok(())
}

/// `shipping.in_doubt` after healing: its prepared list must be empty (a
/// few tries: the service may just have been restarted by the heal).
async fn shipping_in_doubt(client: &async_nats::Client) -> Vec<String> {
    let mut last = String::new();
    for _ in 0..20 {
        match shipping_json(client, "shipping.in_doubt", &serde_json::json!({})).await {
            Ok(v) => {
                return match v["prepared"].as_array() {
                    Some(a) if a.is_empty() => vec![],
                    Some(a) => a
                        .iter()
                        .map(|b| format!("shipping.in_doubt lists {b}"))
                        .collect(),
                    None => vec![format!("shipping.in_doubt answered {v}")],
                };
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    vec![format!("shipping.in_doubt did not answer: {last}")]
}
