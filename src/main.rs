//! `twopc`: run a local system and talk to it.
//!
//! Reads `NATS_URL` as the nats CLI does. See `twopc --help`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use serde_json::Value;
use twopc::chaos::FaultKind;
use twopc::client::{request, request_raw, Reply};
use twopc::launcher::{Binaries, Kind, NatsServer, Service, Settings};
use twopc_schemas::api::{
    Balance, CreateProduct, CreateUser, PurchaseReply, PurchaseRequest, Stock, StockQuery,
};
use twopc_schemas::{subjects, Code};

#[derive(Parser)]
#[command(
    version,
    about = "twopc: atomic purchases across microservices over NATS"
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "NATS_URL", default_value = twopc_common::nats::DEFAULT_URL)]
    nats_url: String,
    /// How long to wait for a reply, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start nats-server (unless NATS_URL is set) and the three services
    /// with demo users and products; Ctrl-C stops them.
    Up {
        /// Folder for the services' databases and logs.
        #[arg(long, default_value = ".twopc")]
        data_dir: PathBuf,
        /// Port of the nats-server started here (when NATS_URL is not set).
        #[arg(long, default_value_t = 4222)]
        port: u16,
        /// Do not create the demo users and products.
        #[arg(long)]
        no_demo: bool,
    },
    /// Buy `qty` of `sku` for `user`. The amount defaults to price × qty.
    Purchase {
        #[arg(long)]
        user: String,
        #[arg(long)]
        sku: String,
        #[arg(long, default_value_t = 1)]
        qty: u64,
        /// Total in minor units (cents); looked up when omitted.
        #[arg(long)]
        amount: Option<u64>,
        /// Idempotency key: retrying with it never charges twice.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// A user's balance.
    Balance { user: String },
    /// A product's price and stock.
    Stock { sku: String },
    /// A transaction's story: the coordinator's record and each participant.
    Tx { id: String },
    /// Transactions not yet resolved anywhere: in phase 1 or undelivered at
    /// the coordinator, prepared (in doubt) at a participant.
    InDoubt,
    /// Create a user with an opening balance (minor units).
    CreateUser {
        user: String,
        #[arg(long)]
        balance: u64,
    },
    /// Create a product with a unit price (minor units) and stock.
    CreateProduct {
        sku: String,
        #[arg(long)]
        price: u64,
        #[arg(long)]
        stock: u64,
    },
    /// Run a real system under a purchase workload while a seeded nemesis
    /// injects faults; then heal, wait for quiescence and check every
    /// invariant. Exits 1 if any invariant is violated.
    Chaos(ChaosArgs),
    /// Measure purchases/s and latency against a running system (NATS_URL)
    /// or one started here (--start), with same-run baselines and ratios.
    Bench(BenchArgs),
    /// Exit 0 if the named service answers `$SRV.PING.<service>` (for
    /// container health checks).
    Ping { service: String },
    /// The empty responder of the bench's NATS baseline (internal).
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        subject: String,
    },
    /// Create users and products from a JSON file:
    /// `{"users": [{"user", "balance"}], "products": [{"sku", "price", "stock"}]}`.
    Seed { file: PathBuf },
}

