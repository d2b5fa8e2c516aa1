//! What a simulated run must end with: the chaos runner's invariants
//! (`twopc_verify::check`: atomicity, conservation, quiescence, the client's
//! view, the first outcome per request id) over the simulated databases and
//! store, plus what only a simulation can see — every decision ever
//! written, not only those that survived collection.

use std::collections::{BTreeMap, BTreeSet};

use twopc_participants::order::OrderSnapshot;
use twopc_participants::wallet::WalletSnapshot;
use twopc_schemas::api::{ApiError, Outcome, PurchaseRequest};
use twopc_schemas::protocol::{Decision, TxId};
use twopc_schemas::tx::{self, Transaction};
use twopc_schemas::{Code, ParticipantName};
use twopc_verify::check::{self as inv, Initial, KeyReply, Snapshot, Told};

use crate::kv::KvState;

/// One answer a client got.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The purchase (the client's own numbering).
    pub purchase: usize,
    pub req: PurchaseRequest,
    pub sent_first_us: u64,
    pub at_us: u64,
    pub tx: TxId,
    pub outcome: Outcome,
    pub duplicate: bool,
}

/// What happened, as only the simulation knows it.
#[derive(Debug, Default)]
pub struct Ground {
    pub balances: BTreeMap<String, u64>,
    pub products: BTreeMap<String, (u64, u64)>,
    /// Every transaction a coordinator began.
    pub begun: BTreeMap<TxId, Transaction>,
    /// When each began (simulated µs).
    pub begun_at_us: BTreeMap<TxId, u64>,
    /// When each request id was first sent.
    pub key_first_us: BTreeMap<String, u64>,
    pub answers: Vec<Answer>,
    /// Every decision ever written for a transaction, in order.
    pub written: BTreeMap<TxId, Vec<Decision>>,
    /// Request ids ever bound to a transaction's record.
    pub bound: BTreeMap<TxId, String>,
    /// Request ids used by more than one purchase (with other content).
    pub shared_keys: BTreeSet<String>,
    keys_seen: BTreeMap<String, usize>,
    /// Answers that are wrong whatever the state (e.g. a conflict for the
    /// very purchase that holds the key).
    pub wrong: Vec<String>,
}

impl Ground {
    pub fn sent(&mut self, purchase: usize, req: &PurchaseRequest, at_us: u64) {
        if let Some(k) = &req.request_id {
            self.key_first_us.entry(k.clone()).or_insert(at_us);
            let first = *self.keys_seen.entry(k.clone()).or_insert(purchase);
            if first != purchase {
                self.shared_keys.insert(k.clone());
            }
        }
    }

    pub fn answer(&mut self, a: Answer) {
        self.answers.push(a);
    }

    pub fn error(&mut self, purchase: usize, req: &PurchaseRequest, e: &ApiError, _at_us: u64) {
        if e.code == Code::Conflict {
            let shared = req
                .request_id
                .as_ref()
                .is_some_and(|k| self.shared_keys.contains(k));
            if !shared {
                self.wrong.push(format!(
                    "purchase {purchase} ({req:?}) refused as a conflict, but no other \
                     purchase uses its request id: {}",
                    e.message
                ));
            }
        }
    }

