//! Crash and fault scenarios with real processes and real signals. Crash
//! points (`TWOPC_CRASH_AT`) abort the process at a named step; restarts
//! reuse the same data folder.

mod harness;

use std::time::{Duration, Instant};

use harness::{poll_until, told, tracing_line, tx_id, Options, System, PURCHASE};
use twopc::check::Told;
use twopc::client::Reply;
use twopc::launcher::Kind;
use twopc_schemas::api::{Outcome, PurchaseRequest};
use twopc_schemas::points::{CoordinatorCrash, ParticipantCrash, ParticipantDelay};
use twopc_schemas::protocol::Decision;
use twopc_schemas::{participant, subjects, BranchState, Code};

fn book(request_id: Option<&str>) -> PurchaseRequest {
    PurchaseRequest {
        user: "alice".into(),
        sku: "book-1".into(),
        qty: 2,
        amount: 2_500,
        request_id: request_id.map(Into::into),
    }
}

/// Scenario 2a: the wallet dies right after its prepare is durable, before
/// its vote leaves. The coordinator times out and aborts; the restarted
/// wallet finds the prepared branch, asks the coordinator and releases the
/// hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_killed_after_durable_prepare_resolves_to_abort() {
    let opts = Options::default()
        .set(
            Kind::Wallet,
            "TWOPC_CRASH_AT",
            &ParticipantCrash::PrepareAfterDurable
                .at(&participant::WALLET)
                .to_string(),
        )
        .set(Kind::Coordinator, "TWOPC_PREPARE_TIMEOUT_MS", "1000");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    tracing_line("--- purchase; the wallet crashes before voting");
    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Aborted);
    assert_eq!(r.reason.as_ref().unwrap().code, Code::Timeout, "{r:?}");
    let tx = tx_id(&r);
    let status = sys
        .service(Kind::Wallet)
        .proc
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        sys.service(Kind::Wallet).proc.log().contains(&format!(
            "CRASH POINT {}",
            ParticipantCrash::PrepareAfterDurable.at(&participant::WALLET)
        )),
        "{status}"
    );

    // The crash happened after the prepare was durable: the file says so.
    let s = sys.snapshot();
    assert_eq!(
        s.wallet_branches.get(&tx).copied(),
        Some(BranchState::Prepared)
    );
    assert_eq!(s.holds.get(&tx), Some(&2_500));

    tracing_line("--- restart the wallet without the crash point");
    sys.start_without_crash_points(Kind::Wallet).await.unwrap();
    let s = sys.assert_consistent(&[Told::Aborted(tx)]).await;
    assert_eq!(
        s.wallet_branches.get(&tx).copied(),
        Some(BranchState::Aborted)
    );
    assert_eq!(s.decisions.get(&tx).map(|d| d.0), Some(Decision::Abort));
    assert_eq!(sys.balance("alice").await.balance, 10_000);
    assert_eq!(sys.balance("alice").await.held, 0);
    assert_eq!(sys.stock("book-1").await.available, 10);
}