#[derive(clap::Args)]
struct ChaosArgs {
    /// How long to inject faults: `90s`, `10m`, `1h` (or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the fault schedule and workload (random when omitted; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Purchases in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 10)]
    users: usize,
    #[arg(long, default_value_t = 5)]
    products: usize,
    /// Opening balance of each user (minor units).
    #[arg(long, default_value_t = 1_000_000_000)]
    balance: u64,
    /// Opening stock of each product.
    #[arg(long, default_value_t = 1_000_000)]
    stock: u64,
    /// Share of purchases quoting a wrong price (bound to abort), 0 to 1.
    #[arg(long, default_value_t = 0.1)]
    bad_share: f64,
    /// Share of answered purchases sent again later with the same
    /// request_id, 0 to 1.
    #[arg(long, default_value_t = 0.33)]
    resend_share: f64,
    /// Mean time between faults, in milliseconds.
    #[arg(long, default_value_t = 700)]
    fault_interval_ms: u64,
    /// Fault kinds with weights, e.g. `kill=2,pause,partition=1`
    /// (kinds: kill, pause, nats_restart, partition, slow, crash_point).
    #[arg(
        long,
        default_value = "kill,pause,nats_restart,partition,slow,crash_point"
    )]
    faults: String,
    /// Keep databases and logs here (default: a temporary folder, removed).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Closed-loop concurrency levels, comma-separated (each is a run).
    #[arg(long, default_value = "1,16,64,256", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Open loop instead: purchases started per second (with at most the
    /// first --concurrency in flight).
    #[arg(long)]
    rate: Option<u64>,
    /// Length of each run: `10s`, `1m`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Length of each baseline measurement.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    baseline_duration: Duration,
    /// Share of purchases bound to abort (wrong price), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    abort_share: f64,
    #[arg(long, default_value_t = 100)]
    users: usize,
    #[arg(long, default_value_t = 20)]
    products: usize,
    /// Start nats-server and the services (release binaries beside this
    /// one) in a temporary folder instead of using NATS_URL.
    #[arg(long)]
    start: bool,
    /// Data folder for the disk baseline (and the started system).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// RUST_LOG of the services started with --start.
    #[arg(long, default_value = "warn")]
    service_log: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

async fn bench(a: BenchArgs, nats_url: String) -> anyhow::Result<()> {
    use twopc::bench;
    let tmp = tempfile::Builder::new().prefix("twopc-bench-").tempdir()?;
    let dir = match &a.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_owned(),
    };
    let mut started = vec![];
    let mut _nats = None;
    let url = if a.start {
        let n = NatsServer::start(&dir.join("nats"), None)?;
        let url = n.url();
        _nats = Some(n);
        let client = twopc_common::nats::connect(&url, "twopc-bench").await?;
        let bins = Binaries::beside_current_exe()?;
        let settings = Settings {
            env: vec![("RUST_LOG".into(), a.service_log.clone())],
        };
        for kind in Kind::ALL {
            let mut s = Service::new(kind, &bins, &dir, &url, &settings)?;
            s.proc.start()?;
            s.wait_ready(&client, Duration::from_secs(30)).await?;
            started.push(s);
        }
        url
    } else {
        nats_url
    };
    let client = twopc_common::nats::connect(&url, "twopc-bench").await?;
    let progress = !a.json;
    let mut cfg = bench::Config {
        concurrency: 1,
        rate: a.rate,
        duration: a.duration,
        abort_share: a.abort_share.clamp(0.0, 1.0),
        users: a.users.max(1),
        products: a.products.max(1),
        timeout: Duration::from_secs(10),
        progress,
    };
    let catalogue = bench::seed(&client, &cfg).await?;
    let disk = tokio::task::spawn_blocking({
        let dir = dir.clone();
        let d = a.baseline_duration;
        move || bench::disk_baseline(&dir, d)
    })
    .await??;
    let rtt1 = bench::nats_baseline(&client, &url, 1, a.baseline_duration, progress).await?;
    let floor_us = 2 * rtt1.latency.p50_us + 2 * disk.latency.p50_us;
    let mut rows = vec![];
    for &c in &a.concurrency {
        cfg.concurrency = c.max(1);
        // Warm up (connections, caches, SQLite pages) before measuring.
        let mut warm = cfg.clone();
        warm.duration = Duration::from_secs(1).min(cfg.duration);
        warm.progress = false;
        bench::purchases(&client, &warm, &catalogue).await;
        let nats = bench::nats_baseline(
            &client,
            &url,
            cfg.concurrency,
            a.baseline_duration,
            progress,
        )
        .await?;
        let load = bench::purchases(&client, &cfg, &catalogue).await;
        let ceiling = nats.requests_per_s / 5.0;
        let row = serde_json::json!({
            "load": load,
            "nats_baseline": nats,
            "purchase_ceiling_per_s": ceiling,
            "throughput_ratio": (load.committed_per_s + load.aborted_per_s) / ceiling,
            "rss_kib": started.iter().map(|s| (s.kind.name(), s.proc.pid().and_then(bench::rss_kib))).collect::<std::collections::BTreeMap<_, _>>(),
        });
        if progress {
            eprintln!(
                "c={:<5} {:>8.0} committed/s {:>7.0} aborted/s  p50 {:>6} µs p99 {:>7} µs p99.9 {:>7} µs max {:>7} µs  busy {} timeouts {}  | NATS {:>7.0} req/s → ceiling {:>6.0}/s, ratio {:.2}",
                c, load.committed_per_s, load.aborted_per_s, load.latency.p50_us, load.latency.p99_us,
                load.latency.p999_us, load.latency.max_us, load.busy, load.timeouts, nats.requests_per_s,
                ceiling, row["throughput_ratio"].as_f64().unwrap_or(0.0)
            );
        }
        rows.push(row);
    }
    let p50_c1 = rows
        .iter()
        .find(|r| r["load"]["concurrency"] == 1)
        .and_then(|r| r["load"]["latency"]["p50_us"].as_u64());
    let report = serde_json::json!({
        "disk_baseline": disk,
        "nats_rtt_c1": rtt1,
        "latency_floor_us": floor_us,
        "p50_c1_over_floor": p50_c1.map(|p| p as f64 / floor_us.max(1) as f64),
        "runs": rows,
    });
    if a.json {
        print_json(&report);
    } else {
        println!(
            "disk: {:.0} commits/s (p50 {} µs) · NATS rtt p50 {} µs at c=1 · floor (2 rtt + 2 fsync) {} µs{}",
            disk.commits_per_s,
            disk.latency.p50_us,
            rtt1.latency.p50_us,
            floor_us,
            p50_c1.map(|p| format!(" · p50 at c=1 is {:.2}× the floor", p as f64 / floor_us.max(1) as f64)).unwrap_or_default()
        );
    }
    for s in started.iter_mut().rev() {
        s.proc.terminate(Duration::from_secs(5))?;
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("bad duration unit in {s:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

fn parse_weights(s: &str) -> anyhow::Result<std::collections::BTreeMap<FaultKind, u32>> {
    let mut w = std::collections::BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, weight) = item.split_once('=').unwrap_or((item, "1"));
        let kind =
            FaultKind::parse(name).with_context(|| format!("unknown fault kind {name:?}"))?;
        w.insert(
            kind,
            weight
                .parse()
                .with_context(|| format!("bad weight in {item:?}"))?,
        );
    }
    Ok(w)
}

