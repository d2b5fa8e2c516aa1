//! The wallet: users with balances. Prepare holds part of a balance
//! (balance minus holds must cover the amount), commit debits the hold,
//! abort releases it. Holds let concurrent purchases of one user prepare
//! without waiting for each other's decisions.
//!
//! Public subjects: `wallet.balance` `{"user"}`, `wallet.users.create`
//! `{"user", "balance"}`.

use std::collections::BTreeMap;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use twopc_common::db::{self, Db, ReadDb};
use twopc_common::now_ms;
use twopc_schemas::api::{ApiError, Balance, BalanceQuery, CreateUser};
use twopc_schemas::participant::{self, BranchState, ParticipantName};
use twopc_schemas::protocol::TxId;
use twopc_schemas::tx::DebitOp;
use twopc_schemas::ClientName;
use twopc_schemas::{subjects, Code};

use twopc_participant::{
    branch_states, db_error, serve_json, sql_int, stored_u64, tx_column, Refusal, Resource,
};

pub struct Wallet;

const MIGRATIONS: &[&str] = &["
CREATE TABLE users (
    user TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0 AND held <= balance)
);
-- One row per prepared, undecided debit.
CREATE TABLE holds (
    tx BLOB PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users (user),
    amount INTEGER NOT NULL CHECK (amount > 0)
);
-- One row per committed debit: the wallet's side of each purchase.
CREATE TABLE debits (
    tx BLOB PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users (user),
    amount INTEGER NOT NULL CHECK (amount > 0),
    applied_at_ms INTEGER NOT NULL
);
"];

/// Everything the wallet stores, read in one SQLite transaction by the
/// caller (the invariant checker), so the parts agree with each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalletSnapshot {
    /// user → (balance, held), minor units.
    pub users: BTreeMap<String, (i64, i64)>,
    /// Prepared, undecided debits: tx → amount.
    pub holds: BTreeMap<TxId, i64>,
    /// Committed debits: tx → (user, amount).
    pub debits: BTreeMap<TxId, (String, i64)>,
    /// Branch states: tx → `prepared`, `committed` or `aborted`.
    pub branches: BTreeMap<TxId, BranchState>,
}

