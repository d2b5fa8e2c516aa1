//! `twopc bench`: starts a system (with `--start`) or uses a running one,
//! seeds it, measures the baselines and the purchase load, and reports.

use std::path::PathBuf;
use std::time::Duration;

use twopc_launcher::{Binaries, System, SystemConfig};
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
}

pub async fn run(a: BenchArgs, nats_url: String) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("twopc-bench-").tempdir()?;
    let dir = match &a.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_owned(),
    };
    let started = if a.start {
        let mut cfg = SystemConfig::new(&dir, Binaries::beside_current_exe()?);
        cfg.log_level = a.service_log.clone();
        cfg.client_name = "twopc-bench".into();
        Some(System::start(cfg).await?)
    } else {
        None
    };
    let url = match &started {
        Some(sys) => sys.url.clone(),
        None => nats_url,
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
            "rss_kib": started.iter().flat_map(|sys| sys.services.values()).map(|s| (s.kind.name(), s.proc.pid().and_then(bench::rss_kib))).collect::<std::collections::BTreeMap<_, _>>(),
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
    drop(client);
    if let Some(sys) = started {
        sys.stop(Duration::from_secs(5)).await?;
    }
    Ok(())
}
