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
//! * ratios: purchases/s ÷ (request-reply rate ÷ 5) — a purchase is five
//!   request-replies — and p50 at concurrency 1 ÷ (2 round trips + 2 forced
//!   writes), the latency floor.
//!
//! A benchmark, not a test: it asserts nothing about time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use twopc_schemas::api::{CreateProduct, CreateUser, Outcome, PurchaseReply, PurchaseRequest};
use twopc_schemas::{subjects, Code};

use twopc_launcher::client::{request, Reply};

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
}

async fn one_purchase(
    client: &async_nats::Client,
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
        request_id: None,
    };
    let t0 = Instant::now();
    let r = request::<_, PurchaseReply>(client, subjects::PURCHASE, &req, cfg.timeout).await;
    let us = t0.elapsed().as_micros() as u64;
    match r {
        Ok(Reply::Ok(p)) => {
            match p.outcome {
                Outcome::Committed => counters.committed.fetch_add(1, Ordering::Relaxed),
                Outcome::Aborted => counters.aborted.fetch_add(1, Ordering::Relaxed),
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

/// Runs the purchase load.
pub async fn purchases(
    client: &async_nats::Client,
    cfg: &Config,
    catalogue: &[(String, u64)],
) -> LoadResult {
    let counters = Arc::new(Counters::default());
    let hist = Arc::new(Mutex::new(histogram()));
    let label = match cfg.rate {
        Some(r) => format!("purchases @ {r}/s"),
        None => format!("purchases × {}", cfg.concurrency),
    };
    let pb = bar(cfg.progress, cfg.duration, label);
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let catalogue: Arc<Vec<(String, u64)>> = Arc::new(catalogue.to_vec());
    let mut tasks = vec![];
    match cfg.rate {
        None => {
            for _ in 0..cfg.concurrency {
                let (client, cfg, catalogue, counters, hist) = (
                    client.clone(),
                    cfg.clone(),
                    catalogue.clone(),
                    counters.clone(),
                    hist.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < deadline {
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
            let (client, cfg2, catalogue, counters2, hist2) = (
                client.clone(),
                cfg.clone(),
                catalogue.clone(),
                counters.clone(),
                hist.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut next = Instant::now();
                while next < deadline {
                    tokio::time::sleep_until(next.into()).await;
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
    for t in tasks {
        let _ = t.await;
    }
    done.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.await;
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    let h = hist.lock().expect("lock");
    let committed = counters.committed.load(Ordering::Relaxed);
    let aborted = counters.aborted.load(Ordering::Relaxed);
    LoadResult {
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
    }
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
