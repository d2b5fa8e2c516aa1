//! A transaction with three branches — the wallet and the order service
//! (Rust, on the SDK) and the shipping service (Go, written from
//! PROTOCOL.md, `go/shipping`) — commits and aborts atomically, also with
//! the Go service crashed at each of its protocol points and restarted.
//!
//! The Go binary is built by `scripts/test-go.sh` (which `scripts/test.sh`
//! runs first) at `target/go/twopc-shipping`, or named by
//! `TWOPC_SHIPPING_BIN`; without it this test fails and says so.

mod harness;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::{Options, System};
use serde_json::{json, Value};
use twopc::launcher::Kind;
use twopc_launcher::process::Proc;

fn shipping_bin() -> PathBuf {
    let bin = std::env::var_os("TWOPC_SHIPPING_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/go/twopc-shipping")
        });
    assert!(
        bin.exists(),
        "{} is missing: scripts/test-go.sh builds the Go participant (scripts/test.sh runs it)",
        bin.display()
    );
    bin
}

struct Shipping {
    proc: Proc,
}

impl Shipping {
    fn new(sys: &System, crash_at: Option<&str>) -> Shipping {
        let dir = sys.data_dir("shipping");
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = vec![
            ("NATS_URL".to_owned(), sys.nats.url()),
            (
                "NATS_NKEY".to_owned(),
                sys.creds.seed_file("shipping").display().to_string(),
            ),
            ("TWOPC_DATA_DIR".to_owned(), dir.display().to_string()),
            ("TWOPC_IN_DOUBT_AFTER_MS".to_owned(), "1000".to_owned()),
            ("TWOPC_RECOVERY_INTERVAL_MS".to_owned(), "200".to_owned()),
            ("TWOPC_DECISION_TIMEOUT_MS".to_owned(), "1000".to_owned()),
        ];
        if let Some(point) = crash_at {
            env.push(("TWOPC_CRASH_AT".to_owned(), point.to_owned()));
        }
        let mut proc = Proc::new(
            "shipping",
            &shipping_bin(),
            vec![],
            env,
            sys.data_dir("shipping.log"),
        );
        proc.start().unwrap();
        Shipping { proc }
    }
}

/// Waits until `f` says yes, polling; fails with `what` after `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn json_req(sys: &System, subject: &str, body: Value) -> Option<Value> {
    let raw = sys.raw(subject, body.to_string().as_bytes()).await.ok()?;
    serde_json::from_slice(&raw).ok()
}

async fn serving(sys: &System) -> bool {
    json_req(sys, "shipping.slot", json!({"slot": "probe"}))
        .await
        .is_some()
}

async fn slot(sys: &System, slot: &str) -> Value {
    json_req(sys, "shipping.slot", json!({"slot": slot}))
        .await
        .expect("shipping.slot answers")
}

async fn system() -> System {
    let opts = Options {
        more_participants: vec!["shipping"],
        ..Options::default()
    }
    .set(
        Kind::Coordinator,
        "TWOPC_PARTICIPANTS",
        "wallet,order,shipping",
    );
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();
    sys
}

fn three_branches(request_id: &str, slot: &str) -> Value {
    json!({"branches": [
        {"participant": "wallet", "op": {"user": "alice", "amount": 1_250}},
        {"participant": "order", "op": {"user": "alice", "sku": "book-1", "qty": 1, "amount": 1_250}},
        {"participant": "shipping", "op": {"user": "alice", "slot": slot, "qty": 1}},
    ], "request_id": request_id})
}

/// Each participant's state of `tx`: wallet and order from their files,
/// shipping from its `shipping.tx`.
async fn states(sys: &System, tx: &str) -> (String, String, String) {
    let s = sys.snapshot();
    let id: twopc_schemas::protocol::TxId = tx.parse().unwrap();
    let of = |m: &std::collections::BTreeMap<twopc_schemas::protocol::TxId, _>| {
        m.get(&id)
            .map(|b: &twopc_schemas::BranchState| b.as_str().to_owned())
            .unwrap_or_else(|| "unknown".into())
    };
    let shipping = json_req(sys, "shipping.tx", json!({"tx": tx}))
        .await
        .expect("shipping.tx answers");
    (
        of(&s.wallet_branches),
        of(&s.order_branches),
        shipping["state"].as_str().unwrap().to_owned(),
    )
}

