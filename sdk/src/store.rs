//! The library's own tables in the service's database: the branch log
//! (`branches`, one row per transaction here) and what reads and trims it.
//! Every function runs inside the writer's SQLite transaction.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};
use tracing::info;
use twopc_common::db::{self};
use twopc_schemas::api::PreparedBranch;
use twopc_schemas::protocol::TxId;
use twopc_schemas::Code;

use crate::branch::{Branch, BranchState};
use crate::ownership::OWNER_SQL;
use crate::recovery::Listed;
use crate::resource::tx_column;

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
pub(crate) const COLLECT_BATCH: i64 = 1_000;

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
pub(crate) fn list_in_doubt(
    conn: &Connection,
    limit: usize,
) -> rusqlite::Result<(Vec<PreparedBranch>, bool)> {
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

pub(crate) fn set_state(
    conn: &Connection,
    tx: TxId,
    state: BranchState,
    now: i64,
) -> rusqlite::Result<()> {
    let n = db::exec(
        conn,
        "UPDATE branches SET state = ?2, updated_at_ms = ?3 WHERE tx = ?1",
        params![tx.as_bytes().as_slice(), state.as_str(), now],
    )?;
    assert_eq!(n, 1, "branch row exists");
    Ok(())
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
