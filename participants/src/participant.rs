//! The participant library: everything about the protocol that the wallet
//! and the order service share. A service implements [`Resource`] (hold,
//! apply, release) and calls [`Participant::run`].
//!
//! Subjects served (queue group `twopc-<name>`):
//! * `twopc.<name>.prepare` — phase 1, postcard [`Prepare`] → [`Vote`];
//! * `twopc.<name>.decide` — phase 2, postcard [`Decide`] → [`DecideReply`];
//! * `<name>.tx` — public JSON status of one transaction here.
//!
//! And one background task: in-doubt recovery, which asks the coordinator
//! on `twopc.decision.<name>` (the subject names the sender) about every
//! branch in doubt — prepared before this
//! process started, or listed by it at least `in_doubt_after_ms` ago on the
//! monotonic clock ([`crate::recovery`]) — until it is answered. A
//! participant never decides a prepared branch on its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tracing::{error, info, warn, Instrument};
use twopc_common::contain::{contained, Panicked};
use twopc_common::db::{self, Db, DbError, ReadDb};
use twopc_common::fault::{crash_point, delay_for};
use twopc_common::micro::Registry;
use twopc_common::now_ms;
use twopc_common::refusals::refused;
use twopc_common::serve::{serve, Endpoint, Response, Serving, Shutdown};
use twopc_common::trace::TraceContext;
use twopc_schemas::api::{
    ApiError, BranchStatus, ParticipantInDoubt, PreparedBranch, TxQuery, MAX_IN_DOUBT_LISTED,
};
use twopc_schemas::points::{ParticipantCrash, ParticipantDelay};
use twopc_schemas::protocol::{
    self, Decide, DecideReply, Decision, DecisionQuery, DecisionReply, Prepare, TxAge, TxId,
    TxWindow, Vote,
};
use twopc_schemas::{subjects, ClientName, Code, ParticipantName};

use crate::branch::{on_decide, on_prepare, Branch, BranchState, OnDecide, OnPrepare};
use crate::config::ParticipantArgs;
use crate::ownership::{self, OWNER_SQL};
use crate::recovery::{Listed, Tracker, MAX_QUERIES_PER_PASS, RECOVERY_PAGE_ROWS};

/// A refusal to prepare: the vote's code and message.
pub type Refusal = (Code, String);

/// What a participant service manages. All three methods run on the
/// database's writer thread inside the transaction's SQLite transaction; the
/// library records the branch state in the same SQLite transaction, so the
/// resource change and the protocol state are durable together.
pub trait Resource: Send + Sync + 'static {
    /// The participant's own operation: what a branch at it asks for, as
    /// the JSON the client wrote in the branch's `op`.
    type Op: serde::de::DeserializeOwned + Send + Sync + 'static;
    /// The participant's name (`wallet`, `order`): subjects and logs.
    fn name(&self) -> ParticipantName;
    /// Schema of the resource's own tables, applied in order once each.
    fn migrations(&self) -> &'static [&'static str];
    /// Reads and checks an operation: the branch's op as the coordinator
    /// sent it (canonical JSON). `Err` is a no vote (`bad_message`), and
    /// nothing is written. The default parses the JSON into `Self::Op`;
    /// add the operation's own limits here.
    fn parse_op(&self, op: &str) -> Result<Self::Op, String> {
        serde_json::from_str(op).map_err(|e| format!("{} cannot read the op: {e}", self.name()))
    }
    /// Reads back an operation this participant stored when it prepared
    /// (it parsed then, so it parses now; rows written by an earlier
    /// version may have another shape, which an override reads).
    fn stored_op(&self, op: &str) -> Self::Op {
        self.parse_op(op)
            .unwrap_or_else(|e| panic!("a stored op reads back: {e}"))
    }
    /// Checks `op` and holds what it needs. `Ok(Err(refusal))` means a no
    /// vote, and the resource must have written nothing. `client` is the
    /// client that submitted the transaction.
    fn hold(
        &self,
        conn: &Connection,
        tx: TxId,
        client: &ClientName,
        op: &Self::Op,
    ) -> rusqlite::Result<Result<(), Refusal>>;
    /// Makes a held operation permanent (decision commit).
    fn apply(&self, conn: &Connection, tx: TxId, op: &Self::Op) -> rusqlite::Result<()>;
    /// Releases what `hold` took (decision abort).
    fn release(&self, conn: &Connection, tx: TxId, op: &Self::Op) -> rusqlite::Result<()>;
}

/// The library's own table, shared by every participant database.
///
/// `id` is an AUTOINCREMENT key: SQLite never hands out an id at or below
/// one it handed out before in this table, even after the rows holding the
/// largest ids were deleted. Recovery relies on it ([`start_mark`]): a row
/// inserted after the mark was read has an id above it. A plain rowid would
/// not do: SQLite gives a new row the largest rowid present plus one, so
/// once collection deleted the newest rows, a new prepare would get an id
/// at or below the mark and look prepared before the process started.
pub(crate) const BRANCHES_SQL: &str = "
CREATE TABLE IF NOT EXISTS branches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tx BLOB NOT NULL UNIQUE CHECK (length(tx) = 16),
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    op TEXT,
    code TEXT,
    message TEXT,
    prepared_at_ms INTEGER,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS branches_in_doubt ON branches (prepared_at_ms) WHERE state = 'prepared';
CREATE INDEX IF NOT EXISTS branches_prepared_by_tx ON branches (tx) WHERE state = 'prepared';
CREATE INDEX IF NOT EXISTS branches_decided ON branches (updated_at_ms) WHERE state != 'prepared';
";

/// Makes the library's own tables (branches, owner) where missing; the
/// service calls it at open, the simulation on its in-memory databases.
pub fn library_schema(conn: &Connection) -> rusqlite::Result<()> {
    branches_table(conn)?;
    conn.execute_batch(OWNER_SQL)
}

/// Rebuilds a `branches` table of the shape before [`BRANCHES_SQL`] (a
/// BLOB primary key, so plain rowids) into the current one. Each row keeps
/// its rowid as its id, so the ids' order is unchanged and the AUTOINCREMENT
/// counter starts above every id present. The old table's indexes go with
/// it; [`BRANCHES_SQL`] makes them again on the new one.
const REBUILD_BRANCHES_SQL: &str = "
CREATE TABLE branches_rebuilt (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tx BLOB NOT NULL UNIQUE CHECK (length(tx) = 16),
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    op TEXT,
    code TEXT,
    message TEXT,
    prepared_at_ms INTEGER,
    updated_at_ms INTEGER NOT NULL
);
INSERT INTO branches_rebuilt (id, tx, state, op, code, message, prepared_at_ms, updated_at_ms)
    SELECT rowid, tx, state, op, code, message, prepared_at_ms, updated_at_ms
    FROM branches ORDER BY rowid;
