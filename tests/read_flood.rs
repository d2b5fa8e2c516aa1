//! A flood of public reads cannot make prepares vote `busy` (issue 11).
//!
//! Before reads had their own connections, `wallet.balance` and
//! `order.stock` took places in the participant's one writer queue, the
//! same queue that prepares and decisions need; a read flood filled it and
//! prepares answered `busy`, a no vote. Now reads have their own read-only
//! connections and their own bounded queue, so a flood can only make reads
//! `busy`.
//!
//! The disk is made slow (a delay before each batch's COMMIT, the
//! `<participant>.commit` delay point): with a fast disk the writer here
//! drains reads faster than one machine can send them, and the flood would
//! have to come from many machines. A slow disk is where the shared queue
//! hurt: every read waited for the fsync with the prepares, and filled the
//! queue. Run against the writer-only code (commit "Delay point
//! <participant>.commit"), this test fails with busy votes.

mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::{poll_until, told, tracing_line, Options, System};
use twopc_launcher::client::{request_raw, Reply};
use twopc_launcher::Kind;
use twopc_schemas::api::{Outcome, PurchaseRequest};
use twopc_schemas::points::ParticipantDelay;
use twopc_schemas::{participant, subjects, Code};

/// Connections the flood is sent from.
const FLOOD_CONNECTIONS: usize = 4;
/// Read requests kept in flight per connection: per service (half of them
/// each) well past the writer's queue (`twopc_common::db::MAX_QUEUE`,
/// 8,192) and the readers' (`MAX_READ_QUEUE`, 1,024).
const FLOOD_IN_FLIGHT_PER_CONNECTION: usize = 5_000;
/// Reads answered before the purchases start: the flood is running.
const READS_BEFORE_PURCHASES: u64 = 20_000;
/// How much longer each batch's fsync takes.
const SLOW_COMMIT_MS: u64 = 50;
/// Purchases made during the flood, `PURCHASE_TASKS` at a time.
const PURCHASES: usize = 40;
const PURCHASE_TASKS: usize = 4;

/// What the flood's reads got back.
#[derive(Default)]
struct ReadCounts {
    ok: AtomicU64,
    busy: AtomicU64,
    /// Timeouts and anything else (under this load, a read may time out).
    other: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_flood_makes_reads_busy_never_prepares() {
    let mut opts = Options::default();
    // A prepare that waits behind the flood must still count: only a vote
    // may fail a purchase here, never a prepare timeout on a busy machine.
    opts.coordinator.prepare_timeout_ms = Some(20_000);
    // Each subject may have this many handlers in flight, so the bound a
    // read meets is the database's queue, not the subject's.
    opts.wallet.max_in_flight = Some(16_384);
    opts.order.max_in_flight = Some(16_384);
    let delay = |p| format!("{}:{SLOW_COMMIT_MS}", ParticipantDelay::Commit.at(p));
    let opts = opts
        .set(Kind::Wallet, "TWOPC_DELAY", &delay(&participant::WALLET))
        .set(Kind::Order, "TWOPC_DELAY", &delay(&participant::ORDER));
    let mut sys = System::start(opts).await.unwrap();
    sys.seed(&[("alice", 1_000_000_000)], &[("pen-1", 1, 1_000_000)])
        .await
        .unwrap();

    tracing_line("--- flood wallet.balance and order.stock");
    let counts = Arc::new(ReadCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = vec![];
    for i in 0..FLOOD_CONNECTIONS {
        let client = sys.connect_as("admin").await;
        for j in 0..FLOOD_IN_FLIGHT_PER_CONNECTION {
            let (subject, body) = if (i + j) % 2 == 0 {
                (subjects::WALLET_BALANCE, br#"{"user":"alice"}"#.to_vec())
            } else {
                (subjects::ORDER_STOCK, br#"{"sku":"pen-1"}"#.to_vec())
            };
            let (client, counts, stop) = (client.clone(), counts.clone(), stop.clone());
            flood.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r =
                        request_raw(&client, subject, body.clone(), Duration::from_secs(30)).await;
                    let counter = match r.as_deref().map(twopc_launcher::client::parse_reply) {
                        Ok(Ok(Reply::<serde_json::Value>::Ok(_))) => &counts.ok,
                        Ok(Ok(Reply::Err(e))) if e.error.code == Code::Busy => &counts.busy,
                        _ => &counts.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    poll_until(
        "the flood's reads answered",
        Duration::from_secs(120),
        || {
            let answered = counts.ok.load(Ordering::Relaxed) + counts.busy.load(Ordering::Relaxed);
            async move {
                if answered >= READS_BEFORE_PURCHASES {
                    Ok(())
                } else {
                    Err(format!("{answered} reads answered"))
                }
            }
        },
    )
    .await;

    tracing_line("--- purchases while the flood goes on");
    let sys = Arc::new(sys);
    let mut buyers = vec![];
    for _ in 0..PURCHASE_TASKS {
        let sys = sys.clone();
        buyers.push(tokio::spawn(async move {
            let mut replies = vec![];
            for _ in 0..PURCHASES / PURCHASE_TASKS {
                let req = PurchaseRequest {
                    user: "alice".into(),
                    sku: "pen-1".into(),
                    qty: 1,
                    amount: 1,
                    request_id: None,
                };
                replies.push(sys.purchase_with(&req, Duration::from_secs(60)).await);
            }
            replies
        }));
    }
    let mut replies = vec![];
    for b in buyers {
        replies.extend(b.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    let (ok, busy, other) = (
        counts.ok.load(Ordering::Relaxed),
        counts.busy.load(Ordering::Relaxed),
        counts.other.load(Ordering::Relaxed),
    );
    tracing_line(&format!(
        "--- reads: {ok} answered, {busy} busy, {other} timed out or failed"
    ));

    let mut busy_votes = vec![];
    let mut not_committed = vec![];
    for r in &replies {
        match r {
            Ok(Reply::Ok(p)) if p.outcome == Outcome::Committed => {}
            Ok(Reply::Ok(p)) => {
                if p.reason.as_ref().is_some_and(|r| r.code == Code::Busy) {
                    busy_votes.push(format!("{p:?}"));
                }
                not_committed.push(format!("{p:?}"));
            }
            other => not_committed.push(format!("{other:?}")),
        }
    }
    assert!(
        busy_votes.is_empty(),
        "{} of {PURCHASES} purchases aborted on a busy vote, e.g. {}",
        busy_votes.len(),
        busy_votes[0]
    );
    assert!(
        not_committed.is_empty(),
        "every purchase must commit; these did not: {not_committed:#?}"
    );
    let told: Vec<_> = replies.iter().map(told).collect();
    let s = sys.assert_consistent(&told).await;
    assert_eq!(
        s.users["alice"].0,
        1_000_000_000 - PURCHASES as i64,
        "each purchase debited once"
    );
}
