//! `twopc bench`: starts a system (with `--start`) or uses a running one,
//! seeds it, measures the baselines and the purchase load, and reports.
//!
//! With `--cluster N`, one run compares two systems it starts one after the
//! other: a single node (SQLite decision log) with the disk baseline, then a
//! JetStream cluster of N nats-servers with coordinator replicas (decision
//! log in a KV bucket with N replicas) with the KV-create baseline and NATS
//! nodes killed under load; it reports both, their ratios and the verdict
//! of each target of the cluster issue ([`bench::cluster_targets`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twopc_common::nats::AuthArgs;
use twopc_launcher::client::Shop;
use twopc_launcher::{Binaries, Nats, System, SystemConfig};
use twopc_schemas::ClientName;
use twopc_verify::bench;

use super::{parse_duration, print_json};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Closed-loop concurrency levels, comma-separated (each is a run).
    #[arg(long, default_value = "1,16,64,256", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Open loop instead: purchases started per second (with at most the
    /// first --concurrency in flight).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Length of each run: `10s`, `1m`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Length of each baseline measurement.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub baseline_duration: Duration,
    /// Share of purchases bound to abort (wrong price), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub abort_share: f64,
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    #[arg(long, default_value_t = 20)]
    pub products: usize,
    /// Start nats-server and the services (release binaries beside this
    /// one) in a temporary folder instead of using NATS_URL.
    #[arg(long)]
    pub start: bool,
    /// Data folder for the disk baseline (and the started system).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// RUST_LOG of the services started with --start.
    #[arg(long, default_value = "warn")]
    pub service_log: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Compare in one run: a single-node system (SQLite decision log), then
    /// a JetStream cluster of this many nats-servers (3 or 5; decision log
    /// in a KV bucket with a replica on every node). Starts both systems
    /// itself (implies --start).
    #[arg(long, value_name = "NODES")]
    pub cluster: Option<usize>,
    /// Coordinator replicas on the cluster (with --cluster).
    #[arg(long, default_value_t = 2)]
    pub coordinators: usize,
    /// Creates in flight of the second KV-create baseline (the first has
    /// one); 0 or 1 for none (with --cluster).
    #[arg(long, default_value_t = 256)]
    pub kv_concurrency: usize,
    /// NATS nodes to SIGKILL and restart under load, one run each
    /// (with --cluster): `follower` (neither the decision bucket's stream
    /// leader nor the meta leader, when there is one), `stream-leader`,
    /// `meta-leader`; `none` for no kill.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "follower,stream-leader,meta-leader"
    )]
    pub failover: Vec<FailoverTarget>,
    /// Closed-loop concurrency during the kills.
    #[arg(long, default_value_t = 16)]
    pub failover_concurrency: usize,
    /// How long a killed node stays down before its restart.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub failover_down: Duration,
    /// Per-purchase timeout at the client during the kills (a reply lost
    /// with a connection holds a closed-loop client this long).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub failover_timeout: Duration,
    /// Measure what credentials and permissions cost: two single-node
    /// systems side by side, one without credentials and one as shipped
    /// (NKeys, permissions), the same purchase load on each in turn (two
    /// rounds each per concurrency); reports the ratio (implies --start).
    #[arg(long)]
    pub auth_cost: bool,
    /// Measure what owning a participant name costs (the lease, and the
    /// fence every write batch checks): two single-node systems side by
    /// side, one whose participants serve without owning their names
    /// (`TWOPC_BREAK=no_owner`, unfenced) and one as shipped, measured as
    /// `--auth-cost` is (implies --start).
    #[arg(long)]
    pub owner_cost: bool,
}

/// Which NATS node a failover run kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverTarget {
    /// A node that leads neither the decision bucket nor the meta group
    /// (if every node leads something: one that is not the stream leader).
    Follower,
    /// The leader of the decision bucket's stream (where every decision is
    /// written).
    StreamLeader,
    /// The JetStream meta leader.
    MetaLeader,
    /// No kill.
    None,
}

