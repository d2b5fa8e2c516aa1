//! The simulated world: one event queue over simulated time, the nodes
//! (coordinator replicas, the wallet, the order service, clients, the KV
//! store), the network between them and the faults. See the crate doc.

use std::cell::RefCell;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::executor::{LocalPool, LocalSpawner};
use futures::task::LocalSpawnExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;
use twopc_common::trace::TraceContext;
use twopc_coordinator::config::ReplyAfter;
use twopc_coordinator::core::{ClientId, Cmd, Core, CoreConfig, Delivery, Event, QueryId};
use twopc_coordinator::kv::KvLog;
use twopc_coordinator::log::{DecisionLog, LogError, Record};
use twopc_coordinator::phase::Ballot;
use twopc_participant::recovery::{Tracker, MAX_QUERIES_PER_PASS, RECOVERY_PAGE_ROWS};
use twopc_participant::{
    collect_branches, decide_job, library_schema, list_prepared, prepare_job, start_mark, Resource,
};
use twopc_participants::order::Order;
use twopc_participants::wallet::Wallet;
use twopc_schemas::api::{ApiError, PurchaseReply, PurchaseRequest};
use twopc_schemas::protocol::{
    Decide, DecideReply, Decision, DecisionQuery, DecisionReply, Prepare, TxId, TxWindow, Vote,
};
use twopc_schemas::tx;
use twopc_schemas::{participant, subjects, ClientName, Code, ParticipantName};

use crate::check::{self, Answer, Ground};
use crate::kv::{KvOp, KvResult, KvState, Outgoing, Shared, SimKv};

/// Deliberately broken behaviour, the simulation's counterpart of
/// `TWOPC_BREAK`: each must make the checker fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breaks {
    /// The coordinator ignores request ids (a re-send runs a new purchase).
    pub forget_request_ids: bool,
    /// A participant votes yes before its prepare is durable, or even
    /// known to be possible.
    pub vote_before_durable: bool,
    /// A participant in doubt aborts on its own instead of asking.
    pub decide_alone: bool,
    /// A second wallet instance with its own empty store serves the name
    /// too, without owning it.
    pub no_owner: bool,
}

impl Breaks {
    pub fn parse(names: &str) -> Result<Breaks, String> {
        let mut b = Breaks::default();
        for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match n {
                "forget_request_ids" => b.forget_request_ids = true,
                "vote_before_durable" => b.vote_before_durable = true,
                "decide_alone" => b.decide_alone = true,
                "no_owner" => b.no_owner = true,
                other => return Err(format!("unknown break {other:?}")),
            }
        }
        Ok(b)
    }
}

/// One run's settings (the seed decides the rest, see [`Knobs`]).
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// Simulated time with purchases and faults, ms.
    pub fault_ms: u64,
    /// After healing, how long the system may take to finish everything
    /// before it counts as stuck, ms.
    pub settle_ms: u64,
    /// Coordinator replicas sharing the KV decision log.
    pub replicas: usize,
    pub breaks: Breaks,
}

impl Config {
    pub fn new(seed: u64) -> Config {
        Config {
            seed,
            fault_ms: 20_000,
            settle_ms: 60_000,
            replicas: 2,
            breaks: Breaks::default(),
        }
    }
}

/// The probabilities and timings one run draws from its seed, each from a
/// small set that includes "never": BUGGIFY-style, so that runs differ in
/// kind, not only in detail, and no knob is tuned to one known bug.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Network message loss and duplication, per message.
    pub p_drop: f64,
    pub p_dup: f64,
    /// Largest one-way network latency, µs.
    pub max_latency_us: u64,
    /// A KV answer lost after the write landed.
    pub p_kv_lost_answer: f64,
    /// A KV call that lands after the caller gave up (up to twice the
    /// window late).
    pub p_kv_late: f64,
    /// A read answered by a leader up to `stale_ms` behind.
    pub p_kv_stale: f64,
    pub stale_ms: u64,
    /// A decision-log task that starts late (a scheduler hiccup or a pause
    /// of the process between its window check and its write), and how
    /// late at most.
    pub p_task_delay: f64,
    pub task_delay_max_ms: u64,
    /// Faults per simulated second, by kind.
    pub pauses_per_s: f64,
    pub crashes_per_s: f64,
    pub partitions_per_s: f64,
    pub clock_steps_per_s: f64,
    /// Participants' in-doubt threshold, ms.
    pub in_doubt_after_ms: u64,
    /// How the coordinator answers: at the decision or after the first
    /// delivery round.
    pub reply_after: ReplyAfter,
    /// Purchases per client, and clients.
    pub purchases: usize,
    pub clients: usize,
    /// Of answered purchases with a request id, the share re-sent later.
    pub p_resend: f64,
    /// Of purchases, the share reusing another purchase's request id with
    /// different content (must be a conflict).
    pub p_key_reuse: f64,
}

