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
//!   reaches it and is restarted.
//!
//! The fault schedule (kinds, targets, durations) comes from the seed; the
//! interleaving with the workload depends on timing, as in any real run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use twopc_schemas::api::{Outcome, PurchaseReply, PurchaseRequest};
use twopc_schemas::subjects;
use uuid::Uuid;

use crate::check::{self, Initial, KeyReply, Snapshot, Told};
use crate::client::{create_if_absent, request, Reply};
use crate::launcher::{Binaries, Kind, NatsServer, Service, Settings};
use crate::proxy::{Link, Proxy};

/// The kinds of fault the nemesis injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Kill,
    Pause,
    NatsRestart,
    Partition,
    Slow,
    CrashPoint,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::NatsRestart,
        FaultKind::Partition,
        FaultKind::Slow,
        FaultKind::CrashPoint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::NatsRestart => "nats_restart",
            FaultKind::Partition => "partition",
            FaultKind::Slow => "slow",
            FaultKind::CrashPoint => "crash_point",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Crash points the nemesis may arm, by service.
pub const CRASH_POINTS: &[(Kind, &str)] = &[
    (Kind::Coordinator, "coordinator.phase1.after_votes"),
    (Kind::Coordinator, "coordinator.decision.after_durable"),
    (Kind::Coordinator, "coordinator.phase2.after_ack"),
    (Kind::Wallet, "wallet.prepare.after_durable"),
    (Kind::Wallet, "wallet.decide.before_apply"),
    (Kind::Wallet, "wallet.decide.after_durable"),
    (Kind::Wallet, "wallet.recover.before_apply"),
    (Kind::Order, "order.prepare.after_durable"),
    (Kind::Order, "order.decide.before_apply"),
    (Kind::Order, "order.decide.after_durable"),
    (Kind::Order, "order.recover.before_apply"),
];

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
            weights: FaultKind::ALL.into_iter().map(|k| (k, 1)).collect(),
            quiesce_timeout: Duration::from_secs(60),
            data_dir: None,
            bins,
            targets: TARGETS.to_vec(),
            extra_env: vec![],
            verbose: true,
        }
    }
}

/// The result of one invariant.
#[derive(Debug, Clone, Serialize)]
pub struct InvariantResult {
    pub name: &'static str,
    pub ok: bool,
    pub violations: usize,
    /// The first few violations, for people.
    pub examples: Vec<String>,
}

/// What a chaos run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    /// Logical purchases (one request id each).
    pub attempted: u64,
    pub committed: u64,
    pub aborted: u64,
    /// No reply after every retry: may be either, must be one.
    pub unknown_to_client: u64,
    /// Attempts repeated with the same request id after a timeout.
    pub retries: u64,
    /// Error replies (`busy`, ...), retried.
    pub error_replies: u64,
    /// Answered purchases sent again with the same request id and body.
    pub resends: u64,
    /// Re-sends answered with a transaction other than the key's first
    /// answer (each one also violates `request_id_client_view`).
    pub resends_different_tx: u64,
    /// Abort reasons seen by clients.
    pub abort_codes: BTreeMap<String, u64>,
    pub faults: BTreeMap<String, u64>,
    /// Services that exited without the nemesis asking (restarted).
    pub unexpected_exits: u64,
    pub heal_to_quiescent_ms: Option<u64>,
    pub invariants: Vec<InvariantResult>,
    pub data_dir: String,
    pub ok: bool,
}

