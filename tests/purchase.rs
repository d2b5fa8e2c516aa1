//! Purchases end to end: real nats-server, real service processes, real
//! SQLite files.

mod harness;

use std::time::Duration;

use harness::{told, tx_id, Options, System};
use twopc_launcher::client::Reply;
use twopc_launcher::Kind;
use twopc_schemas::api::{Outcome, PurchaseRequest};
use twopc_schemas::points::ParticipantDelay;
use twopc_schemas::{participant, subjects, Code};
use twopc_verify::check::{KeyReply, Told};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_and_every_refusal_leave_balances_and_stock_right() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let mut told_all = vec![];

    // Happy path: 2 books at 1250 for alice.
    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    assert!(r.delivered);
    told_all.push(Told::Committed(tx_id(&r)));
    let happy_tx = r.tx.clone();
    let mut carol_tx = String::new();
    assert_eq!(sys.balance("alice").await.balance, 7_500);
    assert_eq!(sys.stock("book-1").await.stock, 8);
    for subject in [
        subjects::participant_tx(&participant::WALLET),
        subjects::participant_tx(&participant::ORDER),
    ] {
        assert_eq!(sys.tx_status(&subject, &r.tx).await["state"], "committed");
    }
    assert_eq!(
        sys.tx_status(subjects::TX_STATUS, &r.tx).await["state"],
        "committed"
    );

    // Each refusal: aborted with the right participant and code, and
    // nothing moves.
    let refusals: [(&str, &str, u64, u64, &str, Code); 5] = [
        (
            "carol",
            "book-1",
            1,
            1_250,
            "wallet",
            Code::InsufficientFunds,
        ),
        (
            "bob",
            "lamp-1",
            3,
            13_500,
            "wallet",
            Code::InsufficientFunds,
        ),
        ("alice", "pen-1", 3, 500, "order", Code::PriceMismatch),
        ("dave", "pen-1", 1, 199, "wallet", Code::UnknownUser),
        ("alice", "sofa-9", 1, 100, "order", Code::UnknownSku),
    ];
    for (user, sku, qty, amount, who, code) in refusals {
        let before_user = sys.balance("alice").await;
        let before_book = sys.stock("book-1").await;
        let before_pen = sys.stock("pen-1").await;
        let r = sys.purchase(user, sku, qty, amount).await;
        assert_eq!(r.outcome, Outcome::Aborted, "{user} {sku}: {r:?}");
        if user == "carol" {
            carol_tx = r.tx.clone();
        }
        let reason = r.reason.clone().expect("an abort says why");
        assert_eq!(
            (reason.participant.as_str(), reason.code),
            (who, code),
            "{r:?}"
        );
        told_all.push(Told::Aborted(tx_id(&r)));
        assert_eq!(sys.balance("alice").await, before_user);
        assert_eq!(sys.stock("book-1").await, before_book);
        assert_eq!(sys.stock("pen-1").await, before_pen);
    }

    // Out of stock: two lamps sell, the third is refused by the order
    // service while the wallet could pay.
    sys.seed(&[("dora", 20_000)], &[]).await.unwrap();
    for buyer in ["dora", "dora"] {
        let r = sys.purchase(buyer, "lamp-1", 1, 4_500).await;
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
        told_all.push(Told::Committed(tx_id(&r)));
    }
    let before = sys.balance("dora").await;
    let r = sys.purchase("dora", "lamp-1", 1, 4_500).await;
    assert_eq!(r.outcome, Outcome::Aborted);
    let reason = r.reason.clone().unwrap();
    assert_eq!(
        (reason.participant.as_str(), reason.code),
        ("order", Code::OutOfStock)
    );
    told_all.push(Told::Aborted(tx_id(&r)));
    assert_eq!(sys.balance("dora").await, before);
    assert_eq!(sys.balance("dora").await.balance, 20_000 - 9_000);
    assert_eq!(sys.stock("lamp-1").await.stock, 0);
    assert_eq!(sys.balance("alice").await.balance, 10_000 - 2_500);

    sys.assert_consistent(&told_all).await;

    // The coordinator's story of a transaction: every vote, the decision,
    // delivery rounds and acknowledgements.
    let st = sys.tx_status(subjects::TX_STATUS, &happy_tx).await;
    assert_eq!(st["votes"][0]["vote"], "yes", "{st}");
    assert_eq!(st["votes"][1]["vote"], "yes", "{st}");
    assert_eq!(st["delivery_attempts"], 1, "{st}");
    assert_eq!(st["deliveries"][0]["acked"], true, "{st}");
    let st = sys.tx_status(subjects::TX_STATUS, &carol_tx).await;
    assert_eq!(st["state"], "aborted");
    assert_eq!(st["votes"][0]["participant"], "wallet", "{st}");
    assert_eq!(st["votes"][0]["vote"], "no", "{st}");
    assert_eq!(st["votes"][0]["code"], "insufficient_funds", "{st}");
    assert_eq!(st["votes"][1]["vote"], "yes", "{st}");
}

