//! `twopc bench`: purchases per second and latency, with the baselines that
//! bound them measured in the same run and at the same concurrency.
//!
//! * purchases: closed loop (`concurrency` clients, each sends its next
//!   purchase when the last is answered) or open loop (`rate` purchases per
//!   second, whatever the answers do); a share bound to abort;
//! * NATS baseline: request-reply against an empty responder, same
//!   concurrency;
//! * disk baseline: SQLite WAL `synchronous=FULL` single-row commits in the
//!   same data folder;
//! * KV-create baseline (on a cluster): put-if-absent of fresh keys into a
//!   replicated JetStream KV bucket configured as the decision log's, the
//!   cluster's counterpart of the disk baseline (one `create` is what the
//!   KV decision log writes per decision);
//! * windows without a commit ([`purchases_during`]): the closed loop runs
//!   while something else happens (a NATS node killed and restarted) and
//!   every commit's time is noted;
//! * ratios: purchases/s ÷ (request-reply rate ÷ 5) — a purchase is five
//!   request-replies — and p50 at concurrency 1 ÷ (2 round trips + 2 forced
//!   writes), the latency floor.
//!
//! A benchmark, not a test: it asserts nothing about time.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use twopc_schemas::api::{CreateProduct, CreateUser, Outcome, PurchaseReply, PurchaseRequest};
use twopc_schemas::Code;

use twopc_launcher::client::{request, Reply, Shop};

/// How to load the system.
#[derive(Debug, Clone)]
pub struct Config {
    /// Purchases in flight (closed loop), or the open loop's cap on
    /// purchases in flight.
    pub concurrency: usize,
    /// Open loop: purchases started per second. `None`: closed loop.
    pub rate: Option<u64>,
    pub duration: Duration,
    /// Share of purchases bound to abort (a wrong price).
    pub abort_share: f64,
    /// Users and products the load spreads over.
    pub users: usize,
    pub products: usize,
    /// Per-purchase timeout at the client.
    pub timeout: Duration,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// One purchase load's results.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub concurrency: usize,
    pub rate: Option<u64>,
    pub seconds: f64,
    pub committed: u64,
    pub aborted: u64,
    pub busy: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub committed_per_s: f64,
    pub aborted_per_s: f64,
    /// Latency of answered purchases (committed or aborted).
    pub latency: Latency,
}

/// The NATS-only baseline.
#[derive(Debug, Clone, Serialize)]
pub struct NatsBaseline {
    pub concurrency: usize,
    pub requests_per_s: f64,
    pub latency: Latency,
}

/// The disk baseline.
#[derive(Debug, Clone, Serialize)]
pub struct DiskBaseline {
    pub commits_per_s: f64,
    pub latency: Latency,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn bar(progress: bool, duration: Duration, label: String) -> Option<indicatif::ProgressBar> {
    if !progress {
        return None;
    }
    let pb = indicatif::ProgressBar::new(duration.as_millis() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>28} [{bar:30}] {elapsed}/{duration} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(label);
    Some(pb)
}

/// Creates the benchmark's users and products (idempotent): balances and
/// stock large enough that no purchase runs out.
pub async fn seed(client: &async_nats::Client, cfg: &Config) -> anyhow::Result<Vec<(String, u64)>> {
    let users: Vec<CreateUser> = (0..cfg.users)
        .map(|i| CreateUser {
            user: format!("bench-user-{i}"),
            balance: 1_000_000_000_000_000,
        })
        .collect();
    let products: Vec<CreateProduct> = (0..cfg.products)
        .map(|i| CreateProduct {
            sku: format!("bench-sku-{i}"),
            price: 100 + 10 * i as u64,
            stock: 1_000_000_000,
        })
        .collect();
    twopc_launcher::seed(client, &users, &products, true).await?;
    Ok(products.into_iter().map(|p| (p.sku, p.price)).collect())
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    aborted: AtomicU64,
    busy: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    seq: AtomicU64,
    /// Commit times, when the run notes them ([`purchases_during`]).
    gaps: Option<Mutex<GapTracker>>,
}

/// Windows without a commit shorter than this are not listed one by one
/// (only the longest is kept).
const GAP_LISTED_MS: u64 = 500;

/// Most windows listed.
const GAPS_LISTED: usize = 64;

/// Notes each commit and keeps the windows between consecutive ones.
struct GapTracker {
    start: Instant,
    last: Instant,
    commits: u64,
    longest: Window,
    windows: Vec<Window>,
}

/// A time without a commit, in milliseconds from the load's start.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct Window {
    pub from_ms: u64,
    pub length_ms: u64,
}

