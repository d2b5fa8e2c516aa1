//! The retention rule end to end, with a short window (1 s) and retention
//! (4 s): a committed purchase's records are collected at the coordinator
//! and at both participants, and then every old message replayed — the
//! prepare, the commit, an abort, a decision query — changes nothing and
//! writes nothing. Also: a prepare that arrives past the window is refused,
//! and the purchase aborts with the other side released.

mod harness;

use std::time::Duration;

use harness::{poll_until, Options, System};
use twopc_launcher::Kind;
use twopc_schemas::api::{Outcome, PurchaseRequest};
use twopc_schemas::protocol::{
    self, Decide, DecideReply, Decision, DecisionQuery, DecisionReply, Prepare, TxId, Vote,
};
use twopc_schemas::{participant, subjects, ClientName, Code};

const WINDOW_MS: &str = "1000";
// At least twice the window, and more than the 1.5 s a late prepare takes
// below: nothing of a transaction is written later than half of it.
const RETENTION_MS: &str = "4000";
const SKEW_MS: &str = "500";

fn options() -> Options {
    let mut o = Options::default();
    for kind in Kind::ALL {
        o = o
            .set(kind, "TWOPC_TX_WINDOW_MS", WINDOW_MS)
            .set(kind, "TWOPC_RETENTION_MS", RETENTION_MS)
            .set(kind, "TWOPC_MAX_SKEW_MS", SKEW_MS);
    }
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_messages_replayed_after_collection_change_nothing() {
    let mut sys = System::start(options()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let req = PurchaseRequest {
        user: "alice".into(),
        sku: "book-1".into(),
        qty: 1,
        amount: 1_250,
        request_id: Some("retained-1".into()),
    };
    let reply = match sys.purchase_with(&req, Duration::from_secs(10)).await {
        Ok(twopc_launcher::client::Reply::Ok(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(reply.outcome, Outcome::Committed);
    let tx: TxId = reply.tx.parse().unwrap();

    // Collected everywhere, by the services' own loops.
    poll_until("the records collected", Duration::from_secs(20), || async {
        let s = sys.snapshot();
        let left = [
            s.decisions.contains_key(&tx),
            s.wallet_branches.contains_key(&tx),
            s.order_branches.contains_key(&tx),
        ];
        if left == [false; 3] {
            Ok(())
        } else {
            Err(format!(
                "still there (coordinator, wallet, order): {left:?}"
            ))
        }
    })
    .await;
    let before = sys.snapshot();
    let balance = sys.balance("alice").await;
    assert_eq!(balance.balance, 10_000 - 1_250);
    // The committed purchase itself stays: only protocol records go.
    assert!(before.debits.contains_key(&tx) && before.orders.contains_key(&tx));

    // The old prepare: refused as expired, nothing held.
    let prepare = Prepare {
        tx,
        client: ClientName::new("web").unwrap(),
        op: br#"{"amount":1250,"user":"alice"}"#.to_vec(),
    };
    let raw = sys
        .raw(
            &subjects::prepare(&participant::WALLET),
            &protocol::encode(&prepare),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            protocol::decode::<Vote>(&raw).unwrap(),
            Vote::No {
                code: Code::Expired,
                ..
            }
        ),
        "{:?}",
        protocol::decode::<Vote>(&raw)
    );
    // The old commit: its branch was committed and collected; a commit
    // for a branch not stored, older than the retention less the skew, is
    // acknowledged (a commit means this participant voted yes, durably
    // prepared, and prepared branches are never collected), and nothing is
    // written (checked below).
    let raw = sys
        .raw(
            &subjects::decide(&participant::WALLET),
            &protocol::encode(&Decide {
                tx,
                decision: Decision::Commit,
            }),
        )
        .await
        .unwrap();
    assert!(matches!(
        protocol::decode::<DecideReply>(&raw).unwrap(),
        DecideReply::Ack
    ));
    // An old abort: acknowledged, and no tombstone written.
    let raw = sys
        .raw(
            &subjects::decide(&participant::ORDER),
            &protocol::encode(&Decide {
                tx,
                decision: Decision::Abort,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        protocol::decode::<DecideReply>(&raw).unwrap(),
        DecideReply::Ack
    );
    // An old decision query: abort (it can never commit now), nothing
    // written.
    let raw = sys
        .raw(
            &subjects::decision_query(&participant::WALLET),
            &protocol::encode(&DecisionQuery {
                tx,
                participant: participant::WALLET,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        protocol::decode::<DecisionReply>(&raw).unwrap(),
        DecisionReply::Decided {
            tx,
            decision: Decision::Abort
        }
    );

    let after = sys.snapshot();
    assert!(
        !after.decisions.contains_key(&tx),
        "the query wrote nothing"
    );
    assert!(!after.wallet_branches.contains_key(&tx));
    assert!(!after.order_branches.contains_key(&tx), "no tombstone");
    assert_eq!(after.users, before.users, "no money moved");
    assert_eq!(after.products, before.products, "no stock moved");
    assert_eq!(after.debits, before.debits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_past_the_window_is_refused_and_the_purchase_aborts() {
    // The order service handles its prepare 1.5 s late: past the 1 s
    // window (the prepare timeout is 3 s, so its vote still counts), so it
    // votes no `expired` and holds nothing; the wallet's hold is released.
    let o = options()
        .set(Kind::Coordinator, "TWOPC_PREPARE_TIMEOUT_MS", "3000")
        .set(
            Kind::Order,
            "TWOPC_DELAY",
            &format!(
                "{}:1500",
                twopc_schemas::points::ParticipantDelay::Prepare.at(&participant::ORDER)
            ),
        );
    let mut sys = System::start(o).await.unwrap();
    sys.seed_standard().await.unwrap();
    let r = sys.purchase("alice", "book-1", 1, 1_250).await;
    assert_eq!(r.outcome, Outcome::Aborted, "{r:?}");
    assert_eq!(
        r.reason.as_ref().map(|r| r.code),
        Some(Code::Expired),
        "{r:?}"
    );
    let s = sys.wait_quiescent(Duration::from_secs(20)).await.unwrap();
    assert!(s.debits.is_empty() && s.orders.is_empty());
    assert_eq!(sys.balance("alice").await.held, 0);
}