/// Scenario 7: the client times out, retries with the same request id, and
/// is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_with_same_request_id_after_client_timeout_charges_once() {
    // The wallet takes 1.5 s to prepare; the coordinator waits up to 5 s;
    // the client gives up after 0.3 s.
    let opts = Options::default()
        .set(
            Kind::Wallet,
            "TWOPC_DELAY",
            &format!(
                "{}:1500",
                ParticipantDelay::Prepare.at(&participant::WALLET)
            ),
        )
        .set(Kind::Coordinator, "TWOPC_PREPARE_TIMEOUT_MS", "5000");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();
    let req = PurchaseRequest {
        user: "alice".into(),
        sku: "book-1".into(),
        qty: 1,
        amount: 1_250,
        request_id: Some("order-42".into()),
    };
    let first = sys.purchase_with(&req, Duration::from_millis(300)).await;
    assert!(
        first.is_err(),
        "the first attempt must time out at the client: {first:?}"
    );

    // Retry while the first attempt is still in flight: waits for it.
    let second = match sys.purchase_with(&req, Duration::from_secs(10)).await {
        Ok(Reply::Ok(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(second.outcome, Outcome::Committed, "{second:?}");
    assert!(
        second.duplicate,
        "the retry repeats the first attempt: {second:?}"
    );

    // Retry after it finished: the durable record answers.
    let third = match sys.purchase_with(&req, Duration::from_secs(10)).await {
        Ok(Reply::Ok(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(third.tx, second.tx);
    assert_eq!(third.outcome, Outcome::Committed);
    assert!(third.duplicate);

    // Same id, different purchase: refused, nothing charged.
    let mut other = req.clone();
    other.qty = 2;
    other.amount = 2_500;
    match sys.purchase_with(&other, Duration::from_secs(10)).await {
        Ok(Reply::Err(e)) => assert_eq!(e.error.code, Code::Conflict),
        r => panic!("{r:?}"),
    }

    assert_eq!(sys.balance("alice").await.balance, 10_000 - 1_250);
    assert_eq!(sys.stock("book-1").await.stock, 9);
    // Both answers are about the key "order-42": one transaction, committed,
    // and the decision log binds the key to it.
    let replies: Vec<KeyReply> = [&second, &third]
        .into_iter()
        .map(|r| KeyReply {
            request_id: sys.shop.log_key("order-42"),
            tx: r.tx.parse().unwrap(),
            outcome: r.outcome,
            duplicate: r.duplicate,
        })
        .collect();
    let s = sys
        .assert_consistent_keys(&[Told::Committed(tx_id(&second))], &replies)
        .await;
    assert_eq!(s.debits.len(), 1, "charged exactly once");
    assert_eq!(s.orders.len(), 1);
}

/// Scenario 8: hundreds of concurrent purchases, many bound to fail; every
/// reply matches the databases and money and stock are conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_purchases_are_atomic_and_conserve_money_and_stock() {
    let mut sys = System::start(Options::default()).await.unwrap();
    let users: Vec<(String, u64)> = (0..10)
        .map(|i| (format!("user-{i}"), 5_000 + 2_000 * i as u64))
        .collect();
    let products: Vec<(String, u64, u64)> = (0..5)
        .map(|i| (format!("sku-{i}"), 100 + 50 * i as u64, 30 + 15 * i as u64))
        .collect();
    let u: Vec<(&str, u64)> = users.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    let p: Vec<(&str, u64, u64)> = products
        .iter()
        .map(|(s, pr, st)| (s.as_str(), *pr, *st))
        .collect();
    sys.seed(&u, &p).await.unwrap();

    const N: usize = 240;
    let mut tasks = vec![];
    for i in 0..N {
        let (user, _) = &users[(i * 7) % users.len()];
        let (sku, price, _) = &products[(i * 3) % products.len()];
        let qty = 1 + (i % 4) as u64;
        // Every 9th purchase quotes a wrong price; the others may still run
        // out of money or stock.
        let amount = if i % 9 == 0 {
            price * qty + 1
        } else {
            price * qty
        };
        let req = PurchaseRequest {
            user: user.clone(),
            sku: sku.clone(),
            qty,
            amount,
            request_id: (i % 5 == 0).then(|| format!("req-{i}")),
        };
        let shop = sys.shop.clone();
        tasks.push(tokio::spawn(async move {
            twopc_launcher::client::request::<_, twopc_schemas::api::PurchaseReply>(
                &shop.client,
                &shop.purchase_subject(),
                &req,
                Duration::from_secs(30),
            )
            .await
        }));
    }
    let mut told_all = vec![];
    let (mut committed, mut aborted) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match &r {
            Ok(Reply::Ok(p)) if p.outcome == Outcome::Committed => committed += 1,
            Ok(Reply::Ok(_)) => aborted += 1,
            other => panic!("every purchase gets an answer here: {other:?}"),
        }
        told_all.push(told(&r));
    }
    eprintln!("{committed} committed, {aborted} aborted");
    assert_eq!(committed + aborted, N);
    assert!(committed >= 20, "most purchases should fit: {committed}");
    assert!(
        aborted >= N / 9,
        "the wrong prices at least abort: {aborted}"
    );
    let s = sys.assert_consistent(&told_all).await;
    assert_eq!(s.debits.len(), committed);
    assert_eq!(s.orders.len(), committed);
}

/// The default reply mode answers at the commit point (the durable
/// decision); the participants apply it right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replying_at_the_decision_applies_right_after() {
    let opts = Options::default().set(Kind::Coordinator, "TWOPC_REPLY_AFTER", "decision");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();
    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Committed);
    let refused = sys.purchase("carol", "book-1", 1, 1_250).await;
    assert_eq!(refused.outcome, Outcome::Aborted);
    // The hold is in place at once, so nothing can double-spend meanwhile.
    let b = sys.balance("alice").await;
    assert_eq!(b.available, 7_500, "{b:?}");
    let s = sys
        .assert_consistent(&[Told::Committed(tx_id(&r)), Told::Aborted(tx_id(&refused))])
        .await;
    assert_eq!(s.debits.len(), 1);
    assert_eq!(sys.balance("alice").await.balance, 7_500);
    assert_eq!(sys.stock("book-1").await.stock, 8);
}
