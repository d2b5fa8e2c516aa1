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
use twopc_schemas::api::Outcome;
use twopc_schemas::protocol::Decision;
use twopc_schemas::{BranchState, ParticipantName};
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    pub wallet_branches: BTreeMap<Uuid, BranchState>,
    pub order_branches: BTreeMap<Uuid, BranchState>,
    /// Coordinator decisions: tx → (decision, participants pending, request id).
    pub decisions: BTreeMap<Uuid, (Decision, Vec<ParticipantName>, Option<String>)>,
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}

impl Snapshot {
    /// Reads the databases in `root/{coordinator,wallet,order}/`, as laid
    /// out by the launcher, each through its owning service's snapshot
    /// reader and in its own SQLite transaction.
    pub fn read(root: &Path) -> anyhow::Result<Snapshot> {
        let (wallet, order) = Self::read_participants(root)?;
        // Decisions last: anything a participant applied was decided before.
        let decisions = {
            let c = open(&root.join("coordinator/coordinator.db"))?;
            twopc_coordinator::log::snapshot(&c)?
        };
        Ok(Self::assemble(wallet, order, decisions))
    }

    /// As [`Snapshot::read`], with the decisions read from a JetStream KV
    /// bucket (coordinator replicas on a cluster) instead of SQLite.
    pub async fn read_with_kv(
        root: &Path,
        client: async_nats::Client,
        bucket: &str,
    ) -> anyhow::Result<Snapshot> {
        let (wallet, order) = Self::read_participants(root)?;
        let decisions = twopc_coordinator::kv::snapshot(client, bucket).await?;
        Ok(Self::assemble(wallet, order, decisions))
    }

    fn read_participants(
        root: &Path,
    ) -> anyhow::Result<(
        twopc_participants::wallet::WalletSnapshot,
        twopc_participants::order::OrderSnapshot,
    )> {
        let wallet = {
            let mut c = open(&root.join("wallet/wallet.db"))?;
            let t = c.transaction()?;
            twopc_participants::wallet::snapshot(&t)?
        };
        let order = {
            let mut c = open(&root.join("order/order.db"))?;
            let t = c.transaction()?;
            twopc_participants::order::snapshot(&t)?
        };
        Ok((wallet, order))
    }

