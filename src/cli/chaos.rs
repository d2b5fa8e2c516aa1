//! `twopc chaos`: a chaos run with the CLI's flags, its report printed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use twopc_launcher::Binaries;
use twopc_verify::chaos::{self, FaultKind};

use super::{parse_duration, print_json};

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// How long to inject faults: `90s`, `10m`, `1h` (or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// The services' transaction window, ms (`TWOPC_TX_WINDOW_MS`): short,
    /// so that a run reaches expiry, the decision deadline (half the
    /// retention) and collection (with --retention-ms and --skew-ms).
    #[arg(long)]
    pub window_ms: Option<u64>,
    /// The services' retention, ms (`TWOPC_RETENTION_MS`).
    #[arg(long)]
    pub retention_ms: Option<u64>,
    /// The services' tolerated clock skew, ms (`TWOPC_MAX_SKEW_MS`).
    #[arg(long)]
    pub skew_ms: Option<u64>,
    /// Seed of the fault schedule and workload (random when omitted; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Purchases in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    #[arg(long, default_value_t = 5)]
    pub products: usize,
    /// Opening balance of each user (minor units).
    #[arg(long, default_value_t = 1_000_000_000)]
    pub balance: u64,
    /// Opening stock of each product.
    #[arg(long, default_value_t = 1_000_000)]
    pub stock: u64,
    /// Share of purchases quoting a wrong price (bound to abort), 0 to 1.
    #[arg(long, default_value_t = 0.1)]
    pub bad_share: f64,
    /// Share of answered purchases sent again later with the same
    /// request_id, 0 to 1.
    #[arg(long, default_value_t = 0.33)]
    pub resend_share: f64,
    /// Mean time between faults, in milliseconds.
    #[arg(long, default_value_t = 700)]
    pub fault_interval_ms: u64,
    /// Fault kinds with weights, e.g. `kill=2,pause,partition=1`. On one
    /// server (default: all of them): kill, pause, nats_restart, partition,
    /// slow, crash_point, duplicate. On a cluster (default: all of them):
    /// kill, pause, slow, crash_point, node_kill, node_pause,
    /// node_partition (needs root and iptables), duplicate. `duplicate`
    /// starts a second wallet or order instance: on a new data folder (it
    /// must refuse) or as a rolling restart on the participant's own.
    #[arg(long)]
    pub faults: Option<String>,
    /// Run on a JetStream cluster of N nodes (3 or 5), decisions in
    /// replicated KV, with coordinator replicas.
    #[arg(long)]
    pub cluster: Option<usize>,
    /// Coordinator replicas on a cluster.
    #[arg(long, default_value_t = 2)]
    pub coordinators: usize,
    /// Run the Go shipping participant too, from this binary (built by
    /// `scripts/test-go.sh` at `target/go/twopc-shipping`): the coordinator
    /// knows `shipping`, a share of the purchases (--transaction-share)
    /// become three-branch transactions (wallet, order, shipping) on
    /// `shop.<client>.transaction`, the faults kill, pause, partition and
    /// crash_point may hit it, and its database is checked too.
    #[arg(long, value_name = "PATH")]
    pub with_shipping: Option<PathBuf>,
    /// With --with-shipping: share of requests sent as three-branch
    /// transactions, 0 to 1.
    #[arg(long, default_value_t = 0.5)]
    pub transaction_share: f64,
    /// Keep databases and logs here (default: a temporary folder, removed).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
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

pub async fn run(a: ChaosArgs) -> anyhow::Result<()> {
    let mut cfg = chaos::Config::new(Binaries::beside_current_exe()?);
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
    let kinds: &[FaultKind] = if a.cluster.is_some() {
        &FaultKind::CLUSTER
    } else {
        &FaultKind::SINGLE
    };
    let default = kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
    cfg.weights = parse_weights(a.faults.as_deref().unwrap_or(&default))?;
    if let Some(nodes) = a.cluster {
        twopc_launcher::NatsCluster::check_size(nodes)?;
        cfg.cluster = Some(nodes);
        cfg.coordinators = a.coordinators.max(1);
    }
    cfg.data_dir = a.data_dir;
    if let Some(bin) = a.with_shipping {
        anyhow::ensure!(
            bin.is_file(),
            "{} is not a file: scripts/test-go.sh builds the shipping participant at target/go/twopc-shipping",
            bin.display()
        );
        cfg.shipping = Some(bin.canonicalize()?);
        cfg.transaction_share = a.transaction_share.clamp(0.0, 1.0);
    }
    for (var, value) in [
        ("TWOPC_TX_WINDOW_MS", a.window_ms),
        ("TWOPC_RETENTION_MS", a.retention_ms),
        ("TWOPC_MAX_SKEW_MS", a.skew_ms),
    ] {
        if let Some(v) = value {
            for kind in twopc_launcher::Kind::ALL {
                cfg.extra_env.push((kind, var.into(), v.to_string()));
            }
            cfg.shipping_env.push((var.into(), v.to_string()));
        }
    }
    cfg.verbose = !a.json;
    let report = chaos::run(cfg).await?;
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
