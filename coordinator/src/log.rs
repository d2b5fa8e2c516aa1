//! The decision log: the one durable thing the coordinator owns.
//!
//! **Invariant:** a transaction has at most one decision, ever. Recording is
//! first writer wins: a second `record` for the same id returns the first
//! decision unchanged. By presumed abort, no record means abort, and a
//! decision query for an undecided id records abort, so a later commit of
//! that id is impossible.

use std::future::Future;

use rusqlite::{params, Connection, OptionalExtension};
use twopc_common::db::{self, Db, DbError, ReadDb};
use twopc_common::now_ms;
use twopc_schemas::api::{AbortReason, VoteSummary};
use twopc_schemas::protocol::{Decision, TxId};
use twopc_schemas::tx::Transaction;
use twopc_schemas::ParticipantName;

/// One transaction's durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub tx: TxId,
    pub decision: Decision,
    /// The client's idempotency key, unique across records.
    pub request_id: Option<String>,
    /// The transaction (its client and branches), for status queries,
    /// duplicate replies and telling a retry from another transaction
    /// under the same key; `None` for a presumed abort.
    pub transaction: Option<Transaction>,
    /// Why it aborted (abort only).
    pub reason: Option<AbortReason>,
    /// Participants the decision must reach.
    pub deliver_to: Vec<ParticipantName>,
    /// Those of `deliver_to` that have not acknowledged yet.
    pub pending: Vec<ParticipantName>,
    pub decided_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    /// Each participant's phase-1 answer (empty for a presumed abort).
    pub votes: Vec<VoteSummary>,
    /// Delivery rounds until the last acknowledgement noted.
    pub delivery_attempts: u32,
}

/// Records one `collect` call deletes at most in SQLite (one short write
/// transaction in the writer's queue; a backlog takes several calls).
pub const COLLECT_BATCH: usize = 10_000;

/// What `record` did. Storage stores: it never turns one decision into
/// another; the coordinator decides what each answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// This call's record is now durable, with its request id if it had one.
    New(Record),
    /// The transaction had a decision already, which wins (the call's
    /// decision is not written). If the call carried a request id that no
    /// record held, the id is now bound to the existing record, in the same
    /// durable write: a retry with that id finds this transaction.
    Existing(Record),
    /// The call's request id belongs to another transaction, returned here.
    /// Nothing was written.
    KeyTaken(Record),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("decision log is overloaded")]
    Busy,
    #[error("decision log failed: {0}")]
    Failed(String),
    /// A commit was not written because its `write_by_ms` had passed when
    /// it would have been sent (nothing was sent then; an earlier attempt
    /// of the same call may still land, and first writer wins).
    #[error("too late to write the commit")]
    TooLate,
}

impl From<DbError> for LogError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Busy => LogError::Busy,
            other => LogError::Failed(other.to_string()),
        }
    }
}

/// The decision log's interface, so that a replicated store can replace
/// SQLite without touching the protocol.
pub trait DecisionLog: Clone + Send + Sync + 'static {
    /// Records `rec` unless `rec.tx` has a decision already; durable before
    /// it returns. With `write_by_ms`, nothing is sent once the writer's
    /// wall clock is past it ([`LogError::TooLate`]): the bound that lets a
    /// query older than the retention take absence for abort.
    fn record_until(
        &self,
        rec: Record,
        write_by_ms: Option<i64>,
    ) -> impl Future<Output = Result<Recorded, LogError>> + Send;
    /// [`DecisionLog::record_until`] without a deadline.
    fn record(&self, rec: Record) -> impl Future<Output = Result<Recorded, LogError>> + Send {
        self.record_until(rec, None)
    }
    fn get(&self, tx: TxId) -> impl Future<Output = Result<Option<Record>, LogError>> + Send;
    fn by_request_id(
        &self,
        request_id: String,
    ) -> impl Future<Output = Result<Option<Record>, LogError>> + Send;
    /// Notes the acknowledgements of `participants`; the record completes
    /// when none is pending. Losing this write only causes a redundant (and
    /// idempotent) redelivery after a restart.
    fn acked(
        &self,
        tx: TxId,
        participants: Vec<ParticipantName>,
        attempts: u32,
    ) -> impl Future<Output = Result<(), LogError>> + Send;
    /// Records whose decision has not reached every participant.
    fn incomplete(&self) -> impl Future<Output = Result<Vec<Record>, LogError>> + Send;
    /// A record for a public status read (`shop.tx`). A store may serve
    /// it off the protocol's write path (SQLite: read-only connections with
    /// their own queue), so a flood of reads never delays a decision.
    fn read(&self, tx: TxId) -> impl Future<Output = Result<Option<Record>, LogError>> + Send {
        self.get(tx)
    }
    /// At most `limit` of the [`incomplete`](Self::incomplete) records,
    /// oldest decision first, for the in-doubt listing; served like
    /// [`read`](Self::read).
    fn incomplete_listing(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Record>, LogError>> + Send {
        async move {
            let mut records = self.incomplete().await?;
            records.truncate(limit);
            Ok(records)
        }
    }
    /// The `n` most recent decisions, newest first.
    fn recent(&self, n: usize) -> impl Future<Output = Result<Vec<Record>, LogError>> + Send;
    /// Deletes what the retention rule lets go: records acknowledged by
    /// every participant and decided before `before_ms`, and request-id
    /// bindings as old. Never an undelivered record. Returns how many
    /// records went; a store may stop after [`COLLECT_BATCH`] (one short
    /// write), so the caller asks again while that many went.
    fn collect(&self, before_ms: i64) -> impl Future<Output = Result<usize, LogError>> + Send;
}

