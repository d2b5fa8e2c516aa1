//! The nemesis: seeded, weighted faults on the services, nats-server and
//! their links, each held for a while and healed; and the supervisor that
//! restarts services that died on their own.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use twopc_launcher::system::coordinator_name;
use twopc_launcher::Kind;
use twopc_schemas::points::{CoordinatorCrash, ParticipantCrash, ParticipantDelay};
use twopc_schemas::ParticipantName;

use super::duplicate::{self, Stop, Variant};
use super::{Config, Shared};
use crate::proxy::Link;

/// The kinds of fault the nemesis injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Kill,
    Pause,
    NatsRestart,
    Partition,
    Slow,
    CrashPoint,
    /// On a cluster: SIGKILL one NATS node (half the time the one leading
    /// the decisions' stream), start it again later.
    NodeKill,
    /// On a cluster: SIGSTOP one NATS node (half the time the decisions'
    /// stream leader) for a while: it keeps its sockets but answers
    /// nothing, the nastiest way for a leader to go quiet.
    NodePause,
    /// On a cluster: cut one NATS node (half the time the decisions'
    /// stream leader) off from the other two for a while; it keeps running
    /// and keeps its clients (needs root and iptables; see
    /// `NatsCluster::isolate`).
    NodePartition,
    /// Start a second instance of a participant: on a new, empty data
    /// folder (it must refuse to serve), or on the participant's own
    /// folder as a rolling restart (it stands by, takes over when the
    /// original is stopped, and hands back). See `duplicate.rs`.
    Duplicate,
}

impl FaultKind {
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::NatsRestart,
        FaultKind::Partition,
        FaultKind::Slow,
        FaultKind::CrashPoint,
        FaultKind::NodeKill,
        FaultKind::NodePause,
        FaultKind::NodePartition,
        FaultKind::Duplicate,
    ];

    /// The kinds a single-server run can inject.
    pub const SINGLE: [FaultKind; 7] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::NatsRestart,
        FaultKind::Partition,
        FaultKind::Slow,
        FaultKind::CrashPoint,
        FaultKind::Duplicate,
    ];

    /// The kinds a cluster run can inject (services reach the nodes
    /// directly, so there is no per-service link to cut).
    pub const CLUSTER: [FaultKind; 8] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Slow,
        FaultKind::CrashPoint,
        FaultKind::NodeKill,
        FaultKind::NodePause,
        FaultKind::NodePartition,
        FaultKind::Duplicate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::NatsRestart => "nats_restart",
            FaultKind::Partition => "partition",
            FaultKind::Slow => "slow",
            FaultKind::CrashPoint => "crash_point",
            FaultKind::NodeKill => "node_kill",
            FaultKind::NodePause => "node_pause",
            FaultKind::NodePartition => "node_partition",
            FaultKind::Duplicate => "duplicate",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Crash points the nemesis may arm at `target` (a service name), from the
/// one vocabulary in `twopc_schemas::points`.
pub fn crash_points(target: &str) -> Vec<String> {
    if target == SHIPPING {
        SHIPPING_CRASH_POINTS
            .iter()
            .map(|p| (*p).to_owned())
            .collect()
    } else if target.starts_with(Kind::Coordinator.name()) {
        CoordinatorCrash::ALL
            .iter()
            .map(|c| c.name().to_owned())
            .collect()
    } else {
        let target = participant_named(target);
        ParticipantCrash::ALL
            .iter()
            .map(|c| c.at(&target).to_string())
            .collect()
    }
}

/// The participant a participant service's name names.
fn participant_named(service: &str) -> ParticipantName {
    ParticipantName::new(service).expect("participant services are named by the naming rule")
}

/// Restarts services that died on their own (crash points armed by env,
/// panics) while no fault is working on them. A fault's duplicate
/// instance is not a service (its exits are the fault's to judge), and a
/// busy target's exits are counted by its fault.
pub(super) async fn supervise(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = shared.cluster.lock().expect("lock");
        let c = &mut *c;
        let busy = c.busy.clone();
        let procs = c
            .sys
            .services
            .iter_mut()
            .map(|(name, s)| (name, &mut s.proc))
            .chain(c.extra.iter_mut());
        for (name, p) in procs {
            if !busy.contains(name) && !p.is_running() {
                shared.unexpected_exits.fetch_add(1, Ordering::Relaxed);
                let _ = p.kill();
                let _ = p.start();
                if shared.verbose {
                    eprintln!("supervisor: {name} had exited; restarted");
                }
            }
        }
    }
}

