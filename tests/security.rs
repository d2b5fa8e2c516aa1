//! Trust nobody on the bus: every attack of issue 11, run against the real
//! nats-server with the credentials `twopc up` generates, as a client with
//! the wrong credentials. Each is refused by the server (a permissions
//! violation, seen as the server's error on the attacker's connection) or
//! by the service, and no database changes.

mod harness;

use std::time::Duration;

use async_nats::ServerError;
use harness::{Options, System, PURCHASE};
use tokio::sync::mpsc;
use twopc_launcher::client::{request, Reply};
use twopc_schemas::api::{PurchaseReply, PurchaseRequest};
use twopc_schemas::protocol::{self, Decide, Decision, DecisionQuery, Prepare, TxId, Vote};
use twopc_schemas::{participant, subjects, ClientName};

/// A connection as identity `name` that reports the server's errors
/// (permission violations) on a channel.
struct Attacker {
    client: async_nats::Client,
    errors: mpsc::UnboundedReceiver<String>,
    name: String,
}

impl Attacker {
    async fn connect(sys: &System, name: &str) -> Attacker {
        let (tx, errors) = mpsc::unbounded_channel();
        let seed = twopc_common::nats::read_seed(&sys.creds.seed_file(name)).unwrap();
        let client = async_nats::ConnectOptions::with_nkey(seed)
            .custom_inbox_prefix(twopc_common::nats::inbox_prefix(name))
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = e {
                        let text = match e {
                            ServerError::AuthorizationViolation => "authorization violation".into(),
                            ServerError::SlowConsumer(_) => "slow consumer".into(),
                            ServerError::Other(s) => s,
                        };
                        let _ = tx.send(text);
                    }
                }
            })
            .connect(sys.nats.url())
            .await
            .unwrap_or_else(|e| panic!("connect as {name}: {e}"));
        Attacker {
            client,
            errors,
            name: name.into(),
        }
    }

    /// Waits (at most 5 s) for the server to refuse `what` on `subject`
    /// ("Publish" or "Subscription").
    async fn refused(&mut self, what: &str, subject: &str) {
        let expected = format!("permissions violation for {what} to \"{subject}\"").to_lowercase();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.errors.recv()).await {
                Ok(Some(e)) if e.to_lowercase().contains(&expected) => return,
                Ok(Some(_other)) => continue,
                _ => panic!(
                    "{}: the server did not refuse {what} to {subject:?}",
                    self.name
                ),
            }
        }
    }

    /// Publishes and expects the server to refuse it.
    async fn publish_refused(&mut self, subject: &str, payload: Vec<u8>) {
        self.client
            .publish(subject.to_owned(), payload.into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        self.refused("Publish", subject).await;
    }

    /// Subscribes (in `queue`, if any) and expects the server to refuse it.
    async fn subscribe_refused(&mut self, subject: &str, queue: Option<&str>) {
        let _sub = match queue {
            Some(q) => self
                .client
                .queue_subscribe(subject.to_owned(), q.to_owned())
                .await
                .unwrap(),
            None => self.client.subscribe(subject.to_owned()).await.unwrap(),
        };
        self.client.flush().await.unwrap();
        self.refused("Subscription", subject).await;
    }
}