impl Report {
    /// A human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "chaos run: seed {} · {:.1} s · data in {}\n",
            self.seed, self.duration_s, self.data_dir
        ));
        s.push_str(&format!(
            "purchases: {} attempted, {} committed, {} aborted, {} unknown to the client ({} retries, {} error replies)\n",
            self.attempted, self.committed, self.aborted, self.unknown_to_client, self.retries, self.error_replies
        ));
        s.push_str(&format!(
            "re-sends of answered purchases: {} ({} answered with a different tx)\n",
            self.resends, self.resends_different_tx
        ));
        let codes: Vec<String> = self
            .abort_codes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        s.push_str(&format!("abort reasons: {}\n", codes.join(", ")));
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        s.push_str(&format!(
            "faults: {} (unexpected exits: {})\n",
            faults.join(", "),
            self.unexpected_exits
        ));
        match self.heal_to_quiescent_ms {
            Some(ms) => s.push_str(&format!("heal to quiescence: {ms} ms\n")),
            None => s.push_str("heal to quiescence: NOT REACHED\n"),
        }
        for inv in &self.invariants {
            s.push_str(&format!(
                "  {:<28} {}\n",
                inv.name,
                if inv.ok {
                    "ok".to_string()
                } else {
                    format!("VIOLATED ({})", inv.violations)
                }
            ));
            for e in &inv.examples {
                s.push_str(&format!("      {e}\n"));
            }
        }
        s.push_str(if self.ok {
            "RESULT: ok\n"
        } else {
            "RESULT: VIOLATIONS FOUND\n"
        });
        s
    }
}

/// The processes under test.
struct Cluster {
    nats: NatsServer,
    services: BTreeMap<&'static str, Service>,
    /// Targets a fault is working on; the supervisor leaves them alone.
    busy: BTreeSet<&'static str>,
}

impl Cluster {
    fn service(&mut self, kind: Kind) -> &mut Service {
        self.services.get_mut(kind.name()).expect("service exists")
    }
}

struct Shared {
    cluster: Mutex<Cluster>,
    proxies: BTreeMap<&'static str, Proxy>,
    faults_files: BTreeMap<&'static str, PathBuf>,
    faults: Mutex<BTreeMap<String, u64>>,
    unexpected_exits: AtomicU64,
    verbose: bool,
}

impl Shared {
    fn say(&self, s: &str) {
        if self.verbose {
            eprintln!("{s}");
        }
    }