const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE decisions (
    tx BLOB PRIMARY KEY CHECK (length(tx) = 16),
    decision TEXT NOT NULL CHECK (decision IN ('commit', 'abort')),
    request_id TEXT UNIQUE,
    purchase TEXT,
    reason TEXT,
    deliver_to TEXT NOT NULL,
    pending TEXT NOT NULL,
    decided_at_ms INTEGER NOT NULL,
    completed_at_ms INTEGER
);
CREATE INDEX decisions_incomplete ON decisions (decided_at_ms) WHERE completed_at_ms IS NULL;
",
    "
ALTER TABLE decisions ADD COLUMN votes TEXT;
ALTER TABLE decisions ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
",
    "
CREATE INDEX decisions_completed ON decisions (decided_at_ms) WHERE completed_at_ms IS NOT NULL;
",
    // Transactions became generic: the column holds a transaction; rows
    // written before hold a purchase, read back as its two branches.
    "
ALTER TABLE decisions RENAME COLUMN purchase TO txn;
",
];

/// The SQLite decision log (WAL, synchronous=FULL, group commit).
#[derive(Clone)]
pub struct SqliteLog {
    /// The writer: everything the protocol reads and writes.
    db: Db,
    /// Read-only connections for the public reads (`shop.tx`,
    /// `shop.in_doubt`), with their own queue.
    reads: ReadDb,
}

impl SqliteLog {
    pub fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let conn = db::open(path, MIGRATIONS)?;
        let db = Db::start(conn, "coordinator");
        let reads = db.reader("coordinator")?;
        Ok(SqliteLog { db, reads })
    }

    pub fn path(&self) -> &std::path::Path {
        self.db.path()
    }
}

/// What the `decisions` table stores in its JSON columns, in shapes of its
/// own: the API types may rename or add fields freely, and a service must
/// still read every row it wrote before. Changing a shape here means a new
/// shape (and a migration), never an edit; `stored_shapes_read_back` holds
/// rows written by earlier versions.
pub(crate) mod stored {
    use serde::{Deserialize, Serialize};
    use twopc_schemas::api::{AbortReason, PurchaseRequest, VoteSummary};
    use twopc_schemas::tx::{self, Op, Transaction};
    use twopc_schemas::{client, ClientName, Code, ParticipantName};

    /// A purchase, as rows written before transactions were generic
    /// stored it; read back as its two branches ([`tx::purchase`]).
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Purchase {
        user: String,
        sku: String,
        qty: u64,
        amount: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    }

    impl From<Purchase> for Transaction {
        fn from(p: Purchase) -> Self {
            // Its client is the scoped request id's, or (keys recorded
            // before they were scoped, and purchases without one) the
            // default client, the only one there was.
            let client = p
                .request_id
                .as_deref()
                .and_then(client::split_request_id)
                .and_then(|(c, _)| ClientName::new(c).ok())
                .unwrap_or_else(|| {
                    ClientName::new(client::DEFAULT_CLIENT).expect("the default client's name")
                });
            let req = PurchaseRequest {
                user: p.user,
                sku: p.sku,
                qty: p.qty,
                amount: p.amount,
                request_id: p.request_id,
            };
            tx::purchase(&client, &req)
        }
    }

