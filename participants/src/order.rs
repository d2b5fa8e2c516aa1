//! The order service: products with price and stock. Prepare checks that
//! the amount is price × qty and reserves stock (stock minus reservations
//! must cover qty); commit records the order and takes the stock; abort
//! releases the reservation.
//!
//! Public subjects: `order.stock` `{"sku"}`, `order.products.create`
//! `{"sku", "price", "stock"}`.

use std::collections::BTreeMap;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use twopc_common::db::{self, Db, ReadDb};
use twopc_common::now_ms;
use twopc_schemas::api::{ApiError, CreateProduct, Stock, StockQuery};
use twopc_schemas::participant::{self, BranchState, ParticipantName};
use twopc_schemas::protocol::TxId;
use twopc_schemas::tx::ReserveOp;
use twopc_schemas::ClientName;
use twopc_schemas::{subjects, Code};

use twopc_participant::{
    branch_states, db_error, serve_json, sql_int, stored_u64, tx_column, Refusal, Resource,
};

pub struct Order;

const MIGRATIONS: &[&str] = &["
CREATE TABLE products (
    sku TEXT PRIMARY KEY,
    price INTEGER NOT NULL CHECK (price > 0),
    stock INTEGER NOT NULL CHECK (stock >= 0),
    reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= stock)
);
-- One row per prepared, undecided purchase.
CREATE TABLE reservations (
    tx BLOB PRIMARY KEY,
    sku TEXT NOT NULL REFERENCES products (sku),
    qty INTEGER NOT NULL CHECK (qty > 0)
);
-- One row per committed purchase: the order service's side of it.
CREATE TABLE orders (
    tx BLOB PRIMARY KEY,
    user TEXT NOT NULL,
    sku TEXT NOT NULL REFERENCES products (sku),
    qty INTEGER NOT NULL CHECK (qty > 0),
    amount INTEGER NOT NULL CHECK (amount > 0),
    created_at_ms INTEGER NOT NULL
);
"];

/// Everything the order service stores, read in one SQLite transaction by
/// the caller (the invariant checker), so the parts agree with each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderSnapshot {
    /// sku → (price, stock, reserved).
    pub products: BTreeMap<String, (i64, i64, i64)>,
    /// Prepared, undecided reservations: tx → qty.
    pub reservations: BTreeMap<TxId, i64>,
    /// Committed orders: tx → (user, sku, qty, amount).
    pub orders: BTreeMap<TxId, (String, String, i64, i64)>,
    /// Branch states: tx → `prepared`, `committed` or `aborted`.
    pub branches: BTreeMap<TxId, BranchState>,
}

