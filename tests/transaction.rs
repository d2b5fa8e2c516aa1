//! Generic transactions end to end (`shop.<client>.transaction`): branches
//! at any participants the client may name, each with its own op; a retry
//! written differently is the same transaction; names nobody serves and
//! names a client may not use are refused before anything is sent; the
//! purchase is one transaction type, under the same request ids.

mod harness;

use harness::{Options, System};
use serde_json::{json, Value};
use twopc::launcher::Kind;
use twopc_schemas::api::Outcome;

const SUBJECT: &str = "shop.web.transaction";

async fn submit(sys: &System, body: &str) -> Value {
    let raw = sys
        .raw(SUBJECT, body.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{body}: {e:#}"));
    serde_json::from_slice(&raw).unwrap()
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error reply, got {v}"))
}

fn purchase_branches(user: &str, amount: u64, qty: u64) -> Value {
    json!([
        {"participant": "wallet", "op": {"user": user, "amount": amount}},
        {"participant": "order", "op": {"user": user, "sku": "book-1", "qty": qty, "amount": amount}},
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_transaction_commits_at_every_branch_and_a_retry_is_the_same() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let before = sys.balance("alice").await.balance;

    let body = json!({"branches": purchase_branches("alice", 2_500, 2), "request_id": "t1"});
    let r = submit(&sys, &body.to_string()).await;
    assert_eq!(r["outcome"], "committed", "{r}");
    assert_eq!(r["duplicate"], false);
    let tx = r["tx"].as_str().unwrap().to_owned();
    assert_eq!(sys.balance("alice").await.balance, before - 2_500);

    // The same transaction written differently: keys in another order,
    // other whitespace. Not a conflict: the first outcome, once.
    let rewritten = r#"{ "request_id" : "t1",
        "branches" : [
          { "op" : { "amount" : 2500, "user" : "alice" }, "participant" : "wallet" },
          { "op" : { "sku" : "book-1", "amount" : 2500, "qty" : 2, "user" : "alice" },
            "participant" : "order" } ] }"#;
    let again = submit(&sys, rewritten).await;
    assert_eq!(again["tx"], tx.as_str(), "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(sys.balance("alice").await.balance, before - 2_500);

    // The same key with another op: a conflict, nothing charged.
    let other = json!({"branches": purchase_branches("alice", 1_250, 1), "request_id": "t1"});
    assert_eq!(
        error_code(&submit(&sys, &other.to_string()).await),
        "conflict"
    );

    // The purchase is the same transaction type under the same key space:
    // this purchase is that transaction, so it is its duplicate.
    let purchase = sys
        .raw(
            "shop.web.purchase",
            br#"{"user":"alice","sku":"book-1","qty":2,"amount":2500,"request_id":"t1"}"#,
        )
        .await
        .unwrap();
    let purchase: Value = serde_json::from_slice(&purchase).unwrap();
    assert_eq!(
        (purchase["tx"].as_str(), &purchase["duplicate"]),
        (Some(tx.as_str()), &json!(true))
    );

    // The client's status shows the branches.
    let status = sys.tx_status("shop.web.tx", &tx).await;
    assert_eq!(status["state"], "committed", "{status}");
    assert_eq!(status["client"], "web");
    assert_eq!(status["branches"][0]["participant"], "wallet");
    assert_eq!(status["branches"][1]["op"]["qty"], 2);
    sys.wait_quiescent(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_refused_before_anything_is_sent_or_aborted_by_its_participant() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let before = sys.snapshot();

    // A name nobody serves: refused at once, nothing recorded.
    let unknown = json!({"branches": [
        {"participant": "wallet", "op": {"user": "alice", "amount": 1}},
        {"participant": "bank", "op": {"account": 7}}]});
    let r = submit(&sys, &unknown.to_string()).await;
    assert_eq!(error_code(&r), "unknown_participant", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("bank"));

    // One branch per participant.
    let twice = json!({"branches": [
        {"participant": "wallet", "op": {"user": "alice", "amount": 1}},
        {"participant": "wallet", "op": {"user": "bob", "amount": 1}}]});
    assert_eq!(
        error_code(&submit(&sys, &twice.to_string()).await),
        "invalid_request"
    );
    for bad in [
        "{",
        r#"{"branches":[]}"#,
        r#"{"branches":[{"participant":"wallet","op":{"user":"a","user":"b"}}]}"#,
        r#"{"branches":[{"participant":"wallet"}]}"#,
    ] {
        let code = error_code(&submit(&sys, bad).await).to_owned();
        assert!(
            code == "invalid_request" || code == "malformed_json",
            "{bad}: {code}"
        );
    }
    let after = sys.snapshot();
    assert!(after.decisions.is_empty(), "{:?}", after.decisions);
    assert_eq!(after.users, before.users);

    // An op the participant cannot read: its no vote aborts the whole
    // transaction, and the other branch is released.
    let unreadable = json!({"branches": [
        {"participant": "wallet", "op": {"user": "alice", "amount": 1_250}},
        {"participant": "order", "op": {"sku": "book-1", "qty": 1}}]});
    let r = submit(&sys, &unreadable.to_string()).await;
    assert_eq!(r["outcome"], "aborted", "{r}");
    assert_eq!(r["reason"]["participant"], "order");
    assert_eq!(r["reason"]["code"], "bad_message");
    let s = sys
        .wait_quiescent(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert!(s.holds.is_empty() && s.reservations.is_empty());
    assert_eq!(s.users, before.users);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_names_only_the_participants_its_grant_lists() {
    let opts = Options {
        clients: vec!["web", "app"],
        ..Options::default()
    }
    .set(
        Kind::Coordinator,
        "TWOPC_CLIENT_GRANTS",
        "web=wallet;app=wallet,order",
    );
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    // web may name the wallet only: a purchase (wallet and order) is
    // forbidden to it, and so is a transaction naming the order service.
    let r = sys
        .raw(
            "shop.web.purchase",
            br#"{"user":"alice","sku":"book-1","qty":1,"amount":1250}"#,
        )
        .await
        .unwrap();
    let r: Value = serde_json::from_slice(&r).unwrap();
    assert_eq!(error_code(&r), "forbidden", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("order"));
    let only_wallet =
        json!({"branches": [{"participant": "wallet", "op": {"user": "alice", "amount": 100}}]});
    let r = submit(&sys, &only_wallet.to_string()).await;
    assert_eq!(r["outcome"], "committed", "{r}");

    // app may name both.
    let app = sys.connect_as("app").await;
    let reply = twopc_launcher::client::request::<_, twopc_schemas::api::PurchaseReply>(
        &app,
        "shop.app.purchase",
        &json!({"user": "alice", "sku": "book-1", "qty": 1, "amount": 1_250}),
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    match reply {
        twopc_launcher::client::Reply::Ok(r) => assert_eq!(r.outcome, Outcome::Committed),
        other => panic!("{other:?}"),
    }
}