    /// A transaction: its client, its branches (each op as the JSON value
    /// it is) and its request id.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Txn {
        client: ClientName,
        branches: Vec<Branch>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Branch {
        participant: ParticipantName,
        op: Op,
    }

    impl From<&Transaction> for Txn {
        fn from(t: &Transaction) -> Self {
            Txn {
                client: t.client.clone(),
                branches: t
                    .branches
                    .iter()
                    .map(|b| Branch {
                        participant: b.participant.clone(),
                        op: b.op.clone(),
                    })
                    .collect(),
                request_id: t.request_id.clone(),
            }
        }
    }

    /// What a transaction column or field holds: a transaction, or a
    /// purchase written by an earlier version.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(untagged)]
    pub enum AnyTxn {
        Txn(Txn),
        Purchase(Purchase),
    }

    impl From<&Transaction> for AnyTxn {
        fn from(t: &Transaction) -> Self {
            AnyTxn::Txn(Txn::from(t))
        }
    }

    impl From<AnyTxn> for Transaction {
        fn from(t: AnyTxn) -> Self {
            match t {
                AnyTxn::Txn(t) => Transaction {
                    client: t.client,
                    branches: t
                        .branches
                        .into_iter()
                        .map(|b| twopc_schemas::tx::Branch {
                            participant: b.participant,
                            op: b.op,
                        })
                        .collect(),
                    request_id: t.request_id,
                },
                AnyTxn::Purchase(p) => p.into(),
            }
        }
    }

    /// Codes are stored by their snake_case names, which never change.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Reason {
        participant: String,
        code: Code,
        message: String,
    }

    impl From<&AbortReason> for Reason {
        fn from(r: &AbortReason) -> Self {
            Reason {
                participant: r.participant.clone(),
                code: r.code,
                message: r.message.clone(),
            }
        }
    }

    impl From<Reason> for AbortReason {
        fn from(r: Reason) -> Self {
            AbortReason {
                participant: r.participant,
                code: r.code,
                message: r.message,
            }
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Vote {
        participant: String,
        vote: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<Code>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    }

    impl From<&VoteSummary> for Vote {
        fn from(v: &VoteSummary) -> Self {
            Vote {
                participant: v.participant.clone(),
                vote: v.vote.clone(),
                code: v.code,
                message: v.message.clone(),
            }
        }
    }

    impl From<Vote> for VoteSummary {
        fn from(v: Vote) -> Self {
            VoteSummary {
                participant: v.participant,
                vote: v.vote,
                code: v.code,
                message: v.message,
            }
        }
    }
}

fn stored_votes(votes: &[VoteSummary]) -> String {
    to_json(&votes.iter().map(stored::Vote::from).collect::<Vec<_>>())
}

fn to_json<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_string(t).expect("serialises")
}

/// Reads back what `to_json` wrote; a row that does not decode is a file
/// that is not ours, or corrupt (paired with the writes).
fn from_json<S: serde::de::DeserializeOwned + Into<T>, T>(s: &str, what: &str) -> T {
    serde_json::from_str::<S>(s)
        .unwrap_or_else(|e| panic!("stored {what} does not decode: {e}"))
        .into()
}

fn decision_column(stored: &str) -> Decision {
    match stored {
        "commit" => Decision::Commit,
        "abort" => Decision::Abort,
        other => panic!("corrupt decision {other:?}"),
    }
}

const COLUMNS: &str = "tx, decision, request_id, txn, reason, deliver_to, pending, decided_at_ms, completed_at_ms, votes, delivery_attempts";

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let tx: Vec<u8> = r.get(0)?;
    let decision: String = r.get(1)?;
    let txn: Option<String> = r.get(3)?;
    let reason: Option<String> = r.get(4)?;
    let deliver_to: String = r.get(5)?;
    let pending: String = r.get(6)?;
    // Paired with the checks on write: what we wrote must read back.
    Ok(Record {
        tx: TxId::from_slice(&tx).expect("16-byte tx id"),
        decision: decision_column(&decision),
        request_id: r.get(2)?,
        transaction: txn.map(|s| from_json::<stored::AnyTxn, _>(&s, "transaction")),
        reason: reason.map(|s| from_json::<stored::Reason, _>(&s, "reason")),
        deliver_to: serde_json::from_str(&deliver_to).expect("stored list decodes"),
        pending: serde_json::from_str(&pending).expect("stored list decodes"),
        decided_at_ms: r.get(7)?,
        completed_at_ms: r.get(8)?,
        votes: r
            .get::<_, Option<String>>(9)?
            .map(|s| {
                serde_json::from_str::<Vec<stored::Vote>>(&s)
                    .expect("stored votes decode")
                    .into_iter()
                    .map(Into::into)
                    .collect()
            })
            .unwrap_or_default(),
        delivery_attempts: r.get(10)?,
    })
}