pub async fn run(a: BenchArgs, nats_url: String, auth: AuthArgs) -> anyhow::Result<()> {
    if a.auth_cost {
        return side_by_side(a, Cost::Auth).await;
    }
    if a.owner_cost {
        return side_by_side(a, Cost::Owner).await;
    }
    if let Some(nodes) = a.cluster {
        return compare(a, nodes).await;
    }
    let (_tmp, dir) = data_dir(&a)?;
    let started = if a.start {
        Some(System::start(system_config(&a, &dir)?).await?)
    } else {
        None
    };
    let url = match &started {
        Some(sys) => sys.url.clone(),
        None => nats_url,
    };
    let client = twopc_common::nats::connect(&url, "twopc-bench", &auth).await?;
    let progress = !a.json;
    let mut cfg = load_config(&a, progress);
    let catalogue = bench::seed(&client, &cfg).await?;
    let disk = disk_baseline(&dir, a.baseline_duration).await?;
    let m = measure(
        &client,
        &url,
        &a,
        &mut cfg,
        &catalogue,
        started.as_ref(),
        "",
    )
    .await?;
    let floor_us = 2 * m.rtt1.latency.p50_us + 2 * disk.latency.p50_us;
    let p50_c1 = m.p50_c1();
    let report = serde_json::json!({
        "disk_baseline": disk,
        "nats_rtt_c1": m.rtt1,
        "latency_floor_us": floor_us,
        "p50_c1_over_floor": p50_c1.map(|p| p as f64 / floor_us.max(1) as f64),
        "runs": m.rows,
    });
    if a.json {
        print_json(&report);
    } else {
        println!(
            "disk: {:.0} commits/s (p50 {} µs) · NATS rtt p50 {} µs at c=1 · floor (2 rtt + 2 fsync) {} µs{}",
            disk.commits_per_s,
            disk.latency.p50_us,
            m.rtt1.latency.p50_us,
            floor_us,
            p50_c1.map(|p| format!(" · p50 at c=1 is {:.2}× the floor", p as f64 / floor_us.max(1) as f64)).unwrap_or_default()
        );
    }
    drop(client);
    if let Some(sys) = started {
        sys.stop(Duration::from_secs(5)).await?;
    }
    Ok(())
}

/// The system `--start` (or each system of `--cluster`) starts in `dir`.
/// What a side-by-side run compares: a system without the thing (A) and
/// one as shipped (B).
#[derive(Clone, Copy)]
enum Cost {
    /// Credentials and permissions.
    Auth,
    /// Participants owning their names (lease and fenced writes).
    Owner,
}

impl Cost {
    /// The JSON key and the two systems' labels.
    fn names(self) -> (&'static str, [&'static str; 2], [&'static str; 2]) {
        match self {
            Cost::Auth => (
                "auth_cost",
                ["no_auth", "auth"],
                ["without credentials", "with"],
            ),
            Cost::Owner => (
                "owner_cost",
                ["no_owner", "owner"],
                ["without owners", "with"],
            ),
        }
    }

    /// System `i` (0: without, 1: as shipped) of this comparison.
    fn configure(self, cfg: &mut SystemConfig, i: usize) {
        match self {
            Cost::Auth => cfg.auth = i == 1,
            Cost::Owner => {
                if i == 0 {
                    for p in [&mut cfg.wallet, &mut cfg.order] {
                        p.extra_env.push(("TWOPC_BREAK".into(), "no_owner".into()));
                    }
                }
            }
        }
    }
}