    /// A value written to the store (create or compare-and-set).
    pub fn on_kv_write(&mut self, key: &str, value: &[u8]) {
        if !key.starts_with("tx.") {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(value) else {
            self.wrong.push(format!("unreadable record at {key}"));
            return;
        };
        let Some(tx) = v["tx"].as_str().and_then(|t| t.parse::<TxId>().ok()) else {
            return;
        };
        let decision = match v["decision"].as_str() {
            Some("commit") => Decision::Commit,
            _ => Decision::Abort,
        };
        let w = self.written.entry(tx).or_default();
        if w.last() != Some(&decision) {
            w.push(decision);
        }
        if let Some(rid) = v["request_id"].as_str() {
            self.bound.insert(tx, rid.to_owned());
        }
    }

    pub fn told_counts(&self) -> (usize, usize) {
        let c = self
            .answers
            .iter()
            .filter(|a| a.outcome == Outcome::Committed)
            .count();
        (c, self.answers.len() - c)
    }
}

/// Whether `t` is the transaction of purchase `p` (request ids aside).
fn same_purchase(t: &Transaction, p: &PurchaseRequest) -> bool {
    t.branches == tx::purchase(&t.client, p).branches
}

/// Decisions in the store not yet acknowledged by everyone.
pub fn undelivered(kv: &KvState) -> Vec<String> {
    let mut v = vec![];
    for (key, hist) in &kv.keys {
        if !key.starts_with("tx.") {
            continue;
        }
        let Some(value) = hist.last().and_then(|h| h.value.as_ref()) else {
            continue;
        };
        let rec: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
        if rec["pending"].as_array().is_some_and(|p| !p.is_empty()) {
            v.push(key.clone());
        }
    }
    v
}

/// Every invariant; `retention_us` bounds how long a request id promises
/// its first outcome.
pub fn all(
    g: &Ground,
    kv: &KvState,
    wallet: WalletSnapshot,
    wallet2: Option<WalletSnapshot>,
    order: OrderSnapshot,
    retention_us: u64,
) -> Vec<String> {
    let mut v = g.wrong.clone();
    // Decisions as the checker knows them: the last ever written, with
    // what is still pending if the record is still there.
    let mut decisions = BTreeMap::new();
    for (tx, written) in &g.written {
        if written.len() > 1 {
            v.push(format!(
                "tx {tx}: its decision changed after being recorded: {written:?}"
            ));
        }
        let key = format!("tx.{}", tx.simple());
        let pending: Vec<ParticipantName> = kv
            .keys
            .get(&key)
            .and_then(|h| h.last())
            .and_then(|h| h.value.as_ref())
            .and_then(|value| {
                let rec: serde_json::Value = serde_json::from_slice(value).ok()?;
                serde_json::from_value(rec["pending"].clone()).ok()
            })
            .unwrap_or_default();
        // A binding made past the key's promise (a re-send after the
        // retention is a new purchase) is not the key's first outcome.
        let promise = retention_us.saturating_sub(1_000_000);
        let bound = g.bound.get(tx).cloned().filter(|k| {
            match (g.key_first_us.get(k), g.begun_at_us.get(tx)) {
                (Some(first), Some(began)) => *began < first + promise,
                _ => true,
            }
        });
        decisions.insert(*tx, (*written.last().expect("written"), pending, bound));
    }
    let s = Snapshot {
        users: wallet.users,
        holds: wallet.holds,
        debits: wallet.debits,
        products: order.products,
        reservations: order.reservations,
        orders: order.orders,
        wallet_branches: wallet.branches,
        order_branches: order.branches,
        decisions,
    };
    let init = Initial {
        balances: g.balances.clone(),
        products: g.products.clone(),
    };
    let told: Vec<Told> = g
        .answers
        .iter()
        .map(|a| match a.outcome {
            Outcome::Committed => Told::Committed(a.tx),
            Outcome::Aborted => Told::Aborted(a.tx),
        })
        .collect();
    // A request id promises its first outcome for the retention: answers
    // to sends later than that may be a new purchase's. Keys two purchases
    // share are checked by content below instead.
    let replies: Vec<KeyReply> = g
        .answers
        .iter()
        .filter(|a| a.at_us < a.sent_first_us + retention_us.saturating_sub(1_000_000))
        .filter_map(|a| {
            let key = a.req.request_id.clone()?;
            (!g.shared_keys.contains(&key)).then_some(KeyReply {
                request_id: key,
                tx: a.tx,
                outcome: a.outcome,
                duplicate: a.duplicate,
            })
        })
        .collect();
    v.extend(inv::atomicity(&s));
    v.extend(inv::conservation(&init, &s));
    v.extend(inv::no_holds_left(&s));
    v.extend(inv::client_view(&told, &s));
    v.extend(inv::request_id_client_view(&replies, &s));
    for a in &g.answers {
        match g.begun.get(&a.tx) {
            Some(req) if !same_purchase(req, &a.req) => v.push(format!(
                "purchase {} ({:?}) answered {:?}{} with tx {}, which is another purchase ({req:?})",
                a.purchase,
                a.req,
                a.outcome,
                if a.duplicate { " (duplicate)" } else { "" },
                a.tx
            )),
            Some(_) => {}
            None => v.push(format!(
                "purchase {} answered with tx {}, which no coordinator began",
                a.purchase, a.tx
            )),
        }
    }
    if let Some(w2) = wallet2 {
        if !w2.branches.is_empty() {
            v.push(format!(
                "at most one owner writing: a second wallet store wrote {} branches for the name",
                w2.branches.len()
            ));
        }
    }
    v
}