/// Scenario 2b: the wallet voted yes and the coordinator decided commit,
/// but the wallet dies as the commit arrives, before applying it. After a
/// restart it asks the coordinator and commits; nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_killed_before_applying_commit_resolves_to_commit() {
    let opts = Options::default()
        .set(
            Kind::Wallet,
            "TWOPC_CRASH_AT",
            &ParticipantCrash::DecideBeforeApply
                .at(&participant::WALLET)
                .to_string(),
        )
        // Only the restarted wallet's own recovery may resolve it: keep the
        // coordinator's redelivery slow.
        .set(Kind::Coordinator, "TWOPC_RETRY_BASE_MS", "60000")
        .set(Kind::Coordinator, "TWOPC_RETRY_CAP_MS", "60000");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    assert!(!r.delivered, "the wallet died before acknowledging");
    let tx = tx_id(&r);
    sys.service(Kind::Wallet)
        .proc
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap();
    let s = sys.snapshot();
    assert_eq!(
        s.wallet_branches.get(&tx).copied(),
        Some(BranchState::Prepared)
    );
    assert_eq!(s.orders.len(), 1, "the order service applied the commit");
    assert!(s.debits.is_empty(), "the wallet did not");

    tracing_line("--- restart the wallet; it resolves the in-doubt transaction");
    sys.start_without_crash_points(Kind::Wallet).await.unwrap();
    let client = sys.client.clone();
    poll_until(
        "the wallet to commit (balance 7500, nothing held)",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            async move {
                let b: Reply<twopc_schemas::api::Balance> = twopc::client::request(
                    &client,
                    subjects::WALLET_BALANCE,
                    &serde_json::json!({"user": "alice"}),
                    Duration::from_secs(2),
                )
                .await
                .map_err(|e| e.to_string())?;
                match b {
                    Reply::Ok(b) if b.balance == 7_500 && b.held == 0 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    assert!(sys
        .service(Kind::Wallet)
        .proc
        .log()
        .contains("in-doubt transaction resolved by the coordinator"));
    // The coordinator still owes the wallet an acknowledgement round; once
    // its (slow) retry lands, everything is quiescent. Restart it to
    // redeliver now: redelivery of an applied commit is acknowledged again.
    sys.restart(Kind::Coordinator).await.unwrap();
    let s = sys.assert_consistent(&[Told::Committed(tx)]).await;
    assert_eq!(s.debits.len(), 1, "debited once");
    assert_eq!(sys.balance("alice").await.balance, 7_500);
    assert_eq!(sys.stock("book-1").await.stock, 8);
}

/// Scenario 3: the coordinator dies right after its commit decision is
/// durable, before telling anyone. After restart it delivers the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_durable_decision_delivers_after_restart() {
    let opts = Options::default()
        .set(
            Kind::Coordinator,
            "TWOPC_CRASH_AT",
            CoordinatorCrash::AfterDecision.name(),
        )
        // Participants must not resolve it themselves: the coordinator's
        // redelivery is what this test is about.
        .set(Kind::Wallet, "TWOPC_IN_DOUBT_AFTER_MS", "600000")
        .set(Kind::Order, "TWOPC_IN_DOUBT_AFTER_MS", "600000");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    let r = sys
        .purchase_with(&book(Some("k-3")), Duration::from_secs(3))
        .await;
    assert!(
        r.is_err() || matches!(r, Ok(Reply::Err(_))),
        "no purchase reply can come: {r:?}"
    );
    sys.service(Kind::Coordinator)
        .proc
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap();
    let s = sys.snapshot();
    let (&tx, d) = s.decisions.iter().next().expect("the decision is durable");
    assert_eq!(d.0, Decision::Commit);
    assert_eq!(
        s.wallet_branches.get(&tx).copied(),
        Some(BranchState::Prepared)
    );
    assert_eq!(
        s.order_branches.get(&tx).copied(),
        Some(BranchState::Prepared)
    );

    tracing_line("--- restart the coordinator");
    sys.start_without_crash_points(Kind::Coordinator)
        .await
        .unwrap();
    let s = sys.assert_consistent(&[Told::Committed(tx)]).await;
    assert!(s.debits.contains_key(&tx) && s.orders.contains_key(&tx));
    assert!(sys
        .service(Kind::Coordinator)
        .proc
        .log()
        .contains("resuming delivery"));
    assert_eq!(sys.balance("alice").await.balance, 7_500);
    assert_eq!(sys.stock("book-1").await.stock, 8);

    // The client retries with its request id and learns the outcome.
    match sys
        .purchase_with(&book(Some("k-3")), Duration::from_secs(5))
        .await
    {
        Ok(Reply::Ok(p)) => {
            assert_eq!(p.tx, tx.to_string());
            assert_eq!(p.outcome, Outcome::Committed);
            assert!(p.duplicate);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        sys.balance("alice").await.balance,
        7_500,
        "not charged twice"
    );
}

/// Scenario 4: the coordinator dies after collecting yes votes, before
/// deciding. Nothing is recorded; the participants, in doubt, ask the
/// restarted coordinator, which records and answers abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_before_deciding_participants_presume_abort() {
    let opts = Options::default()
        .set(
            Kind::Coordinator,
            "TWOPC_CRASH_AT",
            CoordinatorCrash::AfterVotes.name(),
        )
        .set(Kind::Wallet, "TWOPC_IN_DOUBT_AFTER_MS", "500")
        .set(Kind::Order, "TWOPC_IN_DOUBT_AFTER_MS", "500");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    let r = sys.purchase_with(&book(None), Duration::from_secs(3)).await;
    assert!(
        !matches!(r, Ok(Reply::Ok(_))),
        "no purchase reply can come: {r:?}"
    );
    sys.service(Kind::Coordinator)
        .proc
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap();
    let s = sys.snapshot();
    assert!(
        s.decisions.is_empty(),
        "the coordinator died before deciding"
    );
    let (&tx, state) = s
        .wallet_branches
        .iter()
        .next()
        .expect("the wallet prepared");
    assert_eq!(*state, BranchState::Prepared);
    assert_eq!(
        sys.balance("alice").await.held,
        2_500,
        "the hold is in place while in doubt"
    );

    tracing_line("--- restart the coordinator; participants ask and learn abort");
    sys.start_without_crash_points(Kind::Coordinator)
        .await
        .unwrap();
    let s = sys.assert_consistent(&[Told::Aborted(tx)]).await;
    assert_eq!(s.decisions.get(&tx).map(|d| d.0), Some(Decision::Abort));
    assert_eq!(
        s.wallet_branches.get(&tx).copied(),
        Some(BranchState::Aborted)
    );
    assert_eq!(
        s.order_branches.get(&tx).copied(),
        Some(BranchState::Aborted)
    );
    let status = sys.tx_status(subjects::TX_STATUS, &tx.to_string()).await;
    assert_eq!(status["reason"]["code"], "presumed_abort", "{status}");
    assert_eq!(sys.balance("alice").await.held, 0);
    assert_eq!(sys.balance("alice").await.balance, 10_000);
    assert_eq!(sys.stock("book-1").await.reserved, 0);
}

/// Scenario 5: the order service is slower than the prepare timeout. The
/// transaction aborts, and the late prepare leaves no reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_slower_than_prepare_timeout_aborts_and_holds_nothing() {
    let opts = Options::default()
        .set(
            Kind::Order,
            "TWOPC_DELAY",
            &format!("{}:1500", ParticipantDelay::Prepare.at(&participant::ORDER)),
        )
        .set(Kind::Coordinator, "TWOPC_PREPARE_TIMEOUT_MS", "400");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Aborted);
    let reason = r.reason.clone().unwrap();
    assert_eq!(
        (reason.participant.as_str(), reason.code),
        ("order", Code::Timeout)
    );
    let tx = tx_id(&r);
    // The late prepare is handled after the injected delay; whichever came
    // first at the order service (the abort or the prepare), it must end
    // aborted with nothing reserved.
    sys.wait_log_any(
        Kind::Order,
        &["voting no", "prepared, voting yes"],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let s = sys.assert_consistent(&[Told::Aborted(tx)]).await;
    assert_eq!(
        s.order_branches.get(&tx).copied(),
        Some(BranchState::Aborted)
    );
    assert_eq!(sys.stock("book-1").await.reserved, 0);
    assert_eq!(sys.stock("book-1").await.stock, 10);
    assert_eq!(sys.balance("alice").await.balance, 10_000);
    assert_eq!(sys.balance("alice").await.held, 0);
}

