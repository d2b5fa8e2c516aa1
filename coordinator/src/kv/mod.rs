//! The decision log in JetStream KV: NATS's own replicated store (Raft,
//! replicas 3 on a cluster), so that coordinator replicas share decisions
//! and losing one node loses none. No consensus of our own.
//!
//! Keys of the bucket:
//! * `tx.<tx id, 32 hex>` → the transaction's [`Record`], written by
//!   `create` (put-if-absent): **first writer wins**, whichever replica it
//!   is, and whether it records the attempt's decision or a presumed abort
//!   for a participant's query. Updates (acknowledgements) are
//!   compare-and-set on the revision.
//! * `rid.<request id, hex>` → the transaction that claimed the request id,
//!   also by `create`. An attempt claims its key *before* it records its
//!   decision, so a transaction records a decision only while holding its
//!   key (or without one): two attempts with one key can never both commit.
//!
//! A claim whose transaction still has no decision after another attempt
//! with the key has waited [`CLAIM_GRACE_MS`] for it (on its own monotonic
//! clock: no two machines' wall clocks are compared) belongs to an attempt
//! that died between the two writes, or is slow; the waiting attempt ends it
//! by recording a presumed abort for it (first writer wins, so this is safe
//! at any timing: if the first attempt was only slow, its own `create` then
//! finds the abort and its client hears `aborted` too). The claim carries
//! its transaction, so that an attempt with the same key and another transaction
//! hears `conflict` even when the holder's record is a presumed abort.
//!
//! A record and its claim are collected together, the claim first
//! (`collect`): a claim never outlives its record, so a retry never finds a
//! claim without its decision and presumes abort for a transaction that
//! committed.
//!
//! A commit is sent only until its `write_by_ms` (`record_until`), checked
//! before every send of the create: see the retention rule.
//!
//! Compare-and-set updates keep the record's `writer`: a writer whose
//! create's answer was lost recognises its own record even after another
//! replica noted acknowledgements in it.
//!
//! Reads that decide something (after a lost `create`, for a compare-and-
//! set) go to the stream leader (`get_last_raw_message_by_subject`): KV's
//! direct gets may be answered by a follower that has not yet applied the
//! write that won.
//!
//! Durability: every server the project ships runs JetStream with
//! `sync_interval: always` (see the README for what survives what).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use twopc_schemas::api::{AbortReason, VoteSummary};
use twopc_schemas::protocol::{started_at_ms, Decision, TxId};
use twopc_schemas::tx::Transaction;
use twopc_schemas::{Code, ParticipantName};

use crate::log::{stored, DecisionLog, LogError, Record, Recorded, StoredDecision};

pub mod nats;
pub mod store;

pub use nats::NatsKv;
use nats::MARKER_TTL;
pub use store::{Create, Entry, KvStore, Update};

/// The default bucket name.
pub const DEFAULT_BUCKET: &str = twopc_schemas::subjects::DECISION_BUCKET;

/// How long an attempt waits, on its own monotonic clock, for the decision
/// of another transaction that claimed its request id before ending it by
/// presumed abort. The claiming attempt writes its decision right after the
/// claim (one KV write), so this only needs to outlast a slow write.
pub const CLAIM_GRACE_MS: i64 = 5_000;

/// Largest stored value (a record is well under 2 KiB).
const MAX_VALUE_BYTES: i32 = 64 * 1024;

/// Attempts of a compare-and-set before giving up (each loses only to
/// another writer's success).
const CAS_ATTEMPTS: usize = 32;

/// Where and how to keep the decisions.
#[derive(Debug, Clone)]
pub struct KvConfig {
    pub bucket: String,
    /// Copies of each decision: 3 on a 3-node cluster, 1 on one server.
    pub replicas: usize,
    /// Bound of each KV request (a timeout is an unknown outcome).
    pub timeout: Duration,
}

/// The KV decision log, over JetStream KV in the service and over the
/// simulation's stand-in in `twopc-sim` ([`KvStore`]).
#[derive(Clone)]
pub struct KvLog<S: KvStore = NatsKv> {
    store: S,
    /// Bound of one KV request; a write retried after unknown answers gives
    /// up after twice this.
    timeout_ms: u64,
}