async fn chaos(a: ChaosArgs) -> anyhow::Result<()> {
    let mut cfg = twopc::chaos::Config::new(Binaries::beside_current_exe()?);
    if let Some(seed) = a.seed {
        cfg.seed = seed;
    }
    cfg.duration = a.duration;
    cfg.concurrency = a.concurrency.max(1);
    cfg.users = a.users.max(1);
    cfg.products = a.products.max(1);
    cfg.balance = a.balance;
    cfg.stock = a.stock;
    cfg.bad_share = a.bad_share.clamp(0.0, 1.0);
    cfg.resend_share = a.resend_share.clamp(0.0, 1.0);
    cfg.fault_interval = Duration::from_millis(a.fault_interval_ms.max(10));
    cfg.weights = parse_weights(&a.faults)?;
    cfg.data_dir = a.data_dir;
    cfg.verbose = !a.json;
    let report = twopc::chaos::run(cfg).await?;
    if a.json {
        print_json(&report);
    } else {
        print!("{}", report.text());
    }
    if !report.ok {
        bail!("invariants violated (seed {})", report.seed);
    }
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    users: Vec<CreateUser>,
    #[serde(default)]
    products: Vec<CreateProduct>,
}

fn demo() -> SeedFile {
    SeedFile {
        users: vec![
            CreateUser {
                user: "alice".into(),
                balance: 10_000,
            },
            CreateUser {
                user: "bob".into(),
                balance: 5_000,
            },
            CreateUser {
                user: "carol".into(),
                balance: 500,
            },
        ],
        products: vec![
            CreateProduct {
                sku: "book-1".into(),
                price: 1_250,
                stock: 10,
            },
            CreateProduct {
                sku: "pen-1".into(),
                price: 199,
                stock: 100,
            },
            CreateProduct {
                sku: "lamp-1".into(),
                price: 4_500,
                stock: 2,
            },
        ],
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

/// Prints a reply; an error reply makes the command fail.
fn print_reply<T: serde::Serialize>(r: Reply<T>) -> anyhow::Result<()> {
    match r {
        Reply::Ok(v) => {
            print_json(&v);
            Ok(())
        }
        Reply::Err(e) => {
            print_json(&e);
            bail!("{}: {}", e.error.code, e.error.message)
        }
    }
}

/// Sends `body` to each subject and collects the JSON replies by label; an
/// unreachable service shows as `{"unreachable": ...}`.
async fn ask_each(
    client: &async_nats::Client,
    parts: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> serde_json::Map<String, Value> {
    let mut all = serde_json::Map::new();
    for (label, subject) in parts {
        let v = match request_raw(client, subject, body.clone(), timeout).await {
            Ok(raw) => serde_json::from_slice(&raw)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into())),
            Err(e) => serde_json::json!({ "unreachable": format!("{e:#}") }),
        };
        all.insert((*label).into(), v);
    }
    all
}

async fn seed(
    client: &async_nats::Client,
    seed: &SeedFile,
    timeout: Duration,
) -> anyhow::Result<()> {
    for u in &seed.users {
        match request::<_, Balance>(client, subjects::WALLET_CREATE_USER, u, timeout).await? {
            Reply::Ok(b) => println!("user {} created with balance {}", b.user, b.balance),
            Reply::Err(e) if e.error.code == Code::AlreadyExists => {
                println!("user {} exists", u.user)
            }
            Reply::Err(e) => bail!("creating user {}: {}", u.user, e.error.message),
        }
    }
    for p in &seed.products {
        match request::<_, Stock>(client, subjects::ORDER_CREATE_PRODUCT, p, timeout).await? {
            Reply::Ok(s) => println!(
                "product {} created: price {}, stock {}",
                s.sku, s.price, s.stock
            ),
            Reply::Err(e) if e.error.code == Code::AlreadyExists => {
                println!("product {} exists", p.sku)
            }
            Reply::Err(e) => bail!("creating product {}: {}", p.sku, e.error.message),
        }
    }
    Ok(())
}

async fn up(
    data_dir: PathBuf,
    port: u16,
    no_demo: bool,
    nats_url_env: Option<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let mut nats = None;
    let url = match nats_url_env {
        Some(url) => {
            println!("using NATS at {url} (from NATS_URL)");
            url
        }
        None => {
            let s = NatsServer::start(&data_dir.join("nats"), Some(port)).context(
                "starting nats-server (is port in use? set NATS_URL to use a running one)",
            )?;
            println!("nats-server listening on {}", s.url());
            let url = s.url();
            nats = Some(s);
            url
        }
    };
    let bins = Binaries::beside_current_exe()?;
    let client = twopc_common::nats::connect(&url, "twopc-up").await?;
    let mut services = vec![];
    for kind in Kind::ALL {
        let mut s = Service::new(kind, &bins, &data_dir, &url, &Settings::default())?;
        s.proc.start()?;
        s.wait_ready(&client, Duration::from_secs(20)).await?;
        println!(
            "{:<12} running (pid {}), log {}",
            kind.name(),
            s.proc.pid().unwrap_or(0),
            s.proc.log_path().display()
        );
        services.push(s);
    }
    if !no_demo {
        seed(&client, &demo(), Duration::from_secs(5)).await?;
    }
    println!(
        "\ntwopc is up. Buy something:\n\
         \n  nats --server {url} req shop.purchase '{{\"user\":\"alice\",\"sku\":\"book-1\",\"qty\":2,\"amount\":2500}}'\
         \n  NATS_URL={url} twopc purchase --user alice --sku book-1 --qty 2\
         \n  NATS_URL={url} twopc balance alice\
         \n  NATS_URL={url} twopc stock book-1\n\
         \nData and logs in {}. Ctrl-C stops everything.",
        data_dir.display()
    );
    twopc_common::nats::shutdown_signal().await;
    println!("stopping");
    for s in services.iter_mut().rev() {
        s.proc.terminate(Duration::from_secs(5))?;
    }
    drop(nats);
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    twopc_common::logging::init("warn", twopc_common::logging::LogFormat::Human);
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(cli.timeout_ms);
    if let Cmd::Chaos(a) = cli.cmd {
        return chaos(a).await;
    }
    if let Cmd::Bench(a) = cli.cmd {
        return bench(a, cli.nats_url).await;
    }
    if let Cmd::Up {
        data_dir,
        port,
        no_demo,
    } = cli.cmd
    {
        let env_url = std::env::var("NATS_URL").ok().filter(|s| !s.is_empty());
        return up(data_dir, port, no_demo, env_url).await;
    }
    let client = async_nats::ConnectOptions::new()
        .name("twopc-cli")
        .connect(twopc_common::nats::server_addrs(&cli.nats_url)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", cli.nats_url))?;
    match cli.cmd {
        Cmd::Up { .. } | Cmd::Chaos(_) | Cmd::Bench(_) => unreachable!(),
        Cmd::Echo { subject } => twopc::bench::echo(client, subject).await,
        Cmd::Purchase {
            user,
            sku,
            qty,
            amount,
            request_id,
        } => {
            let amount = match amount {
                Some(a) => a,
                None => match request::<_, Stock>(
                    &client,
                    subjects::ORDER_STOCK,
                    &StockQuery { sku: sku.clone() },
                    timeout,
                )
                .await?
                {
                    Reply::Ok(s) => s.price.checked_mul(qty).context("amount overflows")?,
                    Reply::Err(e) => return print_reply::<Value>(Reply::Err(e)),
                },
            };
            let req = PurchaseRequest {
                user,
                sku,
                qty,
                amount,
                request_id,
            };
            match request::<_, PurchaseReply>(&client, subjects::PURCHASE, &req, timeout).await {
                Ok(r) => print_reply(r),
                Err(e) => bail!("{e:#}\nno reply in time: the purchase may or may not have happened; retry with the same --request-id, or check `twopc tx`"),
            }
        }
        Cmd::Balance { user } => print_reply(
            request::<_, Value>(
                &client,
                subjects::WALLET_BALANCE,
                &serde_json::json!({ "user": user }),
                timeout,
            )
            .await?,
        ),
        Cmd::Stock { sku } => print_reply(
            request::<_, Value>(
                &client,
                subjects::ORDER_STOCK,
                &serde_json::json!({ "sku": sku }),
                timeout,
            )
            .await?,
        ),
        Cmd::Tx { id } => {
            let body = serde_json::to_vec(&serde_json::json!({ "tx": id }))?;
            let parts = [
                ("coordinator", subjects::TX_STATUS.to_owned()),
                ("wallet", subjects::participant_tx(subjects::WALLET)),
                ("order", subjects::participant_tx(subjects::ORDER)),
            ];
            print_json(&ask_each(&client, &parts, body, timeout).await);
            Ok(())
        }
        Cmd::Ping { service } => {
            let raw =
                request_raw(&client, &format!("$SRV.PING.{service}"), vec![], timeout).await?;
            let v: Value = serde_json::from_slice(&raw).context("ping reply is not JSON")?;
            println!(
                "{} {} is up",
                v["name"].as_str().unwrap_or("?"),
                v["id"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Cmd::InDoubt => {
            let parts = [
                ("coordinator", subjects::IN_DOUBT.to_owned()),
                ("wallet", subjects::participant_in_doubt(subjects::WALLET)),
                ("order", subjects::participant_in_doubt(subjects::ORDER)),
            ];
            print_json(&ask_each(&client, &parts, b"{}".to_vec(), timeout).await);
            Ok(())
        }
        Cmd::CreateUser { user, balance } => print_reply(
            request::<_, Value>(
                &client,
                subjects::WALLET_CREATE_USER,
                &CreateUser { user, balance },
                timeout,
            )
            .await?,
        ),
        Cmd::CreateProduct { sku, price, stock } => print_reply(
            request::<_, Value>(
                &client,
                subjects::ORDER_CREATE_PRODUCT,
                &CreateProduct { sku, price, stock },
                timeout,
            )
            .await?,
        ),
        Cmd::Seed { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let s: SeedFile = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", file.display()))?;
            seed(&client, &s, timeout).await
        }
    }
}
