//! Exactly-once by `request_id`: a key's first outcome is durable and final,
//! whoever ends the attempt (issue 8).

mod harness;

use std::time::Duration;

use harness::{poll_until, told, tracing_line, tx_id, Options, System, PURCHASE};
use twopc_launcher::client::Reply;
use twopc_launcher::Kind;
use twopc_schemas::api::{Outcome, PurchaseReply, PurchaseRequest};
use twopc_schemas::protocol::Decision;
use twopc_schemas::{BranchState, Code};

/// Polls the real SQLite files until `f` finds what it waits for.
async fn wait_for<T>(
    sys: &System,
    what: &str,
    timeout: Duration,
    f: impl Fn(&twopc::check::Snapshot) -> Option<T>,
) -> T {
    poll_until(what, timeout, || {
        let found = f(&sys.snapshot());
        async move { found.ok_or_else(|| "not yet".to_owned()) }
    })
    .await
}

fn book(request_id: &str) -> PurchaseRequest {
    PurchaseRequest {
        user: "alice".into(),
        sku: "book-1".into(),
        qty: 2,
        amount: 2_500,
        request_id: Some(request_id.into()),
    }
}

async fn must_answer(sys: &System, req: &PurchaseRequest) -> PurchaseReply {
    match sys.purchase_with(req, Duration::from_secs(30)).await {
        Ok(Reply::Ok(r)) => r,
        other => panic!("purchase {req:?}: {other:?}\n{}", sys.logs()),
    }
}

/// Issue 8, bug 1: the order service's vote is held back (the process is
/// stopped with SIGSTOP) while the wallet, prepared, is killed and restarted.
/// The restarted wallet asks for the decision of its prepared branch, and
/// the coordinator records abort by presumption, with no request id. When
/// the order's yes vote finally arrives, the attempt ends in that abort and
/// the client hears `aborted`. The key must be bound to that abort: a retry
/// with the same request_id gets the same transaction, aborted, and nobody
/// is charged. (Before the fix the key stayed free and the retry ran, and
/// committed, a second transaction.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_8_key_told_aborted_by_presumed_abort_is_never_charged() {
    // A long prepare timeout: the order's vote arrives late but in time.
    let opts = Options::default().set(Kind::Coordinator, "TWOPC_PREPARE_TIMEOUT_MS", "20000");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    tracing_line("--- stop the order service (SIGSTOP); its vote will be late");
    sys.service(Kind::Order).proc.pause().unwrap();
    let client = sys.shop.client.clone();
    let first = tokio::spawn(async move {
        twopc_launcher::client::request::<_, PurchaseReply>(
            &client,
            PURCHASE.as_str(),
            &book("issue-8-key"),
            Duration::from_secs(40),
        )
        .await
    });

    tracing_line("--- wait until the wallet has prepared");
    let tx = wait_for(
        &sys,
        "the wallet's prepared branch",
        Duration::from_secs(10),
        |s| {
            s.wallet_branches
                .iter()
                .find(|(_, st)| **st == BranchState::Prepared)
                .map(|(tx, _)| *tx)
        },
    )
    .await;

    sys.restart(Kind::Wallet).await.unwrap();
    tracing_line("--- wait until the restarted wallet's query recorded a presumed abort");
    wait_for(
        &sys,
        "a presumed abort in the decision log",
        Duration::from_secs(10),
        |s| {
            s.decisions
                .get(&tx)
                .filter(|d| d.0 == Decision::Abort)
                .map(|_| ())
        },
    )
    .await;

    tracing_line("--- resume the order service (SIGCONT); it votes yes, too late");
    sys.service(Kind::Order).proc.resume().unwrap();
    let r = first.await.unwrap();
    let first_told = told(&r);
    let Ok(Reply::Ok(r)) = r else {
        panic!("no purchase reply: {r:?}\n{}", sys.logs())
    };
    assert_eq!(tx_id(&r), tx);
    assert_eq!(r.outcome, Outcome::Aborted, "{r:?}");
    assert_eq!(
        r.reason.as_ref().unwrap().code,
        Code::PresumedAbort,
        "{r:?}"
    );
    assert_eq!(r.request_id.as_deref(), Some("issue-8-key"), "{r:?}");

    tracing_line("--- retry the same request_id: the first outcome, not a new purchase");
    let again = must_answer(&sys, &book("issue-8-key")).await;
    assert_eq!(again.tx, r.tx, "the retry ran a new transaction: {again:?}");
    assert_eq!(again.outcome, Outcome::Aborted, "{again:?}");
    assert!(again.duplicate, "{again:?}");

    let s = sys
        .assert_consistent(&[first_told, told(&Ok(Reply::Ok(again)))])
        .await;
    // The log keys request ids per client.
    assert_eq!(
        s.decisions.get(&tx).unwrap().2.as_deref(),
        Some(sys.shop.log_key("issue-8-key").as_str())
    );
    assert_eq!(s.debits.len(), 0, "nobody was charged");
    assert_eq!(sys.balance("alice").await.balance, 10_000);
    assert_eq!(sys.stock("book-1").await.stock, 10);
}
