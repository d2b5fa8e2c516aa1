//! What every [`DecisionLog`] must do, as one suite that each store runs:
//! SQLite in this crate's unit tests, JetStream KV (one server and a 3-node
//! cluster) in `tests/decision_log.rs`. The coordinator's correctness rests
//! on these properties, not on any one store.
//!
//! The suite only adds records with fresh ids and keys, so it can share a
//! store with other runs; it asserts on its own records only.

use std::collections::BTreeSet;

use twopc_schemas::api::PurchaseRequest;
use twopc_schemas::participant::{ORDER, WALLET};
use twopc_schemas::protocol::{Decision, TxId};

use crate::log::{DecisionLog, Record, Recorded};

/// A key no other run uses.
fn fresh_key(what: &str) -> String {
    format!("{what}-{}", TxId::now_v7().simple())
}

/// A record as an attempt writes it: both participants to tell.
pub fn record(tx: TxId, decision: Decision, request_id: Option<&str>) -> Record {
    Record {
        tx,
        decision,
        request_id: request_id.map(Into::into),
        transaction: None,
        reason: None,
        deliver_to: vec![WALLET, ORDER],
        pending: vec![WALLET, ORDER],
        decided_at_ms: twopc_common::now_ms(),
        completed_at_ms: None,
        votes: vec![],
        delivery_attempts: 0,
    }
}

/// A presumed abort, as a decision query records it: nobody to tell.
fn presumed_abort(tx: TxId) -> Record {
    let mut r = record(tx, Decision::Abort, None);
    r.deliver_to.clear();
    r.pending.clear();
    r
}

/// Runs every case.
pub async fn run_all<L: DecisionLog>(log: &L) {
    first_writer_wins(log).await;
    request_ids_are_unique(log).await;
    a_key_binds_to_a_decision_recorded_by_someone_else(log).await;
    acknowledgements_complete_a_record(log).await;
    concurrent_writers_of_one_transaction_agree(log).await;
    concurrent_attempts_with_one_key_bind_it_once(log).await;
    recent_is_newest_first(log).await;
    collection_keeps_what_is_undelivered_or_young(log).await;
}

pub async fn first_writer_wins<L: DecisionLog>(log: &L) {
    let tx = TxId::now_v7();
    assert!(matches!(
        log.record(record(tx, Decision::Abort, None)).await.unwrap(),
        Recorded::New(_)
    ));
    match log
        .record(record(tx, Decision::Commit, None))
        .await
        .unwrap()
    {
        Recorded::Existing(r) => assert_eq!(r.decision, Decision::Abort),
        other => panic!("a second decision must lose: {other:?}"),
    }
    assert_eq!(
        log.get(tx).await.unwrap().unwrap().decision,
        Decision::Abort
    );
    assert_eq!(log.get(TxId::now_v7()).await.unwrap(), None);
}

pub async fn request_ids_are_unique<L: DecisionLog>(log: &L) {
    let k = fresh_key("unique");
    let (a, b) = (TxId::now_v7(), TxId::now_v7());
    assert!(matches!(
        log.record(record(a, Decision::Commit, Some(&k)))
            .await
            .unwrap(),
        Recorded::New(_)
    ));
    match log
        .record(record(b, Decision::Commit, Some(&k)))
        .await
        .unwrap()
    {
        Recorded::KeyTaken(r) => assert_eq!((r.tx, r.decision), (a, Decision::Commit)),
        other => panic!("the key is a's: {other:?}"),
    }
    assert_eq!(
        log.get(b).await.unwrap(),
        None,
        "a taken key writes nothing"
    );
    assert_eq!(log.by_request_id(k.clone()).await.unwrap().unwrap().tx, a);
    assert_eq!(log.by_request_id(fresh_key("free")).await.unwrap(), None);
    // Recording again under the same key is idempotent.
    match log
        .record(record(a, Decision::Commit, Some(&k)))
        .await
        .unwrap()
    {
        Recorded::Existing(r) => assert_eq!(r.tx, a),
        other => panic!("{other:?}"),
    }
}

