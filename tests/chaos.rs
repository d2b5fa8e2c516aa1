//! Chaos: a real system under load while a seeded nemesis kills, pauses,
//! partitions and slows its processes; every invariant must hold. And the
//! checker must be able to fail: with the protocol broken on purpose, the
//! same run must report violations.
//!
//! `TWOPC_CHAOS_SECS` sets the length of the main runs (default 70 s on one
//! server, 55 s on a cluster, 45 s for the duplicate run): long enough that
//! every fault kind, `duplicate` among them, is drawn a few times.

mod harness;

use std::time::Duration;

use twopc_launcher::Kind;
use twopc_verify::chaos::{self, Config, FaultKind, Report};

fn config(seed: u64, secs: u64) -> Config {
    let mut cfg = Config::new(harness::bins());
    cfg.seed = seed;
    cfg.duration = Duration::from_secs(secs);
    cfg
}

fn violated(report: &Report, name: &str) -> bool {
    report.invariants.iter().any(|i| i.name == name && !i.ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_every_fault_kind_keeps_every_invariant() {
    let secs = std::env::var("TWOPC_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    // Duplicate instances have their own run below: each takes a
    // participant for seconds, which would starve the other kinds' counts.
    let kinds: Vec<FaultKind> = FaultKind::SINGLE
        .into_iter()
        .filter(|k| *k != FaultKind::Duplicate)
        .collect();
    let mut cfg = config(20_261_126, secs);
    cfg.weights = kinds.iter().map(|k| (*k, 1)).collect();
    let report = chaos::run(cfg).await.unwrap();
    eprintln!("{}", report.text());
    assert!(report.ok, "invariants violated:\n{}", report.text());
    for kind in kinds {
        let n = report.faults.get(kind.name()).copied().unwrap_or(0);
        assert!(
            n >= 3,
            "fault {} injected only {n} times:\n{}",
            kind.name(),
            report.text()
        );
    }
    assert!(
        report.committed > 100,
        "the workload made progress:\n{}",
        report.text()
    );
    assert!(report.heal_to_quiescent_ms.is_some());
}

/// The same on a 3-node JetStream cluster with two coordinator replicas
/// and decisions in replicated KV: NATS nodes killed, paused and cut off
/// from the others (half the time the decisions' stream leader), replicas
/// killed and paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_cluster_keeps_every_invariant() {
    let secs = std::env::var("TWOPC_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let mut cfg = config(20_261_127, secs);
    cfg.cluster = Some(3);
    cfg.coordinators = 2;
    // Duplicates: their own run below, and `twopc chaos --cluster 3`.
    cfg.weights = FaultKind::CLUSTER
        .into_iter()
        .filter(|k| *k != FaultKind::Duplicate)
        .map(|k| (k, 1))
        .collect();
    let report = chaos::run(cfg).await.unwrap();
    eprintln!("{}", report.text());
    assert!(report.ok, "invariants violated:\n{}", report.text());
    let mut kinds = vec![FaultKind::NodeKill, FaultKind::NodePause, FaultKind::Kill];
    match twopc_launcher::NatsCluster::can_isolate() {
        Ok(()) => kinds.push(FaultKind::NodePartition),
        Err(why) => eprintln!("node_partition not injected: {why}"),
    }
    for kind in kinds {
        let n = report.faults.get(kind.name()).copied().unwrap_or(0);
        assert!(
            n >= 2,
            "fault {} injected only {n} times:\n{}",
            kind.name(),
            report.text()
        );
    }
    assert!(
        report.committed > 100,
        "the workload made progress:\n{}",
        report.text()
    );
    assert!(report.heal_to_quiescent_ms.is_some());
}

/// Duplicate participant instances while the workload buys: fresh ones on
/// new data folders refuse to serve; rolling restarts through a standby on
/// the participant's own folder (the original stopped by SIGTERM or by
/// SIGKILL) hand the name over and back. Every variant happens, no
/// promise of the ownership lease is broken, and nothing splits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_duplicate_instances_keeps_one_owner() {
    let secs = std::env::var("TWOPC_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let mut cfg = config(20_261_128, secs);
    cfg.weights = [
        (FaultKind::Duplicate, 6),
        (FaultKind::Kill, 1),
        (FaultKind::Pause, 1),
        (FaultKind::Partition, 1),
    ]
    .into_iter()
    .collect();
    let report = chaos::run(cfg).await.unwrap();
    eprintln!("{}", report.text());
    assert!(report.ok, "invariants violated:\n{}", report.text());
    assert!(
        report
            .invariants
            .iter()
            .any(|i| i.name == "duplicate_instances"),
        "{}",
        report.text()
    );
    for variant in [
        "duplicate_fresh",
        "duplicate_rolling_sigterm",
        "duplicate_rolling_sigkill",
    ] {
        let n = report.fault_variants.get(variant).copied().unwrap_or(0);
        assert!(n > 0, "{variant} never happened:\n{}", report.text());
    }
    for step in [
        "refusal",
        "takeover_after_sigterm",
        "takeover_after_sigkill",
        "handback",
    ] {
        assert!(
            report.ownership_ms.get(step).is_some_and(|v| !v.is_empty()),
            "no {step} measured:\n{}",
            report.text()
        );
    }
    assert!(
        report.committed > 100,
        "the workload made progress:\n{}",
        report.text()
    );
}

/// Break: the wallet votes yes before its prepare is durable (before it
/// even knows whether the user can pay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_catches_a_vote_before_the_prepare_is_durable() {
    let mut cfg = config(7, 15);
    cfg.extra_env = vec![(
        Kind::Wallet,
        "TWOPC_BREAK".into(),
        "vote_before_durable".into(),
    )];
    // Small balances, so that some purchases cannot be paid for.
    cfg.balance = 3_000;
    cfg.weights = [(FaultKind::Kill, 1), (FaultKind::CrashPoint, 1)]
        .into_iter()
        .collect();
    cfg.quiesce_timeout = Duration::from_secs(10);
    let report = chaos::run(cfg).await.unwrap();
    eprintln!("{}", report.text());
    assert!(!report.ok, "the break went unnoticed:\n{}", report.text());
    assert!(violated(&report, "atomicity"), "{}", report.text());
}

/// Break: a participant in doubt aborts on its own instead of asking the
/// coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_catches_a_participant_deciding_alone() {
    let mut cfg = config(11, 20);
    // The wallet gives up on the coordinator after 100 ms; pauses of the
    // coordinator (0.3–4 s) leave it in doubt far longer than that.
    cfg.extra_env = vec![
        (Kind::Wallet, "TWOPC_BREAK".into(), "decide_alone".into()),
        (Kind::Wallet, "TWOPC_IN_DOUBT_AFTER_MS".into(), "100".into()),
        (
            Kind::Wallet,
            "TWOPC_RECOVERY_INTERVAL_MS".into(),
            "50".into(),
        ),
    ];
    cfg.targets = vec![Kind::Coordinator];
    cfg.weights = [(FaultKind::Pause, 3), (FaultKind::Kill, 1)]
        .into_iter()
        .collect();
    cfg.quiesce_timeout = Duration::from_secs(10);
    let report = chaos::run(cfg).await.unwrap();
    eprintln!("{}", report.text());
    assert!(!report.ok, "the break went unnoticed:\n{}", report.text());
    assert!(violated(&report, "atomicity"), "{}", report.text());
}

/// Break: the coordinator ignores the request id, so a re-send of an
/// answered purchase runs a second transaction. Each answer on its own is
/// true to its transaction (`client_view` sees nothing); only the view per
/// request id catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_catches_a_coordinator_that_forgets_request_ids() {
    let mut cfg = config(13, 15);
    cfg.extra_env = vec![(
        Kind::Coordinator,
        "TWOPC_BREAK".into(),
        "forget_request_ids".into(),
    )];
    cfg.weights = [(FaultKind::Kill, 1), (FaultKind::Pause, 1)]
        .into_iter()
        .collect();
    cfg.quiesce_timeout = Duration::from_secs(10);
    let report = chaos::run(cfg).await.unwrap();
    eprintln!("{}", report.text());
    assert!(!report.ok, "the break went unnoticed:\n{}", report.text());
    assert!(
        violated(&report, "request_id_client_view"),
        "{}",
        report.text()
    );
    assert!(report.resends_different_tx > 0, "{}", report.text());
}
