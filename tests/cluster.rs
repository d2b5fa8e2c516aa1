//! No single point of failure: a system on a 3-node JetStream cluster with
//! two coordinator replicas sharing decisions in replicated KV, under a
//! purchase workload, while one NATS node is killed (and later the meta
//! leader), and one coordinator replica is killed. Every purchase a client
//! heard about is as it heard, none is split, every request id keeps one
//! outcome, and nothing is left in doubt after healing. And a replica held
//! (stopped) between its window check and its decision write until past
//! the window splits no purchase (issue 18, finding 1).

mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::PURCHASE;
use twopc_launcher::client::{request, Reply};
use twopc_launcher::{CoordinatorSettings, Kind, Nats, ParticipantSettings, System, SystemConfig};
use twopc_schemas::api::{CreateProduct, CreateUser, Outcome, PurchaseReply, PurchaseRequest};
use twopc_schemas::BranchState;
use twopc_schemas::Code;
use twopc_verify::check::{self, Initial, KeyReply, Snapshot, Told};

const USERS: usize = 4;
const PRODUCTS: usize = 3;
const BALANCE: u64 = 1_000_000_000;
const STOCK: u64 = 1_000_000;
const WORKERS: usize = 8;

/// The tests here each start a 3-node cluster; run them one at a time (two
/// at once compete for free ports between picking and binding them, and
/// for the two cores).
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Heard {
    told: Mutex<Vec<Told>>,
    replies: Mutex<Vec<KeyReply>>,
    commits: AtomicU64,
    /// Commit times, ms since the run began, to find the longest gap.
    commit_times: Mutex<Vec<u64>>,
}

