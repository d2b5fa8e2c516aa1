//! Decision deliveries in flight are bounded (issue 11): a coordinator that
//! restarts with more undelivered decisions than
//! `MAX_DELIVERIES_IN_FLIGHT` sends at most that many `decide` requests
//! before the first ones are answered or time out, and still delivers
//! every one.

mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::{tracing_line, Options, System};
use twopc_coordinator::coordinator::MAX_DELIVERIES_IN_FLIGHT;
use twopc_coordinator::log::{DecisionLog, Record, SqliteLog};
use twopc_launcher::Kind;
use twopc_schemas::participant;
use twopc_schemas::protocol::{self, Decide, Decision, TxId};
use twopc_schemas::subjects;

/// Undelivered decisions at the restart: more than the bound.
const UNDELIVERED: usize = MAX_DELIVERIES_IN_FLIGHT + 500;
/// How long a delivery waits for its answer; nobody answers here, so no
/// place frees up before this.
const DECIDE_TIMEOUT_MS: u64 = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_many_undelivered_decisions_sends_a_bounded_number_at_once() {
    let mut opts = Options::default();
    opts.coordinator.decide_timeout_ms = Some(DECIDE_TIMEOUT_MS);
    let mut sys = System::start(opts).await.unwrap();

    tracing_line("--- stop the wallet and the coordinator; leave decisions undelivered");
    sys.service(Kind::Wallet).proc.kill().unwrap();
    sys.service(Kind::Coordinator).proc.kill().unwrap();
    let path = sys.dir.path().join("coordinator").join("coordinator.db");
    let log = SqliteLog::open(&path).unwrap();
    let mut txs = BTreeSet::new();
    for _ in 0..UNDELIVERED {
        let tx = TxId::now_v7();
        txs.insert(tx);
        log.record(Record {
            tx,
            decision: Decision::Abort,
            request_id: None,
            transaction: None,
            reason: None,
            deliver_to: vec![participant::WALLET],
            pending: vec![participant::WALLET],
            decided_at_ms: twopc_common::now_ms(),
            completed_at_ms: None,
            votes: vec![],
            delivery_attempts: 0,
        })
        .await
        .unwrap();
    }
    drop(log);

    tracing_line("--- a wallet that never answers; restart the coordinator");
    let wallet = sys.connect_as("wallet").await;
    let mut decides = wallet
        .queue_subscribe(
            subjects::decide(&participant::WALLET),
            subjects::queue_group(participant::WALLET.as_str()),
        )
        .await
        .unwrap();
    wallet.flush().await.unwrap();
    sys.service(Kind::Coordinator).proc.start().unwrap();

    // Every delivery sent before the first one can time out is one in
    // flight at once.
    let mut seen = BTreeSet::new();
    let mut first_round = 0;
    let mut first_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < UNDELIVERED {
        let msg = tokio::time::timeout_at(deadline.into(), decides.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {UNDELIVERED} decisions delivered\n{}",
                    seen.len(),
                    sys.logs()
                )
            })
            .expect("subscription open");
        let d: Decide = protocol::decode(&msg.payload).expect("a decide");
        assert!(txs.contains(&d.tx), "a decision we recorded");
        let at = *first_at.get_or_insert_with(Instant::now);
        // Well inside the first timeout (4 of its 5 s): all sent before
        // any place could free up.
        if at.elapsed() < Duration::from_millis(DECIDE_TIMEOUT_MS - 1_000) {
            first_round += 1;
        }
        seen.insert(d.tx);
    }
    tracing_line(&format!(
        "--- {first_round} deliveries before the first could time out; all {UNDELIVERED} delivered"
    ));
    assert!(
        first_round <= MAX_DELIVERIES_IN_FLIGHT,
        "{first_round} deliveries in flight at once, more than {MAX_DELIVERIES_IN_FLIGHT}"
    );
    assert_eq!(
        first_round, MAX_DELIVERIES_IN_FLIGHT,
        "every place was used"
    );
}