/// `--auth-cost`, `--owner-cost`: purchases on a system without the thing
/// (A) and one with it (B), both running at once, measured A B A B per
/// concurrency, so that the machine's drift falls on both alike.
async fn side_by_side(a: BenchArgs, cost: Cost) -> anyhow::Result<()> {
    let (key, labels, words) = cost.names();
    let (_tmp, dir) = data_dir(&a)?;
    let progress = !a.json;
    let mut systems = vec![];
    for (i, label) in labels.iter().enumerate() {
        let mut cfg = system_config(&a, &dir.join(label))?;
        cost.configure(&mut cfg, i);
        systems.push(System::start(cfg).await?);
    }
    let mut cfg = load_config(&a, false);
    let mut catalogues = vec![];
    for sys in &systems {
        catalogues.push(bench::seed(&sys.client, &cfg).await?);
    }
    let mut rows = vec![];
    for &c in &a.concurrency {
        cfg.concurrency = c.max(1);
        let mut warm = cfg.clone();
        warm.duration = Duration::from_secs(1).min(cfg.duration);
        let mut rate = [0.0f64; 2];
        let mut p50 = [0u64; 2];
        for (i, sys) in systems.iter().enumerate() {
            bench::purchases(&sys.shop, &warm, &catalogues[i]).await;
        }
        for _round in 0..2 {
            for (i, sys) in systems.iter().enumerate() {
                let l = bench::purchases(&sys.shop, &cfg, &catalogues[i]).await;
                rate[i] += (l.committed_per_s + l.aborted_per_s) / 2.0;
                p50[i] += l.latency.p50_us / 2;
            }
        }
        let mut row = serde_json::Map::new();
        row.insert("concurrency".into(), c.into());
        row.insert(format!("{}_per_s", labels[0]), rate[0].into());
        row.insert(format!("{}_per_s", labels[1]), rate[1].into());
        let throughput_ratio = rate[1] / rate[0].max(f64::MIN_POSITIVE);
        let p50_ratio = p50[1] as f64 / p50[0].max(1) as f64;
        row.insert("throughput_ratio".into(), throughput_ratio.into());
        row.insert(format!("{}_p50_us", labels[0]), p50[0].into());
        row.insert(format!("{}_p50_us", labels[1]), p50[1].into());
        row.insert("p50_ratio".into(), p50_ratio.into());
        if progress {
            eprintln!(
                "c={c:<5} {} {:>7.0}/s p50 {:>6} µs | {} {:>7.0}/s p50 {:>6} µs | throughput ratio {throughput_ratio:.3}, p50 ratio {p50_ratio:.3}",
                words[0], rate[0], p50[0], words[1], rate[1], p50[1]
            );
        }
        rows.push(serde_json::Value::Object(row));
    }
    for sys in systems {
        sys.stop(Duration::from_secs(5)).await?;
    }
    if a.json {
        print_json(&serde_json::json!({ key: rows }));
    }
    Ok(())
}

/// The bench's purchases: as the default shop client.
fn shop(client: &async_nats::Client) -> Shop {
    Shop {
        client: client.clone(),
        name: ClientName::new(twopc_schemas::client::DEFAULT_CLIENT).expect("valid"),
    }
}

fn system_config(a: &BenchArgs, dir: &Path) -> anyhow::Result<SystemConfig> {
    let mut cfg = SystemConfig::new(dir, Binaries::beside_current_exe()?);
    // The bench's baselines (bare request-reply on its own subjects, a KV
    // bucket of its own) are outside the roles' permissions: its systems
    // run without credentials, purchases and baselines alike.
    cfg.auth = false;
    cfg.log_level = a.service_log.clone();
    cfg.client_name = "twopc-bench".into();
    Ok(cfg)
}

/// The load's settings from the flags (concurrency set per run).
fn load_config(a: &BenchArgs, progress: bool) -> bench::Config {
    bench::Config {
        concurrency: 1,
        rate: a.rate,
        duration: a.duration,
        abort_share: a.abort_share.clamp(0.0, 1.0),
        users: a.users.max(1),
        products: a.products.max(1),
        timeout: Duration::from_secs(10),
        progress,
    }
}

/// The disk baseline in `dir`, off the async threads.
async fn disk_baseline(dir: &Path, duration: Duration) -> anyhow::Result<bench::DiskBaseline> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || bench::disk_baseline(&dir, duration)).await?
}

/// One system's measurements, the same steps whichever system it is.
struct Measured {
    /// NATS request-reply at concurrency 1.
    rtt1: bench::NatsBaseline,
    /// One report row per concurrency.
    rows: Vec<serde_json::Value>,
    loads: Vec<bench::LoadResult>,
}

impl Measured {
    fn p50_c1(&self) -> Option<u64> {
        self.loads
            .iter()
            .find(|l| l.concurrency == 1)
            .map(|l| l.latency.p50_us)
    }