fn get(c: &Connection, tx: TxId) -> rusqlite::Result<Option<Record>> {
    c.prepare_cached(&format!("SELECT {COLUMNS} FROM decisions WHERE tx = ?1"))?
        .query_row([tx.as_bytes().as_slice()], row_to_record)
        .optional()
}

fn insert(c: &Connection, rec: &Record) -> rusqlite::Result<()> {
    assert!(rec.pending.iter().all(|p| rec.deliver_to.contains(p)));
    assert!(rec.decision == Decision::Abort || rec.reason.is_none());
    c.prepare_cached(&format!(
        "INSERT INTO decisions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?
    .execute(params![
        rec.tx.as_bytes().as_slice(),
        rec.decision.as_str(),
        rec.request_id,
        rec.transaction
            .as_ref()
            .map(|t| to_json(&stored::AnyTxn::from(t))),
        rec.reason
            .as_ref()
            .map(|r| to_json(&stored::Reason::from(r))),
        serde_json::to_string(&rec.deliver_to).expect("serialises"),
        serde_json::to_string(&rec.pending).expect("serialises"),
        rec.decided_at_ms,
        rec.completed_at_ms,
        (!rec.votes.is_empty()).then(|| stored_votes(&rec.votes)),
        rec.delivery_attempts,
    ])?;
    Ok(())
}

fn by_request_id(c: &Connection, request_id: &str) -> rusqlite::Result<Option<Record>> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM decisions WHERE request_id = ?1"
    ))?
    .query_row([request_id], row_to_record)
    .optional()
}

/// First writer wins, for the transaction's decision and for the request
/// id alike; see [`Recorded`]. Runs inside one SQLite transaction, so the
/// checks and the write are atomic.
/// `None`: nothing written, because `write_by_ms` had passed (checked in the
/// writer, right before the insert).
fn record(
    c: &Connection,
    mut rec: Record,
    write_by_ms: Option<i64>,
) -> rusqlite::Result<Option<Recorded>> {
    if let Some(rid) = rec.request_id.as_deref() {
        if let Some(holder) = by_request_id(c, rid)? {
            if holder.tx != rec.tx {
                return Ok(Some(Recorded::KeyTaken(holder)));
            }
        }
    }
    if let Some(mut existing) = get(c, rec.tx)? {
        if existing.request_id.is_none() && rec.request_id.is_some() {
            // The attempt that owns the key ended in a decision somebody else
            // recorded (a presumed abort): bind the key to it, so that the
            // key's first outcome is this one, for good.
            existing.request_id = rec.request_id;
            if existing.transaction.is_none() {
                existing.transaction = rec.transaction;
            }
            if existing.votes.is_empty() {
                existing.votes = rec.votes;
            }
            db::exec(
                c,
                "UPDATE decisions SET request_id = ?2, txn = ?3, votes = ?4 WHERE tx = ?1 AND request_id IS NULL",
                params![
                    existing.tx.as_bytes().as_slice(),
                    existing.request_id,
                    existing
                        .transaction
                        .as_ref()
                        .map(|t| to_json(&stored::AnyTxn::from(t))),
                    (!existing.votes.is_empty())
                        .then(|| stored_votes(&existing.votes)),
                ],
            )?;
        }
        return Ok(Some(Recorded::Existing(existing)));
    }
    let now = now_ms();
    if write_by_ms.is_some_and(|by| now > by) {
        return Ok(None);
    }
    if rec.pending.is_empty() && rec.completed_at_ms.is_none() {
        rec.completed_at_ms = Some(now);
    }
    insert(c, &rec)?;
    Ok(Some(Recorded::New(rec)))
}

impl DecisionLog for SqliteLog {
    async fn record_until(
        &self,
        rec: Record,
        write_by_ms: Option<i64>,
    ) -> Result<Recorded, LogError> {
        self.db
            .run(move |c| record(c, rec, write_by_ms))
            .await?
            .ok_or(LogError::TooLate)
    }