impl GapTracker {
    fn new(start: Instant) -> Self {
        GapTracker {
            start,
            last: start,
            commits: 0,
            longest: Window::default(),
            windows: vec![],
        }
    }

    /// A commit answered at `at` (or, from [`GapTracker::finish`], the end).
    fn note(&mut self, at: Instant) {
        let at = at.max(self.last);
        let w = Window {
            from_ms: self.last.duration_since(self.start).as_millis() as u64,
            length_ms: at.duration_since(self.last).as_millis() as u64,
        };
        if w.length_ms > self.longest.length_ms {
            self.longest = w;
        }
        if w.length_ms >= GAP_LISTED_MS && self.windows.len() < GAPS_LISTED {
            self.windows.push(w);
        }
        self.last = at;
    }

    fn commit(&mut self, at: Instant) {
        self.commits += 1;
        self.note(at);
    }

    /// The windows from the load's start to `end` (the time from the last
    /// commit to the end counts too).
    fn finish(mut self, end: Instant) -> Gaps {
        self.note(end);
        Gaps {
            commits: self.commits,
            longest: self.longest,
            windows: self.windows,
        }
    }
}

/// The windows without a commit of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Gaps {
    pub commits: u64,
    /// The longest window without a commit, from the load's start to its
    /// end (the first commit's wait and the time after the last count).
    pub longest: Window,
    /// Every window of at least 500 ms (the first 64).
    pub windows: Vec<Window>,
}

/// A token of this bench process, so that request ids of separate runs
/// against one system never meet.
fn run_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| uuid::Uuid::now_v7().simple().to_string()[..16].to_owned())
}