/// A presumed abort recorded first (no key) and the attempt's own record
/// second: the key is bound to the abort, durably, and only if no other
/// transaction holds it.
pub async fn a_key_binds_to_a_decision_recorded_by_someone_else<L: DecisionLog>(log: &L) {
    let k = fresh_key("bind");
    let tx = TxId::now_v7();
    assert!(matches!(
        log.record(presumed_abort(tx)).await.unwrap(),
        Recorded::New(_)
    ));
    let mut attempt = record(tx, Decision::Commit, Some(&k));
    attempt.transaction = Some(twopc_schemas::tx::purchase(
        &twopc_schemas::ClientName::new("web").unwrap(),
        &PurchaseRequest {
            user: "alice".into(),
            sku: "book-1".into(),
            qty: 1,
            amount: 1,
            request_id: Some(k.clone()),
        },
    ));
    match log.record(attempt.clone()).await.unwrap() {
        Recorded::Existing(r) => {
            assert_eq!(r.decision, Decision::Abort);
            assert_eq!(r.request_id.as_deref(), Some(k.as_str()));
            assert_eq!(r.transaction, attempt.transaction);
        }
        other => panic!("{other:?}"),
    }
    let stored = log.by_request_id(k.clone()).await.unwrap().unwrap();
    assert_eq!((stored.tx, stored.decision), (tx, Decision::Abort));
    assert!(matches!(
        log.record(attempt).await.unwrap(),
        Recorded::Existing(r) if r.request_id.as_deref() == Some(k.as_str())
    ));

    let other = TxId::now_v7();
    log.record(presumed_abort(other)).await.unwrap();
    assert!(matches!(
        log.record(record(other, Decision::Commit, Some(&k))).await.unwrap(),
        Recorded::KeyTaken(r) if r.tx == tx
    ));
    assert_eq!(log.get(other).await.unwrap().unwrap().request_id, None);
}

pub async fn acknowledgements_complete_a_record<L: DecisionLog>(log: &L) {
    let (a, b) = (TxId::now_v7(), TxId::now_v7());
    log.record(record(a, Decision::Commit, None)).await.unwrap();
    log.record(record(b, Decision::Abort, None)).await.unwrap();
    let done = TxId::now_v7();
    log.record(presumed_abort(done)).await.unwrap();
    let ours = |v: Vec<Record>| -> BTreeSet<TxId> {
        v.into_iter()
            .map(|r| r.tx)
            .filter(|t| [a, b, done].contains(t))
            .collect()
    };
    assert_eq!(
        ours(log.incomplete().await.unwrap()),
        BTreeSet::from([a, b]),
        "a record with nobody to tell is complete at once"
    );
    log.acked(a, vec![WALLET], 1).await.unwrap();
    assert_eq!(log.get(a).await.unwrap().unwrap().pending, vec![ORDER]);
    log.acked(a, vec![ORDER], 3).await.unwrap();
    let r = log.get(a).await.unwrap().unwrap();
    assert!(r.pending.is_empty() && r.completed_at_ms.is_some());
    assert_eq!(r.delivery_attempts, 3);
    // Acknowledging again, or late, changes nothing.
    log.acked(a, vec![WALLET], 2).await.unwrap();
    assert_eq!(log.get(a).await.unwrap().unwrap().delivery_attempts, 3);
    assert_eq!(ours(log.incomplete().await.unwrap()), BTreeSet::from([b]));
    // An acknowledgement for a transaction with no record writes nothing.
    let ghost = TxId::now_v7();
    log.acked(ghost, vec![WALLET], 1).await.unwrap();
    assert_eq!(log.get(ghost).await.unwrap(), None);
}

