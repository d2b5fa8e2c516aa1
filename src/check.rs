//! The invariants of a purchase system, checked against the real SQLite
//! files of the coordinator, the wallet and the order service. One function
//! per invariant, shared by the end-to-end tests (and the chaos runner).
//!
//! A [`Snapshot`] reads all three databases; the checks compare it with the
//! initial state ([`Initial`]) and with what clients were told
//! ([`ClientView`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use uuid::Uuid;

/// What the system was seeded with.
#[derive(Debug, Clone, Default)]
pub struct Initial {
    /// user → opening balance.
    pub balances: BTreeMap<String, u64>,
    /// sku → (price, stock).
    pub products: BTreeMap<String, (u64, u64)>,
}

/// The state of all three databases at one moment (each read in its own
/// SQLite transaction).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// user → (balance, held).
    pub users: BTreeMap<String, (i64, i64)>,
    /// Wallet holds: tx → amount.
    pub holds: BTreeMap<Uuid, i64>,
    /// Committed debits: tx → (user, amount).
    pub debits: BTreeMap<Uuid, (String, i64)>,
    /// sku → (price, stock, reserved).
    pub products: BTreeMap<String, (i64, i64, i64)>,
    /// Order reservations: tx → qty.
    pub reservations: BTreeMap<Uuid, i64>,
    /// Committed orders: tx → (user, sku, qty, amount).
    pub orders: BTreeMap<Uuid, (String, String, i64, i64)>,
    /// Branch states at each participant: tx → state.
    pub wallet_branches: BTreeMap<Uuid, String>,
    pub order_branches: BTreeMap<Uuid, String>,
    /// Coordinator decisions: tx → (decision, participants pending, request id).
    pub decisions: BTreeMap<Uuid, (String, Vec<String>, Option<String>)>,
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}

fn uuid(bytes: Vec<u8>) -> Uuid {
    Uuid::from_slice(&bytes).expect("16-byte tx id")
}

fn branches(c: &Connection) -> rusqlite::Result<BTreeMap<Uuid, String>> {
    let mut s = c.prepare("SELECT tx, state FROM branches")?;
    let rows = s.query_map([], |r| Ok((uuid(r.get(0)?), r.get(1)?)))?;
    rows.collect()
}