DROP TABLE branches;
ALTER TABLE branches_rebuilt RENAME TO branches;
";

/// Whether the database has a `branches` table without the `id` column,
/// i.e. one made before [`BRANCHES_SQL`] had it.
fn branches_table_is_old(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'branches')
            AND NOT EXISTS (SELECT 1 FROM pragma_table_info('branches') WHERE name = 'id')",
        [],
        |r| r.get(0),
    )
}

/// Makes the library's table of branches (and its indexes), or brings a
/// table made by an earlier version to the current shape. Every participant
/// database is opened through this ([`library_schema`]).
///
/// The rebuild runs once: it is one IMMEDIATE transaction that checks the
/// shape again under the write lock, so of two processes opening the same
/// old file at once (a standby started beside a running owner) one rebuilds
/// and the other then finds the new shape. A crash part way leaves the old
/// table whole. A running owner of an earlier version keeps working on the
/// rebuilt table: its statements name the columns it knows, and `rowid` is
/// the new `id`.
pub fn branches_table(conn: &Connection) -> rusqlite::Result<()> {
    if branches_table_is_old(conn)? {
        let tx =
            rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
        if branches_table_is_old(&tx)? {
            tx.execute_batch(REBUILD_BRANCHES_SQL)?;
            tx.execute_batch(BRANCHES_SQL)?;
            info!("migrated the branches table to AUTOINCREMENT ids (each row kept, with its id)");
        }
        tx.commit()?;
    }
    conn.execute_batch(BRANCHES_SQL)
}

/// The mark that tells recovery which branches were prepared before this
/// process started: those whose id is at most the mark. Read in the writer
/// before the prepare subject is served; every row inserted afterwards gets
/// a larger id (an AUTOINCREMENT key), whatever collection deleted
/// meanwhile.
pub fn start_mark(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(id), 0) FROM branches", [], |r| {
        r.get(0)
    })
}

/// Rows deleted per collection job (each job is one short write
/// transaction; a backlog takes several).
const COLLECT_BATCH: i64 = 1_000;

/// Deletes decided branches last changed before `before_ms`, at most
/// [`COLLECT_BATCH`]; returns how many. Prepared branches are never
/// collected. Runs in the writer thread, so it serialises with prepares:
/// a prepare either finds the row or, past the window, is refused.
pub fn collect_branches(conn: &Connection, before_ms: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM branches WHERE rowid IN (
             SELECT rowid FROM branches
             WHERE state != 'prepared' AND updated_at_ms < ?1
             LIMIT ?2)",
        params![before_ms, COLLECT_BATCH],
    )
}

/// Reads a transaction id column (a 16-byte BLOB).
pub fn tx_column(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<TxId> {
    let bytes: Vec<u8> = r.get(i)?;
    TxId::from_slice(&bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, Box::new(e))
    })
}

/// Every branch's stored state (`prepared`, `committed`, `aborted`), by
/// transaction: the library table's part of a participant's snapshot, read
/// by the invariant checker.
pub fn branch_states(conn: &Connection) -> rusqlite::Result<BTreeMap<TxId, BranchState>> {
    let mut s = conn.prepare("SELECT tx, state FROM branches")?;
    let rows = s.query_map([], |r| {
        let state: String = r.get(1)?;
        let state = BranchState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown branch state {state:?}").into(),
            )
        })?;
        Ok((tx_column(r, 0)?, state))
    })?;
    rows.collect()
}

/// One page of prepared branches for recovery: those with a transaction id
/// after `after` (from the start when `None`), in id order, at most `rows`.
/// Each says whether it was prepared before this process started (its id
/// is at most `started_after_rowid`, the [`start_mark`]). No wall-clock
/// value is read: recovery must not depend on it.
pub fn list_prepared(
    conn: &Connection,
    after: Option<TxId>,
    started_after_rowid: i64,
    rows: usize,
) -> rusqlite::Result<Vec<Listed>> {
    // Every 16-byte id sorts after the empty blob.
    let after: Vec<u8> = after.map_or(vec![], |tx| tx.as_bytes().to_vec());
    let rows = i64::try_from(rows).expect("page size fits in i64");
    let mut stmt = conn.prepare_cached(
        "SELECT tx, id <= ?2 FROM branches WHERE state = 'prepared' AND tx > ?1
         ORDER BY tx LIMIT ?3",
    )?;
    let listed = stmt.query_map(params![after, started_after_rowid, rows], |r| {
        let tx: Vec<u8> = r.get(0)?;
        Ok(Listed {
            tx: TxId::from_slice(&tx).expect("16-byte tx id"),
            before_start: r.get(1)?,
        })
    })?;
    listed.collect()
}

/// The oldest `limit` prepared branches, and whether there are more.
fn list_in_doubt(conn: &Connection, limit: usize) -> rusqlite::Result<(Vec<PreparedBranch>, bool)> {
    let mut stmt = conn.prepare_cached(
        "SELECT tx, prepared_at_ms FROM branches WHERE state = 'prepared'
         ORDER BY prepared_at_ms, tx LIMIT ?1",
    )?;
    // One more than shown: its presence is what `truncated` says.
    let fetch = i64::try_from(limit + 1).expect("listing size fits in i64");
    let rows = stmt.query_map([fetch], |r| {
        Ok(PreparedBranch {
            tx: tx_column(r, 0)?.to_string(),
            prepared_at_ms: r.get(1)?,
        })
    })?;
    let mut prepared = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    let truncated = prepared.len() > limit;
    prepared.truncate(limit);
    Ok((prepared, truncated))
}

