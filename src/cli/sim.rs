//! `twopc sim`: the deterministic simulation (crate `twopc-sim`), many
//! seeds in parallel, or one replayed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twopc_sim::{Breaks, Config, Outcome};

#[derive(clap::Args)]
pub struct SimArgs {
    /// Replay this one seed and print its outcome in full.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many schedules (seeds `--from`, `--from + 1`, ...).
    #[arg(long, default_value_t = 1_000)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Stop starting new schedules after this long (e.g. 60s, 10m).
    #[arg(long, value_parser = super::parse_duration)]
    time_limit: Option<Duration>,
    /// Threads (default: the machine's cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Deliberately broken behaviour to run with, comma-separated:
    /// forget_request_ids, vote_before_durable, decide_alone, no_owner.
    #[arg(long = "break", default_value = "")]
    breaks: String,
    /// Stop at the first failing schedule.
    #[arg(long)]
    first: bool,
    /// Coordinator replicas.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
}

fn config(seed: u64, breaks: Breaks, replicas: usize) -> Config {
    let mut c = Config::new(seed);
    c.breaks = breaks;
    c.replicas = replicas;
    c
}

fn print_failure(o: &Outcome) {
    println!("FAIL seed {} ({} violations):", o.seed, o.violations.len());
    for v in o.violations.iter().take(5) {
        println!("  {v}");
    }
    if o.violations.len() > 5 {
        println!("  ... and {} more", o.violations.len() - 5);
    }
}

pub fn run(a: SimArgs) -> anyhow::Result<()> {
    // A panic in the code under test is a finding, reported with its seed
    // (`twopc_sim::run` catches it); the default hook would print a
    // backtrace per schedule.
    std::panic::set_hook(Box::new(|_| {}));
    let breaks = Breaks::parse(&a.breaks).map_err(anyhow::Error::msg)?;
    if let Some(seed) = a.seed {
        let o = twopc_sim::run(config(seed, breaks, a.replicas));
        println!(
            "seed {seed}: {} events, {} simulated ms, {} committed, {} aborted, trace {:016x}",
            o.events, o.sim_ms, o.committed, o.aborted, o.trace_hash
        );
        println!("knobs: {:?}", o.knobs);
        if o.violations.is_empty() {
            println!("ok");
            return Ok(());
        }
        print_failure(&o);
        anyhow::bail!("seed {seed} broke {} invariants", o.violations.len());
    }
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = Arc::new(AtomicU64::new(a.from));
    let end = a.from + a.seeds;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let started = Instant::now();
    let deadline = a.time_limit.map(|d| started + d);
    let threads: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, done, stop, failures) =
                (next.clone(), done.clone(), stop.clone(), failures.clone());
            let (first, replicas) = (a.first, a.replicas);
            std::thread::spawn(move || loop {
                if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let o = twopc_sim::run(config(seed, breaks, replicas));
                done.fetch_add(1, Ordering::Relaxed);
                if !o.violations.is_empty() {
                    print_failure(&o);
                    failures.lock().expect("lock").push(o);
                    if first {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a simulation thread panicked");
    }
    let n = done.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let failures = failures.lock().expect("lock");
    println!(
        "{n} schedules in {secs:.1} s ({:.0}/s on {jobs} threads), {} failed",
        n as f64 / secs,
        failures.len()
    );
    if !failures.is_empty() {
        let mut seeds: Vec<u64> = failures.iter().map(|o| o.seed).collect();
        seeds.sort_unstable();
        println!("failing seeds: {seeds:?}");
        anyhow::bail!("{} of {n} schedules broke an invariant", failures.len());
    }
    Ok(())
}