/// Scenario 6: nats-server is killed and restarted in the middle of a run.
/// Services reconnect; every transaction ends consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_run_ends_consistent() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    sys.seed(&[("erin", 1_000_000)], &[("mug-1", 300, 1_000)])
        .await
        .unwrap();

    let client = sys.shop.client.clone();
    let workload = tokio::spawn(async move {
        let mut results = vec![];
        for i in 0..60 {
            let req = PurchaseRequest {
                user: "erin".into(),
                sku: "mug-1".into(),
                qty: 1,
                amount: 300,
                request_id: Some(format!("nats-restart-{i}")),
            };
            let r = twopc::client::request::<_, twopc_schemas::api::PurchaseReply>(
                &client,
                PURCHASE.as_str(),
                &req,
                Duration::from_secs(3),
            )
            .await;
            results.push(r);
            // Pacing, not waiting: spreads the 60 purchases over the outage.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        results
    });
    // Restart only once purchases are committing: some decisions are durable
    // before the outage.
    poll_until(
        "3 commit decisions before the restart",
        Duration::from_secs(10),
        || async {
            let commits = sys
                .snapshot()
                .decisions
                .values()
                .filter(|d| d.0 == Decision::Commit)
                .count();
            if commits >= 3 {
                Ok(())
            } else {
                Err(format!("{commits} commits"))
            }
        },
    )
    .await;
    tracing_line("--- kill and restart nats-server");
    sys.nats.restart().await.unwrap();
    let results = workload.await.unwrap();
    let told_all: Vec<Told> = results.iter().map(told).collect();
    let unknown = told_all.iter().filter(|t| **t == Told::Unknown).count();
    eprintln!(
        "{} purchases, {unknown} without a reply during the outage",
        told_all.len()
    );

    // Services reconnected: a new purchase commits.
    for kind in [Kind::Coordinator, Kind::Wallet, Kind::Order] {
        sys.wait_ready(kind).await.unwrap();
    }
    let r = sys.purchase("alice", "pen-1", 1, 199).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    let mut told_all = told_all;
    told_all.push(Told::Committed(tx_id(&r)));
    let s = sys.assert_consistent(&told_all).await;
    let committed = told_all
        .iter()
        .filter(|t| matches!(t, Told::Committed(_)))
        .count();
    assert!(
        committed >= 2,
        "purchases before and after the restart commit"
    );
    assert!(s.decisions.len() >= committed);
}