/// A money amount or quantity as an SQLite INTEGER. Messages are validated
/// on decode ([`twopc_schemas::protocol::Message::validate`]), which keeps
/// every value far inside i64; one that is not is refused as a database
/// error rather than wrapped into a negative number.
pub fn sql_int(value: impl Into<u64>) -> rusqlite::Result<i64> {
    i64::try_from(value.into()).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// A stored money amount or quantity read back. The tables' CHECK
/// constraints keep them at least 0, so a negative one means a corrupt file.
pub fn stored_u64(value: i64) -> u64 {
    u64::try_from(value).expect("CHECK constraints keep stored amounts and quantities >= 0")
}

/// Reads one branch.
pub fn load_branch(conn: &Connection, tx: TxId) -> rusqlite::Result<Option<Branch>> {
    db::row(
        conn,
        "SELECT state, op, code, message FROM branches WHERE tx = ?1",
        [tx.as_bytes().as_slice()],
        |r| {
            let state: String = r.get(0)?;
            let op: Option<String> = r.get(1)?;
            let code: Option<String> = r.get(2)?;
            Ok(Branch {
                // Paired with the CHECK constraint on write: a state we do not
                // know means the file is not ours or is corrupt.
                state: BranchState::parse(&state).expect("branch state is valid"),
                op,
                code: code.and_then(|c| Code::parse(&c)),
                message: r.get(3)?,
            })
        },
    )
    .optional()
}

fn set_state(conn: &Connection, tx: TxId, state: BranchState, now: i64) -> rusqlite::Result<()> {
    let n = db::exec(
        conn,
        "UPDATE branches SET state = ?2, updated_at_ms = ?3 WHERE tx = ?1",
        params![tx.as_bytes().as_slice(), state.as_str(), now],
    )?;
    assert_eq!(n, 1, "branch row exists");
    Ok(())
}

/// Phase 1 inside one SQLite transaction: returns the vote to send once the
/// batch is durable. `now` is the wall clock (ms) as the caller reads it:
/// the service passes [`now_ms`], the simulation its own clock.
pub fn prepare_job<R: Resource>(
    resource: &R,
    conn: &Connection,
    msg: &Prepare,
    window: TxWindow,
    now: i64,
) -> rusqlite::Result<Vote> {
    let tx = msg.tx;
    // The op as it came; stored as it came, so a repeated prepare is
    // recognised byte for byte (the coordinator sends canonical JSON).
    let Ok(op) = std::str::from_utf8(&msg.op) else {
        return Ok(Vote::No {
            code: Code::BadMessage,
            message: "the op is not UTF-8 JSON".into(),
        });
    };
    // The handler checked the message already; check again right before
    // writing, so that no path can hold what cannot commit. Its age is
    // taken inside the write transaction, which also serialises with the
    // collection of old rows: a row is either here or the prepare is
    // refused.
    let age = match msg.check(now, &window) {
        Ok(age) => age,
        Err(refused) => {
            return Ok(Vote::No {
                code: refused.code,
                message: refused.message,
            })
        }
    };
    let stored = load_branch(conn, tx)?;
    match on_prepare(stored.as_ref(), op, age == TxAge::Expired) {
        OnPrepare::Repeat(vote) => Ok(vote),
        OnPrepare::Hold => {
            // The service's own code runs contained: a panic there fails
            // this job (rolled back to its savepoint: nothing it wrote
            // stays), and the writer thread and the service go on.
            let parsed = match contained("parse_op", || resource.parse_op(op))
                .map_err(Panicked::into_sqlite)?
            {
                Ok(parsed) => parsed,
                // Refused before anything is held or written: a no vote is
                // always safe, and a retry gets the same answer.
                Err(message) => {
                    return Ok(Vote::No {
                        code: Code::BadMessage,
                        message,
                    })
                }
            };
            let op_json = op;
            match contained("hold", || resource.hold(conn, tx, &msg.client, &parsed))
                .map_err(Panicked::into_sqlite)??
            {
                Ok(()) => {
                    db::exec(
                        conn,
                        "INSERT INTO branches (tx, state, op, prepared_at_ms, updated_at_ms)
                         VALUES (?1, 'prepared', ?2, ?3, ?3)",
                        params![tx.as_bytes().as_slice(), op_json, now],
                    )?;
                    Ok(Vote::Yes)
                }
                Err((code, message)) => {
                    // Remember the no vote, so a repeated prepare gets the
                    // same answer even if the resource changed meanwhile.
                    db::exec(
                        conn,
                        "INSERT INTO branches (tx, state, op, code, message, updated_at_ms)
                         VALUES (?1, 'aborted', ?2, ?3, ?4, ?5)",
                        params![
                            tx.as_bytes().as_slice(),
                            op_json,
                            code.as_str(),
                            message,
                            now
                        ],
                    )?;
                    Ok(Vote::No { code, message })
                }
            }
        }
    }
}

/// Phase 2 inside one SQLite transaction (`now` as for [`prepare_job`]).
pub fn decide_job<R: Resource>(
    resource: &R,
    conn: &Connection,
    msg: Decide,
    window: TxWindow,
    now: i64,
) -> rusqlite::Result<DecideReply> {
    let Decide { tx, decision } = msg;
    let stored = load_branch(conn, tx)?;
    // Checked (again) inside the write transaction, like a prepare's age,
    // and knowing whether the branch is stored.
    let age = match msg.check(now, &window, stored.is_some()) {
        Ok(age) => age,
        Err(refused) => {
            return Ok(DecideReply::Rejected {
                code: refused.code,
                message: refused.message,
            })
        }
    };
    // Old enough that a decided branch may have been collected (its age by
    // this clock, allowing for the skew of the clock that stamped the id).
    let collectable = window.past_retention(tx, now + window.max_skew_ms);
    match on_decide(
        stored.as_ref(),
        decision,
        age == TxAge::Expired,
        collectable,
    ) {
        OnDecide::Ack => Ok(DecideReply::Ack),
        OnDecide::Reject(code, message) => Ok(DecideReply::Rejected { code, message }),
        OnDecide::Tombstone => {
            db::exec(
                conn,
                "INSERT INTO branches (tx, state, code, message, updated_at_ms)
                 VALUES (?1, 'aborted', ?2, ?3, ?4)",
                params![
                    tx.as_bytes().as_slice(),
                    Code::AlreadyAborted.as_str(),
                    "aborted before it was prepared here",
                    now
                ],
            )?;
            Ok(DecideReply::Ack)
        }
        OnDecide::Apply(d) => {
            let stored_op = stored
                .and_then(|b| b.op)
                .expect("a prepared branch has its operation");
            let op = contained("stored_op", || resource.stored_op(&stored_op))
                .map_err(Panicked::into_sqlite)?;
            // A panic or an error in apply or release rolls this job back:
            // the branch stays prepared and the coordinator delivers again.
            match d {
                Decision::Commit => {
                    contained("apply", || resource.apply(conn, tx, &op))
                        .map_err(Panicked::into_sqlite)??;
                    set_state(conn, tx, BranchState::Committed, now)?;
                }
                Decision::Abort => {
                    contained("release", || resource.release(conn, tx, &op))
                        .map_err(Panicked::into_sqlite)??;
                    set_state(conn, tx, BranchState::Aborted, now)?;
                }
            }
            Ok(DecideReply::Ack)
        }
    }
}

/// The answer to a message of a kind or version this build does not speak:
/// [`protocol::Unsupported`], listing what it does; nothing is done.
fn unsupported(name: &ParticipantName, what: &'static str, e: &protocol::DecodeError) -> Response {
    refused(
        what,
        Code::Unsupported.as_str(),
        || warn!(participant = %name, error = %e, "refused a message this build does not speak"),
    );
    Response::error(
        protocol::encode(&protocol::Unsupported::to(e)),
        Code::Unsupported.status(),
        format!("unsupported: {e}"),
    )
}

/// A running participant's shared state.
pub struct Participant<R: Resource> {
    /// The service's resource logic.
    resource: Arc<R>,
    /// The writer thread of the service's database: prepares, decisions,
    /// recovery and collection.
    db: Db,
    /// Read-only connections to the same database for the public reads
    /// (`<name>.tx`, `<name>.in_doubt`), with their own queue: a flood of
    /// reads never takes a place in the writer's queue.
    reads: ReadDb,
    /// Connection to NATS.
    client: async_nats::Client,
    /// Flags and environment.
    args: ParticipantArgs,
    /// Service-protocol identity and statistics (`nats micro`).
    registry: Arc<Registry>,
    /// This service's shutdown signal (endpoints and recovery stop on it).
    shutdown: Shutdown,
    /// The transaction window and retention (checked at start).
    window: TxWindow,
}

impl<R: Resource> Participant<R> {
    /// Opens (or creates) the database in `args.data_dir`, with the
    /// library's tables; the writer thread starts once the instance owns
    /// its name ([`crate::ownership`]).
    pub fn open_conn(args: &ParticipantArgs, resource: &R) -> anyhow::Result<Connection> {
        std::fs::create_dir_all(&args.data_dir)?;
        let path = args.data_dir.join(format!("{}.db", resource.name()));
        let conn = db::open(&path, resource.migrations())?;
        library_schema(&conn)?;
        Ok(conn)
    }

    pub fn new(
        resource: R,
        db: Db,
        reads: ReadDb,
        client: async_nats::Client,
        args: ParticipantArgs,
        registry: Arc<Registry>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let window = args
            .tx_window()
            .expect("the window settings are checked before the service starts");
        Arc::new(Participant {
            resource: Arc::new(resource),
            db,
            reads,
            client,
            args,
            registry,
            shutdown,
            window,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    fn name(&self) -> ParticipantName {
        self.resource.name()
    }

    /// Serves the protocol subjects and runs recovery until the client
    /// closes or a task fails.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        let name = self.name();
        let queue = subjects::queue_group(name.as_str());
        let busy = |body: Vec<u8>| {
            Response::error(body, 503, format!("busy: {name} is at its in-flight limit"))
        };
        let endpoint = |ep: &'static str, subject: String, busy_reply: Response| Endpoint {
            client: self.client.clone(),
            registry: self.registry.clone(),
            shutdown: self.shutdown.clone(),
            name: ep,
            subject,
            queue: queue.clone(),
            max_inflight: self.args.max_inflight,
            busy: busy_reply,
        };
        let busy_vote = busy(protocol::encode(&Vote::No {
            code: Code::Busy,
            message: format!("{name} is at its in-flight limit"),
        }));
        let busy_decide = busy(protocol::encode(&DecideReply::Rejected {
            code: Code::Busy,
            message: format!("{name} is at its in-flight limit"),
        }));
        let busy_json = refusal(&ApiError::new(Code::Busy, "too many requests in flight"));

        let p = self.clone();
        let prepare = serve(
            endpoint("prepare", subjects::prepare(&name), busy_vote),
            move |msg| {
                let p = p.clone();
                async move { p.on_prepare(msg).await }
            },
        );
        let p = self.clone();
        let decide = serve(
            endpoint("decide", subjects::decide(&name), busy_decide),
            move |msg| {
                let p = p.clone();
                async move { p.on_decide(msg).await }
            },
        );
        let p = self.clone();
        let status = serve(
            endpoint("tx-status", subjects::participant_tx(&name), busy_json),
            move |msg| {
                let p = p.clone();
                async move { p.on_tx_status(msg.payload).await }
            },
        );
        let p = self.clone();
        let in_doubt_busy = refusal(&ApiError::new(Code::Busy, "too many requests in flight"));
        let in_doubt = serve(
            endpoint(
                "in-doubt",
                subjects::participant_in_doubt(&name),
                in_doubt_busy,
            ),
            move |_msg| {
                let p = p.clone();
                async move { Response::json(p.in_doubt().await, refusal) }
            },
        );
        // Every row added from now on gets a larger id than any row now
        // (AUTOINCREMENT), so those up to the largest id now were prepared
        // before this process: read it before the prepare subject is served.
        let started_after_rowid = self.db.run(start_mark).await?;
        let recovery = self.clone().recovery_loop(started_after_rowid);
        let collection = self.clone().collection_loop();
        info!(participant = %name, faults = ?twopc_common::fault::armed(), "participant serving");
        tokio::try_join!(prepare, decide, status, in_doubt, recovery, collection)?;
        Ok(())
    }

    async fn on_prepare(&self, msg: async_nats::Message) -> Response {
        let name = self.name();
        let trace_id = TraceContext::from_headers(msg.headers.as_ref())
            .map(|t| t.trace_id)
            .unwrap_or_default();
        let payload = msg.payload;
        let msg = match protocol::decode::<Prepare>(&payload) {
            Ok(m) => m,
            Err(e) if e.is_unsupported() => return unsupported(&name, "prepare", &e),
            Err(e) => {
                // Nothing is written for either: the message is refused
                // before anything is held, so a no vote is always safe.
                refused("prepare", Code::BadMessage.as_str(), || {
                    if matches!(e, protocol::DecodeError::Invalid(_)) {
                        warn!(participant = %name, error = %e, "rejected prepare outside the protocol's limits");
                    } else {
                        warn!(participant = %name, error = %e, "rejected prepare that does not decode");
                    }
                });
                let body = protocol::encode(&Vote::No {
                    code: Code::BadMessage,
                    message: e.to_string(),
                });
                return Response::error(body, 400, format!("bad_message: {e}"));
            }
        };
        // An id that is not a UUIDv7, or from the future: refused before
        // the writer's queue, nothing written. (Past the window is for the
        // write transaction to see: a stored branch still answers.)
        if let Err(why) = msg.check(now_ms(), &self.window) {
            refused(
                "prepare",
                why.code.as_str(),
                || warn!(participant = %name, tx = %msg.tx, code = %why.code, message = %why.message, "refused prepare"),
            );
            let body = protocol::encode(&Vote::No {
                code: why.code,
                message: why.message.clone(),
            });
            return Response::error(body, why.code.status(), why.to_string());
        }
        let span = tracing::info_span!("prepare", participant = %name, tx = %msg.tx, %trace_id);
        async move {
            let delay = delay_for(ParticipantDelay::Prepare.at(&name));
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let resource = self.resource.clone();
            let window = self.window;
            if twopc_common::fault::broken("vote_before_durable") {
                // DELIBERATELY BROKEN (tests only): vote yes before the
                // prepare is written, or even known to be possible.
                let db = self.db.clone();
                tokio::spawn(async move {
                    db.run(move |c| prepare_job(&*resource, c, &msg, window, now_ms()))
                        .await
                });
                return Response::ok(protocol::encode(&Vote::Yes));
            }
            let started = std::time::Instant::now();
            let vote = match self
                .db
                .run(move |c| prepare_job(&*resource, c, &msg, window, now_ms()))
                .await
            {
                Ok(v) => v,
                Err(DbError::Busy) => Vote::No {
                    code: Code::Busy,
                    message: format!("{name}'s log is at its queue limit"),
                },
                Err(DbError::Fenced(why)) => Vote::No {
                    code: Code::NotOwner,
                    message: format!("this {name} instance wrote nothing: {why}"),
                },
                Err(e) => {
                    error!(error = %e, "prepare failed; voting no");
                    Vote::No {
                        code: Code::Internal,
                        message: format!("{name} could not prepare: {e}"),
                    }
                }
            };
            // Durable point: `db.run` returned only after the batch holding
            // this prepare was fsynced, so the yes vote below announces a
            // durable prepared record.
            crash_point(ParticipantCrash::PrepareAfterDurable.at(&name));
            tracing::debug!(log_us = started.elapsed().as_micros() as u64, "timings");
            metrics::counter!(
                "twopc_votes_total",
                "vote" => if vote == Vote::Yes { "yes" } else { "no" }
            )
            .increment(1);
            match &vote {
                Vote::Yes => info!("prepared, voting yes"),
                Vote::No { code, message } => info!(%code, %message, "voting no"),
            }
            Response::ok(protocol::encode(&vote))
        }
        .instrument(span)
        .await
    }

    async fn on_decide(&self, msg: async_nats::Message) -> Response {
        let name = self.name();
        let trace_id = TraceContext::from_headers(msg.headers.as_ref())
            .map(|t| t.trace_id)
            .unwrap_or_default();
        let payload = msg.payload;
        let msg = match protocol::decode::<Decide>(&payload) {
            Ok(m) => m,
            Err(e) if e.is_unsupported() => return unsupported(&name, "decide", &e),
            Err(e) => {
                refused(
                    "decide",
                    Code::BadMessage.as_str(),
                    || warn!(participant = %name, error = %e, "rejected decision that does not decode"),
                );
                let body = protocol::encode(&DecideReply::Rejected {
                    code: Code::BadMessage,
                    message: e.to_string(),
                });
                return Response::error(body, 400, format!("bad_message: {e}"));
            }
        };
        // Impossible ids only: whether one from the future is refused
        // depends on the stored branch (`decide_job`).
        if let Err(why) = msg.check(now_ms(), &self.window, true) {
            refused(
                "decide",
                why.code.as_str(),
                || warn!(participant = %name, tx = %msg.tx, code = %why.code, message = %why.message, "refused decision"),
            );
            let body = protocol::encode(&DecideReply::Rejected {
                code: why.code,
                message: why.message.clone(),
            });
            return Response::error(body, why.code.status(), why.to_string());
        }
        let delay = delay_for(ParticipantDelay::Decide.at(&name));
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        // Crash point: the decision arrived but is not applied (the
        // participant stays prepared, in doubt, until it recovers).
        crash_point(ParticipantCrash::DecideBeforeApply.at(&name));
        let reply = self.apply_decision(msg.tx, msg.decision, &trace_id).await;
        match &reply {
            DecideReply::Ack => Response::ok(protocol::encode(&reply)),
            DecideReply::Rejected { code, message } => Response::error(
                protocol::encode(&reply),
                code.status(),
                format!("{code}: {message}"),
            ),
        }
    }

    /// Applies a decision durably (phase 2 delivery and recovery share it).
    async fn apply_decision(&self, tx: TxId, decision: Decision, trace_id: &str) -> DecideReply {
        let name = self.name();
        let span = tracing::info_span!("decide", participant = %name, %tx, decision = decision.as_str(), trace_id);
        async move {
            let resource = self.resource.clone();
            let window = self.window;
            let reply = match self
                .db
                .run(move |c| decide_job(&*resource, c, Decide { tx, decision }, window, now_ms()))
                .await
            {
                Ok(r) => r,
                Err(DbError::Busy) => DecideReply::Rejected {
                    code: Code::Busy,
                    message: format!("{name}'s log is at its queue limit"),
                },
                Err(DbError::Fenced(why)) => DecideReply::Rejected {
                    code: Code::NotOwner,
                    message: format!("this {name} instance wrote nothing: {why}"),
                },
                Err(e) => {
                    error!(error = %e, "applying the decision failed");
                    DecideReply::Rejected {
                        code: Code::Internal,
                        message: e.to_string(),
                    }
                }
            };
            // Durable point: the decision's effect is fsynced before the ack
            // leaves, so the coordinator may forget the transaction after it.
            crash_point(ParticipantCrash::DecideAfterDurable.at(&name));
            match &reply {
                DecideReply::Ack => {
                    metrics::counter!("twopc_decisions_applied_total", "decision" => decision.as_str())
                        .increment(1);
                    info!("decision applied")
                }
                DecideReply::Rejected { code, message } => {
                    refused("decide", code.as_str(), || {
                        warn!(%code, %message, "decision rejected")
                    })
                }
            }
            reply
        }
        .instrument(span)
        .await
    }

    async fn on_tx_status(&self, payload: Bytes) -> Response {
        let tx = match TxQuery::parse(&payload) {
            Ok(tx) => tx,
            Err(e) => return refusal(&e),
        };
        let name = self.name();
        let res = self
            .reads
            .run(move |c| {
                let b = load_branch(c, tx)?;
                let at: Option<i64> = c
                    .query_row(
                        "SELECT updated_at_ms FROM branches WHERE tx = ?1",
                        [tx.as_bytes().as_slice()],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok((b, at))
            })
            .await;
        match res {
            Ok((b, at)) => {
                let status = BranchStatus {
                    tx: tx.to_string(),
                    participant: name.to_string(),
                    state: b
                        .as_ref()
                        .map_or("unknown", |b| b.state.as_str())
                        .to_owned(),
                    code: b.as_ref().and_then(|b| b.code),
                    message: b.as_ref().and_then(|b| b.message.clone()),
                    op: b
                        .as_ref()
                        .and_then(|b| b.op.as_ref())
                        .and_then(|op| serde_json::from_str(op).ok()),
                    updated_at_ms: at,
                };
                Response::ok(serde_json::to_vec(&status).expect("status serialises"))
            }
            Err(e) => refusal(&db_error(e)),
        }
    }

    /// Prepared branches awaiting a decision (at most
    /// [`MAX_IN_DOUBT_LISTED`], oldest first, `truncated` if there are more).
    async fn in_doubt(&self) -> Result<ParticipantInDoubt, ApiError> {
        let (prepared, truncated) = self
            .reads
            .run(|c| list_in_doubt(c, MAX_IN_DOUBT_LISTED))
            .await
            .map_err(db_error)?;
        Ok(ParticipantInDoubt {
            participant: self.name().to_string(),
            prepared,
            truncated,
        })
    }

    /// In-doubt recovery. Branches prepared before this process started are
    /// in doubt at once; those prepared since, `in_doubt_after_ms` after
    /// recovery first listed them, measured on the monotonic clock (see
    /// [`crate::recovery`]). Each is asked about with its own capped,
    /// jittered backoff until answered, a bounded number per pass.
    /// Deletes decided branches older than the retention, now and then
    /// (every tenth of the retention, at most a minute apart).
    async fn collection_loop(self: Arc<Self>) -> anyhow::Result<()> {
        let every =
            Duration::from_millis((self.window.retention_ms / 10).clamp(100, 60_000) as u64);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.shutdown.begun() => return Ok(()),
            }
            let before = now_ms() - self.window.retention_ms;
            loop {
                match self.db.run(move |c| collect_branches(c, before)).await {
                    Ok(n) => {
                        if n > 0 {
                            info!(participant = %self.name(), rows = n, "collected decided branches past retention");
                        }
                        if (n as i64) < COLLECT_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "collecting old branches failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    async fn recovery_loop(self: Arc<Self>, started_after_rowid: i64) -> anyhow::Result<()> {
        let name = self.name();
        let interval = Duration::from_millis(self.args.recovery_interval_ms.max(10));
        let threshold = Duration::from_millis(self.args.in_doubt_after_ms);
        let mut tracker = Tracker::new();
        loop {
            let after = tracker.cursor();
            let page = self
                .db
                .run(move |c| list_prepared(c, after, started_after_rowid, RECOVERY_PAGE_ROWS))
                .await;
            let now = Instant::now();
            let due = match page {
                Ok(page) => tracker.select_due(
                    now,
                    &page,
                    RECOVERY_PAGE_ROWS,
                    threshold,
                    MAX_QUERIES_PER_PASS,
                ),
                Err(e) => {
                    warn!(participant = %name, error = %e, "could not list in-doubt branches");
                    vec![]
                }
            };
            metrics::gauge!("twopc_in_doubt").set(tracker.in_doubt(now) as f64);
            if !due.is_empty() {
                info!(
                    participant = %name,
                    count = due.len(),
                    "resolving in-doubt transactions"
                );
            }
            let results =
                futures::future::join_all(due.iter().map(|&tx| self.clone().resolve_in_doubt(tx)))
                    .await;
            let now = Instant::now();
            for (tx, resolved) in due.into_iter().zip(results) {
                tracker.record(now, tx, resolved);
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.shutdown.begun() => return Ok(()),
            }
        }
    }

    /// Asks the coordinator once; applies the answer. True when resolved.
    async fn resolve_in_doubt(self: Arc<Self>, tx: TxId) -> bool {
        let name = self.name();
        if twopc_common::fault::broken("decide_alone") {
            // DELIBERATELY BROKEN (tests only): a participant in doubt
            // aborts on its own instead of asking the coordinator.
            warn!(participant = %name, %tx, "BROKEN: aborting an in-doubt transaction alone");
            return matches!(
                self.apply_decision(tx, Decision::Abort, "").await,
                DecideReply::Ack
            );
        }
        let query = protocol::encode(&DecisionQuery {
            tx,
            participant: name.to_owned(),
        });
        let request = async_nats::Request::new().payload(query.into());
        let timeout = Duration::from_millis(self.args.decision_timeout_ms);
        let reply = match twopc_common::nats::request(
            &self.client,
            subjects::decision_query(&name),
            request,
            timeout,
        )
        .await
        {
            Ok(m) => m,
            Err(e) => {
                // A timeout is "unknown": ask again later, never guess.
                warn!(participant = %name, %tx, error = %e, "decision query unanswered; will retry");
                return false;
            }
        };
        match protocol::decode::<DecisionReply>(&reply.payload) {
            Ok(DecisionReply::Decided { tx: got, decision }) if got == tx => {
                info!(participant = %name, %tx, decision = decision.as_str(), "in-doubt transaction resolved by the coordinator");
                crash_point(ParticipantCrash::RecoverBeforeApply.at(&name));
                metrics::counter!("twopc_recoveries_total").increment(1);
                matches!(
                    self.apply_decision(tx, decision, "").await,
                    DecideReply::Ack
                )
            }
            Ok(DecisionReply::Decided { tx: got, .. }) => {
                error!(participant = %name, %tx, %got, "decision reply for another transaction; ignored");
                false
            }
            Ok(DecisionReply::Rejected { code, message }) => {
                warn!(participant = %name, %tx, %code, %message, "decision query refused; will retry");
                false
            }
            Err(e) => {
                warn!(participant = %name, %tx, error = %e, "decision reply does not decode; will retry");
                false
            }
        }
    }
}

/// Opens the participant's database, connects to NATS and serves until
/// `stop` resolves (the binary passes SIGTERM/SIGINT) or a failure, then
/// drains. `extra` adds the service's own subjects.
pub async fn run_service<R, F, Fut>(
    args: ParticipantArgs,
    resource: R,
    description: &str,
    extra: F,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()>
where
    R: Resource,
    F: FnOnce(Serving, Db, ReadDb) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let name = resource.name();
    args.tx_window().map_err(anyhow::Error::msg)?;
    let conn = Participant::open_conn(&args, &resource)?;
    let (store, db_epoch) = ownership::store_of(&conn)?;
    if let Some(addr) = args.metrics_addr {
        twopc_common::telemetry::install(addr)?;
    }
    let client = twopc_common::nats::connect(&args.nats_url, name.as_str(), &args.auth).await?;
    tokio::pin!(stop);
    // Serve nothing before owning the name.
    let me = ownership::Me::new(&args.data_dir, store, db_epoch, args.lease_settings());
    let conn = std::sync::Mutex::new(conn);
    let acquire = ownership::Acquire {
        client: &client,
        name: &name,
        data_dir: &args.data_dir,
        me,
        conn: &conn,
    };
    // TWOPC_BREAK=no_owner (tests only): serve at once, unfenced, as every
    // instance did before owners existed; tests prove they catch it.
    let acquire = async {
        if twopc_common::fault::broken("no_owner") {
            warn!(participant = %name, "BROKEN on purpose: serving without owning the name");
            return Ok(ownership::Ownership::unowned(db_epoch));
        }
        acquire.run().await
    };
    let owned = tokio::select! {
        owned = acquire => owned?,
        _ = &mut stop => {
            info!(participant = %name, "stopped before owning the name; exiting");
            return Ok(());
        }
    };
    let fence = owned.fence.clone();
    let conn = conn.into_inner().expect("conn lock");
    let db = Db::start_guarded(conn, name.as_str(), owned.guard());
    let reads = db.reader(name.as_str())?;
    info!(participant = %name, db = %db.path().display(), epoch = fence.epoch(), "database open (WAL, synchronous=FULL; reads on their own connections; writes fenced by the owner epoch)");
    let registry = Arc::new(Registry::new(
        name.as_str(),
        env!("CARGO_PKG_VERSION"),
        description,
    ));
    let shutdown = Shutdown::new();
    let discovery = registry
        .clone()
        .serve_discovery(client.clone(), shutdown.clone());
    let serving = Serving {
        client: client.clone(),
        registry: registry.clone(),
        shutdown: shutdown.clone(),
    };
    let extra = extra(serving, db.clone(), reads.clone());
    let p = Participant::new(
        resource,
        db,
        reads,
        client.clone(),
        args,
        registry,
        shutdown.clone(),
    );
    let work = async { tokio::try_join!(p.run(), extra, discovery).map(|_| ()) };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        why = fence.lost_wait() => {
            // Another instance owns the name now: stop at once; the fence
            // already refuses every write.
            shutdown.begin();
            let _ = client.flush().await;
            anyhow::bail!("{name}: fenced, exiting: {why}")
        }
        _ = &mut stop => {
            info!(participant = %name, "SIGTERM: draining (no new requests; in-flight ones finish)");
            shutdown.begin();
            // Endpoints and recovery return once drained; discovery answers
            // until the end, so stop waiting after the drain bound.
            let _ = tokio::time::timeout(twopc_common::serve::DRAIN_TIMEOUT, &mut work).await;
            let _ = client.flush().await;
            // Let go of the name only after the drain: a standby takes over
            // at once, and nothing here writes any more.
            owned.release().await;
            let _ = client.flush().await;
            info!(participant = %name, "drained; exiting");
            Ok(())
        }
    }
}

/// Serves one public JSON subject of a participant service: `handler`
/// gets the database handle `db` — the writer ([`Db`]) for a create, the
/// readers ([`ReadDb`]) for a read — and the payload, and returns a value
/// or an error reply.
#[allow(clippy::too_many_arguments)]
pub async fn serve_json<D, T, H, F>(
    serving: Serving,
    service: &'static str,
    endpoint: &'static str,
    subject: &'static str,
    db: D,
    max_inflight: usize,
    handler: H,
) -> anyhow::Result<()>
where
    D: Clone + Send + Sync + 'static,
    T: serde::Serialize,
    H: Fn(D, Bytes) -> F + Copy + Send + Sync + 'static,
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let ep = Endpoint {
        client: serving.client,
        registry: serving.registry,
        shutdown: serving.shutdown,
        name: endpoint,
        subject: subject.into(),
        queue: subjects::queue_group(service),
        max_inflight,
        busy: refusal(&ApiError::new(Code::Busy, "too many requests in flight")),
    };
    serve(ep, move |m| {
        let db = db.clone();
        async move { Response::json(handler(db, m.payload).await, refusal) }
    })
    .await
}

/// Maps a database failure to a public error.
pub fn db_error(e: DbError) -> ApiError {
    match e {
        DbError::Busy => ApiError::new(Code::Busy, "too many requests in flight"),
        DbError::Fenced(why) => ApiError::new(Code::NotOwner, format!("nothing written: {why}")),
        other => ApiError::new(Code::Internal, other.to_string()),
    }
}

/// The reply refusing a request: `{"error": ...}` with the service-protocol
/// error headers.
fn refusal(e: &ApiError) -> Response {
    Response::error(e.to_json(), e.code.status(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inserts a prepared branch with the statement `prepare_job` uses.
    fn insert_prepared(conn: &Connection, tx: TxId, at_ms: i64) {
        conn.execute(
            "INSERT INTO branches (tx, state, op, prepared_at_ms, updated_at_ms)
             VALUES (?1, 'prepared', ?2, ?3, ?3)",
            params![
                tx.as_bytes().as_slice(),
                r#"{"Debit":{"user":"alice","amount":1}}"#,
                at_ms
            ],
        )
        .unwrap();
    }

    /// Inserts a branch decided (committed) at `at_ms`, the shape a prepare
    /// that was later committed leaves.
    fn insert_committed(conn: &Connection, tx: TxId, at_ms: i64) {
        insert_prepared(conn, tx, at_ms);
        conn.execute(
            "UPDATE branches SET state = 'committed', updated_at_ms = ?2 WHERE tx = ?1",
            params![tx.as_bytes().as_slice(), at_ms],
        )
        .unwrap();
    }

    /// What recovery's listing says of each prepared branch: before start?
    fn listed(conn: &Connection, mark: i64) -> BTreeMap<TxId, bool> {
        list_prepared(conn, None, mark, 100)
            .unwrap()
            .into_iter()
            .map(|l| (l.tx, l.before_start))
            .collect()
    }

    /// Finding 6 of issue 18: collection removes the newest rows (decided
    /// ones), and a branch prepared after the start mark must still list as
    /// prepared after start, however ids are handed out. Were it listed as
    /// before start, recovery would ask about a live transaction at once and
    /// the coordinator would presume it aborted.
    #[test]
    fn a_branch_prepared_after_start_never_looks_older_after_collection() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("p.db"), &[]).unwrap();
        branches_table(&conn).unwrap();
        let (old_a, old_b) = (TxId::now_v7(), TxId::now_v7());
        insert_prepared(&conn, old_a, 1_000);
        insert_prepared(&conn, old_b, 1_001);
        for _ in 0..3 {
            insert_committed(&conn, TxId::now_v7(), 0);
        }
        let mark = start_mark(&conn).unwrap();
        // The three newest rows are decided and old: collection removes them.
        assert_eq!(collect_branches(&conn, 1).unwrap(), 3);
        let fresh = TxId::now_v7();
        insert_prepared(&conn, fresh, 2_000);
        let seen = listed(&conn, mark);
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[&old_a] && seen[&old_b],
            "prepared before start: {seen:?}"
        );
        assert!(
            !seen[&fresh],
            "a branch prepared after the start mark lists as prepared before it"
        );
    }

    /// The `branches` table as every database made before AUTOINCREMENT
    /// has it (verbatim): the migration must take such files as they are.
    const OLD_BRANCHES_SQL: &str = "
CREATE TABLE IF NOT EXISTS branches (
    tx BLOB PRIMARY KEY CHECK (length(tx) = 16),
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    op TEXT,
    code TEXT,
    message TEXT,
    prepared_at_ms INTEGER,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS branches_in_doubt ON branches (prepared_at_ms) WHERE state = 'prepared';
CREATE INDEX IF NOT EXISTS branches_prepared_by_tx ON branches (tx) WHERE state = 'prepared';
CREATE INDEX IF NOT EXISTS branches_decided ON branches (updated_at_ms) WHERE state != 'prepared';
";

    type Row = (
        i64,
        Vec<u8>,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
        i64,
    );

    /// Every row with its rowid, in rowid order.
    fn all_rows(conn: &Connection) -> Vec<Row> {
        let mut s = conn
            .prepare(
                "SELECT rowid, tx, state, op, code, message, prepared_at_ms, updated_at_ms
                 FROM branches ORDER BY rowid",
            )
            .unwrap();
        s.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    /// A database file made by an earlier version (the old table, with a
    /// row id already reused) is brought to the current shape when it is
    /// opened, once, keeping every row as it was; from then on a branch
    /// prepared after the start mark lists as such, and a transaction id is
    /// still stored at most once.
    #[test]
    fn an_old_branches_table_migrates_once_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let (prepared, aborted) = (TxId::now_v7(), TxId::now_v7());
        {
            let conn = db::open(&path, &[]).unwrap();
            conn.execute_batch(OLD_BRANCHES_SQL).unwrap();
            insert_prepared(&conn, prepared, 1_000);
            for _ in 0..2 {
                insert_committed(&conn, TxId::now_v7(), 0);
            }
            // A tombstone (no op, no prepare time), as `decide_job` writes.
            conn.execute(
                "INSERT INTO branches (tx, state, code, message, updated_at_ms)
                 VALUES (?1, 'aborted', 'already_aborted', 'aborted before it was prepared here', 5)",
                [aborted.as_bytes().as_slice()],
            )
            .unwrap();
            insert_committed(&conn, TxId::now_v7(), 7);
        }
        let before = all_rows(&Connection::open(&path).unwrap());
        assert_eq!(before.len(), 5);
        for _ in 0..2 {
            let conn = db::open(&path, &[]).unwrap();
            branches_table(&conn).unwrap();
            assert_eq!(all_rows(&conn), before, "every row kept, with its id");
        }
        let conn = db::open(&path, &[]).unwrap();
        branches_table(&conn).unwrap();
        // The library reads the migrated rows.
        assert_eq!(
            load_branch(&conn, aborted).unwrap().unwrap().state,
            BranchState::Aborted
        );
        // The reuse that misled recovery cannot happen on the migrated file.
        let mark = start_mark(&conn).unwrap();
        assert_eq!(collect_branches(&conn, 10).unwrap(), 4, "all decided rows");
        let fresh = TxId::now_v7();
        insert_prepared(&conn, fresh, 2_000);
        let seen = listed(&conn, mark);
        assert!(seen[&prepared], "{seen:?}");
        assert!(
            !seen[&fresh],
            "a branch prepared after the start mark lists as prepared before it: {seen:?}"
        );
        let autoincrement: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master
                 WHERE type = 'table' AND name = 'branches' AND sql LIKE '%AUTOINCREMENT%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(autoincrement, 1, "the table has its AUTOINCREMENT id");
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'branches'
                 AND name LIKE 'branches_%' ORDER BY name",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            indexes,
            [
                "branches_decided",
                "branches_in_doubt",
                "branches_prepared_by_tx"
            ]
        );
        let again = conn.execute(
            "INSERT INTO branches (tx, state, updated_at_ms) VALUES (?1, 'aborted', 0)",
            [prepared.as_bytes().as_slice()],
        );
        assert!(again.is_err(), "a transaction id is stored at most once");
    }

    /// The in-doubt listing shows the oldest prepared branches, at most the
    /// limit, and says when there are more.
    #[test]
    fn the_in_doubt_listing_is_bounded_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("p.db"), &[BRANCHES_SQL]).unwrap();
        let mut txs = vec![];
        for at in 0..5i64 {
            let tx = TxId::now_v7();
            txs.push(tx);
            conn.execute(
                "INSERT INTO branches (tx, state, prepared_at_ms, updated_at_ms)
                 VALUES (?1, 'prepared', ?2, ?2)",
                params![tx.as_bytes().as_slice(), 1_000 + at],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO branches (tx, state, updated_at_ms) VALUES (?1, 'committed', 0)",
            [TxId::now_v7().as_bytes().as_slice()],
        )
        .unwrap();
        let (listed, truncated) = list_in_doubt(&conn, 3).unwrap();
        let oldest: Vec<String> = txs[..3].iter().map(ToString::to_string).collect();
        assert_eq!(
            listed.iter().map(|b| b.tx.clone()).collect::<Vec<_>>(),
            oldest
        );
        assert!(truncated);
        let (listed, truncated) = list_in_doubt(&conn, 5).unwrap();
        assert_eq!(listed.len(), 5);
        assert!(!truncated, "all five prepared branches are shown");
    }
}