fn tx_key(tx: TxId) -> String {
    format!("tx.{}", tx.simple())
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`; request ids may also hold `:` and `@`,
/// so the key carries the id's bytes in hex (at most 128 characters).
fn rid_key(request_id: &str) -> String {
    let mut k = String::with_capacity(4 + 2 * request_id.len());
    k.push_str("rid.");
    for b in request_id.bytes() {
        k.push_str(&format!("{b:02x}"));
    }
    k
}

/// The value of a `tx.` key: its own shape, versioned apart from the API
/// types (the same rule as the SQLite log's JSON columns).
#[derive(Debug, Serialize, Deserialize)]
struct StoredRecord {
    v: u32,
    /// Written by whom: tells this writer's own write apart from another's
    /// after a write whose answer was lost.
    writer: u64,
    tx: TxId,
    decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    /// The transaction (a purchase, `purchase`, in records of version 1).
    #[serde(default, alias = "purchase", skip_serializing_if = "Option::is_none")]
    txn: Option<stored::AnyTxn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<stored::Reason>,
    deliver_to: Vec<ParticipantName>,
    pending: Vec<ParticipantName>,
    decided_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completed_at_ms: Option<i64>,
    #[serde(default)]
    votes: Vec<stored::Vote>,
    #[serde(default)]
    delivery_attempts: u32,
}

/// 2: `txn` holds a transaction (1: `purchase` held a purchase).
const STORED_VERSION: u32 = 2;

impl StoredRecord {
    fn from_record(r: &Record, writer: u64) -> Self {
        StoredRecord {
            v: STORED_VERSION,
            writer,
            tx: r.tx,
            decision: r.decision.as_str().to_owned(),
            request_id: r.request_id.clone(),
            txn: r.transaction.as_ref().map(stored::AnyTxn::from),
            reason: r.reason.as_ref().map(stored::Reason::from),
            deliver_to: r.deliver_to.clone(),
            pending: r.pending.clone(),
            decided_at_ms: r.decided_at_ms,
            completed_at_ms: r.completed_at_ms,
            votes: r.votes.iter().map(stored::Vote::from).collect(),
            delivery_attempts: r.delivery_attempts,
        }
    }

    fn into_record(self) -> Result<Record, LogError> {
        let decision = match self.decision.as_str() {
            "commit" => Decision::Commit,
            "abort" => Decision::Abort,
            other => return Err(corrupt(format!("decision {other:?}"))),
        };
        Ok(Record {
            tx: self.tx,
            decision,
            request_id: self.request_id,
            transaction: self.txn.map(Transaction::from),
            reason: self.reason.map(AbortReason::from),
            deliver_to: self.deliver_to,
            pending: self.pending,
            decided_at_ms: self.decided_at_ms,
            completed_at_ms: self.completed_at_ms,
            votes: self.votes.into_iter().map(VoteSummary::from).collect(),
            delivery_attempts: self.delivery_attempts,
        })
    }
}

/// The value of a `rid.` key.
#[derive(Debug, Serialize, Deserialize)]
struct StoredClaim {
    v: u32,
    writer: u64,
    tx: TxId,
    claimed_at_ms: i64,
    /// The transaction of the attempt that claimed the key (absent in
    /// claims written before it was stored; a purchase in version 1).
    #[serde(default, alias = "purchase", skip_serializing_if = "Option::is_none")]
    txn: Option<stored::AnyTxn>,
}

fn corrupt(what: String) -> LogError {
    LogError::Failed(format!("decision log holds a value it cannot read: {what}"))
}

fn failed(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Failed(format!("{what}: {e}"))
}

/// A value and the revision it was read at.
struct Versioned<T> {
    value: T,
    revision: u64,
}

impl KvLog<NatsKv> {
    /// Opens (creating when missing) the bucket.
    pub async fn open(client: async_nats::Client, cfg: KvConfig) -> anyhow::Result<Self> {
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.timeout)
            .build(client.clone());
        let config = kv::Config {
            bucket: cfg.bucket.clone(),
            description: "twopc: one decision per transaction, first writer wins".into(),
            history: 1,
            max_value_size: MAX_VALUE_BYTES,
            num_replicas: cfg.replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            // Per-message TTLs, so the marker a deletion leaves expires too.
            limit_markers: Some(MARKER_TTL),
            ..Default::default()
        };
        let kv = match js.create_key_value(config).await {
            Ok(kv) => kv,
            Err(e) if e.kind() == jetstream::context::CreateKeyValueErrorKind::BucketCreate => {
                // It exists with another configuration (say, other
                // replicas): use it as it is, and say so.
                let kv = js.get_key_value(cfg.bucket.clone()).await?;
                tracing::warn!(
                    bucket = %cfg.bucket,
                    asked_replicas = cfg.replicas,
                    error = %e,
                    "decision bucket exists with another configuration; using it as it is"
                );
                kv
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self::with_store(kv, client, &cfg))
    }

    /// The bucket as it is, for readers (the invariant checker): never
    /// creates it or changes its configuration.
    pub async fn attach(client: async_nats::Client, cfg: KvConfig) -> anyhow::Result<Self> {
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.timeout)
            .build(client.clone());
        let kv = js.get_key_value(cfg.bucket.clone()).await?;
        Ok(Self::with_store(kv, client, &cfg))
    }

    fn with_store(kv: kv::Store, client: async_nats::Client, cfg: &KvConfig) -> Self {
        KvLog::new(NatsKv::new(kv, client, &cfg.bucket), cfg.timeout)
    }
}

impl<S: KvStore> KvLog<S> {
    /// The log over `store`, each request bounded by `timeout`.
    pub fn new(store: S, timeout: Duration) -> Self {
        KvLog {
            store,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The store under the log.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Put-if-absent of `value` at `key`.
    async fn create(&self, key: &str, value: Bytes) -> Create {
        self.store.create(key, value).await
    }

    /// The current value at `key`, read from the stream leader.
    async fn read_raw(&self, key: &str) -> Result<Option<Versioned<Bytes>>, LogError> {
        match self.store.latest(key).await {
            Ok(v) => Ok(v.map(|e| Versioned {
                value: e.value,
                revision: e.revision,
            })),
            Err(e) => Err(failed("reading the decision log", e)),
        }
    }

    async fn read_record(&self, tx: TxId) -> Result<Option<Versioned<StoredRecord>>, LogError> {
        let Some(raw) = self.read_raw(&tx_key(tx)).await? else {
            return Ok(None);
        };
        let value: StoredRecord = serde_json::from_slice(&raw.value)
            .map_err(|e| corrupt(format!("record of {tx}: {e}")))?;
        if value.tx != tx {
            return Err(corrupt(format!("record under {tx} is of {}", value.tx)));
        }
        Ok(Some(Versioned {
            value,
            revision: raw.revision,
        }))
    }

    async fn read_claim(&self, request_id: &str) -> Result<Option<StoredClaim>, LogError> {
        let Some(raw) = self.read_raw(&rid_key(request_id)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw.value)
            .map(Some)
            .map_err(|e| corrupt(format!("claim of {request_id:?}: {e}")))
    }

    /// First writer wins for `rec.tx`: `Ok(Ok(rec))` if this call's record
    /// is the one stored, `Ok(Err(winner))` otherwise.
    async fn create_record(
        &self,
        rec: Record,
        write_by_ms: Option<i64>,
    ) -> Result<Result<Record, Record>, LogError> {
        let writer: u64 = self.store.random();
        let value = Bytes::from(
            serde_json::to_vec(&StoredRecord::from_record(&rec, writer)).expect("serialises"),
        );
        let key = tx_key(rec.tx);
        let mut last_unknown = String::new();
        let deadline = self.store.monotonic_ms() + 2 * self.timeout_ms;
        while self.store.monotonic_ms() < deadline {
            // Checked before every send: a write sent past it could land
            // after a query older than the retention took absence for abort.
            if write_by_ms.is_some_and(|by| self.store.now_ms() > by) {
                return Err(LogError::TooLate);
            }
            let why = match self.create(&key, value.clone()).await {
                Create::Written => return Ok(Ok(rec)),
                Create::Lost => "refused, yet no value is there".to_owned(),
                Create::Unknown(e) => e,
            };
            // Lost, or not known: what is there decides. Our own value (a
            // write whose answer was lost) means we won.
            match self.read_record(rec.tx).await? {
                Some(v) if v.value.writer == writer => return Ok(Ok(rec)),
                Some(v) => return Ok(Err(v.value.into_record()?)),
                None => last_unknown = why,
            }
            self.store.sleep(10).await;
        }
        Err(LogError::Failed(format!(
            "recording the decision of {}: {last_unknown}",
            rec.tx
        )))
    }

    /// Claims `request_id` for `tx`; `Ok(None)` when this transaction holds
    /// it (now or already), else the holder's claim.
    async fn claim(
        &self,
        request_id: &str,
        tx: TxId,
        txn: Option<&Transaction>,
        write_by_ms: Option<i64>,
    ) -> Result<Option<StoredClaim>, LogError> {
        let claim = StoredClaim {
            v: STORED_VERSION,
            writer: self.store.random(),
            tx,
            claimed_at_ms: self.store.now_ms(),
            txn: txn.map(stored::AnyTxn::from),
        };
        let value = Bytes::from(serde_json::to_vec(&claim).expect("serialises"));
        let mut last_unknown = String::new();
        let deadline = self.store.monotonic_ms() + 2 * self.timeout_ms;
        while self.store.monotonic_ms() < deadline {
            // Checked before every send, as for the decision itself.
            if write_by_ms.is_some_and(|by| self.store.now_ms() > by) {
                return Err(LogError::TooLate);
            }
            let why = match self.create(&rid_key(request_id), value.clone()).await {
                Create::Written => return Ok(None),
                Create::Lost => "refused, yet no claim is there".to_owned(),
                Create::Unknown(e) => e,
            };
            match self.read_claim(request_id).await? {
                Some(holder) if holder.tx == tx => return Ok(None),
                Some(holder) => return Ok(Some(holder)),
                None => last_unknown = why,
            }
            self.store.sleep(10).await;
        }
        Err(LogError::Failed(format!(
            "claiming request id {request_id:?}: {last_unknown}"
        )))
    }

    /// The decision of the transaction holding a key claimed by another:
    /// its record, waiting up to the claim's grace for it, then a presumed
    /// abort recorded for it (see the module doc).
    async fn holder_decision(
        &self,
        request_id: &str,
        holder: StoredClaim,
        write_by_ms: Option<i64>,
    ) -> Result<Record, LogError> {
        let txn: Option<Transaction> = holder.txn.map(Transaction::from);
        let waited_from = self.store.monotonic_ms();
        loop {
            if let Some(v) = self.read_record(holder.tx).await? {
                let mut r = v.value.into_record()?;
                if r.transaction.is_none() {
                    r.transaction = txn;
                }
                return Ok(r);
            }
            if self.store.monotonic_ms() - waited_from > CLAIM_GRACE_MS as u64 {
                let abort = Record {
                    tx: holder.tx,
                    decision: Decision::Abort,
                    request_id: Some(request_id.to_owned()),
                    transaction: txn.clone(),
                    reason: Some(AbortReason {
                        participant: "coordinator".into(),
                        code: Code::PresumedAbort,
                        message: "the attempt holding this request id recorded no decision".into(),
                    }),
                    deliver_to: vec![],
                    pending: vec![],
                    decided_at_ms: self.store.now_ms(),
                    completed_at_ms: Some(self.store.now_ms()),
                    votes: vec![],
                    delivery_attempts: 0,
                };
                return Ok(match self.create_record(abort, write_by_ms).await? {
                    Ok(mut r) | Err(mut r) => {
                        if r.transaction.is_none() {
                            r.transaction = txn;
                        }
                        r
                    }
                });
            }
            self.store.sleep(25).await;
        }
    }

    /// Read, change, compare-and-set, until it holds or `change` says no.
    async fn update_record(
        &self,
        tx: TxId,
        change: impl Fn(&mut StoredRecord) -> bool,
    ) -> Result<(), LogError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(mut v) = self.read_record(tx).await? else {
                return Ok(());
            };
            if !change(&mut v.value) {
                return Ok(());
            }
            // The writer stays: it says who created the record, which a
            // creator whose answer was lost reads back to know it won.
            let value = Bytes::from(serde_json::to_vec(&v.value).expect("serialises"));
            match self.store.update(&tx_key(tx), value, v.revision).await {
                Update::Written => return Ok(()),
                Update::WrongRevision => {}
                // Unknown: read again; a change already made is seen then.
                Update::Unknown(_) => {}
                Update::Failed(e) => return Err(failed("updating the decision log", e)),
            }
        }
        Err(LogError::Failed(format!(
            "updating the record of {tx}: too many concurrent writers"
        )))
    }

    /// The last value of every key under `prefix` (`tx.` or `rid.`), with
    /// its key and revision, in one pass.
    async fn scan_raw(&self, prefix: &str) -> Result<Vec<(String, Versioned<Bytes>)>, LogError> {
        Ok(self
            .store
            .scan(prefix, &|_| true)
            .await
            .map_err(|e| failed("listing the decision log", e))?
            .into_iter()
            .map(|e| {
                (
                    e.key,
                    Versioned {
                        value: e.value,
                        revision: e.revision,
                    },
                )
            })
            .collect())
    }

    /// Every record, with its key and revision.
    async fn scan(&self) -> Result<Vec<(String, Versioned<Record>)>, LogError> {
        self.scan_where(|_| true).await
    }

    /// The records `keep` accepts, with their keys and revisions; the rest
    /// are decoded and dropped as they stream by, not held.
    async fn scan_where(
        &self,
        keep: impl Fn(&StoredRecord) -> bool + Sync,
    ) -> Result<Vec<(String, Versioned<Record>)>, LogError> {
        // A value that does not decode is kept, so that it is reported
        // below rather than skipped.
        let entries = self
            .store
            .scan("tx.", &|e| {
                serde_json::from_slice::<StoredRecord>(&e.value)
                    .map(|v| keep(&v))
                    .unwrap_or(true)
            })
            .await
            .map_err(|e| failed("listing the decision log", e))?;
        let mut out = vec![];
        for e in entries {
            let v: StoredRecord = serde_json::from_slice(&e.value)
                .map_err(|err| corrupt(format!("record at {}: {err}", e.key)))?;
            out.push((
                e.key,
                Versioned {
                    value: v.into_record()?,
                    revision: e.revision,
                },
            ));
        }
        Ok(out)
    }

    /// Deletes `key` if it is still at `revision` (a changed value stays).
    /// The purge marker left behind expires after [`MARKER_TTL`].
    async fn delete_at(&self, key: &str, revision: u64) -> Result<bool, LogError> {
        self.store
            .delete_at(key, revision)
            .await
            .map_err(|e| failed("deleting from the decision log", e))
    }
}

impl<S: KvStore> DecisionLog for KvLog<S> {
    async fn record_until(
        &self,
        mut rec: Record,
        write_by_ms: Option<i64>,
    ) -> Result<Recorded, LogError> {
        if rec.pending.is_empty() && rec.completed_at_ms.is_none() {
            rec.completed_at_ms = Some(self.store.now_ms());
        }
        if let Some(rid) = rec.request_id.clone() {
            if let Some(holder) = self
                .claim(&rid, rec.tx, rec.transaction.as_ref(), write_by_ms)
                .await?
            {
                // Nothing is written for this transaction: by presumed
                // abort it is aborted, and the key keeps its first outcome.
                // A presumed abort for the holder keeps the same deadline
                // rule, counted from the holder's own start.
                let holder_by = write_by_ms.and_then(|by| {
                    let half = by - started_at_ms(rec.tx)?;
                    Some(started_at_ms(holder.tx)? + half)
                });
                return Ok(Recorded::KeyTaken(
                    self.holder_decision(&rid, holder, holder_by).await?,
                ));
            }
        }
        match self.create_record(rec.clone(), write_by_ms).await? {
            Ok(rec) => Ok(Recorded::New(rec)),
            Err(mut existing) => {
                if existing.request_id.is_none() && rec.request_id.is_some() {
                    // The key is bound to this transaction by the claim; the
                    // record says so too, for status queries.
                    let (rid, txn, votes) = (
                        rec.request_id.clone(),
                        rec.transaction.clone(),
                        rec.votes.clone(),
                    );
                    self.update_record(rec.tx, |s| {
                        if s.request_id.is_some() {
                            return false;
                        }
                        s.request_id = rid.clone();
                        if s.txn.is_none() {
                            s.txn = txn.as_ref().map(stored::AnyTxn::from);
                        }
                        if s.votes.is_empty() {
                            s.votes = votes.iter().map(stored::Vote::from).collect();
                        }
                        true
                    })
                    .await?;
                    existing.request_id = rec.request_id;
                    existing.transaction = existing.transaction.or(rec.transaction);
                    if existing.votes.is_empty() {
                        existing.votes = rec.votes;
                    }
                }
                Ok(Recorded::Existing(existing))
            }
        }
    }

    async fn get(&self, tx: TxId) -> Result<Option<Record>, LogError> {
        match self.read_record(tx).await? {
            Some(v) => v.value.into_record().map(Some),
            None => Ok(None),
        }
    }

    async fn by_request_id(&self, request_id: String) -> Result<Option<Record>, LogError> {
        let Some(claim) = self.read_claim(&request_id).await? else {
            return Ok(None);
        };
        // A claim without a decision yet is an attempt in flight (or one
        // that died): the key is not free, but there is no outcome to give.
        let txn = claim.txn.map(Transaction::from);
        Ok(self.get(claim.tx).await?.map(|mut r| {
            r.request_id.get_or_insert(request_id);
            if r.transaction.is_none() {
                r.transaction = txn;
            }
            r
        }))
    }

    async fn acked(
        &self,
        tx: TxId,
        participants: Vec<ParticipantName>,
        attempts: u32,
    ) -> Result<(), LogError> {
        let now = self.store.now_ms();
        self.update_record(tx, |s| {
            let before = s.pending.len();
            s.pending.retain(|p| !participants.contains(p));
            let grew = attempts > s.delivery_attempts;
            s.delivery_attempts = s.delivery_attempts.max(attempts);
            if s.pending.is_empty() && s.completed_at_ms.is_none() {
                s.completed_at_ms = Some(now);
            }
            s.pending.len() != before || grew
        })
        .await
    }

    async fn incomplete(&self) -> Result<Vec<Record>, LogError> {
        let mut v: Vec<Record> = self
            .scan_where(|s| s.completed_at_ms.is_none())
            .await?
            .into_iter()
            .map(|(_, r)| r.value)
            .collect();
        v.sort_by_key(|r| r.decided_at_ms);
        Ok(v)
    }

    async fn recent(&self, n: usize) -> Result<Vec<Record>, LogError> {
        let mut v: Vec<Record> = self
            .scan()
            .await?
            .into_iter()
            .map(|(_, r)| r.value)
            .collect();
        v.sort_by_key(|r| std::cmp::Reverse((r.decided_at_ms, r.tx)));
        v.truncate(n);
        Ok(v)
    }

    async fn collect(&self, before_ms: i64) -> Result<usize, LogError> {
        let mut claims: BTreeMap<String, (StoredClaim, u64)> = BTreeMap::new();
        for (key, raw) in self.scan_raw("rid.").await? {
            let claim: StoredClaim = serde_json::from_slice(&raw.value)
                .map_err(|e| corrupt(format!("claim at {key}: {e}")))?;
            claims.insert(key, (claim, raw.revision));
        }
        let records = self.scan().await?;
        let recorded: std::collections::BTreeSet<TxId> =
            records.iter().map(|(_, r)| r.value.tx).collect();
        // A claim goes with its record, first (below), never before it: a
        // claim is stamped after its record's decision time, so collecting
        // each by its own time could delete the record and keep the claim,
        // and a retry would then presume abort for a purchase that
        // committed. Only a claim whose transaction has no record (an
        // attempt that died between its two writes) goes by its own time.
        for (key, (claim, revision)) in &claims {
            if claim.claimed_at_ms < before_ms && !recorded.contains(&claim.tx) {
                self.delete_at(key, *revision).await?;
            }
        }
        let mut gone = 0;
        for (key, r) in records {
            let rec = &r.value;
            if rec.completed_at_ms.is_none() || rec.decided_at_ms >= before_ms {
                continue;
            }
            if let Some(rid) = &rec.request_id {
                let ck = rid_key(rid);
                if let Some((claim, revision)) = claims.get(&ck) {
                    if claim.tx == rec.tx && !self.delete_at(&ck, *revision).await? {
                        // The claim changed under us: leave the record for
                        // the next pass.
                        continue;
                    }
                }
            }
            if self.delete_at(&key, r.revision).await? {
                gone += 1;
            }
        }
        Ok(gone)
    }
}

/// The JetStream stream behind a KV bucket.
pub fn stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The server leading `bucket`'s stream now (every decision write goes
/// through it), if the stream has one and says so.
pub async fn leader(client: &async_nats::Client, bucket: &str) -> Option<String> {
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream(stream_name(bucket)).await.ok()?;
    stream.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

/// Reads every decision in the bucket, by transaction, for the invariant
/// checker (the KV counterpart of [`crate::log::snapshot`]).
pub async fn snapshot(
    client: async_nats::Client,
    bucket: &str,
) -> anyhow::Result<BTreeMap<TxId, StoredDecision>> {
    let log = KvLog::attach(
        client,
        KvConfig {
            bucket: bucket.to_owned(),
            replicas: 1,
            timeout: Duration::from_secs(5),
        },
    )
    .await?;
    Ok(log
        .scan()
        .await?
        .into_iter()
        .map(|(_, r)| r.value)
        .map(|r| {
            (
                r.tx,
                StoredDecision {
                    decision: r.decision,
                    pending: r.pending,
                    request_id: r.request_id,
                    decided_at_ms: r.decided_at_ms,
                },
            )
        })
        .collect())
}

/// Makes the participants' owner bucket ([`subjects::OWNER_BUCKET`], see
/// `twopc_participant::ownership`) when it is missing, retrying while the
/// server does not answer. The coordinator makes it, not the participants:
/// a participant may then not create streams at all, so it cannot make a
/// stream over someone else's subjects. Returns once the bucket exists, or
/// at once when the server has no JetStream (participants then fall back
/// to asking each other).
pub async fn ensure_owner_bucket(client: async_nats::Client, replicas: usize) {
    use twopc_schemas::subjects;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client.clone());
    let mut backoff = twopc_common::backoff::Backoff::new(200, 5_000);
    loop {
        let config = kv::Config {
            bucket: subjects::OWNER_BUCKET.into(),
            description: "twopc: one owner lease per participant name".into(),
            history: 1,
            max_value_size: twopc_schemas::ownership::MAX_LEASE_BYTES as i32,
            num_replicas: replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        match js.create_key_value(config).await {
            Ok(_) => {
                tracing::info!(
                    bucket = subjects::OWNER_BUCKET,
                    replicas,
                    "participant owner bucket ready"
                );
                return;
            }
            // It exists with another configuration: participants use it.
            Err(e)
                if e.kind() == jetstream::context::CreateKeyValueErrorKind::BucketCreate
                    && js.get_key_value(subjects::OWNER_BUCKET).await.is_ok() =>
            {
                return;
            }
            Err(e) => {
                let no_js = client
                    .request("$JS.API.INFO", Bytes::new())
                    .await
                    .is_err_and(|e| e.kind() == async_nats::client::RequestErrorKind::NoResponders);
                if no_js {
                    tracing::warn!("the NATS server has no JetStream: participants cannot hold owner leases and fall back to asking each other (see ARCHITECTURE.md)");
                    return;
                }
                tracing::warn!(error = %e, "cannot make the participant owner bucket yet; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A store in memory for the log's own tests: a wall clock that stands
    /// still unless told, a monotonic clock that sleeps advance, and hooks
    /// to lose the next create's answer and to run something before the
    /// next read.
    #[derive(Clone, Default)]
    struct MemKv {
        inner: Arc<Mutex<Mem>>,
    }

    type Hook = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>;

    #[derive(Default)]
    struct Mem {
        keys: BTreeMap<String, (Bytes, u64)>,
        seq: u64,
        wall_ms: i64,
        mono_ms: u64,
        random: u64,
        lose_next_create_answer: bool,
        before_next_read: Option<Hook>,
    }

    impl KvStore for MemKv {
        async fn create(&self, key: &str, value: Bytes) -> Create {
            let mut m = self.inner.lock().unwrap();
            if m.keys.contains_key(key) {
                return Create::Lost;
            }
            m.seq += 1;
            let seq = m.seq;
            m.keys.insert(key.to_owned(), (value, seq));
            if std::mem::take(&mut m.lose_next_create_answer) {
                return Create::Unknown("answer lost".into());
            }
            Create::Written
        }
        async fn update(&self, key: &str, value: Bytes, revision: u64) -> Update {
            let mut m = self.inner.lock().unwrap();
            match m.keys.get(key) {
                Some((_, r)) if *r == revision => {
                    m.seq += 1;
                    let seq = m.seq;
                    m.keys.insert(key.to_owned(), (value, seq));
                    Update::Written
                }
                _ => Update::WrongRevision,
            }
        }
        async fn latest(&self, key: &str) -> Result<Option<Entry>, String> {
            let hook = self.inner.lock().unwrap().before_next_read.take();
            if let Some(h) = hook {
                h().await;
            }
            let m = self.inner.lock().unwrap();
            Ok(m.keys.get(key).map(|(v, r)| Entry {
                key: key.to_owned(),
                value: v.clone(),
                revision: *r,
            }))
        }
        async fn delete_at(&self, key: &str, revision: u64) -> Result<bool, String> {
            let mut m = self.inner.lock().unwrap();
            match m.keys.get(key) {
                Some((_, r)) if *r == revision => {
                    m.keys.remove(key);
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
        async fn scan(
            &self,
            prefix: &str,
            keep: &(dyn Fn(&Entry) -> bool + Sync),
        ) -> Result<Vec<Entry>, String> {
            let m = self.inner.lock().unwrap();
            Ok(m.keys
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, (v, r))| Entry {
                    key: k.clone(),
                    value: v.clone(),
                    revision: *r,
                })
                .filter(|e| keep(e))
                .collect())
        }
        fn now_ms(&self) -> i64 {
            self.inner.lock().unwrap().wall_ms
        }
        fn monotonic_ms(&self) -> u64 {
            self.inner.lock().unwrap().mono_ms
        }
        async fn sleep(&self, ms: u64) {
            self.inner.lock().unwrap().mono_ms += ms;
            // A real await point, so that a test's timeout can end a wait
            // that never would.
            tokio::task::yield_now().await;
        }
        fn random(&self) -> u64 {
            let mut m = self.inner.lock().unwrap();
            m.random += 1;
            m.random
        }
    }

    fn log_on(store: &MemKv) -> KvLog<MemKv> {
        KvLog::new(store.clone(), Duration::from_millis(500))
    }

    fn commit_of(tx: TxId, request_id: Option<&str>, decided_at_ms: i64) -> Record {
        let mut r = crate::conformance::record(tx, Decision::Commit, request_id);
        r.decided_at_ms = decided_at_ms;
        r
    }

    /// Issue 18, finding 2: replica A's create lands but its answer is
    /// lost; before A reads back, replica B notes an acknowledgement in
    /// the record. A must still see its own record (the compare-and-set
    /// keeps the writer), not "someone else's commit".
    #[tokio::test]
    async fn a_creator_whose_answer_was_lost_knows_its_record_after_another_noted_acks() {
        let store = MemKv::default();
        let (a, b) = (log_on(&store), log_on(&store));
        let tx = TxId::now_v7();
        {
            let mut m = store.inner.lock().unwrap();
            m.lose_next_create_answer = true;
            m.before_next_read = Some(Box::new(move || {
                Box::pin(async move {
                    b.acked(tx, vec![twopc_schemas::participant::WALLET], 1)
                        .await
                        .unwrap();
                })
            }));
        }
        match a.record(commit_of(tx, None, 1)).await.unwrap() {
            Recorded::New(r) => assert_eq!(r.decision, Decision::Commit),
            other => panic!("A's own create must be New, got {other:?}"),
        }
        assert_eq!(
            a.get(tx).await.unwrap().unwrap().pending,
            vec![twopc_schemas::participant::ORDER]
        );
    }

    /// Issue 18, finding 3: the claim is stamped after the record's
    /// decision time; a cutoff between the two must not delete the record
    /// and keep the claim.
    #[tokio::test]
    async fn collection_never_keeps_a_claim_whose_record_it_deleted() {
        let store = MemKv::default();
        store.inner.lock().unwrap().wall_ms = 10_000;
        let log = log_on(&store);
        let tx = TxId::now_v7();
        // Decided at 9,990, claimed at 10,000 (the store's clock).
        let mut rec = commit_of(tx, Some("k"), 9_990);
        rec.pending.clear();
        assert!(matches!(log.record(rec).await.unwrap(), Recorded::New(_)));
        assert_eq!(log.collect(9_995).await.unwrap(), 1);
        assert_eq!(log.get(tx).await.unwrap(), None);
        assert_eq!(
            store.latest(&rid_key("k")).await.unwrap(),
            None,
            "the claim went with its record"
        );
        // A claim whose attempt never recorded goes by its own time.
        store.inner.lock().unwrap().wall_ms = 20_000;
        let dead = TxId::now_v7();
        log.claim("dead", dead, None, None).await.unwrap();
        assert_eq!(log.collect(19_999).await.unwrap(), 0);
        assert!(store.latest(&rid_key("dead")).await.unwrap().is_some());
        log.collect(20_001).await.unwrap();
        assert_eq!(store.latest(&rid_key("dead")).await.unwrap(), None);
    }

    /// Issue 18, finding 8: the wait for another attempt's decision is
    /// bounded by the waiter's own monotonic clock, whatever the claimer's
    /// wall clock said (here a day ahead).
    #[tokio::test]
    async fn waiting_for_another_claim_is_bounded_by_the_waiters_own_clock() {
        let store = MemKv::default();
        store.inner.lock().unwrap().wall_ms = 1_000;
        let log = log_on(&store);
        let holder = TxId::now_v7();
        let claim = StoredClaim {
            v: STORED_VERSION,
            writer: 99,
            tx: holder,
            claimed_at_ms: 1_000 + 86_400_000,
            txn: None,
        };
        store
            .create(
                &rid_key("k"),
                Bytes::from(serde_json::to_vec(&claim).unwrap()),
            )
            .await;
        let mine = TxId::now_v7();
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            log.record(commit_of(mine, Some("k"), 1_000)),
        )
        .await
        .expect("bounded wait")
        .unwrap();
        match got {
            Recorded::KeyTaken(r) => {
                assert_eq!((r.tx, r.decision), (holder, Decision::Abort));
            }
            other => panic!("{other:?}"),
        }
        let waited = store.monotonic_ms();
        assert!(
            (CLAIM_GRACE_MS as u64..CLAIM_GRACE_MS as u64 + 1_000).contains(&waited),
            "{waited}"
        );
    }

    /// A commit is not sent once its deadline has passed.
    #[tokio::test]
    async fn a_commit_is_not_sent_past_its_deadline() {
        let store = MemKv::default();
        store.inner.lock().unwrap().wall_ms = 5_000;
        let log = log_on(&store);
        let tx = TxId::now_v7();
        assert_eq!(
            log.record_until(commit_of(tx, None, 1), Some(4_999)).await,
            Err(LogError::TooLate)
        );
        assert_eq!(log.get(tx).await.unwrap(), None);
        assert!(matches!(
            log.record_until(commit_of(tx, None, 1), Some(5_000))
                .await
                .unwrap(),
            Recorded::New(_)
        ));
    }

    #[test]
    fn keys_are_valid_kv_keys_for_every_request_id_the_api_accepts() {
        let rid = rid_key("a:b@c.d-e_f");
        assert_eq!(rid, "rid.613a6240632e642d655f66");
        assert!(rid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)));
        let tx = tx_key(TxId::from_u128(0x0193_0000_0000_7000_8000_0000_0000_002a));
        assert_eq!(tx, "tx.0193000000007000800000000000002a");
    }

    #[test]
    fn the_stored_shape_reads_back_what_an_earlier_version_wrote() {
        // Written by version 1; never edit, add a new case for a new shape.
        let v1 = r#"{"v":1,"writer":7,"tx":"01930000-0000-7000-8000-00000000002a","decision":"commit","request_id":"k","purchase":{"user":"alice","sku":"book-1","qty":2,"amount":2500,"request_id":"k"},"deliver_to":["wallet","order"],"pending":["order"],"decided_at_ms":1700000000000,"votes":[{"participant":"wallet","vote":"yes"}],"delivery_attempts":1}"#;
        let s: StoredRecord = serde_json::from_str(v1).unwrap();
        let r = s.into_record().unwrap();
        assert_eq!(r.decision, Decision::Commit);
        assert_eq!(r.pending, vec![twopc_schemas::participant::ORDER]);
        let t = r.transaction.unwrap();
        assert_eq!(t.client.as_str(), "web");
        assert_eq!(
            t.branches[1].op.as_str(),
            r#"{"amount":2500,"qty":2,"sku":"book-1","user":"alice"}"#
        );
        assert_eq!(r.votes[0].vote, "yes");
        // Version 2 writes the transaction, and reads it back.
        let s = StoredRecord::from_record(&r_with(t.clone()), 8);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(r#""v":2"#) && json.contains(r#""txn":{"client":"web""#),
            "{json}"
        );
        let back: StoredRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_record().unwrap().transaction, Some(t));
        let claim_v1 = r#"{"v":1,"writer":7,"tx":"01930000-0000-7000-8000-00000000002a","claimed_at_ms":1,"purchase":{"user":"a","sku":"b","qty":1,"amount":1}}"#;
        let c: StoredClaim = serde_json::from_str(claim_v1).unwrap();
        assert_eq!(Transaction::from(c.txn.unwrap()).participants().len(), 2);
    }

    fn r_with(t: Transaction) -> Record {
        Record {
            tx: TxId::from_u128(0x0193_0000_0000_7000_8000_0000_0000_002a),
            decision: Decision::Commit,
            request_id: None,
            transaction: Some(t),
            reason: None,
            deliver_to: vec![],
            pending: vec![],
            decided_at_ms: 1,
            completed_at_ms: Some(1),
            votes: vec![],
            delivery_attempts: 1,
        }
    }
}