    fn at(&self, c: usize) -> Option<&bench::LoadResult> {
        self.loads.iter().find(|l| l.concurrency == c)
    }
}

/// The NATS round trip at concurrency 1, then for each concurrency: a
/// warm-up, the NATS baseline at that concurrency and the purchase load.
/// Progress lines on stderr start with `label`.
async fn measure(
    client: &async_nats::Client,
    url: &str,
    a: &BenchArgs,
    cfg: &mut bench::Config,
    catalogue: &[(String, u64)],
    started: Option<&System>,
    label: &str,
) -> anyhow::Result<Measured> {
    let progress = cfg.progress;
    let rtt1 = bench::nats_baseline(client, url, 1, a.baseline_duration, progress).await?;
    let mut rows = vec![];
    let mut loads = vec![];
    for &c in &a.concurrency {
        cfg.concurrency = c.max(1);
        // Warm up (connections, caches, SQLite pages) before measuring.
        let mut warm = cfg.clone();
        warm.duration = Duration::from_secs(1).min(cfg.duration);
        warm.progress = false;
        bench::purchases(&shop(client), &warm, catalogue).await;
        let nats =
            bench::nats_baseline(client, url, cfg.concurrency, a.baseline_duration, progress)
                .await?;
        let load = bench::purchases(&shop(client), cfg, catalogue).await;
        let ceiling = nats.requests_per_s / 5.0;
        let row = serde_json::json!({
            "load": load,
            "nats_baseline": nats,
            "purchase_ceiling_per_s": ceiling,
            "throughput_ratio": (load.committed_per_s + load.aborted_per_s) / ceiling,
            "rss_kib": started.iter().flat_map(|sys| sys.services.values()).map(|s| (s.name, s.proc.pid().and_then(bench::rss_kib))).collect::<std::collections::BTreeMap<_, _>>(),
        });
        if progress {
            eprintln!(
                "{label}c={:<5} {:>8.0} committed/s {:>7.0} aborted/s  p50 {:>6} µs p99 {:>7} µs p99.9 {:>7} µs max {:>7} µs  busy {} timeouts {}  | NATS {:>7.0} req/s → ceiling {:>6.0}/s, ratio {:.2}",
                c, load.committed_per_s, load.aborted_per_s, load.latency.p50_us, load.latency.p99_us,
                load.latency.p999_us, load.latency.max_us, load.busy, load.timeouts, nats.requests_per_s,
                ceiling, row["throughput_ratio"].as_f64().unwrap_or(0.0)
            );
        }
        rows.push(row);
        loads.push(load);
    }
    Ok(Measured { rtt1, rows, loads })
}

/// Where the run keeps its data: `--data-dir`, or a temporary folder
/// (removed when the returned guard drops).
fn data_dir(a: &BenchArgs) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::Builder::new().prefix("twopc-bench-").tempdir()?;
    let dir = match &a.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_owned(),
    };
    Ok((tmp, dir))
}