async fn one_purchase(
    client: &Shop,
    cfg: &Config,
    catalogue: &[(String, u64)],
    counters: &Counters,
    hist: &Mutex<Histogram<u64>>,
) {
    let n = counters.seq.fetch_add(1, Ordering::Relaxed);
    let (sku, price) = &catalogue[(n as usize * 7) % catalogue.len()];
    let qty = 1 + n % 3;
    // Deterministic mix: every k-th purchase quotes a wrong price.
    let bad =
        cfg.abort_share > 0.0 && (n as f64 * cfg.abort_share).fract() + cfg.abort_share >= 1.0;
    let req = PurchaseRequest {
        user: format!("bench-user-{}", n as usize % cfg.users),
        sku: sku.clone(),
        qty,
        amount: price * qty + u64::from(bad),
        // As real clients send them: every purchase has its own key (the
        // coordinator looks each up before starting the transaction).
        request_id: Some(format!("bench-{}-{n}", run_token())),
    };
    let t0 = Instant::now();
    let subject = client.purchase_subject();
    let r = request::<_, PurchaseReply>(&client.client, &subject, &req, cfg.timeout).await;
    let us = t0.elapsed().as_micros() as u64;
    match r {
        Ok(Reply::Ok(p)) => {
            match p.outcome {
                Outcome::Committed => {
                    counters.committed.fetch_add(1, Ordering::Relaxed);
                    if let Some(g) = &counters.gaps {
                        g.lock().expect("lock").commit(Instant::now());
                    }
                }
                Outcome::Aborted => {
                    counters.aborted.fetch_add(1, Ordering::Relaxed);
                }
            };
            let _ = hist.lock().expect("lock").record(us.max(1));
        }
        Ok(Reply::Err(e)) if e.error.code == Code::Busy => {
            counters.busy.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Reply::Err(_)) => {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            counters.timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the purchase load for `cfg.duration`.
pub async fn purchases(client: &Shop, cfg: &Config, catalogue: &[(String, u64)]) -> LoadResult {
    let (load, _, _, ()) = run_load(
        client,
        cfg,
        catalogue,
        tokio::time::sleep(cfg.duration),
        false,
    )
    .await;
    load
}

/// One load while `during` runs: the purchase load (closed loop at
/// `cfg.concurrency`; `cfg.duration` only sizes the progress bar) starts,
/// then `during` runs to its end, then the load goes on for `after`. Every
/// commit's time is noted: the windows without one are in the [`Gaps`].
/// Also returns when the load started (the windows count from it) and what
/// `during` returned.
pub async fn purchases_during<F: Future>(
    client: &Shop,
    cfg: &Config,
    catalogue: &[(String, u64)],
    during: F,
    after: Duration,
) -> (LoadResult, Gaps, Instant, F::Output) {
    let mut cfg = cfg.clone();
    cfg.rate = None;
    let until = async move {
        let out = during.await;
        tokio::time::sleep(after).await;
        out
    };
    let (load, gaps, start, out) = run_load(client, &cfg, catalogue, until, true).await;
    (load, gaps.expect("gaps noted"), start, out)
}

/// The purchase load until `until` completes (closed loop: purchases in
/// flight then finish; open loop: no new ones start); also when it started.
async fn run_load<F: Future>(
    client: &Shop,
    cfg: &Config,
    catalogue: &[(String, u64)],
    until: F,
    note_commits: bool,
) -> (LoadResult, Option<Gaps>, Instant, F::Output) {
    let start = Instant::now();
    let counters = Arc::new(Counters {
        gaps: note_commits.then(|| Mutex::new(GapTracker::new(start))),
        ..Default::default()
    });
    let hist = Arc::new(Mutex::new(histogram()));
    let label = match cfg.rate {
        Some(r) => format!("purchases @ {r}/s"),
        None => format!("purchases × {}", cfg.concurrency),
    };
    let pb = bar(cfg.progress, cfg.duration, label);
    let stop = Arc::new(AtomicBool::new(false));
    let catalogue: Arc<Vec<(String, u64)>> = Arc::new(catalogue.to_vec());
    let mut tasks = vec![];
    match cfg.rate {
        None => {
            for _ in 0..cfg.concurrency {
                let (client, cfg, catalogue, counters, hist, stop) = (
                    client.clone(),
                    cfg.clone(),
                    catalogue.clone(),
                    counters.clone(),
                    hist.clone(),
                    stop.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        one_purchase(&client, &cfg, &catalogue, &counters, &hist).await;
                    }
                }));
            }
        }
        Some(rate) => {
            // Open loop: start purchases on a fixed schedule; past the
            // in-flight cap a purchase counts as shed by the client.
            let inflight = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let (client, cfg2, catalogue, counters2, hist2, stop) = (
                client.clone(),
                cfg.clone(),
                catalogue.clone(),
                counters.clone(),
                hist.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut next = Instant::now();
                loop {
                    tokio::time::sleep_until(next.into()).await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    next += interval;
                    let Ok(permit) = inflight.clone().try_acquire_owned() else {
                        counters2.busy.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let (client, cfg, catalogue, counters, hist) = (
                        client.clone(),
                        cfg2.clone(),
                        catalogue.clone(),
                        counters2.clone(),
                        hist2.clone(),
                    );
                    tokio::spawn(async move {
                        one_purchase(&client, &cfg, &catalogue, &counters, &hist).await;
                        drop(permit);
                    });
                }
                // Let the last purchases finish.
                let _ = inflight.acquire_many(cfg2.concurrency.max(1) as u32).await;
            }));
        }
    }
    let done = Arc::new(AtomicBool::new(false));
    let ticker = pb.clone().map(|pb| {
        let done = done.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                pb.set_position(start.elapsed().as_millis() as u64);
                let secs = start.elapsed().as_secs_f64().max(0.001);
                pb.set_message(format!(
                    "{:.0} committed/s",
                    counters.committed.load(Ordering::Relaxed) as f64 / secs
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let out = until.await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let end = Instant::now();
    done.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.await;
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let seconds = end.duration_since(start).as_secs_f64();
    let h = hist.lock().expect("lock");
    let committed = counters.committed.load(Ordering::Relaxed);
    let aborted = counters.aborted.load(Ordering::Relaxed);
    let gaps = counters.gaps.as_ref().map(|g| {
        std::mem::replace(&mut *g.lock().expect("lock"), GapTracker::new(start)).finish(end)
    });
    let load = LoadResult {
        concurrency: cfg.concurrency,
        rate: cfg.rate,
        seconds,
        committed,
        aborted,
        busy: counters.busy.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        timeouts: counters.timeouts.load(Ordering::Relaxed),
        committed_per_s: committed as f64 / seconds,
        aborted_per_s: aborted as f64 / seconds,
        latency: Latency::of(&h),
    };
    (load, gaps, start, out)
}

/// The empty responder of the NATS baseline: replies with nothing to every
/// request on `subject`. Runs in its own process (`twopc echo`), so the
/// baseline crosses processes as a purchase's request-replies do.
pub async fn echo(client: async_nats::Client, subject: String) -> anyhow::Result<()> {
    let mut sub = client.subscribe(subject).await?;
    while let Some(m) = sub.next().await {
        if let Some(reply) = m.reply {
            client.publish(reply, bytes::Bytes::new()).await?;
        }
    }
    Ok(())
}

/// Request-reply against an empty responder process at `concurrency`.
pub async fn nats_baseline(
    client: &async_nats::Client,
    nats_url: &str,
    concurrency: usize,
    duration: Duration,
    progress: bool,
) -> anyhow::Result<NatsBaseline> {
    let subject = format!("twopc.bench.echo.{}", uuid::Uuid::now_v7().simple());
    let mut responder = tokio::process::Command::new(std::env::current_exe()?)
        .args(["echo", "--subject", &subject])
        .env("NATS_URL", nats_url)
        .kill_on_drop(true)
        .spawn()?;
    // Ready when it answers.
    let ready_by = Instant::now() + Duration::from_secs(10);
    loop {
        let req = async_nats::Request::new().timeout(Some(Duration::from_millis(200)));
        if client.send_request(subject.clone(), req).await.is_ok() {
            break;
        }
        anyhow::ensure!(Instant::now() < ready_by, "echo responder did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hist = Arc::new(Mutex::new(histogram()));
    let count = Arc::new(AtomicU64::new(0));
    let pb = bar(
        progress,
        duration,
        format!("NATS request-reply × {concurrency}"),
    );
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = vec![];
    for _ in 0..concurrency {
        let (client, subject, hist, count) =
            (client.clone(), subject.clone(), hist.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            // Same payload size class as a purchase.
            let payload = bytes::Bytes::from(vec![b'x'; 80]);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let req = async_nats::Request::new()
                    .payload(payload.clone())
                    .timeout(Some(Duration::from_secs(5)));
                if client.send_request(subject.clone(), req).await.is_ok() {
                    let _ = hist
                        .lock()
                        .expect("lock")
                        .record((t0.elapsed().as_micros() as u64).max(1));
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let _ = responder.kill().await;
    let secs = start.elapsed().as_secs_f64();
    let h = hist.lock().expect("lock");
    Ok(NatsBaseline {
        concurrency,
        requests_per_s: count.load(Ordering::Relaxed) as f64 / secs,
        latency: Latency::of(&h),
    })
}

/// Single-row commits with WAL and synchronous=FULL, in `dir`.
pub fn disk_baseline(dir: &Path, duration: Duration) -> anyhow::Result<DiskBaseline> {
    let path = dir.join(format!("bench-disk-{}.db", std::process::id()));
    let result = (|| -> anyhow::Result<DiskBaseline> {
        let conn =
            twopc_common::db::open(&path, &["CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"])?;
        let mut hist = histogram();
        let start = Instant::now();
        let mut n = 0u64;
        let value = vec![7u8; 100];
        while start.elapsed() < duration {
            let t0 = Instant::now();
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&value])?;
            let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
            n += 1;
        }
        Ok(DiskBaseline {
            commits_per_s: n as f64 / start.elapsed().as_secs_f64(),
            latency: Latency::of(&hist),
        })
    })();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    result
}

/// The KV-create baseline.
#[derive(Debug, Clone, Serialize)]
pub struct KvBaseline {
    /// Copies of each key (the bucket's replicas).
    pub replicas: usize,
    /// Creates in flight.
    pub concurrency: usize,
    pub creates_per_s: f64,
    /// Creates that failed (any error: none is expected).
    pub errors: u64,
    pub latency: Latency,
}

/// Bytes of each value the KV baseline writes: about a decision record's
/// (the coordinator's JSON record of a purchase with two votes).
pub const KV_BASELINE_VALUE_BYTES: usize = 400;

/// Put-if-absent (`create`) of fresh keys, `concurrency` in flight, for
/// `duration`, into a bucket of its own made as the KV decision log makes
/// its bucket (file storage, `replicas` copies, history 1, per-message
/// TTLs), deleted afterwards. With `concurrency` 1 it is the cluster's
/// counterpart of [`disk_baseline`]: one durable write, waited for, then the
/// next. The servers' `sync_interval` is theirs (the launcher's config says
/// `always`).
pub async fn kv_baseline(
    client: &async_nats::Client,
    replicas: usize,
    concurrency: usize,
    duration: Duration,
    progress: bool,
) -> anyhow::Result<KvBaseline> {
    use async_nats::jetstream::{self, kv};
    let js = jetstream::new(client.clone());
    let bucket = format!("twopc_bench_kv_{}", uuid::Uuid::now_v7().simple());
    let store = js
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            description: "twopc bench: KV-create baseline (deleted after the run)".into(),
            history: 1,
            max_value_size: 64 * 1024,
            num_replicas: replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            limit_markers: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .await?;
    // The first write after a bucket is made may wait for its stream's
    // leader: one, untimed.
    store.create("warm-up", bytes::Bytes::new()).await?;
    let concurrency = concurrency.max(1);
    let hist = Arc::new(Mutex::new(histogram()));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let pb = bar(
        progress,
        duration,
        format!("KV create R{replicas} × {concurrency}"),
    );
    let start = Instant::now();
    let deadline = start + duration;
    let value = bytes::Bytes::from(vec![b'x'; KV_BASELINE_VALUE_BYTES]);
    let mut tasks = vec![];
    for _ in 0..concurrency {
        let (store, value, hist, count, errors, seq) = (
            store.clone(),
            value.clone(),
            hist.clone(),
            count.clone(),
            errors.clone(),
            seq.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let key = format!("k.{}", seq.fetch_add(1, Ordering::Relaxed));
                let t0 = Instant::now();
                match store.create(&key, value.clone()).await {
                    Ok(_) => {
                        let _ = hist
                            .lock()
                            .expect("lock")
                            .record((t0.elapsed().as_micros() as u64).max(1));
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let _ = js.delete_key_value(&bucket).await;
    let h = hist.lock().expect("lock");
    Ok(KvBaseline {
        replicas: replicas.max(1),
        concurrency,
        creates_per_s: count.load(Ordering::Relaxed) as f64 / secs,
        errors: errors.load(Ordering::Relaxed),
        latency: Latency::of(&h),
    })
}

/// Whether a measurement meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    NotMet,
    /// Its measurement was not made in this run.
    NotMeasured,
    /// The run's measurements contradict each other (a baseline slower
    /// than the purchase it is part of: the machine was disturbed while it
    /// ran); run again.
    Inconclusive,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT MET",
            Verdict::NotMeasured => "not measured",
            Verdict::Inconclusive => "inconclusive",
        })
    }
}

/// One target of the cluster comparison, computed from the run.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What it asks, in words.
    pub target: String,
    /// The measured value, in the unit of `limit`.
    pub measured: Option<f64>,
    pub limit: f64,
    pub verdict: Verdict,
    /// The numbers it comes from.
    pub detail: String,
}

/// The concurrency of the throughput target.
pub const TARGET_THROUGHPUT_CONCURRENCY: usize = 256;
/// Cluster committed/s at least this share of single-node committed/s.
pub const TARGET_THROUGHPUT_RATIO: f64 = 0.5;
/// Cluster p50 at concurrency 1 at most this many times the prediction.
pub const TARGET_LATENCY_RATIO: f64 = 1.25;
/// Longest window without a commit during a NATS-node kill, in seconds.
pub const TARGET_LONGEST_GAP_S: f64 = 5.0;

/// What a cluster comparison measured, for [`cluster_targets`].
#[derive(Debug, Clone)]
pub struct Comparison<'a> {
    /// The single-node system's loads (SQLite decision log).
    pub single: &'a [LoadResult],
    /// The cluster's loads (KV decision log).
    pub cluster: &'a [LoadResult],
    /// The disk baseline's p50 (single-row SQLite commit), µs.
    pub disk_p50_us: u64,
    /// The KV-create baseline's p50 at concurrency 1, µs.
    pub kv_create_p50_us: u64,
    /// The longest window without a commit over the NATS-node kills, ms
    /// (`None`: none was made).
    pub longest_gap_ms: Option<u64>,
}

fn closed_loop(loads: &[LoadResult], c: usize) -> Option<&LoadResult> {
    loads
        .iter()
        .find(|l| l.rate.is_none() && l.concurrency == c)
}

/// The three targets, each computed from the run:
///
/// 1. at concurrency 256 the cluster commits at least half the single
///    node's rate;
/// 2. the cluster's p50 at concurrency 1 is at most 1.25 × (single-node p50
///    − disk-commit p50 + KV-create p50): the decision write is the one
///    step that changes;
/// 3. no window longer than 5 s without a commit while a NATS node is
///    killed and restarted under load.
pub fn cluster_targets(m: &Comparison<'_>) -> Vec<Target> {
    let c = TARGET_THROUGHPUT_CONCURRENCY;
    let throughput = match (closed_loop(m.single, c), closed_loop(m.cluster, c)) {
        (Some(s), Some(k)) if s.committed_per_s > 0.0 => {
            let ratio = k.committed_per_s / s.committed_per_s;
            Target {
                target: format!(
                    "c={c}: cluster committed/s ≥ {TARGET_THROUGHPUT_RATIO} × single-node"
                ),
                measured: Some(ratio),
                limit: TARGET_THROUGHPUT_RATIO,
                verdict: if ratio >= TARGET_THROUGHPUT_RATIO {
                    Verdict::Met
                } else {
                    Verdict::NotMet
                },
                detail: format!(
                    "{:.0}/s ÷ {:.0}/s = {ratio:.2}",
                    k.committed_per_s, s.committed_per_s
                ),
            }
        }
        _ => Target {
            target: format!("c={c}: cluster committed/s ≥ {TARGET_THROUGHPUT_RATIO} × single-node"),
            measured: None,
            limit: TARGET_THROUGHPUT_RATIO,
            verdict: Verdict::NotMeasured,
            detail: format!("no closed-loop run at concurrency {c} on both systems"),
        },
    };
    let latency_name = format!(
        "c=1: cluster p50 ≤ {TARGET_LATENCY_RATIO} × (single p50 − disk p50 + KV-create p50)"
    );
    let latency = match (closed_loop(m.single, 1), closed_loop(m.cluster, 1)) {
        (Some(s), Some(k)) => {
            let predicted = (s.latency.p50_us + m.kv_create_p50_us)
                .saturating_sub(m.disk_p50_us)
                .max(1);
            let ratio = k.latency.p50_us as f64 / predicted as f64;
            let detail = format!(
                "{} µs ÷ ({} − {} + {} = {predicted} µs) = {ratio:.2}",
                k.latency.p50_us, s.latency.p50_us, m.disk_p50_us, m.kv_create_p50_us
            );
            // A purchase waits for two forced writes in a row (a prepare,
            // then the decision): one commit as slow as a whole purchase
            // was measured while something else had the disk.
            if m.disk_p50_us >= s.latency.p50_us {
                Target {
                    target: latency_name,
                    measured: Some(ratio),
                    limit: TARGET_LATENCY_RATIO,
                    verdict: Verdict::Inconclusive,
                    detail: format!(
                        "{detail}; the disk baseline's p50 is not below the single-node \
                         purchase p50 it is part of"
                    ),
                }
            } else {
                Target {
                    target: latency_name,
                    measured: Some(ratio),
                    limit: TARGET_LATENCY_RATIO,
                    verdict: if ratio <= TARGET_LATENCY_RATIO {
                        Verdict::Met
                    } else {
                        Verdict::NotMet
                    },
                    detail,
                }
            }
        }
        _ => Target {
            target: latency_name,
            measured: None,
            limit: TARGET_LATENCY_RATIO,
            verdict: Verdict::NotMeasured,
            detail: "no closed-loop run at concurrency 1 on both systems".into(),
        },
    };
    let gap_name =
        format!("NATS-node kill under load: no window > {TARGET_LONGEST_GAP_S} s without a commit");
    let gap = match m.longest_gap_ms {
        Some(ms) => {
            let s = ms as f64 / 1000.0;
            Target {
                target: gap_name,
                measured: Some(s),
                limit: TARGET_LONGEST_GAP_S,
                verdict: if s <= TARGET_LONGEST_GAP_S {
                    Verdict::Met
                } else {
                    Verdict::NotMet
                },
                detail: format!("longest window {s:.2} s over every kill"),
            }
        }
        None => Target {
            target: gap_name,
            measured: None,
            limit: TARGET_LONGEST_GAP_S,
            verdict: Verdict::NotMeasured,
            detail: "no node was killed in this run".into(),
        },
    };
    vec![throughput, latency, gap]
}

/// Resident memory of a process, in KiB (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(concurrency: usize, committed_per_s: f64, p50_us: u64) -> LoadResult {
        LoadResult {
            concurrency,
            rate: None,
            seconds: 10.0,
            committed: (committed_per_s * 10.0) as u64,
            aborted: 0,
            busy: 0,
            errors: 0,
            timeouts: 0,
            committed_per_s,
            aborted_per_s: 0.0,
            latency: Latency {
                p50_us,
                ..Default::default()
            },
        }
    }

    #[test]
    fn targets_are_computed_from_the_measurements() {
        let single = [load(1, 900.0, 1_100), load(256, 10_000.0, 20_000)];
        let cluster = [load(1, 250.0, 4_000), load(256, 4_000.0, 60_000)];
        let t = cluster_targets(&Comparison {
            single: &single,
            cluster: &cluster,
            disk_p50_us: 100,
            kv_create_p50_us: 3_000,
            longest_gap_ms: Some(4_200),
        });
        assert_eq!(t.len(), 3);
        // 4,000 ÷ 10,000 = 0.4 < 0.5.
        assert_eq!(t[0].verdict, Verdict::NotMet);
        assert!((t[0].measured.unwrap() - 0.4).abs() < 1e-9);
        // 4,000 ÷ (1,100 − 100 + 3,000) = 1.0 ≤ 1.25.
        assert_eq!(t[1].verdict, Verdict::Met);
        assert!((t[1].measured.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(t[2].verdict, Verdict::Met);

        let t = cluster_targets(&Comparison {
            single: &single[..1],
            cluster: &cluster,
            disk_p50_us: 100,
            kv_create_p50_us: 3_000,
            longest_gap_ms: Some(5_001),
        });
        assert_eq!(t[0].verdict, Verdict::NotMeasured, "no c=256 single run");
        assert_eq!(t[2].verdict, Verdict::NotMet);
        let t = cluster_targets(&Comparison {
            single: &single,
            cluster: &cluster,
            disk_p50_us: 100,
            kv_create_p50_us: 3_000,
            longest_gap_ms: None,
        });
        assert_eq!(t[2].verdict, Verdict::NotMeasured);
        let t = cluster_targets(&Comparison {
            single: &single,
            cluster: &cluster,
            disk_p50_us: 1_100,
            kv_create_p50_us: 3_000,
            longest_gap_ms: None,
        });
        assert_eq!(
            t[1].verdict,
            Verdict::Inconclusive,
            "a commit as slow as a purchase: the baseline was disturbed"
        );
    }

    #[test]
    fn windows_without_a_commit_count_from_the_start_to_the_end() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut g = GapTracker::new(t0);
        g.commit(ms(100));
        g.commit(ms(200));
        g.commit(ms(2_200));
        g.commit(ms(2_300));
        let gaps = g.finish(ms(3_000));
        assert_eq!(gaps.commits, 4);
        assert_eq!(
            gaps.longest,
            Window {
                from_ms: 200,
                length_ms: 2_000
            }
        );
        assert_eq!(
            gaps.windows,
            [
                Window {
                    from_ms: 200,
                    length_ms: 2_000
                },
                Window {
                    from_ms: 2_300,
                    length_ms: 700
                }
            ],
            "the time after the last commit counts"
        );
    }

    #[test]
    fn no_commit_at_all_is_one_window_as_long_as_the_run() {
        let t0 = Instant::now();
        let gaps = GapTracker::new(t0).finish(t0 + Duration::from_secs(3));
        assert_eq!(gaps.commits, 0);
        assert_eq!(gaps.longest.length_ms, 3_000);
    }

    #[test]
    fn a_commit_noted_out_of_order_makes_no_negative_window() {
        let t0 = Instant::now();
        let mut g = GapTracker::new(t0);
        g.commit(t0 + Duration::from_millis(50));
        // Another client's commit, answered a moment earlier, took the lock
        // later.
        g.commit(t0 + Duration::from_millis(40));
        let gaps = g.finish(t0 + Duration::from_millis(60));
        assert_eq!(gaps.longest.length_ms, 50);
    }
}