/// Replicas (or a query and an attempt) racing to decide one transaction:
/// exactly one write wins and everyone is told the winner.
pub async fn concurrent_writers_of_one_transaction_agree<L: DecisionLog>(log: &L) {
    for _ in 0..3 {
        let tx = TxId::now_v7();
        let writers = (0..8).map(|i| {
            let log = log.clone();
            let decision = if i % 2 == 0 {
                Decision::Commit
            } else {
                Decision::Abort
            };
            tokio::spawn(async move { log.record(record(tx, decision, None)).await.unwrap() })
        });
        let results = futures::future::join_all(writers).await;
        let mut new = vec![];
        let mut seen = vec![];
        for r in results {
            match r.unwrap() {
                Recorded::New(r) => new.push(r.decision),
                Recorded::Existing(r) => seen.push(r.decision),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(new.len(), 1, "exactly one writer wins");
        assert!(seen.iter().all(|d| *d == new[0]), "{new:?} vs {seen:?}");
        assert_eq!(log.get(tx).await.unwrap().unwrap().decision, new[0]);
    }
}

/// Attempts with one request id on several replicas: one binds the key,
/// the others are told its outcome and record nothing.
pub async fn concurrent_attempts_with_one_key_bind_it_once<L: DecisionLog>(log: &L) {
    let k = fresh_key("race");
    let txs: Vec<TxId> = (0..6).map(|_| TxId::now_v7()).collect();
    let attempts = txs.iter().map(|&tx| {
        let (log, k) = (log.clone(), k.clone());
        tokio::spawn(async move {
            log.record(record(tx, Decision::Commit, Some(&k)))
                .await
                .unwrap()
        })
    });
    let results = futures::future::join_all(attempts).await;
    let mut winners = vec![];
    let mut told = vec![];
    for r in results {
        match r.unwrap() {
            Recorded::New(r) => winners.push(r.tx),
            Recorded::KeyTaken(r) => told.push(r.tx),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "one attempt binds the key");
    assert!(told.iter().all(|t| *t == winners[0]));
    for tx in txs.iter().filter(|t| **t != winners[0]) {
        assert_eq!(log.get(*tx).await.unwrap(), None);
    }
    assert_eq!(log.by_request_id(k).await.unwrap().unwrap().tx, winners[0]);
}

pub async fn recent_is_newest_first<L: DecisionLog>(log: &L) {
    let mut older = record(TxId::now_v7(), Decision::Commit, None);
    older.decided_at_ms = i64::MAX - 2;
    let mut newer = record(TxId::now_v7(), Decision::Abort, None);
    newer.decided_at_ms = i64::MAX - 1;
    log.record(older.clone()).await.unwrap();
    log.record(newer.clone()).await.unwrap();
    let recent = log.recent(2).await.unwrap();
    assert_eq!(
        recent.iter().map(|r| r.tx).collect::<Vec<_>>(),
        vec![newer.tx, older.tx]
    );
}

/// The retention rule as the store applies it: only records every
/// participant acknowledged, decided before the cutoff, go, with their
/// request-id binding.
pub async fn collection_keeps_what_is_undelivered_or_young<L: DecisionLog>(log: &L) {
    let cutoff = twopc_common::now_ms();
    let k = fresh_key("collected");
    let (old_done, old_undelivered, young_done) = (TxId::now_v7(), TxId::now_v7(), TxId::now_v7());
    let mut r = record(old_done, Decision::Commit, Some(&k));
    r.decided_at_ms = cutoff - 10_000;
    log.record(r).await.unwrap();
    log.acked(old_done, vec![WALLET, ORDER], 1).await.unwrap();
    let mut r = record(old_undelivered, Decision::Commit, None);
    r.decided_at_ms = cutoff - 10_000;
    log.record(r).await.unwrap();
    log.record(presumed_abort(young_done)).await.unwrap();
    let gone = log.collect(cutoff).await.unwrap();
    assert!(gone >= 1, "{gone}");
    assert_eq!(log.get(old_done).await.unwrap(), None);
    assert_eq!(log.by_request_id(k).await.unwrap(), None);
    assert!(
        log.get(old_undelivered).await.unwrap().is_some(),
        "undelivered stays"
    );
    assert!(log.get(young_done).await.unwrap().is_some(), "young stays");
}