/// `--cluster N`: the single node, then the cluster, then the comparison.
async fn compare(a: BenchArgs, nodes: usize) -> anyhow::Result<()> {
    let (_tmp, dir) = data_dir(&a)?;
    let progress = !a.json;
    let mut cluster_cfg = system_config(&a, &dir.join("cluster"))?;
    cluster_cfg.nats = Nats::Cluster { nodes, port: None };
    cluster_cfg.coordinators = a.coordinators;
    // Refuse a bad cluster before measuring anything.
    cluster_cfg.check()?;

    // (a) One nats-server, SQLite decision log.
    if progress {
        eprintln!("== single node: one nats-server, decision log in SQLite");
    }
    let single_dir = dir.join("single");
    let sys = System::start(system_config(&a, &single_dir)?).await?;
    let client = twopc_common::nats::connect(&sys.url, "twopc-bench", &AuthArgs::default()).await?;
    let mut cfg = load_config(&a, progress);
    let catalogue = bench::seed(&client, &cfg).await?;
    let single_disk = disk_baseline(&single_dir, a.baseline_duration).await?;
    let single = measure(
        &client,
        &sys.url,
        &a,
        &mut cfg,
        &catalogue,
        Some(&sys),
        "single  ",
    )
    .await?;
    drop(client);
    sys.stop(Duration::from_secs(5)).await?;

    // (b) The cluster, KV decision log with a replica on every node.
    if progress {
        eprintln!(
            "== cluster: {nodes} nats-servers, {} coordinators, decision log in KV (R{nodes})",
            a.coordinators
        );
    }
    let cluster_dir = dir.join("cluster");
    let mut sys = System::start(cluster_cfg).await?;
    let client = twopc_common::nats::connect(&sys.url, "twopc-bench", &AuthArgs::default()).await?;
    let catalogue = bench::seed(&client, &cfg).await?;
    let kv1 = bench::kv_baseline(&client, nodes, 1, a.baseline_duration, progress).await?;
    let kvn = if a.kv_concurrency > 1 {
        Some(
            bench::kv_baseline(
                &client,
                nodes,
                a.kv_concurrency,
                a.baseline_duration,
                progress,
            )
            .await?,
        )
    } else {
        None
    };
    // The same disk again: how much the machine drifted between the two.
    let cluster_disk = disk_baseline(&cluster_dir, a.baseline_duration).await?;
    let url = sys.url.clone();
    let cluster = measure(
        &client,
        &url,
        &a,
        &mut cfg,
        &catalogue,
        Some(&sys),
        "cluster ",
    )
    .await?;
    let mut failovers = vec![];
    for &target in a.failover.iter().filter(|t| **t != FailoverTarget::None) {
        let run = failover(&mut sys, &a, &cfg, &catalogue, target).await?;
        if progress {
            eprintln!(
                "failover {:<13} killed {} (stream leader: {}, meta leader: {}) at {:.1} s, restarted at {:.1} s, ready at {:.1} s: longest window without a commit {:.2} s from {:.1} s; {} committed, {} timeouts, {} errors",
                format!("{target:?}"),
                run.node,
                run.was_stream_leader,
                run.was_meta_leader,
                run.killed_at_ms as f64 / 1e3,
                run.restarted_at_ms as f64 / 1e3,
                run.ready_at_ms as f64 / 1e3,
                run.gaps.longest.length_ms as f64 / 1e3,
                run.gaps.longest.from_ms as f64 / 1e3,
                run.load.committed,
                run.load.timeouts,
                run.load.errors,
            );
        }
        failovers.push(run);
    }
    drop(client);
    sys.stop(Duration::from_secs(5)).await?;

    // (c) Both, the ratios and the verdicts.
    let longest_gap_ms = failovers.iter().map(|f| f.gaps.longest.length_ms).max();
    let targets = bench::cluster_targets(&bench::Comparison {
        single: &single.loads,
        cluster: &cluster.loads,
        disk_p50_us: single_disk.latency.p50_us,
        kv_create_p50_us: kv1.latency.p50_us,
        longest_gap_ms,
    });
    let ratios: Vec<serde_json::Value> = a
        .concurrency
        .iter()
        .filter_map(|&c| {
            let (s, k) = (single.at(c.max(1))?, cluster.at(c.max(1))?);
            Some(serde_json::json!({
                "concurrency": c,
                "committed_per_s": k.committed_per_s / s.committed_per_s.max(f64::MIN_POSITIVE),
                "p50": k.latency.p50_us as f64 / s.latency.p50_us.max(1) as f64,
                "p99": k.latency.p99_us as f64 / s.latency.p99_us.max(1) as f64,
            }))
        })
        .collect();
    if a.json {
        print_json(&serde_json::json!({
            "single": {
                "disk_baseline": single_disk,
                "nats_rtt_c1": single.rtt1,
                "runs": single.rows,
            },
            "cluster": {
                "nodes": nodes,
                "coordinators": a.coordinators,
                "kv_create_c1": kv1,
                "kv_create": kvn,
                "disk_baseline": cluster_disk,
                "nats_rtt_c1": cluster.rtt1,
                "runs": cluster.rows,
                "failover": failovers,
            },
            "cluster_over_single": ratios,
            "targets": targets,
        }));
        return Ok(());
    }
    println!(
        "single node (SQLite decision log) vs cluster of {nodes} ({} coordinators, KV decision log R{nodes}), same run",
        a.coordinators
    );
    println!(
        "{:>6} | {:>12} {:>9} {:>9} | {:>12} {:>9} {:>9} | {:>11} {:>9} {:>9}",
        "c",
        "single c/s",
        "p50 µs",
        "p99 µs",
        "cluster c/s",
        "p50 µs",
        "p99 µs",
        "ratio c/s",
        "p50",
        "p99"
    );
    for &c in &a.concurrency {
        let (Some(s), Some(k)) = (single.at(c.max(1)), cluster.at(c.max(1))) else {
            continue;
        };
        println!(
            "{:>6} | {:>12.0} {:>9} {:>9} | {:>12.0} {:>9} {:>9} | {:>11.2} {:>9.2} {:>9.2}",
            c,
            s.committed_per_s,
            s.latency.p50_us,
            s.latency.p99_us,
            k.committed_per_s,
            k.latency.p50_us,
            k.latency.p99_us,
            k.committed_per_s / s.committed_per_s.max(f64::MIN_POSITIVE),
            k.latency.p50_us as f64 / s.latency.p50_us.max(1) as f64,
            k.latency.p99_us as f64 / s.latency.p99_us.max(1) as f64,
        );
    }
    println!(
        "disk commit (SQLite FULL, 1 row): p50 {} µs, {:.0}/s (again during the cluster's turn: p50 {} µs, {:.0}/s)",
        single_disk.latency.p50_us,
        single_disk.commits_per_s,
        cluster_disk.latency.p50_us,
        cluster_disk.commits_per_s
    );
    for kv in std::iter::once(&kv1).chain(kvn.iter()) {
        println!(
            "KV create (R{}, sync always) × {}: p50 {} µs, p99 {} µs, {:.0}/s, {} errors",
            kv.replicas,
            kv.concurrency,
            kv.latency.p50_us,
            kv.latency.p99_us,
            kv.creates_per_s,
            kv.errors
        );
    }
    println!(
        "NATS rtt p50 at c=1: single {} µs, cluster {} µs",
        single.rtt1.latency.p50_us, cluster.rtt1.latency.p50_us
    );
    for f in &failovers {
        println!(
            "kill {:?} ({}{}{}): down {:.1}–{:.1} s, ready {:.1} s; longest window without a commit {:.2} s (from {:.1} s); {} committed, {} timeouts, {} errors",
            f.target,
            f.node,
            if f.was_stream_leader { ", stream leader" } else { "" },
            if f.was_meta_leader { ", meta leader" } else { "" },
            f.killed_at_ms as f64 / 1e3,
            f.restarted_at_ms as f64 / 1e3,
            f.ready_at_ms as f64 / 1e3,
            f.gaps.longest.length_ms as f64 / 1e3,
            f.gaps.longest.from_ms as f64 / 1e3,
            f.load.committed,
            f.load.timeouts,
            f.load.errors
        );
    }
    println!("targets:");
    for t in &targets {
        println!("  [{}] {} — {}", t.verdict, t.target, t.detail);
    }
    Ok(())
}