    async fn get(&self, tx: TxId) -> Result<Option<Record>, LogError> {
        Ok(self.db.run(move |c| get(c, tx)).await?)
    }

    async fn by_request_id(&self, request_id: String) -> Result<Option<Record>, LogError> {
        Ok(self.db.run(move |c| by_request_id(c, &request_id)).await?)
    }

    async fn acked(
        &self,
        tx: TxId,
        participants: Vec<ParticipantName>,
        attempts: u32,
    ) -> Result<(), LogError> {
        Ok(self
            .db
            .run(move |c| {
                let Some(mut rec) = get(c, tx)? else {
                    return Ok(());
                };
                rec.pending.retain(|p| !participants.contains(p));
                let completed = rec.pending.is_empty().then(now_ms);
                db::exec(c,
                    "UPDATE decisions SET pending = ?2, completed_at_ms = coalesce(completed_at_ms, ?3), delivery_attempts = max(delivery_attempts, ?4) WHERE tx = ?1",
                    params![
                        tx.as_bytes().as_slice(),
                        serde_json::to_string(&rec.pending).expect("serialises"),
                        completed,
                        attempts
                    ],
                )?;
                Ok(())
            })
            .await?)
    }

    async fn recent(&self, n: usize) -> Result<Vec<Record>, LogError> {
        Ok(self
            .db
            .run(move |c| {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM decisions ORDER BY decided_at_ms DESC, tx DESC LIMIT ?1"
                ))?;
                let rows = stmt.query_map([n as i64], row_to_record)?;
                rows.collect()
            })
            .await?)
    }

    async fn collect(&self, before_ms: i64) -> Result<usize, LogError> {
        // The request id is a column of the record: it goes with it.
        Ok(self
            .db
            .run(move |c| {
                c.execute(
                    "DELETE FROM decisions WHERE rowid IN (
                         SELECT rowid FROM decisions
                         WHERE completed_at_ms IS NOT NULL AND decided_at_ms < ?1
                         LIMIT ?2)",
                    params![before_ms, COLLECT_BATCH as i64],
                )
            })
            .await?)
    }

    async fn incomplete(&self) -> Result<Vec<Record>, LogError> {
        Ok(self.db.run(|c| incomplete(c, None)).await?)
    }

    async fn read(&self, tx: TxId) -> Result<Option<Record>, LogError> {
        Ok(self.reads.run(move |c| get(c, tx)).await?)
    }

    async fn incomplete_listing(&self, limit: usize) -> Result<Vec<Record>, LogError> {
        Ok(self.reads.run(move |c| incomplete(c, Some(limit))).await?)
    }
}

/// Undelivered records, oldest decision first; at most `limit`.
fn incomplete(c: &Connection, limit: Option<usize>) -> rusqlite::Result<Vec<Record>> {
    // SQLite reads a negative LIMIT as none.
    let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM decisions WHERE completed_at_ms IS NULL
         ORDER BY decided_at_ms, tx LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit], row_to_record)?;
    rows.collect()
}

/// One row of the decision log as stored, for readers outside the service
/// (the invariant checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDecision {
    pub decision: Decision,
    /// Participants the decision has not reached yet.
    pub pending: Vec<ParticipantName>,
    /// The purchase's idempotency key bound to this decision, if any.
    pub request_id: Option<String>,
    /// When the decision was recorded (wall clock, ms since the epoch).
    pub decided_at_ms: i64,
}