pub(super) const TARGETS: [Kind; 3] = [Kind::Coordinator, Kind::Wallet, Kind::Order];

/// The Go shipping participant (`go/shipping`), when the run has it: a
/// process of its own beside the system's services.
pub(super) const SHIPPING: &str = "shipping";

/// The shipping service's crash points (go/shipping/faults.go), armed by
/// `TWOPC_CRASH_AT` at its start (it reads no faults file).
const SHIPPING_CRASH_POINTS: [&str; 6] = [
    "shipping.prepare.before_durable",
    "shipping.prepare.after_durable",
    "shipping.decide.before_apply",
    "shipping.decide.before_durable",
    "shipping.decide.after_durable",
    "shipping.recover.before_apply",
];
const NATS: &str = "nats";

/// Draws a fault kind by weight.
fn draw_kind(cfg: &Config, rng: &mut StdRng) -> Option<FaultKind> {
    let candidates: Vec<(FaultKind, u32)> = cfg
        .weights
        .iter()
        .filter(|(_, w)| **w > 0)
        .map(|(k, w)| (*k, *w))
        .collect();
    let total: u32 = candidates.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    candidates
        .iter()
        .find(|(_, w)| {
            if x < *w {
                true
            } else {
                x -= w;
                false
            }
        })
        .map(|(k, _)| *k)
}

/// Picks a free target for `kind` and marks it busy: a service by name
/// (coordinator replicas each by their own), or [`NATS`] for a fault of
/// the server or of one cluster node.
fn pick_target(
    cfg: &Config,
    kind: FaultKind,
    rng: &mut StdRng,
    shared: &Shared,
) -> Option<&'static str> {
    let mut c = shared.cluster.lock().expect("lock");
    let nats_busy = c.busy.contains(NATS);
    let replicas: Vec<&'static str> = (0..c.sys.coordinator_count())
        .map(coordinator_name)
        .collect();
    let services = |filter: &dyn Fn(Kind) -> bool| -> Vec<&'static str> {
        cfg.targets
            .iter()
            .copied()
            .filter(|k| filter(*k))
            .flat_map(|k| match k {
                Kind::Coordinator => replicas.clone(),
                other => vec![other.name()],
            })
            .collect()
    };
    let mut eligible: Vec<&'static str> = match kind {
        FaultKind::NatsRestart
        | FaultKind::NodeKill
        | FaultKind::NodePause
        | FaultKind::NodePartition => vec![NATS],
        // Only participants own their names.
        FaultKind::Slow | FaultKind::Duplicate => services(&|k| k != Kind::Coordinator),
        // Replicas share one faults file: a crash point armed for one would
        // be armed for all.
        FaultKind::CrashPoint if cfg.cluster.is_some() => services(&|k| k != Kind::Coordinator),
        _ => services(&|_| true),
    };
    // The shipping service: killed, paused, cut off and crashed like the
    // others; no `slow` (no faults file) and no `duplicate` (no owner
    // lease: one instance only).
    if c.extra.contains_key(SHIPPING)
        && matches!(
            kind,
            FaultKind::Kill | FaultKind::Pause | FaultKind::CrashPoint | FaultKind::Partition
        )
        && (kind != FaultKind::Partition || shared.proxies.contains_key(SHIPPING))
    {
        eligible.push(SHIPPING);
    }
    if eligible.is_empty() {
        return None;
    }
    let target = eligible[rng.random_range(0..eligible.len())];
    // One server: the whole system depends on it, so no other fault while
    // it restarts, and no restart while another fault runs. A cluster:
    // one node fault at a time (two would take the quorum), alongside
    // service faults.
    let blocked = if cfg.cluster.is_some() {
        c.busy.contains(target)
    } else {
        nats_busy || c.busy.contains(target) || (target == NATS && !c.busy.is_empty())
    };
    if blocked {
        return None;
    }
    c.busy.insert(target);
    Some(target)
}