    /// Runs `f` on the process of service `target`, under the cluster lock.
    fn with_proc<T>(&self, target: &str, f: impl FnOnce(&mut crate::launcher::Proc) -> T) -> T {
        f(&mut self
            .cluster
            .lock()
            .expect("lock")
            .service(kind_of(target))
            .proc)
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

fn service_env(
    kind: Kind,
    faults_file: &Path,
    extra: &[(Kind, String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = match kind {
        Kind::Coordinator => vec![
            ("TWOPC_PREPARE_TIMEOUT_MS".into(), "1000".into()),
            ("TWOPC_DECIDE_TIMEOUT_MS".into(), "500".into()),
            ("TWOPC_RETRY_BASE_MS".into(), "20".into()),
            ("TWOPC_RETRY_CAP_MS".into(), "1000".into()),
        ],
        Kind::Wallet | Kind::Order => vec![
            ("TWOPC_IN_DOUBT_AFTER_MS".into(), "2000".into()),
            ("TWOPC_RECOVERY_INTERVAL_MS".into(), "250".into()),
            ("TWOPC_DECISION_TIMEOUT_MS".into(), "500".into()),
        ],
    };
    env.push(("RUST_LOG".into(), "info".into()));
    env.push((
        "TWOPC_FAULTS_FILE".into(),
        faults_file.display().to_string(),
    ));
    for (k, key, value) in extra {
        if *k == kind {
            env.retain(|(e, _)| e != key);
            env.push((key.clone(), value.clone()));
        }
    }
    env
}

/// Runs a chaos experiment and reports. An `Err` means the experiment
/// itself could not run (no nats-server, a service would not start), not
/// that an invariant failed.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
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
    let nats = NatsServer::start(&root.join("nats"), None)?;
    let mut proxies = BTreeMap::new();
    let mut faults_files = BTreeMap::new();
    let mut services = BTreeMap::new();
    for kind in Kind::ALL {
        let proxy = Proxy::start(nats.port).await?;
        let file = root.join(format!("{}.faults", kind.name()));
        std::fs::write(&file, "")?;
        let settings = Settings {
            env: service_env(kind, &file, &cfg.extra_env),
        };
        let mut s = Service::new(kind, &cfg.bins, &root, &proxy.url(), &settings)?;
        s.proc.start()?;
        services.insert(kind.name(), s);
        proxies.insert(kind.name(), proxy);
        faults_files.insert(kind.name(), file);
    }
    let client = async_nats::ConnectOptions::new()
        .name("twopc-chaos")
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(nats.url())
        .await?;
    for s in services.values_mut() {
        s.wait_ready(&client, Duration::from_secs(30)).await?;
    }
    let shared = Arc::new(Shared {
        cluster: Mutex::new(Cluster {
            nats,
            services,
            busy: BTreeSet::new(),
        }),
        proxies,
        faults_files,
        faults: Mutex::new(BTreeMap::new()),
        unexpected_exits: AtomicU64::new(0),
        verbose: cfg.verbose,
    });

    // Seed users and products.
    let mut initial = Initial::default();
    let mut catalogue = vec![];
    for i in 0..cfg.users {
        let user = format!("user-{i}");
        let body = serde_json::json!({ "user": user, "balance": cfg.balance });
        create_if_absent(&client, subjects::WALLET_CREATE_USER, &body).await?;
        initial.balances.insert(user, cfg.balance);
    }
    for i in 0..cfg.products {
        let sku = format!("sku-{i}");
        let price = 100 + 37 * i as u64;
        let body = serde_json::json!({ "sku": sku, "price": price, "stock": cfg.stock });
        create_if_absent(&client, subjects::ORDER_CREATE_PRODUCT, &body).await?;
        initial.products.insert(sku.clone(), (price, cfg.stock));
        catalogue.push((sku, price));
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
            client.clone(),
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
    let quiescent_at = loop {
        if let Ok(s) = Snapshot::read(&root) {
            if s.quiescent() {
                break Some(Instant::now());
            }
        }
        if healed.elapsed() > cfg.quiesce_timeout {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    supervisor.abort();
    let snapshot = Snapshot::read(&root)?;
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
        faults: shared.faults.lock().expect("lock").clone(),
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

fn result(name: &'static str, violations: Vec<String>) -> InvariantResult {
    InvariantResult {
        name,
        ok: violations.is_empty(),
        violations: violations.len(),
        examples: violations.into_iter().take(5).collect(),
    }
}

#[derive(Default)]
struct Stats {
    attempted: AtomicU64,
    committed: AtomicU64,
    aborted: AtomicU64,
    unknown: AtomicU64,
    retries: AtomicU64,
    error_replies: AtomicU64,
    resends: AtomicU64,
    resends_different_tx: AtomicU64,
    abort_codes: Mutex<BTreeMap<String, u64>>,
}

/// What clients were told, collected from every worker.
#[derive(Default)]
struct Heard {
    /// One entry per purchase (request id): its first answer, or unknown
    /// when every attempt went unanswered.
    told: Mutex<Vec<Told>>,
    /// Every answer to every send of every request id: first sends,
    /// retries after a timeout, re-sends of answered purchases.
    replies: Mutex<Vec<KeyReply>>,
}

/// Most answered purchases one worker keeps waiting for their re-send.
const RESEND_QUEUE_MAX: usize = 32;

/// Longest wait between a purchase's answer and its re-send. Faults hold
/// for 0.3–4 s, so a re-send often lands in a different fault (or after
/// the restart) than its first send.
const RESEND_DELAY_MAX_MS: u64 = 5_000;

/// An answered purchase waiting to be sent again.
struct Resend {
    req: PurchaseRequest,
    /// The key sent; the reply's `request_id` is not trusted for it.
    key: String,
    /// The transaction of the key's first answer.
    first_tx: Uuid,
    due: Instant,
}

/// One client: purchases one after another until the deadline, retrying a
/// timed-out purchase with the same request id as a real client would, and
/// sending a share of answered purchases again later, interleaved with new
/// ones, as a client does that lost an answer it had in fact received.
async fn worker(
    id: usize,
    cfg: Config,
    client: async_nats::Client,
    catalogue: Vec<(String, u64)>,
    deadline: Instant,
    stats: Arc<Stats>,
    heard: Arc<Heard>,
) {
    let mut rng =
        StdRng::seed_from_u64(cfg.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(id as u64 + 1)));
    let mut n = 0u64;
    let mut queue: Vec<Resend> = vec![];
    while Instant::now() < deadline {
        // A due re-send goes first; a full queue gives up its earliest one
        // early rather than growing.
        let earliest = (0..queue.len()).min_by_key(|&i| queue[i].due);
        if let Some(i) = earliest {
            if queue[i].due <= Instant::now() || queue.len() >= RESEND_QUEUE_MAX {
                let r = queue.swap_remove(i);
                resend(&cfg, &client, r, &stats, &heard).await;
                continue;
            }
        }
        n += 1;
        let user = format!("user-{}", rng.random_range(0..cfg.users));
        let (sku, price) = catalogue[rng.random_range(0..catalogue.len())].clone();
        let qty = rng.random_range(1..=3u64);
        let amount = if rng.random_bool(cfg.bad_share) {
            price * qty + 1
        } else {
            price * qty
        };
        let key = format!("chaos-{}-{id}-{n}", cfg.seed);
        let req = PurchaseRequest {
            user,
            sku,
            qty,
            amount,
            request_id: Some(key.clone()),
        };
        stats.attempted.fetch_add(1, Ordering::Relaxed);
        let answer = send_until_answered(&cfg, &client, &req, &key, &stats, &heard).await;
        let outcome = match &answer {
            Some(r) => {
                let tx = r.tx.parse().expect("tx id");
                match r.outcome {
                    Outcome::Committed => Told::Committed(tx),
                    Outcome::Aborted => {
                        let code = r.reason.as_ref().map_or("none", |r| r.code.as_str());
                        *stats
                            .abort_codes
                            .lock()
                            .expect("lock")
                            .entry(code.into())
                            .or_default() += 1;
                        Told::Aborted(tx)
                    }
                }
            }
            None => Told::Unknown,
        };
        match outcome {
            Told::Committed(_) => stats.committed.fetch_add(1, Ordering::Relaxed),
            Told::Aborted(_) => stats.aborted.fetch_add(1, Ordering::Relaxed),
            Told::Unknown => stats.unknown.fetch_add(1, Ordering::Relaxed),
        };
        if let (Told::Committed(tx) | Told::Aborted(tx), true) =
            (&outcome, rng.random_bool(cfg.resend_share))
        {
            let delay = Duration::from_millis(rng.random_range(0..=RESEND_DELAY_MAX_MS));
            queue.push(Resend {
                req: req.clone(),
                key,
                first_tx: *tx,
                due: Instant::now() + delay,
            });
        }
        heard.told.lock().expect("lock").push(outcome);
    }
    // Keys answered shortly before the deadline are re-sent too, now, while
    // the last faults heal: a key the coordinator forgot during a fault would
    // run again exactly then.
    queue.sort_by_key(|r| r.due);
    for r in queue {
        resend(&cfg, &client, r, &stats, &heard).await;
    }
}

/// Sends an answered purchase again, unchanged, and counts an answer that
/// names another transaction than the first (the checker reports it too).
async fn resend(
    cfg: &Config,
    client: &async_nats::Client,
    r: Resend,
    stats: &Stats,
    heard: &Heard,
) {
    stats.resends.fetch_add(1, Ordering::Relaxed);
    let answer = send_until_answered(cfg, client, &r.req, &r.key, stats, heard).await;
    if let Some(a) = answer {
        let tx: Uuid = a.tx.parse().expect("tx id");
        if tx != r.first_tx {
            stats.resends_different_tx.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends `req` until it is answered: after a timeout, no responders or an
/// error reply (`busy`, or an outcome the coordinator could not establish)
/// the outcome is unknown, and the same request id is sent again, at most
/// `cfg.max_retries` more times. The answer, if any, is recorded in
/// `heard.replies` under `key`, the key this client sent.
async fn send_until_answered(
    cfg: &Config,
    client: &async_nats::Client,
    req: &PurchaseRequest,
    key: &str,
    stats: &Stats,
    heard: &Heard,
) -> Option<PurchaseReply> {
    for attempt in 0..=cfg.max_retries {
        if attempt > 0 {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
        }
        match request::<_, PurchaseReply>(client, subjects::PURCHASE, req, cfg.client_timeout).await
        {
            Ok(Reply::Ok(r)) => {
                heard.replies.lock().expect("lock").push(KeyReply {
                    request_id: key.to_owned(),
                    tx: r.tx.parse().expect("tx id"),
                    outcome: r.outcome,
                    duplicate: r.duplicate,
                });
                let code = r.reason.as_ref().map(|r| r.code.as_str());
                if matches!(code, Some("unavailable" | "timeout" | "busy")) {
                    // As a real client would, back off a little before
                    // buying again from a sick system.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return Some(r);
            }
            Ok(Reply::Err(_)) => {
                stats.error_replies.fetch_add(1, Ordering::Relaxed);
            }
            // A timeout or no responders: unknown; retry the same id.
            Err(_) => {}
        }
    }
    None
}

/// Restarts services that died on their own (crash points armed by env,
/// panics) while no fault is working on them.
async fn supervise(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = shared.cluster.lock().expect("lock");
        let busy = c.busy.clone();
        for (name, s) in c.services.iter_mut() {
            if !busy.contains(name) && !s.proc.is_running() {
                shared.unexpected_exits.fetch_add(1, Ordering::Relaxed);
                let _ = s.proc.kill();
                let _ = s.proc.start();
                if shared.verbose {
                    eprintln!("supervisor: {name} had exited; restarted");
                }
            }
        }
    }
}

const TARGETS: [Kind; 3] = [Kind::Coordinator, Kind::Wallet, Kind::Order];
const NATS: &str = "nats";

/// Draws a fault kind by weight.
fn draw_kind(cfg: &Config, rng: &mut StdRng) -> Option<FaultKind> {
    let candidates: Vec<(FaultKind, u32)> = cfg
        .weights
        .iter()
        .filter(|(_, w)| **w > 0)
        .map(|(k, w)| (*k, *w))
        .collect();
    let total: u32 = candidates.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    candidates
        .iter()
        .find(|(_, w)| {
            if x < *w {
                true
            } else {
                x -= w;
                false
            }
        })
        .map(|(k, _)| *k)
}

/// Picks a free target for `kind` and marks it busy.
fn pick_target(
    cfg: &Config,
    kind: FaultKind,
    rng: &mut StdRng,
    shared: &Shared,
) -> Option<&'static str> {
    let mut c = shared.cluster.lock().expect("lock");
    let nats_busy = c.busy.contains(NATS);
    let eligible: Vec<Kind> = match kind {
        FaultKind::NatsRestart => vec![],
        FaultKind::Slow => cfg
            .targets
            .iter()
            .copied()
            .filter(|k| *k != Kind::Coordinator)
            .collect(),
        _ => cfg.targets.clone(),
    };
    let target = match kind {
        FaultKind::NatsRestart => NATS,
        _ if eligible.is_empty() => return None,
        _ => eligible[rng.random_range(0..eligible.len())].name(),
    };
    // The whole system depends on nats: no other fault while it restarts,
    // and no restart while another fault runs.
    if nats_busy || c.busy.contains(target) || (target == NATS && !c.busy.is_empty()) {
        return None;
    }
    c.busy.insert(target);
    Some(target)
}

fn kind_of(name: &str) -> Kind {
    Kind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .expect("a service")
}

/// Injects faults until the deadline; returns when every fault has healed.
async fn nemesis(cfg: &Config, shared: Arc<Shared>, deadline: Instant) {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut tasks = vec![];
    let mean = cfg.fault_interval.as_millis().max(2) as u64;
    // A drawn kind waits until a target is free (a nats restart waits for
    // every other fault to end), so the mix follows the weights.
    let mut pending: Option<FaultKind> = None;
    loop {
        let wait = Duration::from_millis(rng.random_range(mean / 2..=mean * 3 / 2));
        if Instant::now() + wait >= deadline {
            break;
        }
        tokio::time::sleep(wait).await;
        tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
        if tasks.len() >= cfg.max_active_faults {
            continue;
        }
        let Some(kind) = pending.take().or_else(|| draw_kind(cfg, &mut rng)) else {
            continue;
        };
        let Some(target) = pick_target(cfg, kind, &mut rng, &shared) else {
            pending = Some(kind);
            continue;
        };
        // Every random choice of the fault is drawn here, from the seeded
        // generator, so the schedule is reproducible from the seed.
        let hold = Duration::from_millis(rng.random_range(300..=4_000));
        let points: Vec<&'static str> = CRASH_POINTS
            .iter()
            .filter(|(k, _)| k.name() == target)
            .map(|(_, p)| *p)
            .collect();
        let point = if points.is_empty() {
            ""
        } else {
            points[rng.random_range(0..points.len())]
        };
        let slow = if rng.random_bool(0.7) {
            "prepare"
        } else {
            "decide"
        };
        let slow_ms = rng.random_range(500..=2_500);
        shared.count(kind);
        tasks.push(tokio::spawn(fault(
            shared.clone(),
            kind,
            target,
            hold,
            point,
            slow,
            slow_ms,
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Applies one fault, holds it, heals it, frees the target.
async fn fault(
    shared: Arc<Shared>,
    kind: FaultKind,
    target: &'static str,
    hold: Duration,
    point: &'static str,
    slow: &'static str,
    slow_ms: u64,
) {
    match kind {
        FaultKind::Kill => {
            shared.say(&format!("nemesis: SIGKILL {target}, down {:?}", hold / 4));
            let _ = shared.with_proc(target, |p| p.kill());
            tokio::time::sleep(hold / 4).await;
            let _ = shared.with_proc(target, |p| p.start());
        }
        FaultKind::Pause => {
            shared.say(&format!("nemesis: SIGSTOP {target} for {hold:?}"));
            let _ = shared.with_proc(target, |p| p.pause());
            tokio::time::sleep(hold).await;
            let _ = shared.with_proc(target, |p| p.resume());
        }
        FaultKind::NatsRestart => {
            shared.say(&format!(
                "nemesis: SIGKILL nats-server, down {:?}",
                hold / 4
            ));
            let _ = shared.cluster.lock().expect("lock").nats.proc.kill();
            tokio::time::sleep(hold / 4).await;
            let r = {
                let mut c = shared.cluster.lock().expect("lock");
                c.nats.proc.start()
            };
            if let Err(e) = r {
                shared.say(&format!("nemesis: nats-server restart failed: {e:#}"));
            }
        }
        FaultKind::Partition => {
            shared.say(&format!("nemesis: cut {target}'s link for {hold:?}"));
            shared.proxies[target].set(Link::Cut);
            tokio::time::sleep(hold).await;
            shared.proxies[target].set(Link::Up);
        }
        FaultKind::Slow => {
            let p = format!("{target}.{slow}");
            shared.say(&format!("nemesis: slow {p} by {slow_ms} ms for {hold:?}"));
            let _ = std::fs::write(
                &shared.faults_files[target],
                format!("delay:{p}:{slow_ms}\n"),
            );
            tokio::time::sleep(hold).await;
            let _ = std::fs::write(&shared.faults_files[target], "");
        }
        FaultKind::CrashPoint => {
            shared.say(&format!("nemesis: arm crash point {point}"));
            let _ = std::fs::write(&shared.faults_files[target], format!("crash:{point}\n"));
            // Wait for the crash (or give up and disarm).
            let deadline = Instant::now() + hold.max(Duration::from_secs(2));
            let mut crashed = false;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if !shared.with_proc(target, |p| p.is_running()) {
                    crashed = true;
                    break;
                }
            }
            let _ = std::fs::write(&shared.faults_files[target], "");
            if crashed {
                shared.say(&format!("nemesis: {target} crashed at {point}; restarting"));
                let _ = shared.with_proc(target, |p| p.kill().and_then(|_| p.start()));
            }
        }
    }
    shared.cluster.lock().expect("lock").busy.remove(target);
}

/// Leaves nothing paused, cut, armed or down.
fn heal_all(shared: &Shared) {
    for p in shared.proxies.values() {
        p.set(Link::Up);
    }
    for f in shared.faults_files.values() {
        let _ = std::fs::write(f, "");
    }
    let mut c = shared.cluster.lock().expect("lock");
    if !c.nats.proc.is_running() {
        let _ = c.nats.proc.kill();
        let _ = c.nats.proc.start();
    }
    for s in c.services.values_mut() {
        if s.proc.is_running() {
            let _ = s.proc.resume();
        } else {
            let _ = s.proc.kill();
            let _ = s.proc.start();
        }
    }
    c.busy.clear();
}
