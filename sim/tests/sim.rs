//! The simulation as a test: a run replays from its seed, every planted
//! break (`TWOPC_BREAK`'s counterparts) is found, and a batch of at least
//! 10,000 schedules finds nothing on the code as it is.
//!
//! The batch starts at `TWOPC_SIM_FROM` (default: a seed taken from the
//! clock, printed, so that every CI run explores new schedules; a failure
//! prints its seed, and `twopc sim --seed N` replays it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twopc_sim::{run, Breaks, Config};

fn config(seed: u64, breaks: Breaks) -> Config {
    let mut c = Config::new(seed);
    c.breaks = breaks;
    c
}

/// Runs seeds `from..from + n` on every core; returns the failing ones
/// with their first violation, and how many ran before `limit`.
fn batch(from: u64, n: u64, breaks: Breaks, limit: Duration) -> (Vec<(u64, String)>, u64) {
    std::panic::set_hook(Box::new(|_| {}));
    let next = Arc::new(AtomicU64::new(from));
    let done = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let deadline = Instant::now() + limit;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, done, failed) = (next.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || loop {
                if Instant::now() >= deadline {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= from + n {
                    return;
                }
                let o = run(config(seed, breaks));
                done.fetch_add(1, Ordering::Relaxed);
                if let Some(v) = o.violations.first() {
                    failed.lock().unwrap().push((seed, v.clone()));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let _ = std::panic::take_hook();
    let mut f = failed.lock().unwrap().clone();
    f.sort();
    (f, done.load(Ordering::Relaxed))
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in [3, 196, 395] {
        let (a, b) = (run(Config::new(seed)), run(Config::new(seed)));
        assert!(a.events > 1_000, "seed {seed}: a run of substance");
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_eq!(a.violations, b.violations, "seed {seed}");
        assert_eq!((a.events, a.sim_ms), (b.events, b.sim_ms), "seed {seed}");
    }
    assert_ne!(
        run(Config::new(3)).trace_hash,
        run(Config::new(4)).trace_hash,
        "different seeds, different schedules"
    );
}

#[test]
fn every_planted_break_is_found() {
    for name in [
        "forget_request_ids",
        "vote_before_durable",
        "decide_alone",
        "no_owner",
    ] {
        let breaks = Breaks::parse(name).unwrap();
        let (failed, ran) = batch(0, 100, breaks, Duration::from_secs(120));
        assert!(
            !failed.is_empty(),
            "break {name}: no violation in {ran} schedules"
        );
        eprintln!(
            "break {name}: {} of {ran} schedules failed, first seed {}: {}",
            failed.len(),
            failed[0].0,
            failed[0].1
        );
    }
}

#[test]
fn ten_thousand_schedules_break_no_invariant() {
    let from = std::env::var("TWOPC_SIM_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                * 100_000
        });
    let n = 10_000;
    let started = Instant::now();
    let (failed, ran) = batch(from, n, Breaks::default(), Duration::from_secs(900));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "seeds {from}..{}: {ran} schedules in {secs:.0} s ({:.0}/s), {} failed",
        from + n,
        ran as f64 / secs,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failing seeds (replay with `twopc sim --seed N`): {failed:#?}"
    );
    assert_eq!(ran, n, "the batch did not finish within its time bound");
}
