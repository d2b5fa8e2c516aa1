//! The docker compose deployment, for real: images built by
//! `compose/build-images.sh` (scripts/test.sh runs it), `docker-compose up`,
//! a purchase, the wallet killed while a transaction is in doubt there and
//! started again, then `down` (volumes kept) and `up` with the data found
//! again.
//!
//! Ignored by a plain `cargo test`, which cannot know whether Docker and the
//! images are there; `scripts/test.sh` builds the images and runs it with
//! `--ignored` (unless `TWOPC_SKIP_DOCKER` is set), so a skipped run says
//! "ignored" instead of passing.

use std::process::Command;
use std::time::{Duration, Instant};

use twopc_launcher::client::{request, Reply};
use twopc_schemas::api::{Balance, PurchaseReply, PurchaseRequest, Stock};
use twopc_schemas::points::ParticipantDelay;
use twopc_schemas::{participant, subjects};

struct Compose {
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn run(&self, args: &[&str]) -> String {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/compose/docker-compose.yml");
        let out = Command::new("docker-compose")
            .args(["-f", file, "-p", &self.project])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("docker-compose runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed:\n{text}"
        );
        text
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/compose/docker-compose.yml");
        let _ = Command::new("docker-compose")
            .args([
                "-f",
                file,
                "-p",
                &self.project,
                "down",
                "-v",
                "--timeout",
                "5",
            ])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output();
    }
}

async fn until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ready(client: &async_nats::Client) {
    for (service, subject) in [
        ("coordinator", subjects::TX_STATUS),
        ("wallet", subjects::WALLET_BALANCE),
        ("order", subjects::ORDER_STOCK),
    ] {
        until(service, Duration::from_secs(60), || async {
            let req = async_nats::Request::new()
                .payload(b"{}".to_vec().into())
                .timeout(Some(Duration::from_millis(500)));
            client.send_request(subject, req).await.is_ok()
        })
        .await;
    }
}

