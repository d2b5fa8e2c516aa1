//! What the participant library promises when the service's own code fails
//! inside the durable transaction: a panic or an error in `parse_op`,
//! `hold`, `apply` or `release` fails that one job — no yes vote, nothing it
//! wrote stays (rolled back to the job's savepoint) — and the writer thread,
//! so the service, goes on with the next job. Real SQLite file, real writer
//! thread, the services' abort-on-panic hook installed.

use rusqlite::Connection;
use twopc_common::db::{self, Db, DbError};
use twopc_participant::{decide_job, library_schema, load_branch, prepare_job, Refusal, Resource};
use twopc_schemas::protocol::{Decide, DecideReply, Decision, Prepare, TxId, TxWindow, Vote};
use twopc_schemas::{BranchState, ClientName, ParticipantName};

/// Writes a row for every hold, apply and release, then fails as its op
/// says: `"ok"`, `"panic"`, `"error"`, `"panic_apply"`, `"error_release"`.
struct Faulty;

impl Resource for Faulty {
    type Op = String;

    fn name(&self) -> ParticipantName {
        ParticipantName::new("faulty").unwrap()
    }

    fn migrations(&self) -> &'static [&'static str] {
        &["CREATE TABLE effects (tx BLOB NOT NULL, what TEXT NOT NULL);"]
    }

    fn parse_op(&self, op: &str) -> Result<String, String> {
        let op: String = serde_json::from_str(op).map_err(|e| e.to_string())?;
        if op == "panic_parse" {
            panic!("cannot parse {op}");
        }
        Ok(op)
    }

    fn hold(
        &self,
        conn: &Connection,
        tx: TxId,
        _client: &ClientName,
        op: &String,
    ) -> rusqlite::Result<Result<(), Refusal>> {
        effect(conn, tx, "hold")?;
        match op.as_str() {
            "panic" => panic!("hold bug"),
            "error" => Err(rusqlite::Error::InvalidQuery),
            _ => Ok(Ok(())),
        }
    }

    fn apply(&self, conn: &Connection, tx: TxId, op: &String) -> rusqlite::Result<()> {
        effect(conn, tx, "apply")?;
        if op == "panic_apply" {
            panic!("apply bug");
        }
        Ok(())
    }

    fn release(&self, conn: &Connection, tx: TxId, op: &String) -> rusqlite::Result<()> {
        effect(conn, tx, "release")?;
        if op == "error_release" {
            return Err(rusqlite::Error::InvalidQuery);
        }
        Ok(())
    }
}

fn effect(conn: &Connection, tx: TxId, what: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO effects (tx, what) VALUES (?1, ?2)",
        rusqlite::params![tx.as_bytes().as_slice(), what],
    )
    .map(|_| ())
}

fn effects(db_path: &std::path::Path, tx: TxId) -> Vec<String> {
    let c = Connection::open(db_path).unwrap();
    let mut stmt = c
        .prepare("SELECT what FROM effects WHERE tx = ?1 ORDER BY rowid")
        .unwrap();
    stmt.query_map([tx.as_bytes().as_slice()], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn branch_state(db_path: &std::path::Path, tx: TxId) -> Option<BranchState> {
    let c = Connection::open(db_path).unwrap();
    load_branch(&c, tx).unwrap().map(|b| b.state)
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    db: Db,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faulty.db");
    let conn = db::open(&path, Faulty.migrations()).unwrap();
    library_schema(&conn).unwrap();
    Fixture {
        db: Db::start(conn, "faulty"),
        path,
        _dir: dir,
    }
}

async fn prepare(f: &Fixture, tx: TxId, op: &str) -> Result<Vote, DbError> {
    let msg = Prepare {
        tx,
        client: ClientName::new("web").unwrap(),
        op: serde_json::to_vec(op).unwrap(),
    };
    f.db.run(move |c| prepare_job(&Faulty, c, &msg, TxWindow::DEFAULT, twopc_common::now_ms()))
        .await
}

async fn decide(f: &Fixture, tx: TxId, decision: Decision) -> Result<DecideReply, DbError> {
    let msg = Decide { tx, decision };
    f.db.run(move |c| decide_job(&Faulty, c, msg, TxWindow::DEFAULT, twopc_common::now_ms()))
        .await
}

#[tokio::test]
async fn a_failing_hold_votes_nothing_writes_nothing_and_the_writer_goes_on() {
    twopc_common::logging::abort_on_panic();
    let f = fixture();
    for op in ["panic", "error", "panic_parse"] {
        let tx = TxId::now_v7();
        let r = prepare(&f, tx, op).await;
        match &r {
            Err(DbError::Sqlite(e)) => {
                if op.starts_with("panic") {
                    assert!(e.to_string().contains("panicked"), "{op}: {e}");
                }
            }
            other => panic!("{op}: expected the job to fail, got {other:?}"),
        }
        assert!(
            effects(&f.path, tx).is_empty(),
            "{op}: the hold's write stayed"
        );
        assert_eq!(branch_state(&f.path, tx), None, "{op}: a branch row stayed");
    }
    // The writer thread is alive: the next prepare holds and votes yes.
    let tx = TxId::now_v7();
    assert_eq!(prepare(&f, tx, "ok").await.unwrap(), Vote::Yes);
    assert_eq!(effects(&f.path, tx), vec!["hold"]);
    assert_eq!(branch_state(&f.path, tx), Some(BranchState::Prepared));
}

#[tokio::test]
async fn a_failing_apply_or_release_keeps_the_branch_prepared_for_the_next_delivery() {
    twopc_common::logging::abort_on_panic();
    let f = fixture();
    for (op, decision, then) in [
        ("panic_apply", Decision::Commit, BranchState::Committed),
        ("error_release", Decision::Abort, BranchState::Aborted),
    ] {
        let tx = TxId::now_v7();
        assert_eq!(prepare(&f, tx, op).await.unwrap(), Vote::Yes);
        assert!(decide(&f, tx, decision).await.is_err(), "{op}");
        assert_eq!(
            branch_state(&f.path, tx),
            Some(BranchState::Prepared),
            "{op}"
        );
        assert_eq!(
            effects(&f.path, tx),
            vec!["hold"],
            "{op}: the failed write stayed"
        );
        // The service's bug is still there: delivery fails again, and the
        // branch stays prepared (the coordinator keeps delivering and
        // reports it stuck), never half applied.
        assert!(decide(&f, tx, decision).await.is_err(), "{op}");
        assert_eq!(branch_state(&f.path, tx), Some(BranchState::Prepared));
        let _ = then;
    }
    // Other branches are unaffected.
    let tx = TxId::now_v7();
    assert_eq!(prepare(&f, tx, "ok").await.unwrap(), Vote::Yes);
    assert_eq!(
        decide(&f, tx, Decision::Commit).await.unwrap(),
        DecideReply::Ack
    );
    assert_eq!(branch_state(&f.path, tx), Some(BranchState::Committed));
    assert_eq!(effects(&f.path, tx), vec!["hold", "apply"]);
}
