//! The Rust client library (`twopc-client`) against a real system: typed
//! decisions, refusals that are final, and a coordinator that does not
//! answer in time reported as unknown — never as an abort — with a retry
//! under the same request id returning the one outcome, charged once.

mod harness;

use std::time::Duration;

use harness::{Options, System};
use twopc::launcher::Kind;
use twopc_client::{ClientError, Submitted, TxClient};
use twopc_schemas::api::{Outcome, PurchaseRequest};
use twopc_schemas::tx::{Branch, Op};
use twopc_schemas::{ClientName, Code, ParticipantName};

fn branch(p: &str, op: &str) -> Branch {
    Branch {
        participant: ParticipantName::new(p).unwrap(),
        op: Op::parse(op.as_bytes()).unwrap(),
    }
}

fn book(amount: u64) -> Vec<Branch> {
    vec![
        branch(
            "wallet",
            &format!(r#"{{"user":"alice","amount":{amount}}}"#),
        ),
        branch(
            "order",
            &format!(r#"{{"user":"alice","sku":"book-1","qty":1,"amount":{amount}}}"#),
        ),
    ]
}

async fn client(sys: &System) -> TxClient {
    TxClient::new(sys.connect_as("web").await, ClientName::new("web").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_typed_and_refusals_final() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let c = client(&sys).await;

    let Ok(Submitted::Decided(r)) = c.submit(book(1_250), Some("lib-1".into())).await else {
        panic!("no decision")
    };
    assert_eq!((r.outcome, r.duplicate), (Outcome::Committed, false));
    let Ok(Submitted::Decided(again)) = c.submit(book(1_250), Some("lib-1".into())).await else {
        panic!("no decision")
    };
    assert_eq!((again.tx.as_str(), again.duplicate), (r.tx.as_str(), true));

    // A purchase is the same client's transaction type.
    let Ok(Submitted::Decided(p)) = c
        .purchase(PurchaseRequest {
            user: "carol".into(),
            sku: "book-1".into(),
            qty: 1,
            amount: 1_250,
            request_id: None,
        })
        .await
    else {
        panic!("no decision")
    };
    assert_eq!(p.outcome, Outcome::Aborted, "carol cannot pay: {p:?}");
    assert!(p.request_id.is_some(), "the library made a request id");

    match c.submit(vec![branch("bank", "{}")], None).await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, Code::UnknownParticipant),
        other => panic!("{other:?}"),
    }
    match c.submit(book(1), Some("lib-1".into())).await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, Code::Conflict),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_in_time_is_unknown_and_the_retry_finds_the_one_outcome() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let before = sys.balance("alice").await.balance;
    let c = client(&sys)
        .await
        .with_deadline(Duration::from_millis(1_500), Duration::from_millis(400));

    // The coordinator is frozen: no attempt is answered.
    sys.service(Kind::Coordinator).proc.pause().unwrap();
    match c.submit(book(1_250), Some("frozen".into())).await {
        Err(ClientError::Unknown {
            request_id,
            attempts,
            ..
        }) => {
            assert_eq!(request_id, "frozen");
            assert!(attempts >= 2, "it retried: {attempts}");
        }
        other => panic!("expected unknown, got {other:?}"),
    }
    // It wakes up with every attempt queued: one transaction runs.
    sys.service(Kind::Coordinator).proc.resume().unwrap();
    let c = c.with_deadline(Duration::from_secs(20), Duration::from_secs(5));
    let Ok(Submitted::Decided(r)) = c.submit(book(1_250), Some("frozen".into())).await else {
        panic!("no decision after the coordinator resumed")
    };
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    sys.wait_quiescent(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        sys.balance("alice").await.balance,
        before - 1_250,
        "charged exactly once"
    );
}
