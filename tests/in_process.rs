//! The three services run inside this test's process, each with its own
//! shutdown signal, against a real nats-server and real SQLite files: what
//! the service runners taking their stop signal as an argument is for.
//! (Crashes need real processes; they are in `faults.rs` and `chaos.rs`.)

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use twopc_common::logging::LogFormat;
use twopc_coordinator::config::{CoordinatorArgs, ReplyAfter, Store};
use twopc_launcher::client::{request, Reply};
use twopc_launcher::process::NatsServer;
use twopc_launcher::Kind;
use twopc_participant::ParticipantArgs;
use twopc_schemas::api::{
    Balance, BalanceQuery, CreateProduct, CreateUser, Outcome, PurchaseReply, PurchaseRequest,
};
use twopc_schemas::subjects;

fn coordinator_args(url: &str, dir: &Path) -> CoordinatorArgs {
    CoordinatorArgs {
        nats_url: url.to_owned(),
        auth: Default::default(),
        data_dir: dir.join("coordinator"),
        store: Store::Sqlite,
        kv_bucket: String::new(),
        kv_replicas: 1,
        kv_timeout_ms: 2_000,
        nats_monitor: vec![],
        allow_unsynced_jetstream: false,
        sweep_interval_ms: 5_000,
        tx_window_ms: 300_000,
        retention_ms: 86_400_000,
        max_skew_ms: 60_000,
        prepare_timeout_ms: 2_000,
        decide_timeout_ms: 1_000,
        retry_base_ms: 50,
        retry_cap_ms: 1_000,
        reply_after: ReplyAfter::Decision,
        max_inflight: 64,
        metrics_addr: None,
        log_format: LogFormat::Human,
        http_addr: None,
        participants: twopc_schemas::participant::PURCHASE_PARTICIPANTS.to_vec(),
        client_grants: None,
    }
}

fn participant_args(url: &str, dir: &Path) -> ParticipantArgs {
    ParticipantArgs {
        nats_url: url.to_owned(),
        auth: Default::default(),
        data_dir: dir.to_owned(),
        in_doubt_after_ms: 5_000,
        recovery_interval_ms: 1_000,
        decision_timeout_ms: 2_000,
        max_inflight: 64,
        tx_window_ms: 300_000,
        retention_ms: 86_400_000,
        max_skew_ms: 60_000,
        metrics_addr: None,
        lease_ms: 10_000,
        replace_store: false,
        log_format: LogFormat::Human,
    }
}

/// A running service and the signal that stops it.
struct Running {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn spawn<F>(run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (stop, rx) = oneshot::channel();
    Running {
        stop,
        done: tokio::spawn(run(rx)),
    }
}

impl Running {
    /// Signals shutdown and waits for the runner to drain and return.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.done).await??
    }
}

/// Waits until alice's balance is `balance` with nothing held.
async fn wait_balance(client: &async_nats::Client, balance: u64) {
    let q = BalanceQuery {
        user: "alice".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        let r = request::<_, Balance>(client, subjects::WALLET_BALANCE, &q, Duration::from_secs(2))
            .await
            .unwrap();
        if let Reply::Ok(b) = &r {
            if b.balance == balance && b.held == 0 {
                return;
            }
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("alice never reached {balance} with nothing held; last answer {last:?}");
}

async fn stop_signal(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_services_in_one_process_commit_a_purchase_and_stop_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats"), None)
        .await
        .unwrap();
    let url = nats.url();

    let wallet = {
        let args = participant_args(&url, &dir.path().join("wallet"));
        spawn(|rx| twopc_participants::wallet::run(args, stop_signal(rx)))
    };
    let order = {
        let args = participant_args(&url, &dir.path().join("order"));
        spawn(|rx| twopc_participants::order::run(args, stop_signal(rx)))
    };
    let coordinator = {
        let args = coordinator_args(&url, dir.path());
        spawn(|rx| twopc_coordinator::coordinator::run(args, stop_signal(rx)))
    };

    let client = twopc_common::nats::connect(&url, "in-process-test", &Default::default())
        .await
        .unwrap();
    // Ready when each answers its probe subject.
    for kind in Kind::ALL {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !kind.answers(&client).await {
            assert!(Instant::now() < deadline, "{} never answered", kind.name());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    twopc_launcher::system::seed(
        &client,
        &[CreateUser {
            user: "alice".into(),
            balance: 10_000,
        }],
        &[CreateProduct {
            sku: "book-1".into(),
            price: 1_250,
            stock: 3,
        }],
        false,
    )
    .await
    .unwrap();

    let timeout = Duration::from_secs(10);
    // No credentials here: any client token goes.
    let purchase_subject =
        subjects::purchase(&twopc_schemas::ClientName::new("in-process").unwrap());
    let buy = PurchaseRequest {
        request_id: Some("in-process-1".into()),
        user: "alice".into(),
        sku: "book-1".into(),
        qty: 2,
        amount: 2_500,
    };
    let reply = match request::<_, PurchaseReply>(&client, &purchase_subject, &buy, timeout)
        .await
        .unwrap()
    {
        Reply::Ok(r) => r,
        Reply::Err(e) => panic!("purchase refused: {e:?}"),
    };
    assert_eq!(reply.outcome, Outcome::Committed, "{reply:?}");

    // The decision reaches the wallet within a delivery round or two; wait
    // on the wallet's own balance.
    wait_balance(&client, 7_500).await;

    // Stop the order service alone: the others keep serving, and a purchase
    // now aborts (no one answers the order's prepare) instead of hanging.
    order.stop().await.unwrap();
    let buy = PurchaseRequest {
        request_id: Some("in-process-2".into()),
        ..buy
    };
    match request::<_, PurchaseReply>(&client, &purchase_subject, &buy, timeout)
        .await
        .unwrap()
    {
        Reply::Ok(r) => assert_eq!(r.outcome, Outcome::Aborted, "{r:?}"),
        Reply::Err(e) => panic!("purchase refused: {e:?}"),
    }
    // The wallet held 2500 for it, and releases it when the abort arrives.
    wait_balance(&client, 7_500).await;

    coordinator.stop().await.unwrap();
    wallet.stop().await.unwrap();
}
