//! The invariants of the third participant, the Go shipping service
//! (`go/shipping`), checked against its SQLite file beside the wallet's and
//! the order service's ([`crate::check::Snapshot`]) and the coordinator's
//! decisions.
//!
//! Which transactions have a shipping branch is known from the client's
//! side: every request id the workload ever sent as a three-branch
//! transaction (answered or not). A decision the log binds to such a key is
//! a three-branch transaction; every other transaction has no shipping
//! branch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use twopc_schemas::api::Outcome;
use twopc_schemas::protocol::Decision;
use twopc_schemas::BranchState;
use uuid::Uuid;

use crate::check::{KeyReply, Snapshot, Told};

/// The shipping service's database at one moment (one SQLite transaction).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShippingSnapshot {
    /// slot → (capacity, held, booked).
    pub slots: BTreeMap<String, (i64, i64, i64)>,
    /// Prepared, undecided bookings: tx → (slot, qty).
    pub holds: BTreeMap<Uuid, (String, i64)>,
    /// Committed bookings: tx → (slot, user, qty).
    pub bookings: BTreeMap<Uuid, (String, String, i64)>,
    /// Branch states: tx → state.
    pub branches: BTreeMap<Uuid, BranchState>,
}

fn uuid_of(blob: Vec<u8>) -> rusqlite::Result<Uuid> {
    Uuid::from_slice(&blob).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

impl ShippingSnapshot {
    /// Reads `shipping.db` (the schema of `go/shipping/store.go`) in one
    /// read transaction; it only ever runs `SELECT`s. (Opened read-write,
    /// as the checker opens the other files: a reader of a WAL database
    /// needs its shared-memory file.)
    pub fn read(db: &Path) -> anyhow::Result<ShippingSnapshot> {
        let mut c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        let t = c.transaction()?;
        let slots = t
            .prepare("SELECT slot, capacity, held, booked FROM slots")?
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?
            .collect::<rusqlite::Result<_>>()?;
        let holds = t
            .prepare("SELECT tx, slot, qty FROM holds")?
            .query_map([], |r| Ok((uuid_of(r.get(0)?)?, (r.get(1)?, r.get(2)?))))?
            .collect::<rusqlite::Result<_>>()?;
        let bookings = t
            .prepare("SELECT tx, slot, user, qty FROM bookings")?
            .query_map([], |r| {
                Ok((uuid_of(r.get(0)?)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let branches = t
            .prepare("SELECT tx, state FROM branches")?
            .query_map([], |r| {
                let state: String = r.get(1)?;
                let state = match state.as_str() {
                    "prepared" => BranchState::Prepared,
                    "committed" => BranchState::Committed,
                    _ => BranchState::Aborted,
                };
                Ok((uuid_of(r.get(0)?)?, state))
            })?
            .collect::<rusqlite::Result<_>>()?;
        t.finish()?;
        Ok(ShippingSnapshot {
            slots,
            holds,
            bookings,
            branches,
        })
    }

    /// Nothing held, nothing prepared.
    pub fn quiescent(&self) -> bool {
        no_holds_left(self).is_empty()
    }
}

/// The transactions the decision log binds to a three-branch key.
fn three_branch_txs(s: &Snapshot, keys: &BTreeSet<String>) -> BTreeSet<Uuid> {
    s.decisions
        .iter()
        .filter(|(_, (_, _, rid))| rid.as_ref().is_some_and(|k| keys.contains(k)))
        .map(|(tx, _)| *tx)
        .collect()
}

/// Atomicity over three branches: a booking at shipping only for a
/// transaction the coordinator decided commit and that is applied at the
/// wallet and the order service too; a three-branch transaction applied
/// at any participant is applied at all three; the shipping branch states
/// agree with the decisions; no booking for a transaction without a
/// shipping branch.
pub fn atomicity(s: &Snapshot, sh: &ShippingSnapshot, keys: &BTreeSet<String>) -> Vec<String> {
    let mut v = vec![];
    let three = three_branch_txs(s, keys);
    let decided = |tx: &Uuid| s.decisions.get(tx).map(|d| d.0);
    for tx in sh.bookings.keys() {
        if decided(tx) != Some(Decision::Commit) {
            v.push(format!(
                "shipping booked tx {tx}, coordinator decided {:?}",
                decided(tx)
            ));
        }
        if !(s.debits.contains_key(tx) && s.orders.contains_key(tx)) {
            v.push(format!(
                "shipping booked tx {tx}, not applied at both others (wallet: {}, order: {})",
                s.debits.contains_key(tx),
                s.orders.contains_key(tx)
            ));
        }
        if !three.contains(tx) {
            v.push(format!(
                "shipping booked tx {tx}, which is not a three-branch transaction"
            ));
        }
    }
    for tx in &three {
        let (w, o, sp) = (
            s.debits.contains_key(tx),
            s.orders.contains_key(tx),
            sh.bookings.contains_key(tx),
        );
        if (w || o || sp) && !(w && o && sp) {
            v.push(format!(
                "three-branch tx {tx} applied at some participants only \
                 (wallet: {w}, order: {o}, shipping: {sp}; decision {:?}, shipping branch {:?})",
                decided(tx),
                sh.branches.get(tx)
            ));
        }
        if let Some((Decision::Commit, pending, _)) = s.decisions.get(tx) {
            if pending.is_empty() && !sp {
                v.push(format!(
                    "three-branch tx {tx} decided commit and delivered, not booked at shipping"
                ));
            }
        }
    }
    for (tx, state) in &sh.branches {
        match (state, decided(tx)) {
            (BranchState::Committed, Some(Decision::Commit)) if !sh.bookings.contains_key(tx) => {
                v.push(format!("shipping committed tx {tx} without a booking"))
            }
            (BranchState::Committed, Some(Decision::Commit)) => {}
            (BranchState::Committed, other) => v.push(format!(
                "shipping committed tx {tx}, coordinator decided {other:?}"
            )),
            (BranchState::Aborted, Some(Decision::Commit)) => v.push(format!(
                "shipping aborted tx {tx}, coordinator decided commit"
            )),
            _ => {}
        }
    }
    for (tx, (_, user, _)) in &sh.bookings {
        if let Some((wuser, _)) = s.debits.get(tx) {
            if wuser != user {
                v.push(format!(
                    "tx {tx}: wallet debited {wuser}, shipping booked for {user}"
                ));
            }
        }
    }
    v
}

/// Conservation of slot capacity: each slot's `booked` is the sum of its
/// committed bookings, its `held` the sum of its holds, its capacity what
/// it was created with; every booking's slot exists.
pub fn conservation(capacity: &BTreeMap<String, u64>, sh: &ShippingSnapshot) -> Vec<String> {
    let mut v = vec![];
    for (slot, opening) in capacity {
        let Some((cap, held, booked)) = sh.slots.get(slot) else {
            v.push(format!("slot {slot} missing"));
            continue;
        };
        if *cap != *opening as i64 {
            v.push(format!(
                "slot {slot}: capacity {cap}, created with {opening}"
            ));
        }
        let sum_booked: i64 = sh
            .bookings
            .values()
            .filter(|(s, _, _)| s == slot)
            .map(|(_, _, q)| q)
            .sum();
        if sum_booked != *booked {
            v.push(format!(
                "slot {slot}: booked {booked} != sum of committed bookings {sum_booked}"
            ));
        }
        let sum_held: i64 = sh
            .holds
            .values()
            .filter(|(s, _)| s == slot)
            .map(|(_, q)| q)
            .sum();
        if sum_held != *held {
            v.push(format!(
                "slot {slot}: held {held} != sum of holds {sum_held}"
            ));
        }
    }
    for (tx, (slot, _, _)) in &sh.bookings {
        if !capacity.contains_key(slot) {
            v.push(format!("tx {tx} booked unknown slot {slot}"));
        }
    }
    v
}

/// After healing: no hold, nothing held on any slot, no prepared branch.
pub fn no_holds_left(sh: &ShippingSnapshot) -> Vec<String> {
    let mut v = vec![];
    for tx in sh.holds.keys() {
        v.push(format!("shipping hold left for tx {tx}"));
    }
    for (slot, (_, held, _)) in &sh.slots {
        if *held != 0 {
            v.push(format!("slot {slot} has {held} held"));
        }
    }
    for (tx, state) in &sh.branches {
        if *state == BranchState::Prepared {
            v.push(format!("shipping still in doubt about tx {tx}"));
        }
    }
    v
}

/// The client's view of its three-branch transactions: one told
/// `committed` is booked at shipping (the wallet and the order service are
/// checked by [`crate::check::client_view`] for every request), one told
/// `aborted` is booked nowhere, under the told transaction or the one the
/// decision log binds its key to.
pub fn client_view(
    told: &[Told],
    replies: &[KeyReply],
    s: &Snapshot,
    sh: &ShippingSnapshot,
    keys: &BTreeSet<String>,
) -> Vec<String> {
    let mut v = vec![];
    for t in told {
        match t {
            Told::Committed(tx) if !sh.bookings.contains_key(tx) => v.push(format!(
                "client told committed for three-branch tx {tx}, not booked at shipping"
            )),
            Told::Aborted(tx) if sh.bookings.contains_key(tx) => v.push(format!(
                "client told aborted for three-branch tx {tx}, but booked at shipping"
            )),
            _ => {}
        }
    }
    let mut bound: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    for (tx, (_, _, rid)) in &s.decisions {
        if let Some(rid) = rid {
            bound.entry(rid.as_str()).or_default().push(*tx);
        }
    }
    for r in replies.iter().filter(|r| keys.contains(&r.request_id)) {
        match r.outcome {
            Outcome::Committed => {
                if !sh.bookings.contains_key(&r.tx) {
                    v.push(format!(
                        "request_id {} told committed as tx {}, not booked at shipping",
                        r.request_id, r.tx
                    ));
                }
            }
            Outcome::Aborted => {
                // The told transaction and those the log binds the key
                // to, each once.
                let carriers: BTreeSet<Uuid> = std::iter::once(r.tx)
                    .chain(
                        bound
                            .get(r.request_id.as_str())
                            .into_iter()
                            .flatten()
                            .copied(),
                    )
                    .collect();
                for tx in carriers.iter().filter(|tx| sh.bookings.contains_key(tx)) {
                    v.push(format!(
                        "request_id {} told aborted, but tx {tx} carrying it is booked at shipping",
                        r.request_id
                    ));
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// A three-branch tx decided `d` under key `k`, applied at the wallet
    /// and order (when `applied`).
    fn world(d: Decision, applied: bool) -> (Snapshot, BTreeSet<String>) {
        let mut s = Snapshot::default();
        s.decisions.insert(tx(1), (d, vec![], Some("web/k".into())));
        if applied {
            s.debits.insert(tx(1), ("al".into(), 100));
            s.orders
                .insert(tx(1), ("al".into(), "sku-0".into(), 1, 100));
        }
        (s, BTreeSet::from(["web/k".to_owned()]))
    }

    fn booked(qty: i64) -> ShippingSnapshot {
        let mut sh = ShippingSnapshot::default();
        sh.slots.insert("s".into(), (1000, 0, qty));
        sh.bookings.insert(tx(1), ("s".into(), "al".into(), qty));
        sh.branches.insert(tx(1), BranchState::Committed);
        sh
    }

    #[test]
    fn a_three_branch_commit_at_all_three_passes() {
        let (s, keys) = world(Decision::Commit, true);
        let sh = booked(2);
        assert!(atomicity(&s, &sh, &keys).is_empty());
        let cap = BTreeMap::from([("s".to_owned(), 1000)]);
        assert!(conservation(&cap, &sh).is_empty());
        assert!(no_holds_left(&sh).is_empty());
        let told = [Told::Committed(tx(1))];
        assert!(client_view(&told, &[], &s, &sh, &keys).is_empty());
    }

    #[test]
    fn a_commit_missing_at_shipping_is_caught() {
        let (s, keys) = world(Decision::Commit, true);
        let sh = ShippingSnapshot::default();
        let v = atomicity(&s, &sh, &keys);
        assert!(
            v.iter().any(|e| e.contains("some participants only")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|e| e.contains("not booked at shipping")),
            "{v:?}"
        );
        let told = [Told::Committed(tx(1))];
        assert_eq!(client_view(&told, &[], &s, &sh, &keys).len(), 1);
    }

    #[test]
    fn a_booking_of_an_aborted_tx_is_caught() {
        let (s, keys) = world(Decision::Abort, false);
        let sh = booked(1);
        let v = atomicity(&s, &sh, &keys);
        assert!(v.iter().any(|e| e.contains("decided Some(Abort)")), "{v:?}");
        let replies = [KeyReply {
            request_id: "web/k".into(),
            tx: tx(1),
            outcome: Outcome::Aborted,
            duplicate: false,
        }];
        assert_eq!(client_view(&[], &replies, &s, &sh, &keys).len(), 1);
    }

    #[test]
    fn slot_counts_must_match_bookings_and_holds() {
        let mut sh = booked(2);
        sh.slots.insert("s".into(), (1000, 1, 3));
        let cap = BTreeMap::from([("s".to_owned(), 1000)]);
        assert_eq!(conservation(&cap, &sh).len(), 2);
        sh.branches.insert(tx(2), BranchState::Prepared);
        assert_eq!(no_holds_left(&sh).len(), 2);
    }
}