/// Injects faults until the deadline; returns when every fault has healed.
pub(super) async fn nemesis(cfg: &Config, shared: Arc<Shared>, deadline: Instant) {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut tasks = vec![];
    let mean = cfg.fault_interval.as_millis().max(2) as u64;
    // A drawn kind waits until a target is free (a nats restart waits for
    // every other fault to end), so the mix follows the weights.
    let mut pending: Option<FaultKind> = None;
    // Faults started so far (names each duplicate instance).
    let mut seq: u64 = 0;
    loop {
        let wait = Duration::from_millis(rng.random_range(mean / 2..=mean * 3 / 2));
        if Instant::now() + wait >= deadline {
            break;
        }
        tokio::time::sleep(wait).await;
        tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
        if tasks.len() >= cfg.max_active_faults {
            continue;
        }
        let Some(kind) = pending.take().or_else(|| draw_kind(cfg, &mut rng)) else {
            continue;
        };
        let Some(target) = pick_target(cfg, kind, &mut rng, &shared) else {
            pending = Some(kind);
            continue;
        };
        // Every random choice of the fault is drawn here, from the seeded
        // generator, so the schedule is reproducible from the seed.
        let hold = Duration::from_millis(rng.random_range(300..=4_000));
        let points = crash_points(target);
        let point = if points.is_empty() {
            String::new()
        } else {
            points[rng.random_range(0..points.len())].clone()
        };
        let slow = if rng.random_bool(0.7) {
            ParticipantDelay::Prepare
        } else {
            ParticipantDelay::Decide
        };
        let slow_ms = rng.random_range(500..=2_500);
        let node_choice = rng.random_range(0..6usize);
        // Drawn only for this kind, so that seeds of runs without it keep
        // their schedules.
        let duplicate = (kind == FaultKind::Duplicate).then(|| {
            if rng.random_bool(0.5) {
                Variant::Fresh
            } else if rng.random_bool(0.5) {
                Variant::Rolling(Stop::Sigterm)
            } else {
                Variant::Rolling(Stop::Sigkill)
            }
        });
        seq += 1;
        shared.count(kind);
        tasks.push(tokio::spawn(fault(
            shared.clone(),
            kind,
            target,
            Draw {
                hold,
                point,
                slow,
                slow_ms,
                node_choice,
                duplicate,
                seq,
            },
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// A fault's random choices, drawn from the seeded generator.
struct Draw {
    hold: Duration,
    /// The crash point to arm (`crash_point`).
    point: String,
    /// What to slow, and by how much (`slow`).
    slow: ParticipantDelay,
    slow_ms: u64,
    /// Which node (`node_kill`, `node_pause`).
    node_choice: usize,
    /// Which duplicate (`duplicate`).
    duplicate: Option<Variant>,
    /// This fault's number in the run.
    seq: u64,
}

/// Applies one fault, holds it, heals it, frees the target.
async fn fault(shared: Arc<Shared>, kind: FaultKind, target: &'static str, draw: Draw) {
    let Draw {
        hold,
        point,
        slow,
        slow_ms,
        node_choice,
        duplicate,
        seq,
    } = draw;
    match kind {
        FaultKind::NodeKill | FaultKind::NodePause | FaultKind::NodePartition => {
            let node = pick_node(&shared, node_choice).await;
            let name = {
                let mut c = shared.cluster.lock().expect("lock");
                c.sys.cluster().map(|n| n.node(node).name.clone())
            };
            let Some(name) = name else {
                shared.say("nemesis: a node fault needs a cluster");
                shared.cluster.lock().expect("lock").busy.remove(target);
                return;
            };
            if kind == FaultKind::NodePartition {
                shared.say(&format!(
                    "nemesis: cut NATS node {name} off from the others for {hold:?}"
                ));
                let r = {
                    let mut c = shared.cluster.lock().expect("lock");
                    c.sys.cluster().expect("a cluster").isolate(node)
                };
                if let Err(e) = r {
                    shared.say(&format!("nemesis: isolating {name} failed: {e:#}"));
                }
                tokio::time::sleep(hold).await;
                let mut c = shared.cluster.lock().expect("lock");
                let _ = c.sys.cluster().expect("a cluster").reconnect(node);
            } else if kind == FaultKind::NodeKill {
                shared.say(&format!(
                    "nemesis: SIGKILL NATS node {name}, down {:?}",
                    hold
                ));
                let _ = with_node(&shared, node, |p| p.kill());
                tokio::time::sleep(hold).await;
                let _ = with_node(&shared, node, |p| p.start());
            } else {
                shared.say(&format!("nemesis: SIGSTOP NATS node {name} for {hold:?}"));
                let _ = with_node(&shared, node, |p| p.pause());
                tokio::time::sleep(hold).await;
                let _ = with_node(&shared, node, |p| p.resume());
            }
        }
        FaultKind::Kill => {
            shared.say(&format!("nemesis: SIGKILL {target}, down {:?}", hold / 4));
            let _ = shared.with_proc(target, |p| p.kill());
            tokio::time::sleep(hold / 4).await;
            let _ = shared.with_proc(target, |p| p.start());
        }
        FaultKind::Pause => {
            shared.say(&format!("nemesis: SIGSTOP {target} for {hold:?}"));
            let _ = shared.with_proc(target, |p| p.pause());
            tokio::time::sleep(hold).await;
            let _ = shared.with_proc(target, |p| p.resume());
        }
        FaultKind::NatsRestart => {
            shared.say(&format!(
                "nemesis: SIGKILL nats-server, down {:?}",
                hold / 4
            ));
            let _ = shared
                .cluster
                .lock()
                .expect("lock")
                .sys
                .nats_server()
                .proc
                .kill();
            tokio::time::sleep(hold / 4).await;
            let r = {
                let mut c = shared.cluster.lock().expect("lock");
                c.sys.nats_server().proc.start()
            };
            if let Err(e) = r {
                shared.say(&format!("nemesis: nats-server restart failed: {e:#}"));
            }
        }
        FaultKind::Partition => {
            shared.say(&format!("nemesis: cut {target}'s link for {hold:?}"));
            shared.proxies[target].set(Link::Cut);
            tokio::time::sleep(hold).await;
            shared.proxies[target].set(Link::Up);
        }
        FaultKind::Slow => {
            let p = slow.at(&participant_named(target)).to_string();
            shared.say(&format!("nemesis: slow {p} by {slow_ms} ms for {hold:?}"));
            let _ = std::fs::write(
                &shared.faults_files[target],
                format!("delay:{p}:{slow_ms}\n"),
            );
            tokio::time::sleep(hold).await;
            let _ = std::fs::write(&shared.faults_files[target], "");
        }
        FaultKind::Duplicate => {
            let variant = duplicate.expect("drawn for a duplicate fault");
            duplicate::duplicate(&shared, target, seq, variant).await;
        }
        FaultKind::CrashPoint if target == SHIPPING => {
            shipping_crash_point(&shared, hold, &point).await;
        }
        FaultKind::CrashPoint => {
            shared.say(&format!("nemesis: arm crash point {point}"));
            let _ = std::fs::write(&shared.faults_files[target], format!("crash:{point}\n"));
            // Wait for the crash (or give up and disarm).
            let deadline = Instant::now() + hold.max(Duration::from_secs(2));
            let mut crashed = false;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if !shared.with_proc(target, |p| p.is_running()) {
                    crashed = true;
                    break;
                }
            }
            let _ = std::fs::write(&shared.faults_files[target], "");
            if crashed {
                shared.say(&format!("nemesis: {target} crashed at {point}; restarting"));
                let _ = shared.with_proc(target, |p| p.kill().and_then(|_| p.start()));
            }
        }
    }
    shared.cluster.lock().expect("lock").busy.remove(target);
}

/// A crash point at the shipping service, which arms them from its
/// environment only: stop it (SIGTERM, drained), start it with
/// `TWOPC_CRASH_AT=<point>`, wait for the crash (exit 86) or the hold,
/// then start it disarmed.
async fn shipping_crash_point(shared: &Shared, hold: Duration, point: &str) {
    shared.say(&format!(
        "nemesis: arm crash point {point} (restart {SHIPPING} with TWOPC_CRASH_AT)"
    ));
    if let Some(pid) = shared.with_proc(SHIPPING, |p| p.pid()) {
        let _ = twopc_launcher::process::signal(pid, libc::SIGTERM);
    }
    let stop_by = Instant::now() + Duration::from_secs(3);
    while Instant::now() < stop_by && shared.with_proc(SHIPPING, |p| p.is_running()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = shared.with_proc(SHIPPING, |p| {
        p.kill()?;
        p.set_env("TWOPC_CRASH_AT", Some(point));
        p.start()
    });
    let deadline = Instant::now() + hold.max(Duration::from_secs(2));
    let mut crashed = false;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !shared.with_proc(SHIPPING, |p| p.is_running()) {
            crashed = true;
            break;
        }
    }
    if crashed {
        shared.say(&format!(
            "nemesis: {SHIPPING} crashed at {point}; restarting"
        ));
    } else {
        shared.say(&format!(
            "nemesis: {SHIPPING} did not reach {point}; restarting it disarmed"
        ));
    }
    let _ = shared.with_proc(SHIPPING, |p| {
        p.set_env("TWOPC_CRASH_AT", None);
        p.kill()?;
        p.start()
    });
}

/// Runs `f` on NATS node `i`'s process, under the cluster lock.
fn with_node<T>(shared: &Shared, i: usize, f: impl FnOnce(&mut twopc_launcher::Proc) -> T) -> T {
    let mut c = shared.cluster.lock().expect("lock");
    f(c.sys.cluster().expect("a cluster").proc(i))
}

/// The node a node fault hits: half the time the one leading the
/// decisions' stream (every decision write goes through it), else one
/// drawn from the seed.
async fn pick_node(shared: &Shared, choice: usize) -> usize {
    let nodes = {
        let mut c = shared.cluster.lock().expect("lock");
        c.sys.cluster().map_or(1, |n| n.nodes.len())
    };
    if choice.is_multiple_of(2) {
        if let Some(leader) = decisions_leader(&shared.client).await {
            let mut c = shared.cluster.lock().expect("lock");
            if let Some(n) = c.sys.cluster() {
                if let Some(i) = (0..nodes).find(|&i| n.node(i).name == leader) {
                    return i;
                }
            }
        }
    }
    (choice / 2) % nodes
}

/// The server leading the KV stream of decisions, if it can be learned
/// within a second.
async fn decisions_leader(client: &async_nats::Client) -> Option<String> {
    let ask = twopc_coordinator::kv::leader(client, twopc_coordinator::kv::DEFAULT_BUCKET);
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

/// Leaves nothing paused, cut, armed or down. Duplicate instances need
/// nothing here: each is owned by its fault, which kills it when it ends
/// (and the nemesis has awaited every fault), leaving the original
/// running and owning its name.
pub(super) fn heal_all(shared: &Shared) {
    for p in shared.proxies.values() {
        p.set(Link::Up);
    }
    for f in shared.faults_files.values() {
        let _ = std::fs::write(f, "");
    }
    let mut c = shared.cluster.lock().expect("lock");
    if let Some(nodes) = c.sys.cluster() {
        nodes.reconnect_all();
        for i in 0..nodes.nodes.len() {
            let p = nodes.proc(i);
            if p.is_running() {
                let _ = p.resume();
            } else {
                let _ = p.kill();
                let _ = p.start();
            }
        }
    } else if !c.sys.nats_server().proc.is_running() {
        let _ = c.sys.nats_server().proc.kill();
        let _ = c.sys.nats_server().proc.start();
    }
    let c = &mut *c;
    let procs = c
        .sys
        .services
        .values_mut()
        .map(|s| &mut s.proc)
        .chain(c.extra.values_mut());
    for p in procs {
        if p.is_running() {
            let _ = p.resume();
        } else {
            let _ = p.kill();
            let _ = p.start();
        }
    }
    c.busy.clear();
}