/// Scenario 7 (periodic recovery must not depend on the wall clock): both
/// participants prepare, the coordinator dies before deciding, and then the
/// participants' wall clocks step back an hour while they keep running. Their
/// in-doubt branches must still be resolved by the periodic recovery pass
/// once the coordinator is back. The participants are not restarted: their
/// start-up pass would ask about every prepared branch anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_stepped_back_does_not_hide_in_doubt_branches() {
    let faults_dir = tempfile::tempdir().unwrap();
    let faults_file = faults_dir.path().join("faults");
    std::fs::write(&faults_file, "").unwrap();
    let faults_path = faults_file.to_str().unwrap();
    let opts = Options::default()
        .set(
            Kind::Coordinator,
            "TWOPC_CRASH_AT",
            CoordinatorCrash::AfterVotes.name(),
        )
        .set(Kind::Wallet, "TWOPC_FAULTS_FILE", faults_path)
        .set(Kind::Order, "TWOPC_FAULTS_FILE", faults_path)
        .set(Kind::Wallet, "TWOPC_IN_DOUBT_AFTER_MS", "1000")
        .set(Kind::Order, "TWOPC_IN_DOUBT_AFTER_MS", "1000");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    tracing_line("--- purchase; the coordinator dies after the yes votes");
    let r = sys.purchase_with(&book(None), Duration::from_secs(3)).await;
    assert!(
        !matches!(r, Ok(Reply::Ok(_))),
        "no purchase reply can come: {r:?}"
    );
    sys.service(Kind::Coordinator)
        .proc
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap();
    let s = sys.snapshot();
    let (&tx, state) = s
        .wallet_branches
        .iter()
        .next()
        .expect("the wallet prepared");
    assert_eq!(*state, BranchState::Prepared);
    assert_eq!(
        s.order_branches.get(&tx).copied(),
        Some(BranchState::Prepared)
    );

    tracing_line("--- step both participants' wall clocks back one hour");
    std::fs::write(&faults_file, "clock_skew_ms:-3600000\n").unwrap();
    // The faults file is re-read when the process next reads the wall
    // clock. Storing a tombstone reads it, so abort a transaction nobody
    // prepared until each participant announces the step (a tombstone for an
    // unknown id is harmless: a late prepare for it would vote no).
    let deadline = Instant::now() + Duration::from_secs(10);
    for kind in [Kind::Wallet, Kind::Order] {
        while !sys
            .service(kind)
            .proc
            .log()
            .contains("CLOCK SKEW -3600000 ms")
        {
            assert!(
                Instant::now() < deadline,
                "{} never stepped its clock:\n{}",
                kind.name(),
                sys.logs()
            );
            let ghost = twopc_schemas::protocol::TxId::now_v7();
            let decide = twopc_schemas::protocol::encode(&twopc_schemas::protocol::Decide {
                tx: ghost,
                decision: twopc_schemas::protocol::Decision::Abort,
            });
            sys.raw(&subjects::decide(&kind.participant().unwrap()), &decide)
                .await
                .unwrap();
        }
    }

    tracing_line("--- restart the coordinator; periodic recovery must ask it");
    sys.start_without_crash_points(Kind::Coordinator)
        .await
        .unwrap();
    // Recovery retries with backoff capped at 10 s; 30 s is generous.
    let wait = Duration::from_secs(30);
    let deadline = Instant::now() + wait;
    loop {
        let s = sys.snapshot();
        let wallet = s.wallet_branches.get(&tx).cloned();
        let order = s.order_branches.get(&tx).cloned();
        if wallet == Some(BranchState::Aborted) && order == Some(BranchState::Aborted) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in-doubt branches not resolved {wait:?} after the coordinator came back \
             (wallet {wallet:?}, order {order:?}):\n{}",
            sys.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = sys.assert_consistent(&[Told::Aborted(tx)]).await;
    assert_eq!(s.decisions.get(&tx).map(|d| d.0), Some(Decision::Abort));
    for kind in [Kind::Wallet, Kind::Order] {
        assert!(
            sys.service(kind)
                .proc
                .log()
                .contains("in-doubt transaction resolved by the coordinator"),
            "{} resolved it by asking",
            kind.name()
        );
    }
    assert_eq!(sys.balance("alice").await.held, 0);
    assert_eq!(sys.stock("book-1").await.reserved, 0);
}