impl Knobs {
    fn draw(rng: &mut StdRng, window: &TxWindow) -> Knobs {
        fn pick<T: Copy>(rng: &mut StdRng, from: &[T]) -> T {
            from[rng.random_range(0..from.len())]
        }
        let w = window.window_ms as u64;
        Knobs {
            p_drop: pick(rng, &[0.0, 0.0, 0.01, 0.05]),
            p_dup: pick(rng, &[0.0, 0.01, 0.05]),
            max_latency_us: pick(rng, &[500, 3_000, 20_000]),
            p_kv_lost_answer: pick(rng, &[0.0, 0.02, 0.1]),
            p_kv_late: pick(rng, &[0.0, 0.01, 0.05]),
            p_kv_stale: pick(rng, &[0.0, 0.02, 0.1]),
            stale_ms: pick(rng, &[20, 300]),
            p_task_delay: pick(rng, &[0.0, 0.05, 0.2]),
            task_delay_max_ms: pick(rng, &[50, 2 * w]),
            pauses_per_s: pick(rng, &[0.0, 0.2, 0.6]),
            crashes_per_s: pick(rng, &[0.0, 0.1, 0.3]),
            partitions_per_s: pick(rng, &[0.0, 0.2, 0.5]),
            clock_steps_per_s: pick(rng, &[0.0, 0.1]),
            in_doubt_after_ms: pick(rng, &[300, 1_000, 3_000]),
            reply_after: pick(rng, &[ReplyAfter::Decision, ReplyAfter::Delivery]),
            purchases: pick(rng, &[5, 10, 20]),
            clients: pick(rng, &[2, 4]),
            p_resend: pick(rng, &[0.1, 0.4]),
            p_key_reuse: pick(rng, &[0.0, 0.05]),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    /// Broken invariants (empty: the run passed).
    pub violations: Vec<String>,
    /// A hash of every event the run processed, in order: equal for two
    /// runs of one seed, or the simulation is not deterministic.
    pub trace_hash: u64,
    /// Events processed, and simulated time at the end, ms.
    pub events: u64,
    pub sim_ms: u64,
    /// Purchases committed and aborted as clients were told.
    pub committed: usize,
    pub aborted: usize,
    pub knobs: Knobs,
}

/// The simulated transaction window: short, so that expiry and
/// collection happen in every run.
pub fn sim_window() -> TxWindow {
    TxWindow::new(2_000, 8_000, 500).expect("valid window")
}

const PREPARE_TIMEOUT_MS: u64 = 400;
const DECIDE_TIMEOUT_MS: u64 = 400;
const KV_TIMEOUT_MS: u64 = 300;
const DECISION_TIMEOUT_MS: u64 = 400;
const RECOVERY_INTERVAL_MS: u64 = 100;
const SWEEP_INTERVAL_MS: u64 = 500;
const CLIENT_TIMEOUT_MS: u64 = 1_500;
const RETRY_BASE_MS: u64 = 20;
const RETRY_CAP_MS: u64 = 400;
/// Simulated fsync, µs.
const FSYNC_US: (u64, u64) = (100, 2_000);

/// Users and their opening balances; products with price and stock.
const USERS: [(&str, u64); 3] = [("alice", 20_000), ("bob", 5_000), ("carol", 2_000)];
const PRODUCTS: [(&str, u64, u64); 2] = [("book-1", 1_250, 40), ("pen-2", 300, 10)];

/// Node numbers: replicas `0..r`, then these offsets.
#[derive(Debug, Clone, Copy)]
struct Layout {
    replicas: usize,
}

impl Layout {
    fn wallet(self) -> usize {
        self.replicas
    }
    fn order(self) -> usize {
        self.replicas + 1
    }
    /// The second wallet instance (`no_owner`).
    fn wallet2(self) -> usize {
        self.replicas + 2
    }
    fn client(self, i: usize) -> usize {
        self.replicas + 3 + i
    }
    /// The KV store, as a network endpoint.
    fn kv(self) -> usize {
        usize::MAX
    }
    fn is_replica(self, n: usize) -> bool {
        n < self.replicas
    }
    fn is_participant(self, n: usize) -> bool {
        n == self.wallet() || n == self.order() || n == self.wallet2()
    }
}

#[derive(Debug, Clone)]
enum Msg {
    Purchase {
        creq: u64,
        req: PurchaseRequest,
    },
    PurchaseReply {
        creq: u64,
        reply: Result<PurchaseReply, ApiError>,
    },
    Prepare {
        rpc: u64,
        msg: Prepare,
    },
    Vote {
        rpc: u64,
        vote: Vote,
    },
    Decide {
        rpc: u64,
        msg: Decide,
    },
    DecideAck {
        rpc: u64,
        reply: DecideReply,
    },
    Query {
        rpc: u64,
        q: DecisionQuery,
    },
    Answer {
        rpc: u64,
        reply: DecisionReply,
    },
    /// The server's answer to a request nobody subscribed to.
    NoResponders {
        rpc: u64,
    },
}

impl Msg {
    /// The request id to answer "no responders" to, if it is a request.
    fn request_rpc(&self) -> Option<u64> {
        match self {
            Msg::Purchase { creq, .. } => Some(*creq),
            Msg::Prepare { rpc, .. } | Msg::Decide { rpc, .. } | Msg::Query { rpc, .. } => {
                Some(*rpc)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Timer {
    RpcTimeout(u64),
    PrepareRetry(u64),
    RetryDue(TxId),
    Sweep,
    Collect,
    Recovery,
    PartCollect,
    QueryTimeout(u64),
    /// A reply sent once its write is durable (after the simulated fsync).
    SendLater {
        to: usize,
        msg: Msg,
    },
    /// `vote_before_durable`: the prepare written after the vote.
    DelayedPrepare {
        msg: Prepare,
    },
    ClientSend {
        purchase: usize,
    },
    ClientTimeout {
        purchase: usize,
        attempt: u32,
    },
}

#[derive(Debug, Clone)]
enum Fault {
    Pause(usize),
    Resume(usize),
    Crash(usize),
    Restart(usize),
    Cut(usize, usize),
    Mend(usize, usize),
    ClockStep(usize, i64),
    Heal,
}

enum Ev {
    Msg {
        from: usize,
        to: usize,
        msg: Msg,
    },
    Timer {
        node: usize,
        inc: u64,
        t: Timer,
    },
    KvArrive {
        call: u64,
        op: KvOp,
        lose_answer: bool,
    },
    KvBack {
        call: u64,
        result: KvResult,
    },
    KvTimeout {
        call: u64,
    },
    Wake {
        sleep: u64,
    },
    Fault(Fault),
    CheckDone,
}

struct Scheduled {
    at_us: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at_us, self.seq) == (o.at_us, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap pops the earliest.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.at_us, o.seq).cmp(&(self.at_us, self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Up,
    Paused,
    Down,
}

/// What a decision-log task reports back to its replica.
enum Done {
    Event(Event),
    KeyFound {
        key: String,
        found: Result<Option<Record>, LogError>,
    },
    Incomplete {
        records: Result<Vec<Record>, LogError>,
        older_than_ms: i64,
    },
    Nothing,
}

enum Rpc {
    Prepare {
        tx: TxId,
        participant: ParticipantName,
        msg: Prepare,
        started_us: u64,
        pause_ms: u64,
    },
    Decide {
        tx: TxId,
        participant: ParticipantName,
    },
}

struct Replica {
    core: Core,
    pool: LocalPool,
    spawner: LocalSpawner,
    done: Rc<RefCell<Vec<Done>>>,
    log: KvLog<SimKv>,
    clients: BTreeMap<ClientId, (usize, u64)>,
    queries: BTreeMap<QueryId, (usize, u64)>,
    rpcs: BTreeMap<u64, Rpc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Wallet,
    Order,
}

impl Kind {
    /// Phase 1 at this participant, with its real resource and SQL.
    fn prepare(
        self,
        t: &Connection,
        msg: &Prepare,
        w: TxWindow,
        now: i64,
    ) -> rusqlite::Result<Vote> {
        match self {
            Kind::Wallet => prepare_job(&Wallet, t, msg, w, now),
            Kind::Order => prepare_job(&Order, t, msg, w, now),
        }
    }

    /// Phase 2 at this participant.
    fn decide(
        self,
        t: &Connection,
        msg: Decide,
        w: TxWindow,
        now: i64,
    ) -> rusqlite::Result<DecideReply> {
        match self {
            Kind::Wallet => decide_job(&Wallet, t, msg, w, now),
            Kind::Order => decide_job(&Order, t, msg, w, now),
        }
    }
}

struct Part {
    kind: Kind,
    name: ParticipantName,
    conn: Connection,
    tracker: Tracker,
    started_after_rowid: i64,
    /// Decision queries out: rpc → tx.
    queries: BTreeMap<u64, TxId>,
}

struct Purchase {
    req: PurchaseRequest,
    first_sent_us: Option<u64>,
    attempts: u32,
    /// The attempt whose answer is awaited, if any.
    waiting: Option<u32>,
    /// Re-sends still planned (one per answered purchase at most).
    resend_planned: bool,
}

pub(crate) struct World {
    cfg: Config,
    knobs: Knobs,
    lay: Layout,
    window: TxWindow,
    rng: StdRng,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    shared: Arc<Mutex<Shared>>,
    kv: KvState,
    /// KV calls in flight: id → (node, waiting sender).
    calls: BTreeMap<u64, (usize, futures::channel::oneshot::Sender<KvResult>)>,
    sleeps: BTreeMap<u64, (usize, futures::channel::oneshot::Sender<()>)>,
    status: BTreeMap<usize, Status>,
    /// Events for paused nodes, replayed in order when they resume.
    held: BTreeMap<usize, Vec<Ev>>,
    /// Incarnation of each node: timers of an earlier one are void.
    inc: BTreeMap<usize, u64>,
    cuts: BTreeSet<(usize, usize)>,
    replicas: Vec<Option<Replica>>,
    parts: BTreeMap<usize, Part>,
    purchases: Vec<Purchase>,
    /// Ground truth for the checker.
    ground: Ground,
    next_id: u64,
    healed: bool,
    finished: bool,
    base: Instant,
    hash: u64,
    events: u64,
    /// Print every event (`TWOPC_SIM_TRACE=1`), for replaying one seed.
    trace: bool,
}

fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    let mut h = hash;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Runs one schedule. Never panics: a panic in the code under test is a
/// finding, reported as a violation.
pub fn run(cfg: Config) -> Outcome {
    let seed = cfg.seed;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut w = World::new(cfg);
        w.run_to_end()
    }));
    match result {
        Ok(o) => o,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".into());
            let knobs = Knobs::draw(&mut StdRng::seed_from_u64(seed), &sim_window());
            Outcome {
                seed,
                violations: vec![format!("panic in the code under test: {msg}")],
                trace_hash: 0,
                events: 0,
                sim_ms: 0,
                committed: 0,
                aborted: 0,
                knobs,
            }
        }
    }
}

impl World {
    fn new(cfg: Config) -> World {
        let window = sim_window();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let knobs = Knobs::draw(&mut rng, &window);
        let lay = Layout {
            replicas: cfg.replicas,
        };
        let shared = Arc::new(Mutex::new(Shared {
            now_us: 0,
            skew_ms: BTreeMap::new(),
            rng: StdRng::seed_from_u64(rng.random()),
            outbox: vec![],
            direct: None,
        }));
        let mut w = World {
            cfg,
            knobs,
            lay,
            window,
            rng,
            queue: BinaryHeap::new(),
            seq: 0,
            shared,
            kv: KvState::default(),
            calls: BTreeMap::new(),
            sleeps: BTreeMap::new(),
            status: BTreeMap::new(),
            held: BTreeMap::new(),
            inc: BTreeMap::new(),
            cuts: BTreeSet::new(),
            replicas: vec![],
            parts: BTreeMap::new(),
            purchases: vec![],
            ground: Ground::default(),
            next_id: 1,
            healed: false,
            finished: false,
            base: Instant::now(),
            hash: 0xcbf2_9ce4_8422_2325,
            events: 0,
            trace: std::env::var("TWOPC_SIM_TRACE").is_ok_and(|v| v == "1"),
        };
        w.setup();
        w
    }

    fn now_us(&self) -> u64 {
        self.shared.lock().expect("lock").now_us
    }

    fn wall_ms(&self, node: usize) -> i64 {
        self.shared.lock().expect("lock").wall_ms(node)
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now_us())
    }

    fn fresh(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A UUIDv7 for `node`'s clock, from the seeded random source.
    fn fresh_tx(&mut self, node: usize) -> TxId {
        let ms = u64::try_from(self.wall_ms(node)).expect("after 1970");
        let rand: [u8; 10] = self.rng.random();
        uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid()
    }

    fn at(&mut self, delay_us: u64, ev: Ev) {
        self.seq += 1;
        let at_us = self.now_us() + delay_us;
        self.queue.push(Scheduled {
            at_us,
            seq: self.seq,
            ev,
        });
    }

    fn timer(&mut self, node: usize, delay_ms: u64, t: Timer) {
        let inc = self.inc.get(&node).copied().unwrap_or(0);
        self.at(delay_ms * 1_000, Ev::Timer { node, inc, t });
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    // ---- setup -------------------------------------------------------

    fn setup(&mut self) {
        for r in 0..self.lay.replicas {
            self.start_replica(r);
        }
        let (wallet, order) = (self.lay.wallet(), self.lay.order());
        self.parts.insert(wallet, new_part(Kind::Wallet));
        self.parts.insert(order, new_part(Kind::Order));
        self.start_part(wallet);
        self.start_part(order);
        if self.cfg.breaks.no_owner {
            // Another wallet process with a store of its own, serving the
            // name alongside the first: what the owner lease prevents.
            self.parts
                .insert(self.lay.wallet2(), new_part(Kind::Wallet));
            self.start_part(self.lay.wallet2());
        }
        for (user, balance) in USERS {
            self.ground.balances.insert(user.into(), balance);
        }
        for (sku, price, stock) in PRODUCTS {
            self.ground.products.insert(sku.into(), (price, stock));
        }
        self.plan_purchases();
        self.plan_faults();
        self.at(self.cfg.fault_ms * 1_000, Ev::Fault(Fault::Heal));
    }

    fn start_replica(&mut self, r: usize) {
        let pool = LocalPool::new();
        let spawner = pool.spawner();
        let core = Core::new(CoreConfig {
            retry_base_ms: RETRY_BASE_MS,
            retry_cap_ms: RETRY_CAP_MS,
            reply_after: self.knobs.reply_after,
            seed: self.rng.random(),
            window: self.window,
        });
        let log = KvLog::new(
            SimKv {
                node: r,
                shared: self.shared.clone(),
            },
            Duration::from_millis(KV_TIMEOUT_MS),
        );
        let rep = Replica {
            core,
            pool,
            spawner,
            done: Rc::new(RefCell::new(vec![])),
            log,
            clients: BTreeMap::new(),
            queries: BTreeMap::new(),
            rpcs: BTreeMap::new(),
        };
        if self.replicas.len() <= r {
            self.replicas.resize_with(r + 1, || None);
        }
        self.replicas[r] = Some(rep);
        self.status.insert(r, Status::Up);
        // At start: what is recorded and not yet delivered (`on_resume`).
        self.spawn_log(r, false, |log| async move {
            match log.incomplete().await {
                Ok(records) => Done::Event(Event::Resume { records }),
                Err(_) => Done::Nothing,
            }
        });
        let sweep = self.rng.random_range(1..SWEEP_INTERVAL_MS);
        self.timer(r, sweep, Timer::Sweep);
        let collect = self.rng.random_range(1..self.collect_every_ms());
        self.timer(r, collect, Timer::Collect);
        self.pump(r);
    }

    fn collect_every_ms(&self) -> u64 {
        (self.window.retention_ms / 10) as u64
    }

    fn start_part(&mut self, n: usize) {
        let p = self.parts.get_mut(&n).expect("participant");
        p.tracker = Tracker::new();
        p.queries.clear();
        p.started_after_rowid = start_mark(&p.conn).expect("start mark");
        self.status.insert(n, Status::Up);
        self.timer(n, RECOVERY_INTERVAL_MS, Timer::Recovery);
        let c = self.rng.random_range(1..self.collect_every_ms());
        self.timer(n, c, Timer::PartCollect);
    }

    fn plan_purchases(&mut self) {
        let clients = self.knobs.clients;
        for c in 0..clients {
            for i in 0..self.knobs.purchases {
                let (user, _) = USERS[self.rng.random_range(0..USERS.len())];
                let (sku, price, _) = PRODUCTS[self.rng.random_range(0..PRODUCTS.len())];
                let qty = self.rng.random_range(1..=3u64);
                let keyed = self.rng.random_bool(0.85);
                let mut request_id = keyed.then(|| format!("c{c}-p{i}"));
                if keyed && i > 0 && self.chance(self.knobs.p_key_reuse) {
                    // The same key as an earlier purchase, other content.
                    request_id = Some(format!("c{c}-p{}", self.rng.random_range(0..i)));
                }
                let req = PurchaseRequest {
                    user: user.into(),
                    sku: sku.into(),
                    qty,
                    amount: price * qty,
                    request_id,
                };
                let idx = self.purchases.len();
                self.purchases.push(Purchase {
                    req,
                    first_sent_us: None,
                    attempts: 0,
                    waiting: None,
                    resend_planned: false,
                });
                let at = self.rng.random_range(0..self.cfg.fault_ms * 3 / 4);
                let client = self.lay.client(c);
                self.status.insert(client, Status::Up);
                self.timer(client, at, Timer::ClientSend { purchase: idx });
            }
        }
    }

    fn plan_faults(&mut self) {
        let secs = self.cfg.fault_ms as f64 / 1_000.0;
        let w = self.window.window_ms as u64;
        let mut victims: Vec<usize> = (0..self.lay.replicas).collect();
        victims.push(self.lay.wallet());
        victims.push(self.lay.order());
        let count = |rng: &mut StdRng, rate: f64| -> usize {
            let mean = rate * secs;
            if mean <= 0.0 {
                0
            } else {
                rng.random_range(0..=(2.0 * mean).ceil() as usize)
            }
        };
        for _ in 0..count(&mut self.rng, self.knobs.pauses_per_s) {
            let n = victims[self.rng.random_range(0..victims.len())];
            let at = self.rng.random_range(0..self.cfg.fault_ms);
            let len = self.rng.random_range(10..3 * w);
            self.at(at * 1_000, Ev::Fault(Fault::Pause(n)));
            self.at((at + len) * 1_000, Ev::Fault(Fault::Resume(n)));
        }
        for _ in 0..count(&mut self.rng, self.knobs.crashes_per_s) {
            let n = victims[self.rng.random_range(0..victims.len())];
            let at = self.rng.random_range(0..self.cfg.fault_ms);
            let len = self.rng.random_range(10..3 * w);
            self.at(at * 1_000, Ev::Fault(Fault::Crash(n)));
            self.at((at + len) * 1_000, Ev::Fault(Fault::Restart(n)));
        }
        let mut ends: Vec<usize> = victims.clone();
        ends.push(self.lay.kv());
        for _ in 0..count(&mut self.rng, self.knobs.partitions_per_s) {
            let a = victims[self.rng.random_range(0..victims.len())];
            let at = self.rng.random_range(0..self.cfg.fault_ms);
            let len = self.rng.random_range(10..3 * w);
            // One link, or the node cut off from everyone.
            let others: Vec<usize> = if self.rng.random_bool(0.5) {
                vec![ends[self.rng.random_range(0..ends.len())]]
            } else {
                ends.clone()
            };
            for b in others.into_iter().filter(|b| *b != a) {
                self.at(at * 1_000, Ev::Fault(Fault::Cut(a, b)));
                self.at((at + len) * 1_000, Ev::Fault(Fault::Mend(a, b)));
            }
        }
        for _ in 0..count(&mut self.rng, self.knobs.clock_steps_per_s) {
            let n = victims[self.rng.random_range(0..victims.len())];
            let at = self.rng.random_range(0..self.cfg.fault_ms);
            // Within the tolerated skew, as the retention rule assumes.
            let s = self.window.max_skew_ms;
            let step = self.rng.random_range(-s / 2..=s / 2);
            self.at(at * 1_000, Ev::Fault(Fault::ClockStep(n, step)));
        }
    }

    // ---- the loop ----------------------------------------------------

    fn run_to_end(&mut self) -> Outcome {
        let deadline_us = (self.cfg.fault_ms + self.cfg.settle_ms) * 1_000;
        while let Some(s) = self.queue.pop() {
            if s.at_us > deadline_us || self.finished {
                break;
            }
            self.shared.lock().expect("lock").now_us = s.at_us;
            self.events += 1;
            self.dispatch(s.ev);
        }
        let mut violations = vec![];
        if !self.finished {
            violations.push(format!(
                "not finished {} ms after healing: {}",
                self.cfg.settle_ms,
                self.unfinished().join("; ")
            ));
        }
        violations.extend(self.check());
        let (committed, aborted) = self.ground.told_counts();
        Outcome {
            seed: self.cfg.seed,
            violations,
            trace_hash: self.hash,
            events: self.events,
            sim_ms: self.now_us() / 1_000,
            committed,
            aborted,
            knobs: self.knobs.clone(),
        }
    }

    fn target(&self, ev: &Ev) -> Option<usize> {
        match ev {
            Ev::Msg { to, .. } => Some(*to),
            Ev::Timer { node, .. } => Some(*node),
            Ev::KvBack { call, .. } | Ev::KvTimeout { call } => {
                self.calls.get(call).map(|(n, _)| *n)
            }
            Ev::Wake { sleep } => self.sleeps.get(sleep).map(|(n, _)| *n),
            Ev::KvArrive { .. } | Ev::Fault(_) | Ev::CheckDone => None,
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        if let Some(n) = self.target(&ev) {
            match self.status.get(&n).copied().unwrap_or(Status::Up) {
                Status::Paused => {
                    self.held.entry(n).or_default().push(ev);
                    return;
                }
                Status::Down => {
                    if let Ev::Msg { from, msg, .. } = &ev {
                        self.no_responders(*from, n, msg);
                    }
                    return;
                }
                Status::Up => {}
            }
        }
        let t = self.now_us();
        self.hash = fnv(self.hash, &t.to_le_bytes());
        if self.trace {
            eprintln!("{:>9.3} {}", t as f64 / 1_000.0, describe(&ev));
        }
        match ev {
            Ev::Msg { from, to, msg } => {
                self.hash = fnv(self.hash, &[from as u8, to as u8, msg_kind(&msg)]);
                self.on_msg(from, to, msg);
            }
            Ev::Timer { node, inc, t } => {
                if self.inc.get(&node).copied().unwrap_or(0) == inc {
                    self.hash = fnv(self.hash, &[node as u8, timer_kind(&t)]);
                    self.on_timer(node, t);
                }
            }
            Ev::KvArrive {
                call,
                op,
                lose_answer,
            } => self.on_kv_arrive(call, op, lose_answer),
            Ev::KvBack { call, result } => {
                if let Some((n, reply)) = self.calls.remove(&call) {
                    self.hash = fnv(self.hash, &[n as u8, result_kind(&result)]);
                    let _ = reply.send(result);
                    self.pump(n);
                }
            }
            Ev::KvTimeout { call } => {
                if let Some((n, reply)) = self.calls.remove(&call) {
                    let _ = reply.send(KvResult::TimedOut);
                    self.pump(n);
                }
            }
            Ev::Wake { sleep } => {
                if let Some((n, wake)) = self.sleeps.remove(&sleep) {
                    let _ = wake.send(());
                    self.pump(n);
                }
            }
            Ev::Fault(f) => {
                self.hash = fnv(self.hash, format!("{f:?}").as_bytes());
                self.on_fault(f);
            }
            Ev::CheckDone => {
                if self.unfinished().is_empty() {
                    self.finished = true;
                } else {
                    self.at(100_000, Ev::CheckDone);
                }
            }
        }
    }

    /// The server answers a request to a process that is not subscribed.
    fn no_responders(&mut self, from: usize, to: usize, msg: &Msg) {
        if self.lay.is_replica(to) && matches!(msg, Msg::Purchase { .. } | Msg::Query { .. }) {
            // A queue group: the server picks a live member if there is one.
            if let Some(other) = self.pick_replica() {
                self.send_raw(from, other, msg.clone());
                return;
            }
        }
        if let Some(rpc) = msg.request_rpc() {
            self.send_raw(to, from, Msg::NoResponders { rpc });
        }
    }

    // ---- network -----------------------------------------------------

    fn cut(&self, a: usize, b: usize) -> bool {
        self.cuts.contains(&(a.min(b), a.max(b)))
    }

    fn latency_us(&mut self) -> u64 {
        self.rng
            .random_range(50..=self.knobs.max_latency_us.max(51))
    }

    /// Sends over the network, with its faults.
    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if self.cut(from, to) {
            return;
        }
        if !self.healed && self.chance(self.knobs.p_drop) {
            return;
        }
        if !self.healed && self.chance(self.knobs.p_dup) {
            let l = self.latency_us();
            self.at(
                l,
                Ev::Msg {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
        self.send_raw(from, to, msg);
    }

    fn send_raw(&mut self, from: usize, to: usize, msg: Msg) {
        if self.cut(from, to) {
            return;
        }
        let l = self.latency_us();
        self.at(l, Ev::Msg { from, to, msg });
    }

    /// A queue-group member for the coordinator's subjects.
    fn pick_replica(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..self.lay.replicas)
            .filter(|r| self.status.get(r) != Some(&Status::Down))
            .collect();
        (!live.is_empty()).then(|| live[self.rng.random_range(0..live.len())])
    }

    fn send_to_coordinator(&mut self, from: usize, msg: Msg) {
        match self.pick_replica() {
            Some(r) => self.send(from, r, msg),
            None => {
                if let Some(rpc) = msg.request_rpc() {
                    self.send_raw(from, from, Msg::NoResponders { rpc });
                }
            }
        }
    }

    /// A participant name's queue group: with `no_owner`, the wallet's two
    /// instances share its subjects.
    fn send_to_participant(&mut self, from: usize, name: &ParticipantName, msg: Msg) {
        let to = if *name == participant::WALLET {
            if self.cfg.breaks.no_owner && self.rng.random_bool(0.5) {
                self.lay.wallet2()
            } else {
                self.lay.wallet()
            }
        } else {
            self.lay.order()
        };
        self.send(from, to, msg);
    }

    // ---- the KV store ------------------------------------------------

    /// Takes the store calls and sleeps that tasks made.
    fn drain_outbox(&mut self) {
        let out = std::mem::take(&mut self.shared.lock().expect("lock").outbox);
        for o in out {
            match o {
                Outgoing::Call { node, op, reply } => {
                    let call = self.fresh();
                    self.calls.insert(call, (node, reply));
                    self.at(KV_TIMEOUT_MS * 1_000, Ev::KvTimeout { call });
                    if self.cut(node, self.lay.kv()) {
                        continue;
                    }
                    let mut l = self.latency_us();
                    if !self.healed && self.chance(self.knobs.p_kv_late) {
                        // Lands after the caller gave up, but within the
                        // bound the retention rule assumes of a write in
                        // flight: half the retention less the skew.
                        let bound_ms =
                            (self.window.retention_ms / 2 - self.window.max_skew_ms) as u64;
                        l = self
                            .rng
                            .random_range(KV_TIMEOUT_MS * 1_000..bound_ms * 1_000);
                    }
                    let lose_answer = !self.healed && self.chance(self.knobs.p_kv_lost_answer);
                    self.at(
                        l,
                        Ev::KvArrive {
                            call,
                            op,
                            lose_answer,
                        },
                    );
                }
                Outgoing::Sleep { node, ms, wake } => {
                    let sleep = self.fresh();
                    self.sleeps.insert(sleep, (node, wake));
                    self.at(ms * 1_000, Ev::Wake { sleep });
                }
            }
        }
    }

    fn on_kv_arrive(&mut self, call: u64, op: KvOp, lose_answer: bool) {
        let stale_us = if !self.healed
            && matches!(op, KvOp::Latest { .. })
            && self.chance(self.knobs.p_kv_stale)
        {
            self.rng.random_range(1..=self.knobs.stale_ms) * 1_000
        } else {
            0
        };
        let now = self.now_us();
        let result = self.kv.apply(op.clone(), now, stale_us);
        self.hash = fnv(self.hash, &call.to_le_bytes());
        self.hash = fnv(self.hash, &[result_kind(&result)]);
        if let KvOp::Create { key, value } | KvOp::Update { key, value, .. } = &op {
            if matches!(
                result,
                KvResult::Create(twopc_coordinator::kv::Create::Written)
                    | KvResult::Update(twopc_coordinator::kv::Update::Written)
            ) {
                self.ground.on_kv_write(key, value);
            }
        }
        if lose_answer {
            return;
        }
        let node = self.calls.get(&call).map(|(n, _)| *n);
        if let Some(n) = node {
            if self.cut(n, self.lay.kv()) {
                return;
            }
        }
        let l = self.latency_us();
        self.at(l, Ev::KvBack { call, result });
    }

    // ---- coordinator replicas ---------------------------------------

    /// Spawns a decision-log task on replica `r`; `delayable` tasks may
    /// start late (the knob `p_task_delay`).
    fn spawn_log<F, Fut>(&mut self, r: usize, delayable: bool, f: F)
    where
        F: FnOnce(KvLog<SimKv>) -> Fut + 'static,
        Fut: std::future::Future<Output = Done> + 'static,
    {
        let delay_ms = if delayable && !self.healed && self.chance(self.knobs.p_task_delay) {
            self.rng.random_range(1..=self.knobs.task_delay_max_ms)
        } else {
            0
        };
        let Some(rep) = self.replicas[r].as_ref() else {
            return;
        };
        let log = rep.log.clone();
        let done = rep.done.clone();
        rep.spawner
            .spawn_local(async move {
                if delay_ms > 0 {
                    twopc_coordinator::kv::KvStore::sleep(log.store(), delay_ms).await;
                }
                let d = f(log).await;
                done.borrow_mut().push(d);
            })
            .expect("spawn");
    }

    /// Runs replica `r`'s tasks until they wait, feeding what they finish
    /// to its core, until nothing more happens.
    fn pump(&mut self, r: usize) {
        if !self.lay.is_replica(r) {
            return;
        }
        loop {
            let done = {
                let Some(rep) = self.replicas[r].as_mut() else {
                    return;
                };
                rep.pool.run_until_stalled();
                std::mem::take(&mut *rep.done.borrow_mut())
            };
            self.drain_outbox();
            if done.is_empty() {
                return;
            }
            for d in done {
                let ev = match d {
                    Done::Event(e) => e,
                    Done::KeyFound { key, found } => Event::KeyFound {
                        key,
                        found,
                        tx: self.fresh_tx(r),
                    },
                    Done::Incomplete {
                        records,
                        older_than_ms,
                    } => match records {
                        Ok(rs) => {
                            let records: Vec<Record> = rs
                                .into_iter()
                                .filter(|rec| rec.decided_at_ms < older_than_ms)
                                .collect();
                            if records.is_empty() {
                                continue;
                            }
                            Event::Resume { records }
                        }
                        Err(_) => continue,
                    },
                    Done::Nothing => continue,
                };
                self.step(r, ev);
            }
        }
    }

    fn step(&mut self, r: usize, ev: Event) {
        let now = self.wall_ms(r);
        let Some(rep) = self.replicas[r].as_mut() else {
            return;
        };
        let cmds = rep.core.step(now, ev);
        for cmd in cmds {
            self.exec(r, cmd);
        }
    }

    fn exec(&mut self, r: usize, cmd: Cmd) {
        match cmd {
            Cmd::LookUpKey { key } => self.spawn_log(r, true, |log| async move {
                let found = log.by_request_id(key.clone()).await;
                Done::KeyFound { key, found }
            }),
            Cmd::Record { rec, write_by_ms } => self.spawn_log(r, true, move |log| async move {
                let tx = rec.tx;
                let result = log.record_until(rec, write_by_ms).await;
                Done::Event(Event::Recorded { tx, result })
            }),
            Cmd::LookUpDecision {
                query,
                tx,
                participant,
            } => self.spawn_log(r, true, move |log| async move {
                let found = log.get(tx).await;
                Done::Event(Event::DecisionFound {
                    query,
                    tx,
                    participant,
                    found,
                })
            }),
            Cmd::RecordPresumedAbort {
                query,
                rec,
                participant,
                write_by_ms,
            } => self.spawn_log(r, true, move |log| async move {
                let tx = rec.tx;
                let result = log.record_until(rec, write_by_ms).await;
                Done::Event(Event::QueryRecorded {
                    query,
                    tx,
                    participant,
                    result,
                })
            }),
            Cmd::NoteAcks {
                tx,
                participants,
                attempts,
            } => self.spawn_log(r, true, move |log| async move {
                let _ = log.acked(tx, participants, attempts).await;
                Done::Nothing
            }),
            Cmd::Prepare {
                tx,
                participant,
                client,
                op,
                ..
            } => {
                let rpc = self.fresh();
                let msg = Prepare {
                    tx,
                    client,
                    op: op.as_bytes().to_vec(),
                };
                let started_us = self.now_us();
                if let Some(rep) = self.replicas[r].as_mut() {
                    rep.rpcs.insert(
                        rpc,
                        Rpc::Prepare {
                            tx,
                            participant: participant.clone(),
                            msg: msg.clone(),
                            started_us,
                            pause_ms: 10,
                        },
                    );
                }
                self.timer(r, PREPARE_TIMEOUT_MS, Timer::RpcTimeout(rpc));
                self.send_to_participant(r, &participant, Msg::Prepare { rpc, msg });
            }
            Cmd::Decide {
                tx,
                participant,
                decision,
                ..
            } => {
                let rpc = self.fresh();
                if let Some(rep) = self.replicas[r].as_mut() {
                    rep.rpcs.insert(
                        rpc,
                        Rpc::Decide {
                            tx,
                            participant: participant.clone(),
                        },
                    );
                }
                self.timer(r, DECIDE_TIMEOUT_MS, Timer::RpcTimeout(rpc));
                self.send_to_participant(
                    r,
                    &participant,
                    Msg::Decide {
                        rpc,
                        msg: Decide { tx, decision },
                    },
                );
            }
            Cmd::Reply { client, reply } => {
                let to = self.replicas[r]
                    .as_mut()
                    .and_then(|rep| rep.clients.remove(&client));
                if let Some((node, creq)) = to {
                    self.send(r, node, Msg::PurchaseReply { creq, reply });
                }
            }
            Cmd::Answer { query, reply } => {
                let to = self.replicas[r]
                    .as_mut()
                    .and_then(|rep| rep.queries.remove(&query));
                if let Some((node, rpc)) = to {
                    self.send(r, node, Msg::Answer { rpc, reply });
                }
            }
            Cmd::RetryAfter { tx, delay_ms } => self.timer(r, delay_ms, Timer::RetryDue(tx)),
            Cmd::Begun { tx, req, .. } => {
                self.ground.begun.insert(tx, req);
                let now = self.now_us();
                self.ground.begun_at_us.insert(tx, now);
            }
            Cmd::Concluded { .. } | Cmd::DeliveredAll { .. } | Cmd::Stuck { .. } => {}
        }
    }

    fn on_replica_msg(&mut self, from: usize, r: usize, msg: Msg) {
        match msg {
            Msg::Purchase { creq, mut req } => {
                if self.cfg.breaks.forget_request_ids {
                    req.request_id = None;
                }
                let client = self.fresh();
                if let Some(rep) = self.replicas[r].as_mut() {
                    rep.clients.insert(client, (from, creq));
                }
                let tx = self.fresh_tx(r);
                self.step(
                    r,
                    Event::Submit {
                        client,
                        req: tx::purchase(&shop_client(), &req),
                        tx,
                        trace: trace(),
                    },
                );
            }
            Msg::Vote { rpc, vote } => {
                if let Some(Rpc::Prepare {
                    tx, participant, ..
                }) = self.take_rpc(r, rpc)
                {
                    self.step(
                        r,
                        Event::Voted {
                            tx,
                            participant,
                            ballot: Ballot::Voted(vote),
                        },
                    );
                }
            }
            Msg::DecideAck { rpc, reply } => {
                if let Some(Rpc::Decide { tx, participant }) = self.take_rpc(r, rpc) {
                    let result = match reply {
                        DecideReply::Ack => Delivery::Acked,
                        DecideReply::Rejected { code, message } => Delivery::Refused(code, message),
                    };
                    self.step(
                        r,
                        Event::Delivered {
                            tx,
                            participant,
                            result,
                        },
                    );
                }
            }
            Msg::NoResponders { rpc } => self.on_replica_no_responders(r, rpc),
            Msg::Query { rpc, q } => {
                let query = self.fresh();
                let subject = subjects::decision_query(&q.participant);
                if let Some(rep) = self.replicas[r].as_mut() {
                    rep.queries.insert(query, (from, rpc));
                }
                self.step(
                    r,
                    Event::DecisionQuery {
                        query,
                        subject,
                        msg: q,
                    },
                );
            }
            other => unreachable!("replica got {other:?}"),
        }
        self.pump(r);
    }

    fn take_rpc(&mut self, r: usize, rpc: u64) -> Option<Rpc> {
        self.replicas[r].as_mut()?.rpcs.remove(&rpc)
    }

    /// As the driver: "no responders" to a prepare is asked again within
    /// the prepare timeout; otherwise it ends the ballot.
    fn on_replica_no_responders(&mut self, r: usize, rpc: u64) {
        let now = self.now_us();
        let Some(rep) = self.replicas[r].as_mut() else {
            return;
        };
        match rep.rpcs.get_mut(&rpc) {
            Some(Rpc::Prepare {
                started_us,
                pause_ms,
                ..
            }) => {
                let left_ms =
                    (PREPARE_TIMEOUT_MS * 1_000).saturating_sub(now - *started_us) / 1_000;
                if left_ms <= *pause_ms {
                    if let Some(Rpc::Prepare {
                        tx, participant, ..
                    }) = rep.rpcs.remove(&rpc)
                    {
                        self.step(
                            r,
                            Event::Voted {
                                tx,
                                participant,
                                ballot: Ballot::NoResponders,
                            },
                        );
                    }
                } else {
                    let p = *pause_ms;
                    *pause_ms = (p * 2).min(200);
                    self.timer(r, p, Timer::PrepareRetry(rpc));
                }
            }
            Some(Rpc::Decide { .. }) => {
                if let Some(Rpc::Decide { tx, participant }) = rep.rpcs.remove(&rpc) {
                    self.step(
                        r,
                        Event::Delivered {
                            tx,
                            participant,
                            result: Delivery::Failed,
                        },
                    );
                }
            }
            None => {}
        }
    }

    fn on_replica_timer(&mut self, r: usize, t: Timer) {
        match t {
            Timer::RpcTimeout(rpc) => match self.take_rpc(r, rpc) {
                Some(Rpc::Prepare {
                    tx, participant, ..
                }) => self.step(
                    r,
                    Event::Voted {
                        tx,
                        participant,
                        ballot: Ballot::TimedOut,
                    },
                ),
                Some(Rpc::Decide { tx, participant }) => self.step(
                    r,
                    Event::Delivered {
                        tx,
                        participant,
                        result: Delivery::Failed,
                    },
                ),
                None => {}
            },
            Timer::PrepareRetry(rpc) => {
                let again = self.replicas[r]
                    .as_ref()
                    .and_then(|rep| match rep.rpcs.get(&rpc) {
                        Some(Rpc::Prepare {
                            participant, msg, ..
                        }) => Some((participant.clone(), msg.clone())),
                        _ => None,
                    });
                if let Some((participant, msg)) = again {
                    self.send_to_participant(r, &participant, Msg::Prepare { rpc, msg });
                }
            }
            Timer::RetryDue(tx) => self.step(r, Event::RetryDue { tx }),
            Timer::Sweep => {
                let older_than_ms = self.wall_ms(r) - SWEEP_INTERVAL_MS as i64;
                self.spawn_log(r, false, move |log| async move {
                    Done::Incomplete {
                        records: log.incomplete().await,
                        older_than_ms,
                    }
                });
                self.timer(r, SWEEP_INTERVAL_MS, Timer::Sweep);
            }
            Timer::Collect => {
                let before = self.wall_ms(r) - self.window.retention_ms;
                self.spawn_log(r, false, move |log| async move {
                    let _ = log.collect(before).await;
                    Done::Nothing
                });
                let every = self.collect_every_ms();
                self.timer(r, every, Timer::Collect);
            }
            other => unreachable!("replica timer {other:?}"),
        }
        self.pump(r);
    }

    // ---- participants -------------------------------------------------

    fn fsync_us(&mut self) -> u64 {
        self.rng.random_range(FSYNC_US.0..=FSYNC_US.1)
    }

    /// Runs one job in one SQLite transaction (durable at commit).
    fn job<T>(
        &mut self,
        n: usize,
        f: impl FnOnce(Kind, &rusqlite::Transaction<'_>, TxWindow, i64) -> rusqlite::Result<T>,
    ) -> T {
        let now = self.wall_ms(n);
        let window = self.window;
        let p = self.parts.get_mut(&n).expect("participant");
        let kind = p.kind;
        let t = p
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("begin");
        let out = f(kind, &t, window, now).expect("a participant job failed in SQLite");
        t.commit().expect("commit");
        out
    }

    fn on_part_msg(&mut self, n: usize, from: usize, msg: Msg) {
        match msg {
            Msg::Prepare { rpc, msg } => {
                if self.cfg.breaks.vote_before_durable {
                    // DELIBERATELY BROKEN: yes before the write, or even
                    // before knowing it can be held.
                    self.send(
                        n,
                        from,
                        Msg::Vote {
                            rpc,
                            vote: Vote::Yes,
                        },
                    );
                    let d = self.rng.random_range(1..50);
                    self.timer(n, d, Timer::DelayedPrepare { msg });
                    return;
                }
                let vote = self.job(n, |kind, t, w, now| kind.prepare(t, &msg, w, now));
                // Durable point: the vote goes out after the fsync.
                let d = self.fsync_us();
                let inc = self.inc.get(&n).copied().unwrap_or(0);
                self.at(
                    d,
                    Ev::Timer {
                        node: n,
                        inc,
                        t: Timer::SendLater {
                            to: from,
                            msg: Msg::Vote { rpc, vote },
                        },
                    },
                );
            }
            Msg::Decide { rpc, msg } => {
                let reply = self.job(n, |kind, t, w, now| kind.decide(t, msg, w, now));
                let d = self.fsync_us();
                let inc = self.inc.get(&n).copied().unwrap_or(0);
                self.at(
                    d,
                    Ev::Timer {
                        node: n,
                        inc,
                        t: Timer::SendLater {
                            to: from,
                            msg: Msg::DecideAck { rpc, reply },
                        },
                    },
                );
            }
            Msg::Answer { rpc, reply } => {
                let Some(tx) = self.parts.get_mut(&n).and_then(|p| p.queries.remove(&rpc)) else {
                    return;
                };
                let resolved = match reply {
                    DecisionReply::Decided { tx: got, decision } if got == tx => {
                        self.apply_decision(n, tx, decision)
                    }
                    _ => false,
                };
                self.record_recovery(n, tx, resolved);
            }
            Msg::NoResponders { rpc } => {
                if let Some(tx) = self.parts.get_mut(&n).and_then(|p| p.queries.remove(&rpc)) {
                    self.record_recovery(n, tx, false);
                }
            }
            other => unreachable!("participant got {other:?}"),
        }
    }

    fn apply_decision(&mut self, n: usize, tx: TxId, decision: Decision) -> bool {
        let reply = self.job(n, |kind, t, w, now| {
            kind.decide(t, Decide { tx, decision }, w, now)
        });
        matches!(reply, DecideReply::Ack)
    }

    fn record_recovery(&mut self, n: usize, tx: TxId, resolved: bool) {
        let now = self.instant();
        let p = self.parts.get_mut(&n).expect("participant");
        p.tracker.record_with(now, tx, resolved, &mut self.rng);
    }

    fn on_part_timer(&mut self, n: usize, t: Timer) {
        match t {
            Timer::SendLater { to, msg } => self.send(n, to, msg),
            Timer::DelayedPrepare { msg } => {
                self.job(n, |kind, t, w, now| kind.prepare(t, &msg, w, now));
            }
            Timer::Recovery => {
                self.recovery_pass(n);
                self.timer(n, RECOVERY_INTERVAL_MS, Timer::Recovery);
            }
            Timer::PartCollect => {
                let before = self.wall_ms(n) - self.window.retention_ms;
                self.job(n, |_, t, _, _| collect_branches(t, before));
                let every = self.collect_every_ms();
                self.timer(n, every, Timer::PartCollect);
            }
            Timer::QueryTimeout(rpc) => {
                if let Some(tx) = self.parts.get_mut(&n).and_then(|p| p.queries.remove(&rpc)) {
                    self.record_recovery(n, tx, false);
                }
            }
            other => unreachable!("participant timer {other:?}"),
        }
    }

    /// One pass of the recovery loop: list a page, select with the
    /// production tracker, ask (or, `decide_alone`, abort alone).
    fn recovery_pass(&mut self, n: usize) {
        let now = self.instant();
        let threshold = Duration::from_millis(self.knobs.in_doubt_after_ms);
        let (due, name) = {
            let p = self.parts.get_mut(&n).expect("participant");
            let page = list_prepared(
                &p.conn,
                p.tracker.cursor(),
                p.started_after_rowid,
                RECOVERY_PAGE_ROWS,
            )
            .expect("list prepared branches");
            let asking: BTreeSet<TxId> = p.queries.values().copied().collect();
            let due: Vec<TxId> = p
                .tracker
                .select_due(
                    now,
                    &page,
                    RECOVERY_PAGE_ROWS,
                    threshold,
                    MAX_QUERIES_PER_PASS,
                )
                .into_iter()
                .filter(|tx| !asking.contains(tx))
                .collect();
            (due, p.name.clone())
        };
        for tx in due {
            if self.cfg.breaks.decide_alone {
                // DELIBERATELY BROKEN: abort alone instead of asking.
                let ok = self.apply_decision(n, tx, Decision::Abort);
                self.record_recovery(n, tx, ok);
                continue;
            }
            let rpc = self.fresh();
            self.parts
                .get_mut(&n)
                .expect("participant")
                .queries
                .insert(rpc, tx);
            self.timer(n, DECISION_TIMEOUT_MS, Timer::QueryTimeout(rpc));
            self.send_to_coordinator(
                n,
                Msg::Query {
                    rpc,
                    q: DecisionQuery {
                        tx,
                        participant: name.clone(),
                    },
                },
            );
        }
    }

    // ---- clients -----------------------------------------------------

    fn on_client_timer(&mut self, c: usize, t: Timer) {
        match t {
            Timer::ClientSend { purchase } => {
                let now = self.now_us();
                let p = &mut self.purchases[purchase];
                p.attempts += 1;
                let attempt = p.attempts;
                p.waiting = Some(attempt);
                p.first_sent_us.get_or_insert(now);
                let req = p.req.clone();
                self.ground.sent(purchase, &req, now);
                self.timer(
                    c,
                    CLIENT_TIMEOUT_MS,
                    Timer::ClientTimeout { purchase, attempt },
                );
                self.send_to_coordinator(
                    c,
                    Msg::Purchase {
                        creq: purchase as u64,
                        req,
                    },
                );
            }
            Timer::ClientTimeout { purchase, attempt } => {
                if self.purchases[purchase].waiting == Some(attempt) {
                    self.purchases[purchase].waiting = None;
                    self.retry_later(c, purchase);
                }
            }
            other => unreachable!("client timer {other:?}"),
        }
    }

    /// A keyed purchase without an answer is sent again (a timeout is
    /// unknown, never failed), within half the retention of its first send.
    fn retry_later(&mut self, c: usize, purchase: usize) {
        let p = &self.purchases[purchase];
        let horizon_us = (self.window.retention_ms as u64 / 2) * 1_000;
        let first = p.first_sent_us.unwrap_or(0);
        if p.req.request_id.is_some() && p.attempts < 6 && self.now_us() < first + horizon_us {
            let d = self.rng.random_range(50..500);
            self.timer(c, d, Timer::ClientSend { purchase });
        }
    }

    fn on_client_msg(&mut self, c: usize, msg: Msg) {
        match msg {
            Msg::PurchaseReply { creq, reply } => {
                let purchase = creq as usize;
                // Any answer counts, even to an earlier attempt.
                let was_waiting = self.purchases[purchase].waiting.take().is_some();
                let now = self.now_us();
                let req = self.purchases[purchase].req.clone();
                match &reply {
                    Ok(r) => {
                        self.ground.answer(Answer {
                            purchase,
                            req: req.clone(),
                            sent_first_us: self.purchases[purchase].first_sent_us.unwrap_or(now),
                            at_us: now,
                            tx: r.tx.parse().expect("a transaction id"),
                            outcome: r.outcome,
                            duplicate: r.duplicate,
                        });
                        let p = &mut self.purchases[purchase];
                        if req.request_id.is_some() && !p.resend_planned {
                            p.resend_planned = true;
                            if self.chance(self.knobs.p_resend) {
                                // A re-send of an answered request, at any
                                // time up to past the retention.
                                let h = self.window.retention_ms as u64;
                                let d = self.rng.random_range(1..h * 13 / 10);
                                self.timer(c, d, Timer::ClientSend { purchase });
                            }
                        }
                    }
                    Err(e) => {
                        self.ground.error(purchase, &req, e, now);
                        if was_waiting
                            && matches!(
                                e.code,
                                Code::Busy | Code::Unavailable | Code::OutcomeUnknown
                            )
                        {
                            self.retry_later(c, purchase);
                        }
                    }
                }
            }
            Msg::NoResponders { rpc } => {
                let purchase = rpc as usize;
                if self.purchases[purchase].waiting.take().is_some() {
                    self.retry_later(c, purchase);
                }
            }
            other => unreachable!("client got {other:?}"),
        }
    }

    fn is_client(&self, n: usize) -> bool {
        n >= self.lay.client(0) && n < self.lay.client(self.knobs.clients)
    }

    // ---- dispatch by node --------------------------------------------

    fn on_msg(&mut self, from: usize, to: usize, msg: Msg) {
        if self.lay.is_replica(to) {
            self.on_replica_msg(from, to, msg);
        } else if self.lay.is_participant(to) {
            self.on_part_msg(to, from, msg);
        } else if self.is_client(to) {
            self.on_client_msg(to, msg);
        }
    }

    fn on_timer(&mut self, node: usize, t: Timer) {
        if self.lay.is_replica(node) {
            self.on_replica_timer(node, t);
        } else if self.lay.is_participant(node) {
            self.on_part_timer(node, t);
        } else {
            self.on_client_timer(node, t);
        }
    }

    // ---- faults --------------------------------------------------------

    fn on_fault(&mut self, f: Fault) {
        match f {
            Fault::Pause(n) => {
                if self.status.get(&n) == Some(&Status::Up) && !self.healed {
                    self.status.insert(n, Status::Paused);
                }
            }
            Fault::Resume(n) => self.resume(n),
            Fault::Crash(n) => {
                if self.status.get(&n) != Some(&Status::Down) && !self.healed {
                    self.crash(n);
                }
            }
            Fault::Restart(n) => self.restart(n),
            Fault::Cut(a, b) => {
                if !self.healed {
                    self.cuts.insert((a.min(b), a.max(b)));
                }
            }
            Fault::Mend(a, b) => {
                self.cuts.remove(&(a.min(b), a.max(b)));
            }
            Fault::ClockStep(n, step) => {
                let mut sh = self.shared.lock().expect("lock");
                let s = sh.skew_ms.entry(n).or_insert(0);
                let bound = self.window.max_skew_ms / 2;
                *s = (*s + step).clamp(-bound, bound);
            }
            Fault::Heal => {
                self.healed = true;
                self.cuts.clear();
                let nodes: Vec<usize> = self.status.keys().copied().collect();
                for n in nodes {
                    match self.status.get(&n) {
                        Some(Status::Paused) => self.resume(n),
                        Some(Status::Down) => self.restart(n),
                        _ => {}
                    }
                }
                self.at(100_000, Ev::CheckDone);
            }
        }
    }

    fn resume(&mut self, n: usize) {
        if self.status.get(&n) != Some(&Status::Paused) {
            return;
        }
        self.status.insert(n, Status::Up);
        // What arrived meanwhile, in order, now.
        for ev in self.held.remove(&n).unwrap_or_default() {
            self.seq += 1;
            let at_us = self.now_us();
            self.queue.push(Scheduled {
                at_us,
                seq: self.seq,
                ev,
            });
        }
    }

    fn crash(&mut self, n: usize) {
        self.status.insert(n, Status::Down);
        *self.inc.entry(n).or_insert(0) += 1;
        self.held.remove(&n);
        // Its waits end with it; calls already sent may still land.
        self.calls.retain(|_, (node, _)| *node != n);
        self.sleeps.retain(|_, (node, _)| *node != n);
        if self.lay.is_replica(n) {
            self.replicas[n] = None;
        } else if let Some(p) = self.parts.get_mut(&n) {
            p.queries.clear();
        }
    }

    fn restart(&mut self, n: usize) {
        if self.status.get(&n) != Some(&Status::Down) {
            return;
        }
        if self.lay.is_replica(n) {
            self.start_replica(n);
        } else {
            self.start_part(n);
        }
    }

    // ---- the end -------------------------------------------------------

    /// What is still going on (empty: finished): in flight at the
    /// participants, undelivered in the log, or clients still waiting.
    fn unfinished(&self) -> Vec<String> {
        let mut v = vec![];
        for (n, p) in &self.parts {
            let prepared: i64 = p
                .conn
                .query_row(
                    "SELECT count(*) FROM branches WHERE state = 'prepared'",
                    [],
                    |r| r.get(0),
                )
                .expect("count");
            if prepared > 0 {
                v.push(format!("{} (node {n}) has {prepared} prepared", p.name));
            }
        }
        let pending = check::undelivered(&self.kv);
        if !pending.is_empty() {
            v.push(format!("undelivered decisions: {pending:?}"));
        }
        let waiting = self
            .purchases
            .iter()
            .filter(|p| p.waiting.is_some())
            .count();
        if waiting > 0 {
            v.push(format!("{waiting} purchases waiting for an answer"));
        }
        if !self.queue.iter().all(|s| {
            !matches!(
                s.ev,
                Ev::Timer {
                    t: Timer::ClientSend { .. },
                    ..
                }
            )
        }) {
            v.push("client sends still planned".into());
        }
        v
    }

    fn check(&self) -> Vec<String> {
        let wallet = {
            let p = &self.parts[&self.lay.wallet()];
            twopc_participants::wallet::snapshot(&p.conn).expect("wallet snapshot")
        };
        let order = {
            let p = &self.parts[&self.lay.order()];
            twopc_participants::order::snapshot(&p.conn).expect("order snapshot")
        };
        let wallet2 = self
            .parts
            .get(&self.lay.wallet2())
            .map(|p| twopc_participants::wallet::snapshot(&p.conn).expect("wallet snapshot"));
        check::all(
            &self.ground,
            &self.kv,
            wallet,
            wallet2,
            order,
            self.window.retention_ms as u64 * 1_000,
        )
    }
}

/// Cheap fingerprints of events for the trace hash (time, ids and kinds,
/// not whole values: formatting every value was most of a run's time).
fn msg_kind(m: &Msg) -> u8 {
    match m {
        Msg::Purchase { .. } => 1,
        Msg::PurchaseReply { reply, .. } => 2 + u8::from(reply.is_ok()),
        Msg::Prepare { .. } => 4,
        Msg::Vote { vote, .. } => 5 + u8::from(matches!(vote, Vote::Yes)),
        Msg::Decide { msg, .. } => 7 + u8::from(msg.decision == Decision::Commit),
        Msg::DecideAck { reply, .. } => 9 + u8::from(matches!(reply, DecideReply::Ack)),
        Msg::Query { .. } => 11,
        Msg::Answer { .. } => 12,
        Msg::NoResponders { .. } => 13,
    }
}

fn timer_kind(t: &Timer) -> u8 {
    match t {
        Timer::RpcTimeout(_) => 1,
        Timer::PrepareRetry(_) => 2,
        Timer::RetryDue(_) => 3,
        Timer::Sweep => 4,
        Timer::Collect => 5,
        Timer::Recovery => 6,
        Timer::PartCollect => 7,
        Timer::QueryTimeout(_) => 8,
        Timer::SendLater { msg, .. } => 16 + msg_kind(msg),
        Timer::DelayedPrepare { .. } => 9,
        Timer::ClientSend { .. } => 10,
        Timer::ClientTimeout { .. } => 11,
    }
}

fn result_kind(r: &KvResult) -> u8 {
    match r {
        KvResult::Create(c) => 1 + matches!(c, twopc_coordinator::kv::Create::Written) as u8,
        KvResult::Update(u) => 3 + matches!(u, twopc_coordinator::kv::Update::Written) as u8,
        KvResult::Latest(e) => 5 + e.is_some() as u8,
        KvResult::Deleted(d) => 7 + *d as u8,
        KvResult::Scan(all) => 9u8.wrapping_add(all.len() as u8),
        KvResult::TimedOut => 0,
    }
}

fn describe(ev: &Ev) -> String {
    match ev {
        Ev::Msg { from, to, msg } => format!("msg {from}->{to} {msg:?}"),
        Ev::Timer { node, t, .. } => format!("timer {node} {t:?}"),
        Ev::KvArrive {
            call,
            op,
            lose_answer,
        } => {
            let op = match op {
                KvOp::Create { key, value } | KvOp::Update { key, value, .. } => format!(
                    "{} {key} {}",
                    if matches!(op, KvOp::Create { .. }) {
                        "create"
                    } else {
                        "update"
                    },
                    String::from_utf8_lossy(value)
                ),
                other => format!("{other:?}"),
            };
            format!("kv arrive #{call} {op} lose_answer={lose_answer}")
        }
        Ev::KvBack { call, result } => format!("kv back #{call} {result:?}"),
        Ev::KvTimeout { call } => format!("kv timeout #{call}"),
        Ev::Wake { sleep } => format!("wake {sleep}"),
        Ev::Fault(f) => format!("FAULT {f:?}"),
        Ev::CheckDone => "check done".into(),
    }
}

/// The one shop client of the simulation.
fn shop_client() -> ClientName {
    ClientName::new(twopc_schemas::client::DEFAULT_CLIENT).expect("the default client's name")
}

fn trace() -> TraceContext {
    TraceContext {
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        span_id: "b7ad6b7169203331".into(),
    }
}

fn new_part(kind: Kind) -> Part {
    let mut conn = Connection::open_in_memory().expect("in-memory SQLite");
    let (name, migrations) = match kind {
        Kind::Wallet => (Wallet.name(), Wallet.migrations()),
        Kind::Order => (Order.name(), Order.migrations()),
    };
    twopc_common::db::migrate(&mut conn, migrations).expect("migrations");
    library_schema(&conn).expect("library schema");
    match kind {
        Kind::Wallet => {
            for (user, balance) in USERS {
                conn.execute(
                    "INSERT INTO users (user, balance) VALUES (?1, ?2)",
                    rusqlite::params![user, balance as i64],
                )
                .expect("seed user");
            }
        }
        Kind::Order => {
            for (sku, price, stock) in PRODUCTS {
                conn.execute(
                    "INSERT INTO products (sku, price, stock) VALUES (?1, ?2, ?3)",
                    rusqlite::params![sku, price as i64, stock as i64],
                )
                .expect("seed product");
            }
        }
    }
    Part {
        kind,
        name,
        conn,
        tracker: Tracker::new(),
        started_after_rowid: 0,
        queries: BTreeMap::new(),
    }
}