/// One client: purchases with request ids; a timeout or an
/// `outcome_unknown`/`busy`/`unavailable` answer is retried with the same
/// key (the outcome is unknown, not failed).
async fn worker(
    w: usize,
    client: async_nats::Client,
    heard: Arc<Heard>,
    stop: Arc<AtomicBool>,
    began: Instant,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let sku = (n as usize + w) % PRODUCTS;
        let req = PurchaseRequest {
            user: format!("user-{}", (n as usize * 7 + w) % USERS),
            sku: format!("sku-{sku}"),
            qty: 1,
            amount: 100 + 37 * sku as u64,
            request_id: Some(format!("w{w}-{n}")),
        };
        let mut answered = false;
        for _attempt in 0..40 {
            match request::<_, PurchaseReply>(
                &client,
                PURCHASE.as_str(),
                &req,
                Duration::from_secs(3),
            )
            .await
            {
                Ok(Reply::Ok(r)) => {
                    let tx: uuid::Uuid = r.tx.parse().expect("tx id");
                    heard.replies.lock().unwrap().push(KeyReply {
                        // As the decision log keys it.
                        request_id: format!("web/{}", req.request_id.as_deref().unwrap()),
                        tx,
                        outcome: r.outcome,
                        duplicate: r.duplicate,
                    });
                    heard.told.lock().unwrap().push(match r.outcome {
                        Outcome::Committed => Told::Committed(tx),
                        Outcome::Aborted => Told::Aborted(tx),
                    });
                    if r.outcome == Outcome::Committed {
                        heard.commits.fetch_add(1, Ordering::Relaxed);
                        heard
                            .commit_times
                            .lock()
                            .unwrap()
                            .push(began.elapsed().as_millis() as u64);
                    }
                    answered = true;
                    break;
                }
                Ok(Reply::Err(e))
                    if matches!(
                        e.error.code,
                        Code::OutcomeUnknown | Code::Busy | Code::Unavailable | Code::ShuttingDown
                    ) => {}
                Ok(Reply::Err(e)) => panic!("purchase refused: {e:?}"),
                // A timeout or no responders (a replica's node is down and
                // the client's reconnects): unknown; ask again, same key.
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !answered {
            heard.told.lock().unwrap().push(Told::Unknown);
        }
    }
}

/// Waits until `more` commits past `from` were heard (bounded).
async fn commits_go_on(heard: &Heard, from: u64, more: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while heard.commits.load(Ordering::Relaxed) < from + more {
        assert!(
            Instant::now() < deadline,
            "{what}: only {} commits in 60 s",
            heard.commits.load(Ordering::Relaxed) - from
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server leading the KV stream of decisions.
async fn decisions_leader(client: &async_nats::Client) -> String {
    twopc_coordinator::kv::leader(client, twopc_coordinator::kv::DEFAULT_BUCKET)
        .await
        .expect("a replicated stream has a leader")
}

fn node_named(sys: &mut System, name: &str) -> usize {
    (0..3)
        .find(|&i| sys.cluster().unwrap().node(i).name == name)
        .unwrap_or_else(|| panic!("{name} is not a node"))
}

fn say(s: &str) {
    eprintln!("--- {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_nats_node_or_a_coordinator_replica_under_load_loses_and_splits_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("twopc-test-cluster-faults-")
        .tempdir()
        .unwrap();
    let root = dir.path().to_owned();
    let mut cfg = SystemConfig::new(&root, harness::bins());
    cfg.client_name = "twopc-test".into();
    cfg.nats = Nats::Cluster {
        nodes: 3,
        port: None,
    };
    cfg.coordinators = 2;
    cfg.coordinator = CoordinatorSettings {
        prepare_timeout_ms: Some(1_000),
        decide_timeout_ms: Some(500),
        retry_base_ms: Some(20),
        retry_cap_ms: Some(1_000),
        extra_env: vec![("TWOPC_SWEEP_INTERVAL_MS".into(), "1000".into())],
        ..Default::default()
    };
    let participant = ParticipantSettings {
        in_doubt_after_ms: Some(2_000),
        recovery_interval_ms: Some(250),
        decision_timeout_ms: Some(1_000),
        ..Default::default()
    };
    cfg.wallet = participant.clone();
    cfg.order = participant;
    let mut sys = System::start(cfg).await.unwrap();

    let users: Vec<CreateUser> = (0..USERS)
        .map(|i| CreateUser {
            user: format!("user-{i}"),
            balance: BALANCE,
        })
        .collect();
    let products: Vec<CreateProduct> = (0..PRODUCTS)
        .map(|i| CreateProduct {
            sku: format!("sku-{i}"),
            price: 100 + 37 * i as u64,
            stock: STOCK,
        })
        .collect();
    sys.seed(&users, &products, false).await.unwrap();
    let mut initial = Initial::default();
    for u in &users {
        initial.balances.insert(u.user.clone(), u.balance);
    }
    for p in &products {
        initial.products.insert(p.sku.clone(), (p.price, p.stock));
    }

    let heard = Arc::new(Heard::default());
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(worker(
                w,
                sys.shop.client.clone(),
                heard.clone(),
                stop.clone(),
                began,
            ))
        })
        .collect();
    commits_go_on(&heard, 0, 50, "before any fault").await;

    // The node leading the decisions' stream: every decision write goes
    // through it, so its loss is the one that costs an election.
    let leader = decisions_leader(&sys.client).await;
    let node = node_named(&mut sys, &leader);
    say(&format!(
        "kill the decisions' stream leader, NATS node {node} ({leader}); purchases must go on"
    ));
    sys.cluster().unwrap().kill(node).unwrap();
    let c = heard.commits.load(Ordering::Relaxed);
    commits_go_on(&heard, c, 100, "with the stream leader's node down").await;
    say("restart it");
    sys.cluster().unwrap().restart(node).await.unwrap();

    say("kill coordinator replica 1 (SIGKILL); the other serves");
    sys.coordinator(0).proc.kill().unwrap();
    let c = heard.commits.load(Ordering::Relaxed);
    commits_go_on(&heard, c, 100, "with one coordinator replica down").await;
    say("restart coordinator replica 1");
    sys.coordinator(0).proc.start().unwrap();
    sys.wait_ready(Kind::Coordinator).await.unwrap();

    let leader = sys.cluster().unwrap().live_leader().await.unwrap();
    let node = node_named(&mut sys, &leader);
    say(&format!(
        "kill the JetStream meta leader, node {node} ({leader})"
    ));
    sys.cluster().unwrap().kill(node).unwrap();
    let c = heard.commits.load(Ordering::Relaxed);
    commits_go_on(&heard, c, 100, "with the meta leader down").await;
    say("restart it");
    sys.cluster().unwrap().restart(node).await.unwrap();
    let c = heard.commits.load(Ordering::Relaxed);
    commits_go_on(&heard, c, 50, "after healing").await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let healed = Instant::now();
    let bucket = twopc_coordinator::kv::DEFAULT_BUCKET;
    let snapshot = loop {
        let s = Snapshot::read_with_kv(&root, sys.client.clone(), bucket).await;
        if let Ok(s) = &s {
            if s.quiescent() {
                break s.clone();
            }
        }
        assert!(
            healed.elapsed() < Duration::from_secs(60),
            "not quiescent 60 s after healing: {:?}",
            s.map(|s| check::no_holds_left(&s))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let told = heard.told.lock().unwrap().clone();
    let replies = heard.replies.lock().unwrap().clone();
    let mut gaps: Vec<u64> = {
        let mut t = heard.commit_times.lock().unwrap().clone();
        t.sort_unstable();
        t.windows(2).map(|w| w[1] - w[0]).collect()
    };
    gaps.sort_unstable();
    eprintln!(
        "{} purchases answered ({} committed), {} unknown to the client; \
         quiescent {} ms after healing; longest time without a commit {} ms",
        replies.len(),
        heard.commits.load(Ordering::Relaxed),
        told.iter().filter(|t| matches!(t, Told::Unknown)).count(),
        healed.elapsed().as_millis(),
        gaps.last().copied().unwrap_or(0),
    );
    let violations: Vec<String> = [
        check::atomicity(&snapshot),
        check::conservation(&initial, &snapshot),
        check::no_holds_left(&snapshot),
        check::client_view(&told, &snapshot),
        check::request_id_client_view(&replies, &snapshot),
    ]
    .concat();
    assert!(violations.is_empty(), "violations: {violations:#?}");
    assert!(
        !snapshot.decisions.is_empty()
            && snapshot.debits.len() as u64 >= heard.commits.load(Ordering::Relaxed),
        "every commit a client heard is applied"
    );
}

// ---------------------------------------------------------------------
// Issue 18, finding 1: a commit written late, past the window.

/// The short window of [`a_commit_write_held_past_the_window_splits_nothing`].
const LATE_WINDOW_MS: i64 = 2_000;

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`).
fn process_state(pid: u32) -> Result<char, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // `pid (comm) S ...`: the state follows the last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .ok_or_else(|| format!("unparsable /proc/{pid}/stat: {stat:?}"))
}

/// Milliseconds since `tx` began (its UUIDv7 timestamp).
fn tx_age_ms(tx: uuid::Uuid) -> i64 {
    twopc_common::now_ms()
        - twopc_schemas::protocol::started_at_ms(tx).expect("transaction ids are UUIDv7")
}

/// The sequence of issue 18, finding 1, with real processes: replica A
/// collects the votes of a purchase, passes the window check and is
/// stopped (SIGSTOP, by its own stop point) before its decision write.
/// Past the window the wallet, in doubt, asks; replica B answers (A is
/// stopped), the wallet aborts. A resumes and writes its decision. Both
/// branches must end the same way: after the wallet's abort, aborted.
///
/// To make A the one that collects the votes, B is stopped while the
/// purchase is sent and started again once A is held. The wallet's
/// queries go to either replica (a queue group; a NATS server picks a
/// member at random for a client's message, wherever the members are
/// connected): one that reaches the stopped A times out and is asked
/// again, so within a few tries one reaches B. The order service
/// asks only after a minute, so it hears the outcome from A's delivery, as
/// in the finding's sequence; the wallet asks from 3 s on (past the 2 s
/// window, so B never answers it within the window, where B records a
/// presumed abort that A's write would lose to).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_write_held_past_the_window_splits_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let began = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("twopc-test-cluster-late-write-")
        .tempdir()
        .unwrap();
    let root = dir.path().to_owned();
    let mut cfg = SystemConfig::new(&root, harness::bins());
    cfg.client_name = "twopc-test".into();
    cfg.nats = Nats::Cluster {
        nodes: 3,
        port: None,
    };
    cfg.coordinators = 2;
    let window = [
        ("TWOPC_TX_WINDOW_MS".to_owned(), LATE_WINDOW_MS.to_string()),
        // Long enough that nothing is collected while the test looks.
        ("TWOPC_RETENTION_MS".to_owned(), "60000".to_owned()),
        ("TWOPC_MAX_SKEW_MS".to_owned(), "500".to_owned()),
    ];
    cfg.coordinator = CoordinatorSettings {
        prepare_timeout_ms: Some(1_000),
        decide_timeout_ms: Some(500),
        retry_base_ms: Some(20),
        retry_cap_ms: Some(500),
        extra_env: window.to_vec(),
        ..Default::default()
    };
    cfg.wallet = ParticipantSettings {
        // Asks only past the window.
        in_doubt_after_ms: Some(LATE_WINDOW_MS as u64 + 1_000),
        recovery_interval_ms: Some(100),
        // A query that went to the stopped replica is retried soon.
        decision_timeout_ms: Some(500),
        extra_env: window.to_vec(),
        ..Default::default()
    };
    cfg.order = ParticipantSettings {
        // Hears the outcome only from A's delivery.
        in_doubt_after_ms: Some(60_000),
        recovery_interval_ms: Some(100),
        decision_timeout_ms: Some(500),
        extra_env: window.to_vec(),
        ..Default::default()
    };
    let mut sys = System::start(cfg).await.unwrap();
    let users = [CreateUser {
        user: "alice".into(),
        balance: 10_000,
    }];
    let products = [CreateProduct {
        sku: "book-1".into(),
        price: 1_250,
        stock: 10,
    }];
    sys.seed(&users, &products, false).await.unwrap();
    let mut initial = Initial::default();
    initial.balances.insert("alice".into(), 10_000);
    initial.products.insert("book-1".into(), (1_250, 10));
    let bucket = twopc_coordinator::kv::DEFAULT_BUCKET;
    let snapshot = |client: async_nats::Client| {
        let root = root.clone();
        async move {
            Snapshot::read_with_kv(&root, client, bucket)
                .await
                .map_err(|e| format!("{e:#}"))
        }
    };

    say("stop replica B; start replica A again with its stop point armed");
    sys.coordinator(1).proc.kill().unwrap();
    let point = twopc_schemas::points::CoordinatorCrash::AfterVotes.name();
    let a = sys.coordinator(0);
    a.proc.kill().unwrap();
    a.proc.set_env(twopc_common::fault::STOP_ENV, Some(point));
    a.proc.start().unwrap();
    let admin = sys.client.clone();
    sys.coordinator(0)
        .wait_ready(&admin, Duration::from_secs(30))
        .await
        .unwrap();
    let a_pid = sys.coordinator(0).proc.pid().expect("A runs");

    say("purchase through A, the only replica");
    let shop = sys.shop.client.clone();
    let purchase = tokio::spawn(async move {
        let req = PurchaseRequest {
            user: "alice".into(),
            sku: "book-1".into(),
            qty: 1,
            amount: 1_250,
            request_id: Some("late-write-1".into()),
        };
        request::<_, PurchaseReply>(&shop, PURCHASE.as_str(), &req, Duration::from_secs(60)).await
    });
    harness::poll_until(
        "replica A stopped at its stop point",
        Duration::from_secs(20),
        || async {
            match process_state(a_pid)? {
                'T' => Ok(()),
                s => Err(format!("A is in state {s}")),
            }
        },
    )
    .await;
    let s = harness::poll_until("both branches prepared", Duration::from_secs(10), || {
        snapshot(admin.clone())
    })
    .await;
    let tx = match s.wallet_branches.iter().next() {
        Some((tx, BranchState::Prepared)) if s.wallet_branches.len() == 1 => *tx,
        _ => panic!("one prepared wallet branch, got {:?}", s.wallet_branches),
    };
    assert_eq!(
        s.order_branches.get(&tx),
        Some(&BranchState::Prepared),
        "A stops after both votes"
    );
    assert!(!s.decisions.contains_key(&tx), "A stopped before its write");
    assert!(
        sys.coordinator(0).proc.log().contains("STOP POINT"),
        "A stopped at its stop point"
    );
    say(&format!(
        "A stopped between its window check and its write, {} ms into tx {tx}; start B",
        tx_age_ms(tx)
    ));
    sys.coordinator(1).proc.start().unwrap();
    sys.coordinator(1)
        .wait_ready(&admin, Duration::from_secs(30))
        .await
        .unwrap();

    say("wait until the wallet, in doubt past the window, hears abort (from B)");
    let s = harness::poll_until(
        "the wallet's branch aborted",
        // A few queries to the stopped A may time out first, with backoff.
        Duration::from_secs(60),
        || async {
            let s = snapshot(admin.clone()).await?;
            match s.wallet_branches.get(&tx) {
                Some(BranchState::Aborted) => Ok(s),
                other => Err(format!("wallet branch {other:?}")),
            }
        },
    )
    .await;
    // (Past the window by construction: the wallet asks no earlier than
    // `in_doubt_after_ms` after its prepare, which is past the window.)
    let aborted_at = tx_age_ms(tx);
    assert_eq!(
        s.order_branches.get(&tx),
        Some(&BranchState::Prepared),
        "the order service has not heard anything yet"
    );
    assert_eq!(process_state(a_pid), Ok('T'), "A is still stopped");
    say(&format!(
        "wallet aborted {aborted_at} ms into the transaction; decisions: {:?}; resume A",
        s.decisions.get(&tx)
    ));
    sys.coordinator(0).proc.resume().unwrap();

    let s = harness::poll_until(
        "the order branch decided and a decision recorded",
        Duration::from_secs(30),
        || async {
            let s = snapshot(admin.clone()).await?;
            match (s.order_branches.get(&tx), s.decisions.get(&tx)) {
                (Some(BranchState::Committed | BranchState::Aborted), Some(_)) => Ok(s),
                other => Err(format!("order branch, decision: {other:?}")),
            }
        },
    )
    .await;
    let told = vec![harness::told(&purchase.await.unwrap())];
    say(&format!(
        "tx {tx}: wallet {:?}, order {:?}, decision {:?}; the client was told {told:?}",
        s.wallet_branches.get(&tx),
        s.order_branches.get(&tx),
        s.decisions.get(&tx),
    ));
    let violations = [check::atomicity(&s), check::client_view(&told, &s)].concat();
    assert!(
        violations.is_empty(),
        "split purchase: {violations:#?}\n{}",
        logs_of(&sys)
    );
    assert_eq!(
        (s.wallet_branches.get(&tx), s.order_branches.get(&tx)),
        (Some(&BranchState::Aborted), Some(&BranchState::Aborted)),
        "the wallet aborted, so the order must abort too"
    );

    say("wait until quiescent, and check every invariant");
    let s = harness::poll_until("quiescence", Duration::from_secs(30), || async {
        let s = snapshot(admin.clone()).await?;
        if s.quiescent() {
            Ok(s)
        } else {
            Err(format!("{:?}", check::no_holds_left(&s)))
        }
    })
    .await;
    let violations: Vec<String> = [
        check::atomicity(&s),
        check::conservation(&initial, &s),
        check::no_holds_left(&s),
        check::client_view(&told, &s),
    ]
    .concat();
    assert!(violations.is_empty(), "violations: {violations:#?}");
    eprintln!("took {} ms", began.elapsed().as_millis());
}

/// The last lines of every service's log, for a failure message.
fn logs_of(sys: &System) -> String {
    let mut out = String::new();
    for (name, s) in &sys.services {
        let log = s.proc.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        out.push_str(&format!("===== {name} (last 30 lines)\n"));
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}