async fn balance(client: &async_nats::Client, user: &str) -> Option<Balance> {
    match request(
        client,
        subjects::WALLET_BALANCE,
        &serde_json::json!({ "user": user }),
        Duration::from_secs(2),
    )
    .await
    {
        Ok(Reply::Ok(b)) => Some(b),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the images from compose/build-images.sh; run by scripts/test.sh"]
async fn compose_up_buy_kill_wallet_in_doubt_then_down_up_keeps_data() {
    let images = Command::new("docker")
        .args(["image", "inspect", "twopc:local", "twopc-nats:local"])
        .output()
        .expect("docker is needed for this test");
    assert!(
        images.status.success(),
        "images missing: run compose/build-images.sh (scripts/test.sh does)"
    );
    let port = |_| twopc_launcher::free_port().unwrap().to_string();
    let nats_port = port(0);
    let compose = Compose {
        project: format!("twopctest{}", std::process::id()),
        env: vec![
            ("NATS_PORT".into(), nats_port.clone()),
            ("STATUS_PORT".into(), port(1)),
            ("METRICS_PORT_COORDINATOR".into(), port(2)),
            ("METRICS_PORT_WALLET".into(), port(3)),
            ("METRICS_PORT_ORDER".into(), port(4)),
            // The wallet applies decisions 3 s late: a window in which a
            // committed purchase is in doubt at the wallet.
            (
                "WALLET_DELAY".into(),
                format!("{}:3000", ParticipantDelay::Decide.at(&participant::WALLET)),
            ),
            // ... and the coordinator waits long enough for its late acks.
            ("DECIDE_TIMEOUT_MS".into(), "5000".into()),
        ],
    };
    eprintln!("--- compose up");
    compose.run(&["up", "-d"]);
    let client =
        twopc_common::nats::connect(&format!("nats://127.0.0.1:{nats_port}"), "twopc-test")
            .await
            .unwrap();
    ready(&client).await;
    // Each service's health check (`twopc ping <service>` inside its
    // container) passes.
    for service in ["coordinator", "wallet", "order"] {
        let id = compose.run(&["ps", "-q", service]).trim().to_owned();
        until(
            &format!("{service} healthy"),
            Duration::from_secs(90),
            || {
                let id = id.clone();
                async move {
                    Command::new("docker")
                        .args(["inspect", "--format", "{{.State.Health.Status}}", &id])
                        .output()
                        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "healthy")
                }
            },
        )
        .await;
    }
    let _: Reply<Balance> = request(
        &client,
        subjects::WALLET_CREATE_USER,
        &serde_json::json!({"user": "dora", "balance": 100_000}),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let _: Reply<Stock> = request(
        &client,
        subjects::ORDER_CREATE_PRODUCT,
        &serde_json::json!({"sku": "mug-1", "price": 300, "stock": 50}),
        Duration::from_secs(5),
    )
    .await
    .unwrap();

    let req = PurchaseRequest {
        user: "dora".into(),
        sku: "mug-1".into(),
        qty: 2,
        amount: 600,
        request_id: Some("compose-1".into()),
    };
    let reply = match request::<_, PurchaseReply>(
        &client,
        subjects::PURCHASE,
        &req,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    {
        Reply::Ok(r) => r,
        Reply::Err(e) => panic!("{e:?}"),
    };
    assert_eq!(
        reply.outcome,
        twopc_schemas::api::Outcome::Committed,
        "{reply:?}"
    );
    let b = balance(&client, "dora").await.unwrap();
    assert_eq!(
        (b.balance, b.held),
        (100_000, 600),
        "prepared, decision not yet applied: {b:?}"
    );

    eprintln!("--- docker-compose kill wallet while it is in doubt; start it again");
    compose.run(&["kill", "wallet"]);
    compose.run(&["start", "wallet"]);
    until(
        "the wallet resolves its in-doubt purchase",
        Duration::from_secs(60),
        || async {
            balance(&client, "dora")
                .await
                .is_some_and(|b| b.balance == 99_400 && b.held == 0)
        },
    )
    .await;
    let logs = compose.run(&["logs", "wallet"]);
    assert!(
        logs.contains("in-doubt transaction resolved by the coordinator"),
        "{logs}"
    );
    until("nothing left in doubt", Duration::from_secs(60), || async {
        let c: Result<Reply<serde_json::Value>, _> = request(
            &client,
            subjects::IN_DOUBT,
            &serde_json::json!({}),
            Duration::from_secs(2),
        )
        .await;
        let w: Result<Reply<serde_json::Value>, _> = request(
            &client,
            &subjects::participant_in_doubt(&participant::WALLET),
            &serde_json::json!({}),
            Duration::from_secs(2),
        )
        .await;
        matches!((c, w), (Ok(Reply::Ok(c)), Ok(Reply::Ok(w)))
            if c["undelivered"].as_array().is_some_and(|a| a.is_empty())
                && w["prepared"].as_array().is_some_and(|a| a.is_empty()))
    })
    .await;

    eprintln!("--- compose down (volumes kept), up again");
    drop(client);
    compose.run(&["down", "--timeout", "10"]);
    compose.run(&["up", "-d"]);
    let client =
        twopc_common::nats::connect(&format!("nats://127.0.0.1:{nats_port}"), "twopc-test")
            .await
            .unwrap();
    ready(&client).await;
    let b = balance(&client, "dora").await.unwrap();
    assert_eq!(
        (b.balance, b.held),
        (99_400, 0),
        "the wallet's volume survived down/up"
    );
    let s: Reply<Stock> = request(
        &client,
        subjects::ORDER_STOCK,
        &serde_json::json!({"sku": "mug-1"}),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(
        matches!(s, Reply::Ok(s) if s.stock == 48),
        "the order volume survived"
    );
    // The idempotency record survived too: a retry is not charged again.
    let again = match request::<_, PurchaseReply>(
        &client,
        subjects::PURCHASE,
        &req,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    {
        Reply::Ok(r) => r,
        Reply::Err(e) => panic!("{e:?}"),
    };
    assert!(again.duplicate && again.tx == reply.tx, "{again:?}");
    assert_eq!(balance(&client, "dora").await.unwrap().balance, 99_400);
}