/// How long the load runs before a kill, and after the node is back.
const FAILOVER_BEFORE: Duration = Duration::from_secs(3);
const FAILOVER_AFTER: Duration = Duration::from_secs(5);

/// Longest wait for the decision bucket to have a leader and every replica
/// current before a kill.
const BUCKET_CURRENT_TIMEOUT: Duration = Duration::from_secs(60);

/// One NATS-node kill under load.
#[derive(Debug, serde::Serialize)]
struct FailoverRun {
    target: FailoverTarget,
    /// The killed node's server name.
    node: String,
    was_stream_leader: bool,
    was_meta_leader: bool,
    /// From the load's start.
    killed_at_ms: u64,
    restarted_at_ms: u64,
    /// When the cluster agreed on a live meta leader again.
    ready_at_ms: u64,
    load: bench::LoadResult,
    gaps: bench::Gaps,
}

/// The decision bucket's stream.
fn decision_stream() -> String {
    twopc_coordinator::kv::stream_name(twopc_coordinator::kv::DEFAULT_BUCKET)
}

/// The decision bucket's stream leader, once it has one and every replica
/// is current (a kill before that could take the quorum).
async fn bucket_leader(client: &async_nats::Client, nodes: usize) -> anyhow::Result<String> {
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + BUCKET_CURRENT_TIMEOUT;
    loop {
        let why = match js.get_stream(decision_stream()).await {
            Ok(stream) => match stream.get_info().await {
                Ok(info) => match info.cluster {
                    Some(c) => match c.leader {
                        Some(leader)
                            if c.replicas.len() + 1 == nodes
                                && c.replicas.iter().all(|r| r.current && !r.offline) =>
                        {
                            return Ok(leader);
                        }
                        _ => format!("leader {:?}, replicas {:?}", c.leader, c.replicas),
                    },
                    None => "no cluster information".to_owned(),
                },
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "the decision bucket is not current after {BUCKET_CURRENT_TIMEOUT:?}: {why}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Kills one NATS node under load (closed loop at --failover-concurrency),
/// restarts it after --failover-down, and notes every commit. The load's
/// client connects to the other nodes only: what is measured is the
/// system's windows without a commit, not this client's own reconnect.
async fn failover(
    sys: &mut System,
    a: &BenchArgs,
    cfg: &bench::Config,
    catalogue: &[(String, u64)],
    target: FailoverTarget,
) -> anyhow::Result<FailoverRun> {
    let cluster = sys.cluster.as_mut().expect("a cluster system");
    let nodes = cluster.nodes.len();
    let client = sys.client.clone();
    let stream_leader = bucket_leader(&client, nodes).await?;
    let meta_leader = cluster
        .live_leader()
        .await
        .map_err(|why| anyhow::anyhow!("no meta leader: {why}"))?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let index = |name: &str| names.iter().position(|n| n == name);
    let victim = match target {
        FailoverTarget::StreamLeader => index(&stream_leader),
        FailoverTarget::MetaLeader => index(&meta_leader),
        FailoverTarget::Follower => names
            .iter()
            .position(|n| *n != stream_leader && *n != meta_leader)
            .or_else(|| names.iter().position(|n| *n != stream_leader)),
        FailoverTarget::None => unreachable!("filtered out"),
    }
    .ok_or_else(|| anyhow::anyhow!("no node to kill for {target:?} among {names:?}"))?;
    let survivors: Vec<String> = cluster
        .urls()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, u)| u)
        .collect();
    let load_client = twopc_common::nats::connect(
        &survivors.join(","),
        "twopc-bench-failover",
        &AuthArgs::default(),
    )
    .await?;
    let mut load_cfg = cfg.clone();
    load_cfg.concurrency = a.failover_concurrency.max(1);
    load_cfg.rate = None;
    load_cfg.timeout = a.failover_timeout;
    load_cfg.duration = FAILOVER_BEFORE + a.failover_down + FAILOVER_AFTER;
    let down = a.failover_down;
    let nemesis = async {
        tokio::time::sleep(FAILOVER_BEFORE).await;
        let killed = Instant::now();
        cluster.kill(victim)?;
        tokio::time::sleep(down).await;
        let restarted = Instant::now();
        cluster.restart(victim).await?;
        anyhow::Ok((killed, restarted, Instant::now()))
    };
    let (load, gaps, start, times) = bench::purchases_during(
        &shop(&load_client),
        &load_cfg,
        catalogue,
        nemesis,
        FAILOVER_AFTER,
    )
    .await;
    let (killed, restarted, ready) = times?;
    let ms = |t: Instant| t.saturating_duration_since(start).as_millis() as u64;
    Ok(FailoverRun {
        target,
        node: names[victim].clone(),
        was_stream_leader: names[victim] == stream_leader,
        was_meta_leader: names[victim] == meta_leader,
        killed_at_ms: ms(killed),
        restarted_at_ms: ms(restarted),
        ready_at_ms: ms(ready),
        load,
        gaps,
    })
}