/// Reads the order service's tables (see [`MIGRATIONS`]) and its branches.
/// Run it inside a transaction for a consistent view.
pub fn snapshot(conn: &Connection) -> rusqlite::Result<OrderSnapshot> {
    Ok(OrderSnapshot {
        products: conn
            .prepare("SELECT sku, price, stock, reserved FROM products")?
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?
            .collect::<rusqlite::Result<_>>()?,
        reservations: conn
            .prepare("SELECT tx, qty FROM reservations")?
            .query_map([], |r| Ok((tx_column(r, 0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?,
        orders: conn
            .prepare("SELECT tx, user, sku, qty, amount FROM orders")?
            .query_map([], |r| {
                Ok((
                    tx_column(r, 0)?,
                    (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
                ))
            })?
            .collect::<rusqlite::Result<_>>()?,
        branches: branch_states(conn)?,
    })
}

fn reserve(op: &ReserveOp) -> (&str, &str, u64, u64) {
    (&op.user, &op.sku, op.qty, op.amount)
}

impl Resource for Order {
    /// `{"user", "sku", "qty", "amount"}`: reserve stock, then order it.
    type Op = ReserveOp;

    fn name(&self) -> ParticipantName {
        participant::ORDER
    }

    fn migrations(&self) -> &'static [&'static str] {
        MIGRATIONS
    }

    fn parse_op(&self, op: &str) -> Result<ReserveOp, String> {
        let reserve: ReserveOp =
            serde_json::from_str(op).map_err(|e| format!("the order service reserves: {e}"))?;
        reserve.validate()?;
        Ok(reserve)
    }

    /// Rows prepared before transactions were generic hold
    /// `{"Reserve":{"user":...,"sku":...,"qty":...,"amount":...}}`.
    fn stored_op(&self, op: &str) -> ReserveOp {
        #[derive(serde::Deserialize)]
        enum Stored {
            Reserve(ReserveOp),
        }
        serde_json::from_str::<ReserveOp>(op)
            .or_else(|_| serde_json::from_str::<Stored>(op).map(|Stored::Reserve(r)| r))
            .expect("a stored order op reads back")
    }

    fn hold(
        &self,
        conn: &Connection,
        tx: TxId,
        _client: &ClientName,
        op: &ReserveOp,
    ) -> rusqlite::Result<Result<(), Refusal>> {
        let (_, sku, qty, amount) = reserve(op);
        let row: Option<(i64, i64, i64)> = conn
            .query_row(
                "SELECT price, stock, reserved FROM products WHERE sku = ?1",
                [sku],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((price, stock, reserved)) = row else {
            return Ok(Err((Code::UnknownSku, format!("no product {sku:?}"))));
        };
        let due = stored_u64(price).checked_mul(qty);
        if due != Some(amount) {
            return Ok(Err((
                Code::PriceMismatch,
                format!(
                    "{sku} costs {price} × {qty} = {}, the purchase says {amount}",
                    due.map_or("overflow".to_string(), |d| d.to_string())
                ),
            )));
        }
        let available = stored_u64(stock - reserved);
        if available < qty {
            return Ok(Err((
                Code::OutOfStock,
                format!("{sku} has {available} available, the purchase needs {qty}"),
            )));
        }
        db::exec(
            conn,
            "UPDATE products SET reserved = reserved + ?2 WHERE sku = ?1",
            params![sku, qty],
        )?;
        db::exec(
            conn,
            "INSERT INTO reservations (tx, sku, qty) VALUES (?1, ?2, ?3)",
            params![tx.as_bytes().as_slice(), sku, qty],
        )?;
        Ok(Ok(()))
    }

    fn apply(&self, conn: &Connection, tx: TxId, op: &ReserveOp) -> rusqlite::Result<()> {
        let (user, sku, qty, amount) = reserve(op);
        let n = db::exec(
            conn,
            "DELETE FROM reservations WHERE tx = ?1",
            [tx.as_bytes().as_slice()],
        )?;
        assert_eq!(n, 1, "a prepared order has its reservation");
        db::exec(
            conn,
            "UPDATE products SET stock = stock - ?2, reserved = reserved - ?2 WHERE sku = ?1",
            params![sku, qty],
        )?;
        db::exec(
            conn,
            "INSERT INTO orders (tx, user, sku, qty, amount, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                tx.as_bytes().as_slice(),
                user,
                sku,
                qty,
                sql_int(amount)?,
                now_ms()
            ],
        )?;
        Ok(())
    }

    fn release(&self, conn: &Connection, tx: TxId, op: &ReserveOp) -> rusqlite::Result<()> {
        let (_, sku, qty, _) = reserve(op);
        let n = db::exec(
            conn,
            "DELETE FROM reservations WHERE tx = ?1",
            [tx.as_bytes().as_slice()],
        )?;
        assert_eq!(n, 1, "a prepared order has its reservation");
        db::exec(
            conn,
            "UPDATE products SET reserved = reserved - ?2 WHERE sku = ?1",
            params![sku, qty],
        )?;
        Ok(())
    }
}

async fn stock(db: ReadDb, payload: Bytes) -> Result<Stock, ApiError> {
    let q = StockQuery::parse(&payload)?;
    let sku = q.sku.clone();
    let row = db
        .run(move |c| {
            db::row(
                c,
                "SELECT price, stock, reserved FROM products WHERE sku = ?1",
                [&sku],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()
        })
        .await
        .map_err(db_error)?;
    let (price, stock, reserved) =
        row.ok_or_else(|| ApiError::new(Code::UnknownSku, format!("no product {:?}", q.sku)))?;
    Ok(Stock {
        sku: q.sku,
        price: stored_u64(price),
        stock: stored_u64(stock),
        reserved: stored_u64(reserved),
        available: stored_u64(stock - reserved),
    })
}

async fn create_product(db: Db, payload: Bytes) -> Result<Stock, ApiError> {
    let req = CreateProduct::parse(&payload)?;
    let r = req.clone();
    let inserted = db
        .run(move |c| {
            db::exec(c,
                "INSERT INTO products (sku, price, stock) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![r.sku, sql_int(r.price)?, sql_int(r.stock)?],
            )
        })
        .await
        .map_err(db_error)?;
    if inserted == 0 {
        return Err(ApiError::new(
            Code::AlreadyExists,
            format!("product {:?} exists already", req.sku),
        ));
    }
    tracing::info!(sku = %req.sku, price = req.price, stock = req.stock, "product created");
    Ok(Stock {
        sku: req.sku,
        price: req.price,
        stock: req.stock,
        reserved: 0,
        available: req.stock,
    })
}

/// Serves the order service's public subjects.
/// Reads go to the read-only connections (`reads`), creates to the writer.
pub async fn serve_public(
    serving: twopc_common::serve::Serving,
    db: Db,
    reads: ReadDb,
    max_inflight: usize,
) -> anyhow::Result<()> {
    let s = participant::ORDER.as_str();
    tokio::try_join!(
        serve_json(
            serving.clone(),
            s,
            "stock",
            subjects::ORDER_STOCK,
            reads,
            max_inflight,
            stock
        ),
        serve_json(
            serving,
            s,
            "create-product",
            subjects::ORDER_CREATE_PRODUCT,
            db,
            max_inflight,
            create_product
        ),
    )?;
    Ok(())
}

/// Runs the order service until SIGTERM/SIGINT (then drains).
pub async fn run(
    args: twopc_participant::ParticipantArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let max = args.max_inflight;
    twopc_participant::run_service(
        args,
        Order,
        "twopc order service: products, prices, stock and reservations",
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
    fn the_snapshot_reads_back_a_reservation_and_then_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("order.db"), MIGRATIONS).unwrap();
        library_schema(&conn).unwrap();
        conn.execute(
            "INSERT INTO products (sku, price, stock) VALUES ('pen-1', 199, 10)",
            [],
        )
        .unwrap();
        let tx = TxId::now_v7();
        let op = ReserveOp {
            user: "alice".into(),
            sku: "pen-1".into(),
            qty: 2,
            amount: 398,
        };
        let web = ClientName::new("web").unwrap();
        Order.hold(&conn, tx, &web, &op).unwrap().unwrap();
        let s = snapshot(&conn).unwrap();
        assert_eq!(s.products["pen-1"], (199, 10, 2));
        assert_eq!(s.reservations[&tx], 2);
        assert!(s.orders.is_empty());
        Order.apply(&conn, tx, &op).unwrap();
        let s = snapshot(&conn).unwrap();
        assert_eq!(s.products["pen-1"], (199, 8, 0));
        assert!(s.reservations.is_empty());
        assert_eq!(
            s.orders[&tx],
            ("alice".to_string(), "pen-1".to_string(), 2, 398)
        );
    }
}