/// Reads every decision in the log, by transaction. Added for the
/// invariant checker, which reads the file while the service runs.
pub fn snapshot(
    conn: &Connection,
) -> rusqlite::Result<std::collections::BTreeMap<TxId, StoredDecision>> {
    conn.prepare("SELECT tx, decision, pending, request_id, decided_at_ms FROM decisions")?
        .query_map([], |r| {
            let tx: Vec<u8> = r.get(0)?;
            let tx = TxId::from_slice(&tx).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            })?;
            let pending: String = r.get(2)?;
            Ok((
                tx,
                StoredDecision {
                    decision: decision_column(&r.get::<_, String>(1)?),
                    pending: serde_json::from_str(&pending).expect("stored list decodes"),
                    request_id: r.get(3)?,
                    decided_at_ms: r.get(4)?,
                },
            ))
        })?
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_passes_the_decision_log_suite() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(&dir.path().join("c.db")).unwrap();
        crate::conformance::run_all(&log).await;
        // And what it wrote is on disk: a second handle reads it back.
        drop(log);
        let again = SqliteLog::open(&dir.path().join("c.db")).unwrap();
        assert!(!again.recent(1).await.unwrap().is_empty());
    }

    /// The in-doubt listing reads at most its limit, oldest decision
    /// first, off the read-only connections, which see what the writer made
    /// durable.
    #[tokio::test]
    async fn the_incomplete_listing_is_bounded_and_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(&dir.path().join("c.db")).unwrap();
        let mut undelivered = vec![];
        for at in 0..5i64 {
            let mut rec = crate::conformance::record(TxId::now_v7(), Decision::Abort, None);
            rec.decided_at_ms = 1_000 - at;
            undelivered.push(rec.tx);
            log.record(rec).await.unwrap();
        }
        let mut done = crate::conformance::record(TxId::now_v7(), Decision::Commit, None);
        done.decided_at_ms = 0;
        done.pending.clear();
        log.record(done.clone()).await.unwrap();
        undelivered.reverse(); // oldest first
        let listed: Vec<TxId> = log
            .incomplete_listing(3)
            .await
            .unwrap()
            .iter()
            .map(|r| r.tx)
            .collect();
        assert_eq!(listed, undelivered[..3]);
        assert_eq!(log.incomplete_listing(10).await.unwrap().len(), 5);
        assert_eq!(
            log.read(done.tx).await.unwrap(),
            log.get(done.tx).await.unwrap()
        );
        assert!(log.read(done.tx).await.unwrap().is_some());
    }

    /// Rows as earlier versions wrote them still read back, whatever the
    /// API types look like now.
    #[test]
    fn stored_shapes_read_back() {
        // A purchase, as rows written before transactions were generic.
        let t: Transaction = from_json::<stored::AnyTxn, _>(
            r#"{"user":"alice","sku":"book-1","qty":2,"amount":2500,"request_id":"web/k"}"#,
            "transaction",
        );
        assert_eq!(t.client.as_str(), "web");
        assert_eq!(t.request_id.as_deref(), Some("web/k"));
        assert_eq!(
            t.branches[0].op.as_str(),
            r#"{"amount":2500,"user":"alice"}"#
        );
        assert_eq!(
            t.branches[1].op.as_str(),
            r#"{"amount":2500,"qty":2,"sku":"book-1","user":"alice"}"#
        );
        let t: Transaction = from_json::<stored::AnyTxn, _>(
            r#"{"user":"alice","sku":"book-1","qty":2,"amount":2500}"#,
            "transaction",
        );
        assert_eq!(t.client.as_str(), "web");
        // A transaction.
        let t: Transaction = from_json::<stored::AnyTxn, _>(
            r#"{"client":"ops","branches":[{"participant":"shipping","op":{"slot":"a","qty":1}}],"request_id":"ops/k"}"#,
            "transaction",
        );
        assert_eq!(
            t.participants(),
            vec![ParticipantName::new("shipping").unwrap()]
        );
        assert_eq!(t.branches[0].op.as_str(), r#"{"qty":1,"slot":"a"}"#);
        let r: AbortReason = from_json::<stored::Reason, _>(
            r#"{"participant":"coordinator","code":"presumed_abort","message":"m"}"#,
            "reason",
        );
        assert_eq!(r.code, twopc_schemas::Code::PresumedAbort);
        let v: Vec<stored::Vote> = serde_json::from_str(
            r#"[{"participant":"wallet","vote":"yes"},{"participant":"order","vote":"no","code":"out_of_stock","message":"none"}]"#,
        )
        .unwrap();
        let v: Vec<VoteSummary> = v.into_iter().map(Into::into).collect();
        assert_eq!(v[1].code, Some(twopc_schemas::Code::OutOfStock));
        // And what is written now has the shape read above.
        let t: Transaction = from_json::<stored::AnyTxn, _>(
            r#"{"client":"ops","branches":[{"participant":"shipping","op":{"slot":"a","qty":1}}],"request_id":"ops/k"}"#,
            "transaction",
        );
        assert_eq!(
            to_json(&stored::AnyTxn::from(&t)),
            r#"{"client":"ops","branches":[{"participant":"shipping","op":{"qty":1,"slot":"a"}}],"request_id":"ops/k"}"#
        );
    }
}