/// A request that must be answered with a `T` (not an error reply).
async fn ask<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    body: &B,
) -> T {
    match request::<B, T>(client, subject, body, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{subject}: {e:#}"))
    {
        Reply::Ok(v) => v,
        Reply::Err(e) => panic!("{subject}: {e:?}"),
    }
}

fn a_tx() -> TxId {
    TxId::now_v7()
}

fn wallet_debit(tx: TxId) -> Vec<u8> {
    protocol::encode(&Prepare {
        tx,
        client: ClientName::new("web").unwrap(),
        op: br#"{"amount":9999,"user":"alice"}"#.to_vec(),
    })
}

async fn system() -> System {
    let mut sys = System::start(Options {
        clients: vec!["web", "app"],
        ..Options::default()
    })
    .await
    .unwrap();
    sys.seed_standard().await.unwrap();
    sys
}

/// The identities an outsider could hold: a shop client, admin, and the
/// other participant (for attacks on the wallet).
const NOT_THE_COORDINATOR: [&str; 3] = ["web", "admin", "order"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_credentials_or_with_a_forged_key_is_refused() {
    let sys = system().await;
    let err = match sys.connect_anonymous().await {
        Ok(_) => panic!("a connection without credentials was let in"),
        Err(e) => e,
    };
    assert!(
        format!("{err:#}").to_lowercase().contains("authorization"),
        "{err:#}"
    );
    // A seed the server never heard of.
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let r = async_nats::ConnectOptions::with_nkey(stranger)
        .connect(sys.nats.url())
        .await;
    assert!(r.is_err(), "an unknown NKey connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_prepare_and_commit_to_the_wallet_are_refused_by_the_server() {
    let sys = system().await;
    let before = sys.snapshot();
    for who in NOT_THE_COORDINATOR {
        let mut a = Attacker::connect(&sys, who).await;
        let tx = a_tx();
        a.publish_refused(&subjects::prepare(&participant::WALLET), wallet_debit(tx))
            .await;
        a.publish_refused(
            &subjects::decide(&participant::WALLET),
            protocol::encode(&Decide {
                tx,
                decision: Decision::Commit,
            }),
        )
        .await;
    }
    assert_eq!(
        sys.snapshot(),
        before,
        "a forged prepare or commit changed something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_abort_to_the_order_service_is_refused_by_the_server() {
    let sys = system().await;
    let before = sys.snapshot();
    for who in ["web", "admin", "wallet"] {
        let mut a = Attacker::connect(&sys, who).await;
        a.publish_refused(
            &subjects::decide(&participant::ORDER),
            protocol::encode(&Decide {
                tx: a_tx(),
                decision: Decision::Abort,
            }),
        )
        .await;
    }
    assert_eq!(sys.snapshot(), before, "a forged abort wrote a tombstone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_else_joins_a_participants_queue_group_and_purchases_still_commit() {
    let sys = system().await;
    for who in NOT_THE_COORDINATOR {
        let mut a = Attacker::connect(&sys, who).await;
        let queue = subjects::queue_group("wallet");
        a.subscribe_refused(&subjects::prepare(&participant::WALLET), Some(&queue))
            .await;
        a.subscribe_refused(&subjects::decide(&participant::WALLET), Some(&queue))
            .await;
        a.subscribe_refused(subjects::WALLET_BALANCE, Some(&queue))
            .await;
    }
    // The wallet in another queue group of its own subjects: refused too.
    let mut w = Attacker::connect(&sys, "wallet").await;
    w.subscribe_refused(&subjects::prepare(&participant::WALLET), Some("evil"))
        .await;
    // Every purchase is still the real wallet's.
    let mut told = vec![];
    for _ in 0..10 {
        let r = sys.purchase("alice", "pen-1", 1, 199).await;
        assert_eq!(r.outcome, twopc_schemas::api::Outcome::Committed, "{r:?}");
        told.push(harness::told(&Ok(Reply::Ok(r))));
    }
    sys.assert_consistent(&told).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_reads_the_protocol_or_anothers_replies() {
    let sys = system().await;
    for who in ["web", "admin", "wallet", "order"] {
        let mut a = Attacker::connect(&sys, who).await;
        for subject in ["twopc.>", ">", "_INBOX.>", "_INBOX_coordinator.>", "shop.>"] {
            a.subscribe_refused(subject, None).await;
        }
    }
    // The coordinator may not read another's inbox either.
    let mut c = Attacker::connect(&sys, "coordinator").await;
    c.subscribe_refused("_INBOX_web.>", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_vote_to_the_coordinators_inbox_is_refused_by_the_server() {
    let sys = system().await;
    for who in ["web", "admin", "wallet", "order"] {
        let mut a = Attacker::connect(&sys, who).await;
        a.publish_refused("_INBOX_coordinator.x1.y2", protocol::encode(&Vote::Yes))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_queries_only_from_participants_and_only_in_their_own_name() {
    let sys = system().await;
    let before = sys.snapshot();
    let query = |p| {
        protocol::encode(&DecisionQuery {
            tx: a_tx(),
            participant: p,
        })
    };
    for who in ["web", "admin"] {
        let mut a = Attacker::connect(&sys, who).await;
        a.publish_refused(
            &subjects::decision_query(&participant::WALLET),
            query(participant::WALLET),
        )
        .await;
    }
    // The order service may not ask in the wallet's name.
    let mut o = Attacker::connect(&sys, "order").await;
    o.publish_refused("twopc.decision.wallet", query(participant::WALLET))
        .await;
    assert_eq!(sys.snapshot(), before, "a forged query wrote a decision");
    // And the in-doubt listing that would name live transactions is
    // admin's alone.
    let mut web = Attacker::connect(&sys, "web").await;
    web.publish_refused(subjects::IN_DOUBT, b"{}".to_vec())
        .await;
    web.publish_refused(subjects::TX_STATUS, b"{}".to_vec())
        .await;
    web.publish_refused("wallet.in_doubt", b"{}".to_vec()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_creates_users_and_products_or_reads_balances() {
    let sys = system().await;
    let before = sys.snapshot();
    for who in ["web", "order"] {
        let mut a = Attacker::connect(&sys, who).await;
        a.publish_refused(
            subjects::WALLET_CREATE_USER,
            br#"{"user":"mallory","balance":1000000000000000000}"#.to_vec(),
        )
        .await;
        a.publish_refused(
            subjects::ORDER_CREATE_PRODUCT,
            br#"{"sku":"free-1","price":1,"stock":1000}"#.to_vec(),
        )
        .await;
        a.publish_refused(subjects::WALLET_BALANCE, br#"{"user":"alice"}"#.to_vec())
            .await;
    }
    assert_eq!(
        sys.snapshot(),
        before,
        "an outsider created a user or product"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_neither_squats_nor_reads_another_clients_purchases() {
    let sys = system().await;
    // web buys with its request id.
    let web = sys.shop.clone();
    let buy = PurchaseRequest {
        user: "alice".into(),
        sku: "book-1".into(),
        qty: 1,
        amount: 1_250,
        request_id: Some("order-1".into()),
    };
    let first: PurchaseReply = ask(&web.client, &web.purchase_subject(), &buy).await;
    assert_eq!(first.request_id.as_deref(), Some("order-1"));

    let mut app = Attacker::connect(&sys, "app").await;
    // app may not buy as web, nor read web's transactions.
    app.publish_refused(PURCHASE.as_str(), serde_json::to_vec(&buy).unwrap())
        .await;
    app.publish_refused("shop.web.tx", b"{}".to_vec()).await;
    // On its own subject, web's transaction is unknown to app...
    let seen: serde_json::Value = ask(
        &app.client,
        "shop.app.tx",
        &serde_json::json!({ "tx": first.tx }),
    )
    .await;
    assert_eq!(seen["state"], "unknown", "{seen}");
    assert!(seen.get("purchase").is_none(), "{seen}");
    // ... while web reads it, with its own request id.
    let own: serde_json::Value = ask(
        &web.client,
        &web.tx_subject(),
        &serde_json::json!({ "tx": first.tx }),
    )
    .await;
    assert_eq!(own["state"], "committed", "{own}");
    assert_eq!(own["request_id"], "order-1", "{own}");
    // app's "order-1" is its own purchase, not a replay of web's.
    let mine: PurchaseReply = ask(&app.client, "shop.app.purchase", &buy).await;
    assert_ne!(
        mine.tx, first.tx,
        "app's request id was answered with web's purchase"
    );
    assert!(!mine.duplicate);
    // alice paid twice: once per client.
    assert_eq!(sys.balance("alice").await.balance, 10_000 - 2 * 1_250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_role_but_the_coordinator_uses_jetstream_and_none_captures_prepares() {
    let sys = system().await;
    let stream = serde_json::json!({
        "name": "EVIL",
        "subjects": ["twopc.*.prepare"],
        "storage": "memory",
    })
    .to_string()
    .into_bytes();
    for who in ["web", "admin", "wallet", "order"] {
        let mut a = Attacker::connect(&sys, who).await;
        a.publish_refused("$JS.API.STREAM.CREATE.EVIL", stream.clone())
            .await;
    }
    // No stream answers prepares: a purchase is voted on by the wallet.
    let r = sys.purchase("carol", "book-1", 1, 1_250).await;
    assert_eq!(r.outcome, twopc_schemas::api::Outcome::Aborted);
    let reason = r.reason.expect("reason");
    assert_eq!(reason.participant, "wallet");
    assert_eq!(reason.code.as_str(), "insufficient_funds");
}