impl Snapshot {
    /// Reads the databases in `root/{coordinator,wallet,order}/`, as laid
    /// out by the launcher.
    pub fn read(root: &Path) -> anyhow::Result<Snapshot> {
        let mut s = Snapshot::default();
        {
            let mut c = open(&root.join("wallet/wallet.db"))?;
            let t = c.transaction()?;
            s.users = t
                .prepare("SELECT user, balance, held FROM users")?
                .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
                .collect::<rusqlite::Result<_>>()?;
            s.holds = t
                .prepare("SELECT tx, amount FROM holds")?
                .query_map([], |r| Ok((uuid(r.get(0)?), r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            s.debits = t
                .prepare("SELECT tx, user, amount FROM debits")?
                .query_map([], |r| Ok((uuid(r.get(0)?), (r.get(1)?, r.get(2)?))))?
                .collect::<rusqlite::Result<_>>()?;
            s.wallet_branches = branches(&t)?;
        }
        {
            let mut c = open(&root.join("order/order.db"))?;
            let t = c.transaction()?;
            s.products = t
                .prepare("SELECT sku, price, stock, reserved FROM products")?
                .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?
                .collect::<rusqlite::Result<_>>()?;
            s.reservations = t
                .prepare("SELECT tx, qty FROM reservations")?
                .query_map([], |r| Ok((uuid(r.get(0)?), r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            s.orders = t
                .prepare("SELECT tx, user, sku, qty, amount FROM orders")?
                .query_map([], |r| {
                    Ok((
                        uuid(r.get(0)?),
                        (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            s.order_branches = branches(&t)?;
        }
        {
            let c = open(&root.join("coordinator/coordinator.db"))?;
            s.decisions = c
                .prepare("SELECT tx, decision, pending, request_id FROM decisions")?
                .query_map([], |r| {
                    let pending: String = r.get(2)?;
                    Ok((
                        uuid(r.get(0)?),
                        (
                            r.get(1)?,
                            serde_json::from_str(&pending).unwrap_or_default(),
                            r.get(3)?,
                        ),
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
        }
        Ok(s)
    }

    /// True when nothing is in flight: no holds, reservations, prepared
    /// branches or undelivered decisions.
    pub fn quiescent(&self) -> bool {
        no_holds_left(self).is_empty()
    }
}

/// Atomicity: a transaction is committed at both participants or at
/// neither, and only if the coordinator decided commit.
pub fn atomicity(s: &Snapshot) -> Vec<String> {
    let mut v = vec![];
    let committed_w: BTreeSet<_> = s.debits.keys().collect();
    let committed_o: BTreeSet<_> = s.orders.keys().collect();
    for tx in committed_w.symmetric_difference(&committed_o) {
        v.push(format!(
            "tx {tx} committed at one participant only (wallet: {}, order: {})",
            s.debits.contains_key(tx),
            s.orders.contains_key(tx)
        ));
    }
    for tx in committed_w.union(&committed_o) {
        match s.decisions.get(tx) {
            Some((d, _, _)) if d == "commit" => {}
            other => v.push(format!(
                "tx {tx} applied but the coordinator's decision is {other:?}"
            )),
        }
    }
    for (tx, (d, pending, _)) in &s.decisions {
        if d == "commit"
            && pending.is_empty()
            && !(s.debits.contains_key(tx) && s.orders.contains_key(tx))
        {
            v.push(format!(
                "tx {tx} decided commit and delivered, but not applied at both"
            ));
        }
        if d == "abort" && (s.debits.contains_key(tx) || s.orders.contains_key(tx)) {
            v.push(format!("tx {tx} decided abort but applied"));
        }
    }
    for (name, branches) in [("wallet", &s.wallet_branches), ("order", &s.order_branches)] {
        for (tx, state) in branches {
            let decided = s.decisions.get(tx).map(|d| d.0.as_str());
            match (state.as_str(), decided) {
                ("committed", Some("commit")) => {}
                ("committed", other) => v.push(format!(
                    "{name} committed tx {tx}, coordinator decided {other:?}"
                )),
                ("aborted", Some("commit")) => v.push(format!(
                    "{name} aborted tx {tx}, coordinator decided commit"
                )),
                _ => {}
            }
        }
    }
    for (tx, (user, amount)) in &s.debits {
        if let Some((ouser, _, _, oamount)) = s.orders.get(tx) {
            if ouser != user || oamount != amount {
                v.push(format!(
                    "tx {tx}: wallet debited {user} {amount}, order recorded {ouser} {oamount}"
                ));
            }
        }
    }
    v
}

/// Conservation: money taken from wallets equals the value of committed
/// orders; stock taken equals quantities ordered; totals match the initial
/// state; nothing is negative.
pub fn conservation(init: &Initial, s: &Snapshot) -> Vec<String> {
    let mut v = vec![];
    for (user, opening) in &init.balances {
        let Some((balance, held)) = s.users.get(user) else {
            v.push(format!("user {user} missing"));
            continue;
        };
        let debited: i64 = s
            .debits
            .values()
            .filter(|(u, _)| u == user)
            .map(|(_, a)| a)
            .sum();
        if *opening as i64 - debited != *balance {
            v.push(format!(
                "{user}: opening {opening} - debits {debited} != balance {balance}"
            ));
        }
        if *balance < 0 || *held < 0 || held > balance {
            v.push(format!(
                "{user}: balance {balance}, held {held} out of range"
            ));
        }
    }
    for (sku, (_, opening)) in &init.products {
        let Some((_, stock, reserved)) = s.products.get(sku) else {
            v.push(format!("product {sku} missing"));
            continue;
        };
        let sold: i64 = s
            .orders
            .values()
            .filter(|(_, k, _, _)| k == sku)
            .map(|(_, _, q, _)| q)
            .sum();
        if *opening as i64 - sold != *stock {
            v.push(format!(
                "{sku}: opening {opening} - sold {sold} != stock {stock}"
            ));
        }
        if *stock < 0 || *reserved < 0 || reserved > stock {
            v.push(format!(
                "{sku}: stock {stock}, reserved {reserved} out of range"
            ));
        }
    }
    let paid: i64 = s.debits.values().map(|(_, a)| a).sum();
    let sold: i64 = s.orders.values().map(|(_, _, _, a)| a).sum();
    if paid != sold {
        v.push(format!("money debited {paid} != value of orders {sold}"));
    }
    for (tx, (_, sku, qty, amount)) in &s.orders {
        if let Some((price, _, _)) = s.products.get(sku) {
            if price * qty != *amount {
                v.push(format!("tx {tx}: {qty} × {price} != {amount}"));
            }
        }
    }
    v
}

/// Quiescence: no holds or reservations, no prepared (in-doubt) branch, no
/// decision still being delivered.
pub fn no_holds_left(s: &Snapshot) -> Vec<String> {
    let mut v = vec![];
    for tx in s.holds.keys() {
        v.push(format!("wallet hold left for tx {tx}"));
    }
    for tx in s.reservations.keys() {
        v.push(format!("order reservation left for tx {tx}"));
    }
    for (user, (_, held)) in &s.users {
        if *held != 0 {
            v.push(format!("{user} has {held} held"));
        }
    }
    for (sku, (_, _, reserved)) in &s.products {
        if *reserved != 0 {
            v.push(format!("{sku} has {reserved} reserved"));
        }
    }
    for (name, branches) in [("wallet", &s.wallet_branches), ("order", &s.order_branches)] {
        for (tx, state) in branches {
            if state == "prepared" {
                v.push(format!("{name} still in doubt about tx {tx}"));
            }
        }
    }
    for (tx, (d, pending, _)) in &s.decisions {
        if !pending.is_empty() {
            v.push(format!(
                "{d} of tx {tx} not yet acknowledged by {pending:?}"
            ));
        }
    }
    v
}

/// What a client was told about one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Told {
    Committed(Uuid),
    Aborted(Uuid),
    /// No reply in time: either outcome is allowed, but it must be one.
    Unknown,
}

/// Client view: `committed` means applied at both, `aborted` means applied
/// at neither.
pub fn client_view(told: &[Told], s: &Snapshot) -> Vec<String> {
    let mut v = vec![];
    for t in told {
        match t {
            Told::Committed(tx) => {
                if !(s.debits.contains_key(tx) && s.orders.contains_key(tx)) {
                    v.push(format!(
                        "client told committed for {tx}, not applied at both"
                    ));
                }
            }
            Told::Aborted(tx) => {
                if s.debits.contains_key(tx) || s.orders.contains_key(tx) {
                    v.push(format!("client told aborted for {tx}, but applied"));
                }
            }
            Told::Unknown => {}
        }
    }
    v
}

/// Idempotency: one request id is never applied twice.
pub fn request_ids_applied_once(s: &Snapshot) -> Vec<String> {
    let mut seen: BTreeMap<&str, Uuid> = BTreeMap::new();
    let mut v = vec![];
    for (tx, (d, _, rid)) in &s.decisions {
        if let (Some(rid), "commit") = (rid.as_deref(), d.as_str()) {
            if let Some(other) = seen.insert(rid, *tx) {
                v.push(format!(
                    "request_id {rid} committed twice: {other} and {tx}"
                ));
            }
        }
    }
    v
}

/// Every invariant at once (for a quiescent system).
pub fn all(init: &Initial, told: &[Told], s: &Snapshot) -> Vec<String> {
    let mut v = atomicity(s);
    v.extend(conservation(init, s));
    v.extend(no_holds_left(s));
    v.extend(client_view(told, s));
    v.extend(request_ids_applied_once(s));
    v
}