/// Nothing left in doubt anywhere: the coordinator delivered everything,
/// and no participant holds a prepared branch.
async fn quiescent(sys: &System) -> bool {
    let Some(ship) = json_req(sys, "shipping.in_doubt", json!({})).await else {
        return false;
    };
    let Some(coord) = json_req(sys, "shop.in_doubt", json!({})).await else {
        return false;
    };
    let s = sys.snapshot();
    ship["prepared"].as_array().is_some_and(|a| a.is_empty())
        && coord["undelivered"]
            .as_array()
            .is_some_and(|a| a.is_empty())
        && coord["in_progress"]
            .as_array()
            .is_some_and(|a| a.is_empty())
        && s.holds.is_empty()
        && s.reservations.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_branches_commit_and_abort_together_with_a_go_participant() {
    let sys = system().await;
    let mut shipping = Shipping::new(&sys, None);
    wait_until("shipping serves", Duration::from_secs(20), || serving(&sys)).await;
    let created = json_req(
        &sys,
        "shipping.slots.create",
        json!({"slot": "mon-am", "capacity": 1}),
    )
    .await
    .unwrap();
    assert_eq!(created["available"], 1, "{created}");
    let before = sys.balance("alice").await.balance;

    // All three commit.
    let r = harness_submit(&sys, three_branches("g1", "mon-am")).await;
    assert_eq!(r["outcome"], "committed", "{r}");
    let tx = r["tx"].as_str().unwrap().to_owned();
    wait_until("delivered", Duration::from_secs(10), || quiescent(&sys)).await;
    assert_eq!(
        states(&sys, &tx).await,
        ("committed".into(), "committed".into(), "committed".into())
    );
    assert_eq!(slot(&sys, "mon-am").await["booked"], 1);
    assert_eq!(sys.balance("alice").await.balance, before - 1_250);

    // The slot is full: shipping votes no, and nobody keeps anything.
    let r = harness_submit(&sys, three_branches("g2", "mon-am")).await;
    assert_eq!(r["outcome"], "aborted", "{r}");
    assert_eq!(r["reason"]["participant"], "shipping", "{r}");
    let tx = r["tx"].as_str().unwrap().to_owned();
    wait_until("delivered", Duration::from_secs(10), || quiescent(&sys)).await;
    let (w, o, _) = states(&sys, &tx).await;
    assert_eq!((w.as_str(), o.as_str()), ("aborted", "aborted"));
    assert_eq!(sys.balance("alice").await.balance, before - 1_250);
    shipping.proc.kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_participant_crashed_at_each_protocol_point_keeps_the_transaction_atomic() {
    let sys = system().await;
    let mut shipping = Shipping::new(&sys, None);
    wait_until("shipping serves", Duration::from_secs(20), || serving(&sys)).await;
    json_req(
        &sys,
        "shipping.slots.create",
        json!({"slot": "tue-pm", "capacity": 100}),
    )
    .await
    .unwrap();
    shipping.proc.kill().unwrap();

    let points = [
        "shipping.prepare.before_durable",
        "shipping.prepare.after_durable",
        "shipping.decide.before_apply",
        "shipping.decide.before_durable",
        "shipping.decide.after_durable",
    ];
    for (i, point) in points.iter().enumerate() {
        let mut crashing = Shipping::new(&sys, Some(point));
        wait_until("shipping serves", Duration::from_secs(20), || serving(&sys)).await;
        let key = format!("crash-{i}");
        let reply = sys
            .raw(
                "shop.web.transaction",
                three_branches(&key, "tue-pm").to_string().as_bytes(),
            )
            .await;
        // It reaches its crash point and exits; then it starts again, and
        // recovery or redelivery finishes the transaction.
        let exit = crashing
            .proc
            .wait_exit(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{point}: did not crash: {e:#}"));
        let crashed = {
            use std::os::unix::process::ExitStatusExt;
            format!("{:?}", std::process::ExitStatus::from_raw(86 << 8))
        };
        assert_eq!(exit, crashed, "{point}: exits 86 at its crash point");
        let mut restarted = Shipping::new(&sys, None);
        wait_until(
            &format!("{point}: quiescent"),
            Duration::from_secs(30),
            || quiescent(&sys),
        )
        .await;
        // The outcome the client heard, if any, or the retry's.
        let told: Value = match reply {
            Ok(raw) => serde_json::from_slice(&raw).unwrap(),
            Err(_) => harness_submit(&sys, three_branches(&key, "tue-pm")).await,
        };
        let told = if told["outcome"].is_string() {
            told
        } else {
            // outcome_unknown or busy: the retry with the same key says.
            harness_submit(&sys, three_branches(&key, "tue-pm")).await
        };
        let tx = told["tx"].as_str().expect("a transaction id").to_owned();
        let (w, o, s) = states(&sys, &tx).await;
        eprintln!(
            "{point}: told {} ; wallet {w}, order {o}, shipping {s}",
            told["outcome"]
        );
        match told["outcome"].as_str().unwrap() {
            "committed" => assert_eq!(
                (w.as_str(), o.as_str(), s.as_str()),
                ("committed", "committed", "committed"),
                "{point}"
            ),
            _ => {
                assert_eq!((w.as_str(), o.as_str()), ("aborted", "aborted"), "{point}");
                // Shipping aborted, or never stored the branch.
                assert!(s == "aborted" || s == "unknown", "{point}: shipping {s}");
            }
        }
        restarted.proc.kill().unwrap();
    }
    // Conservation: the slot booked exactly the committed transactions.
    let mut shipping = Shipping::new(&sys, None);
    wait_until("shipping serves", Duration::from_secs(20), || serving(&sys)).await;
    let s = slot(&sys, "tue-pm").await;
    let committed = sys.snapshot().orders.len() as u64;
    assert_eq!(s["booked"], committed, "{s}");
    assert_eq!(s["held"], 0, "{s}");
    shipping.proc.kill().unwrap();
}

async fn harness_submit(sys: &System, body: Value) -> Value {
    json_req(sys, "shop.web.transaction", body)
        .await
        .expect("the coordinator answers")
}