/// Reads the wallet's tables (see [`MIGRATIONS`]) and its branches. Run it
/// inside a transaction for a consistent view.
pub fn snapshot(conn: &Connection) -> rusqlite::Result<WalletSnapshot> {
    Ok(WalletSnapshot {
        users: conn
            .prepare("SELECT user, balance, held FROM users")?
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
            .collect::<rusqlite::Result<_>>()?,
        holds: conn
            .prepare("SELECT tx, amount FROM holds")?
            .query_map([], |r| Ok((tx_column(r, 0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?,
        debits: conn
            .prepare("SELECT tx, user, amount FROM debits")?
            .query_map([], |r| Ok((tx_column(r, 0)?, (r.get(1)?, r.get(2)?))))?
            .collect::<rusqlite::Result<_>>()?,
        branches: branch_states(conn)?,
    })
}

impl Resource for Wallet {
    /// `{"user": ..., "amount": ...}`: hold, then debit, part of a balance.
    type Op = DebitOp;

    fn name(&self) -> ParticipantName {
        participant::WALLET
    }

    fn migrations(&self) -> &'static [&'static str] {
        MIGRATIONS
    }

    fn parse_op(&self, op: &str) -> Result<DebitOp, String> {
        let debit: DebitOp =
            serde_json::from_str(op).map_err(|e| format!("the wallet debits: {e}"))?;
        debit.validate()?;
        Ok(debit)
    }

    /// Rows prepared before transactions were generic hold
    /// `{"Debit":{"user":...,"amount":...}}`.
    fn stored_op(&self, op: &str) -> DebitOp {
        #[derive(serde::Deserialize)]
        enum Stored {
            Debit(DebitOp),
        }
        serde_json::from_str::<DebitOp>(op)
            .or_else(|_| serde_json::from_str::<Stored>(op).map(|Stored::Debit(d)| d))
            .expect("a stored wallet op reads back")
    }

    fn hold(
        &self,
        conn: &Connection,
        tx: TxId,
        _client: &ClientName,
        op: &DebitOp,
    ) -> rusqlite::Result<Result<(), Refusal>> {
        let (user, amount) = (op.user.as_str(), op.amount);
        let row: Option<(i64, i64)> = conn
            .query_row(
                "SELECT balance, held FROM users WHERE user = ?1",
                [user],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((balance, held)) = row else {
            return Ok(Err((Code::UnknownUser, format!("no user {user:?}"))));
        };
        let available = stored_u64(balance - held);
        if available < amount {
            return Ok(Err((
                Code::InsufficientFunds,
                format!("{user} has {available} available, the purchase needs {amount}"),
            )));
        }
        db::exec(
            conn,
            "UPDATE users SET held = held + ?2 WHERE user = ?1",
            params![user, sql_int(amount)?],
        )?;
        db::exec(
            conn,
            "INSERT INTO holds (tx, user, amount) VALUES (?1, ?2, ?3)",
            params![tx.as_bytes().as_slice(), user, sql_int(amount)?],
        )?;
        Ok(Ok(()))
    }

    fn apply(&self, conn: &Connection, tx: TxId, op: &DebitOp) -> rusqlite::Result<()> {
        let (user, amount) = (op.user.as_str(), op.amount);
        let n = db::exec(
            conn,
            "DELETE FROM holds WHERE tx = ?1",
            [tx.as_bytes().as_slice()],
        )?;
        assert_eq!(n, 1, "a prepared debit has its hold");
        db::exec(
            conn,
            "UPDATE users SET balance = balance - ?2, held = held - ?2 WHERE user = ?1",
            params![user, sql_int(amount)?],
        )?;
        db::exec(
            conn,
            "INSERT INTO debits (tx, user, amount, applied_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![tx.as_bytes().as_slice(), user, sql_int(amount)?, now_ms()],
        )?;
        Ok(())
    }

    fn release(&self, conn: &Connection, tx: TxId, op: &DebitOp) -> rusqlite::Result<()> {
        let (user, amount) = (op.user.as_str(), op.amount);
        let n = db::exec(
            conn,
            "DELETE FROM holds WHERE tx = ?1",
            [tx.as_bytes().as_slice()],
        )?;
        assert_eq!(n, 1, "a prepared debit has its hold");
        db::exec(
            conn,
            "UPDATE users SET held = held - ?2 WHERE user = ?1",
            params![user, sql_int(amount)?],
        )?;
        Ok(())
    }
}

async fn balance(db: ReadDb, payload: Bytes) -> Result<Balance, ApiError> {
    let q = BalanceQuery::parse(&payload)?;
    let user = q.user.clone();
    let row = db
        .run(move |c| {
            db::row(
                c,
                "SELECT balance, held FROM users WHERE user = ?1",
                [&user],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
        })
        .await
        .map_err(db_error)?;
    let (balance, held) =
        row.ok_or_else(|| ApiError::new(Code::UnknownUser, format!("no user {:?}", q.user)))?;
    Ok(Balance {
        user: q.user,
        balance: stored_u64(balance),
        held: stored_u64(held),
        available: stored_u64(balance - held),
    })
}

async fn create_user(db: Db, payload: Bytes) -> Result<Balance, ApiError> {
    let req = CreateUser::parse(&payload)?;
    let r = req.clone();
    let inserted = db
        .run(move |c| {
            db::exec(
                c,
                "INSERT INTO users (user, balance) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![r.user, sql_int(r.balance)?],
            )
        })
        .await
        .map_err(db_error)?;
    if inserted == 0 {
        return Err(ApiError::new(
            Code::AlreadyExists,
            format!("user {:?} exists already", req.user),
        ));
    }
    tracing::info!(user = %req.user, balance = req.balance, "user created");
    Ok(Balance {
        user: req.user,
        balance: req.balance,
        held: 0,
        available: req.balance,
    })
}

/// Serves the wallet service's public subjects.
/// Reads go to the read-only connections (`reads`), creates to the writer.
pub async fn serve_public(
    serving: twopc_common::serve::Serving,
    db: Db,
    reads: ReadDb,
    max_inflight: usize,
) -> anyhow::Result<()> {
    let s = participant::WALLET.as_str();
    tokio::try_join!(
        serve_json(
            serving.clone(),
            s,
            "balance",
            subjects::WALLET_BALANCE,
            reads,
            max_inflight,
            balance
        ),
        serve_json(
            serving,
            s,
            "create-user",
            subjects::WALLET_CREATE_USER,
            db,
            max_inflight,
            create_user
        ),
    )?;
    Ok(())
}

/// Runs the wallet service until SIGTERM/SIGINT (then drains).
pub async fn run(
    args: twopc_participant::ParticipantArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let max = args.max_inflight;
    twopc_participant::run_service(
        args,
        Wallet,
        "twopc wallet: user balances, holds while a purchase is prepared",
        move |serving, db, reads| serve_public(serving, db, reads, max),
        stop,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use twopc_participant::library_schema;

    /// The snapshot reader and the resource agree on the tables: what a
    /// hold and an apply write is what the checker reads back.
    #[test]
    fn the_snapshot_reads_back_a_hold_and_then_its_debit() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("wallet.db"), MIGRATIONS).unwrap();
        library_schema(&conn).unwrap();
        conn.execute(
            "INSERT INTO users (user, balance) VALUES ('alice', 1000)",
            [],
        )
        .unwrap();
        let tx = TxId::now_v7();
        let op = DebitOp {
            user: "alice".into(),
            amount: 300,
        };
        let web = ClientName::new("web").unwrap();
        Wallet.hold(&conn, tx, &web, &op).unwrap().unwrap();
        let s = snapshot(&conn).unwrap();
        assert_eq!(s.users["alice"], (1000, 300));
        assert_eq!(s.holds[&tx], 300);
        assert!(s.debits.is_empty());
        Wallet.apply(&conn, tx, &op).unwrap();
        let s = snapshot(&conn).unwrap();
        assert_eq!(s.users["alice"], (700, 0));
        assert!(s.holds.is_empty());
        assert_eq!(s.debits[&tx], ("alice".to_string(), 300));
    }
}