/// Issue 8, bug 4: a decision a participant refuses again and again is
/// surfaced (an error in the log, `shop.in_doubt` / `twopc in-doubt`), not
/// retried silently forever. Here a forged abort reaches the order service
/// while the coordinator, which recorded commit, is down; after its restart
/// the order service refuses the commit with `conflict` at every attempt.
/// (Forged protocol messages are for the permissions issue to stop; what
/// matters here is that the stuck delivery is visible.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_refused_again_and_again_is_surfaced() {
    use twopc_schemas::protocol::{self, Decide, DecideReply, Decision};
    let opts = Options::default()
        .set(
            Kind::Coordinator,
            "TWOPC_CRASH_AT",
            CoordinatorCrash::AfterDecision.name(),
        )
        .set(Kind::Coordinator, "TWOPC_RETRY_BASE_MS", "20")
        .set(Kind::Coordinator, "TWOPC_RETRY_CAP_MS", "100");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();

    tracing_line("--- purchase; the coordinator dies right after recording commit");
    let _ = sys.purchase_with(&book(None), Duration::from_secs(2)).await;
    sys.service(Kind::Coordinator)
        .proc
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap();
    let s = sys.snapshot();
    let (&tx, _) = s
        .decisions
        .iter()
        .find(|(_, d)| d.0 == Decision::Commit)
        .expect("a durable commit");

    tracing_line("--- a forged abort reaches the order service, which releases");
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

    sys.start_without_crash_points(Kind::Coordinator)
        .await
        .unwrap();
    tracing_line("--- the restarted coordinator delivers commit; the order service refuses it");
    let threshold = twopc_coordinator::coordinator::REFUSALS_BEFORE_ALERT;
    let refusal = poll_until(
        "the order service's refusals surfaced in shop.in_doubt",
        Duration::from_secs(20),
        || async {
            let v: serde_json::Value =
                serde_json::from_slice(&sys.raw(subjects::IN_DOUBT, b"{}").await.unwrap()).unwrap();
            v["undelivered"]
                .as_array()
                .unwrap()
                .iter()
                .find(|u| u["tx"] == tx.to_string())
                .and_then(|u| u["refused_by"].as_array().cloned())
                .and_then(|r| r.into_iter().find(|r| r["participant"] == "order"))
                .filter(|r| r["times"].as_u64() >= Some(u64::from(threshold)))
                .ok_or_else(|| v.to_string())
        },
    )
    .await;
    assert_eq!(refusal["code"], "conflict", "{refusal}");
    sys.wait_log_any(
        Kind::Coordinator,
        &["participant keeps refusing the recorded decision"],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    // The wallet, which was not refused, has the commit.
    let s = sys.snapshot();
    assert_eq!(s.decisions.get(&tx).unwrap().1, vec![participant::ORDER]);
    assert!(s.debits.contains_key(&tx));
}