    fn assemble(
        wallet: twopc_participants::wallet::WalletSnapshot,
        order: twopc_participants::order::OrderSnapshot,
        decisions: BTreeMap<Uuid, twopc_coordinator::log::StoredDecision>,
    ) -> Snapshot {
        Snapshot {
            users: wallet.users,
            holds: wallet.holds,
            debits: wallet.debits,
            wallet_branches: wallet.branches,
            products: order.products,
            reservations: order.reservations,
            orders: order.orders,
            order_branches: order.branches,
            decisions: decisions
                .into_iter()
                .map(|(tx, d)| (tx, (d.decision, d.pending, d.request_id)))
                .collect(),
        }
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
            Some((Decision::Commit, _, _)) => {}
            other => v.push(format!(
                "tx {tx} applied but the coordinator's decision is {other:?}"
            )),
        }
    }
    for (tx, (d, pending, _)) in &s.decisions {
        if *d == Decision::Commit
            && pending.is_empty()
            && !(s.debits.contains_key(tx) && s.orders.contains_key(tx))
        {
            v.push(format!(
                "tx {tx} decided commit and delivered, but not applied at both"
            ));
        }
        if *d == Decision::Abort && (s.debits.contains_key(tx) || s.orders.contains_key(tx)) {
            v.push(format!("tx {tx} decided abort but applied"));
        }
    }
    for (name, branches) in [("wallet", &s.wallet_branches), ("order", &s.order_branches)] {
        for (tx, state) in branches {
            let decided = s.decisions.get(tx).map(|d| d.0);
            match (state, decided) {
                (BranchState::Committed, Some(Decision::Commit)) => {}
                (BranchState::Committed, other) => v.push(format!(
                    "{name} committed tx {tx}, coordinator decided {other:?}"
                )),
                (BranchState::Aborted, Some(Decision::Commit)) => v.push(format!(
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
/// state.
///
/// (Ranges — balance ≥ held ≥ 0, stock ≥ reserved ≥ 0 — are not checked
/// here: SQLite CHECK constraints already make any other state impossible.)
pub fn conservation(init: &Initial, s: &Snapshot) -> Vec<String> {
    let mut v = vec![];
    for (user, opening) in &init.balances {
        let Some((balance, _held)) = s.users.get(user) else {
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
    }
    for (sku, (_, opening)) in &init.products {
        let Some((_, stock, _reserved)) = s.products.get(sku) else {
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
            if *state == BranchState::Prepared {
                v.push(format!("{name} still in doubt about tx {tx}"));
            }
        }
    }
    for (tx, (d, pending, _)) in &s.decisions {
        if !pending.is_empty() {
            v.push(format!(
                "{} of tx {tx} not yet acknowledged by {pending:?}",
                d.as_str()
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

/// One answer a client got for a purchase with a `request_id`: the first
/// send, a retry after a timeout, or a re-send of an answered request. An
/// attempt without an answer (a timeout, an error reply) is not recorded:
/// it says nothing about the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReply {
    /// The key the client sent (remembered by the client, not read from the
    /// reply, so that a coordinator that drops the key is still caught).
    pub request_id: String,
    /// The transaction the answer named.
    pub tx: Uuid,
    pub outcome: Outcome,
    /// The coordinator said this answer repeats an earlier one.
    pub duplicate: bool,
}

/// Client view per `request_id`: a key is one purchase, however often it is
/// sent. For each key,
/// * every answer names the same transaction and the same outcome;
/// * if any answer said `aborted`, no transaction carrying the key is
///   applied anywhere: neither a transaction named in an answer nor the one
///   the decision log binds the key to;
/// * if an answer said `committed`, that transaction is applied at both
///   participants and the decision log binds the key to it (so a later
///   re-send finds it).
///
/// `client_view` checks each answer against its own transaction only; this
/// catches a key told `aborted` whose re-send then ran, committed and
/// charged a second transaction.
pub fn request_id_client_view(replies: &[KeyReply], s: &Snapshot) -> Vec<String> {
    let mut by_key: BTreeMap<&str, Vec<&KeyReply>> = BTreeMap::new();
    for r in replies {
        by_key.entry(r.request_id.as_str()).or_default().push(r);
    }
    // The schema keeps `request_id` unique, but the check does not rely on
    // the schema it is checking: every bound transaction is kept.
    let mut bound: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    for (tx, (_, _, rid)) in &s.decisions {
        if let Some(rid) = rid {
            bound.entry(rid.as_str()).or_default().push(*tx);
        }
    }
    let applied = |tx: &Uuid| s.debits.contains_key(tx) || s.orders.contains_key(tx);
    let mut v = vec![];
    for (key, answers) in &by_key {
        let bound_txs = bound.get(key).map(Vec::as_slice).unwrap_or_default();
        let distinct: BTreeSet<(Uuid, &str)> = answers
            .iter()
            .map(|a| (a.tx, outcome_name(a.outcome)))
            .collect();
        if distinct.len() > 1 {
            v.push(format!(
                "request_id {key} answered differently: {}",
                describe(answers)
            ));
        }
        if answers.iter().any(|a| a.outcome == Outcome::Aborted) {
            let carriers: BTreeSet<Uuid> = answers
                .iter()
                .map(|a| a.tx)
                .chain(bound_txs.iter().copied())
                .collect();
            for tx in carriers.iter().filter(|tx| applied(tx)) {
                v.push(format!(
                    "request_id {key} told aborted, but tx {tx} carrying it is applied \
                     (wallet: {}, order: {}; answers: {}; bound to {bound_txs:?})",
                    s.debits.contains_key(tx),
                    s.orders.contains_key(tx),
                    describe(answers)
                ));
            }
        }
        let committed: BTreeSet<Uuid> = answers
            .iter()
            .filter(|a| a.outcome == Outcome::Committed)
            .map(|a| a.tx)
            .collect();
        for tx in committed {
            if !(s.debits.contains_key(&tx) && s.orders.contains_key(&tx)) {
                v.push(format!(
                    "request_id {key} told committed as tx {tx}, not applied at both \
                     (wallet: {}, order: {})",
                    s.debits.contains_key(&tx),
                    s.orders.contains_key(&tx)
                ));
            }
            if bound_txs != [tx] {
                v.push(format!(
                    "request_id {key} told committed as tx {tx}, but the decision log \
                     binds it to {bound_txs:?}"
                ));
            }
        }
    }
    v
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Committed => "committed",
        Outcome::Aborted => "aborted",
    }
}

/// The answers for one key, for people: `committed tx (duplicate), ...`.
fn describe(answers: &[&KeyReply]) -> String {
    let each: Vec<String> = answers
        .iter()
        .map(|a| {
            format!(
                "{} {}{}",
                outcome_name(a.outcome),
                a.tx,
                if a.duplicate { " (duplicate)" } else { "" }
            )
        })
        .collect();
    each.join(", ")
}

/// Every invariant at once (for a quiescent system).
pub fn all(init: &Initial, told: &[Told], replies: &[KeyReply], s: &Snapshot) -> Vec<String> {
    let mut v = atomicity(s);
    v.extend(conservation(init, s));
    v.extend(no_holds_left(s));
    v.extend(client_view(told, s));
    v.extend(request_id_client_view(replies, s));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice";

    fn tx(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn answer(key: &str, tx: Uuid, outcome: Outcome, duplicate: bool) -> KeyReply {
        KeyReply {
            request_id: key.into(),
            tx,
            outcome,
            duplicate,
        }
    }

    /// A snapshot in which `tx` was decided with `decision`, bound to `key`,
    /// and (when `applied`) debited and ordered.
    fn decided(s: &mut Snapshot, tx: Uuid, decision: Decision, key: Option<&str>, applied: bool) {
        s.decisions
            .insert(tx, (decision, vec![], key.map(Into::into)));
        if applied {
            s.debits.insert(tx, (ALICE.into(), 100));
            s.orders.insert(tx, (ALICE.into(), "sku-0".into(), 1, 100));
        }
    }

    #[test]
    fn a_key_answered_the_same_every_time_passes() {
        let mut s = Snapshot::default();
        decided(&mut s, tx(1), Decision::Commit, Some("k1"), true);
        decided(&mut s, tx(2), Decision::Abort, Some("k2"), false);
        let replies = [
            answer("k1", tx(1), Outcome::Committed, false),
            answer("k1", tx(1), Outcome::Committed, true),
            answer("k2", tx(2), Outcome::Aborted, false),
            answer("k2", tx(2), Outcome::Aborted, true),
        ];
        assert_eq!(request_id_client_view(&replies, &s), Vec::<String>::new());
    }

    #[test]
    fn a_key_told_aborted_whose_resend_committed_another_tx_is_caught() {
        // The case: the first attempt ended by presumed abort (an
        // abort row without the key), the re-send ran a new transaction
        // under the key and charged it.
        let mut s = Snapshot::default();
        decided(&mut s, tx(1), Decision::Abort, None, false);
        decided(&mut s, tx(2), Decision::Commit, Some("k"), true);
        let replies = [
            answer("k", tx(1), Outcome::Aborted, false),
            answer("k", tx(2), Outcome::Committed, false),
        ];
        let v = request_id_client_view(&replies, &s);
        assert!(
            v.iter().any(|e| e.contains("answered differently")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|e| e.contains("told aborted") && e.contains(&tx(2).to_string())),
            "{v:?}"
        );
    }

    #[test]
    fn a_key_told_aborted_is_caught_when_only_the_log_binds_it_to_an_applied_tx() {
        // The client never heard of tx 2 (its re-send timed out), but the
        // decision log bound the key to it and it was applied.
        let mut s = Snapshot::default();
        decided(&mut s, tx(1), Decision::Abort, None, false);
        decided(&mut s, tx(2), Decision::Commit, Some("k"), true);
        let replies = [answer("k", tx(1), Outcome::Aborted, false)];
        let v = request_id_client_view(&replies, &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("told aborted") && v[0].contains(&tx(2).to_string()));
        // The per-transaction view sees nothing wrong here.
        assert!(client_view(&[Told::Aborted(tx(1))], &s).is_empty());
    }

    #[test]
    fn a_key_told_aborted_whose_told_tx_is_applied_is_caught() {
        let mut s = Snapshot::default();
        decided(&mut s, tx(1), Decision::Commit, Some("k"), false);
        s.debits.insert(tx(1), (ALICE.into(), 100));
        let replies = [answer("k", tx(1), Outcome::Aborted, false)];
        let v = request_id_client_view(&replies, &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("wallet: true, order: false"), "{v:?}");
    }

    #[test]
    fn two_answers_with_different_txs_are_caught_even_if_both_aborted() {
        let mut s = Snapshot::default();
        decided(&mut s, tx(1), Decision::Abort, None, false);
        decided(&mut s, tx(2), Decision::Abort, None, false);
        let replies = [
            answer("k", tx(1), Outcome::Aborted, false),
            answer("k", tx(2), Outcome::Aborted, false),
        ];
        let v = request_id_client_view(&replies, &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("answered differently"), "{v:?}");
    }

    #[test]
    fn a_key_told_committed_must_be_applied_at_both_and_bound_to_that_tx() {
        let mut s = Snapshot::default();
        // k1: applied at the wallet only.
        decided(&mut s, tx(1), Decision::Commit, Some("k1"), false);
        s.debits.insert(tx(1), (ALICE.into(), 100));
        // k2: applied, but the log does not carry the key.
        decided(&mut s, tx(2), Decision::Commit, None, true);
        // k3: applied, but the log binds the key to another transaction.
        decided(&mut s, tx(3), Decision::Commit, None, true);
        decided(&mut s, tx(4), Decision::Abort, Some("k3"), false);
        let replies = [
            answer("k1", tx(1), Outcome::Committed, false),
            answer("k2", tx(2), Outcome::Committed, false),
            answer("k3", tx(3), Outcome::Committed, false),
        ];
        let v = request_id_client_view(&replies, &s);
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v[0].starts_with("request_id k1") && v[0].contains("not applied at both"));
        assert!(v[1].starts_with("request_id k2") && v[1].contains("binds it to []"));
        assert!(v[2].starts_with("request_id k3") && v[2].contains(&tx(4).to_string()));
    }

    #[test]
    fn keys_are_checked_separately() {
        // Two keys, one committed and one aborted, never mix.
        let mut s = Snapshot::default();
        decided(&mut s, tx(1), Decision::Commit, Some("a"), true);
        decided(&mut s, tx(2), Decision::Abort, Some("b"), false);
        let replies = [
            answer("a", tx(1), Outcome::Committed, false),
            answer("b", tx(2), Outcome::Aborted, false),
            answer("a", tx(1), Outcome::Committed, true),
        ];
        assert_eq!(request_id_client_view(&replies, &s), Vec::<String>::new());
    }
}
