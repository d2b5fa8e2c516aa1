//! The chaos workload: concurrent clients buying, retrying timed-out
//! purchases with the same request id, and re-sending answered ones; what
//! they were told is collected for the client-view invariants. With the
//! shipping participant in the run, a share of the purchases go as
//! three-branch transactions (wallet, order, shipping) on
//! `shop.<client>.transaction`, retried and re-sent the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use twopc_launcher::client::{request, Reply, Shop};
use twopc_schemas::api::{Outcome, PurchaseReply, PurchaseRequest};
use uuid::Uuid;

use super::Config;
use crate::check::{KeyReply, Told};

#[derive(Default)]
pub(super) struct Stats {
    pub(super) attempted: AtomicU64,
    pub(super) committed: AtomicU64,
    pub(super) aborted: AtomicU64,
    pub(super) unknown: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) error_replies: AtomicU64,
    pub(super) resends: AtomicU64,
    pub(super) resends_different_tx: AtomicU64,
    pub(super) abort_codes: Mutex<BTreeMap<String, u64>>,
    /// The same for the three-branch transactions (with shipping).
    pub(super) tx: TxStats,
}

/// Counts of the three-branch transactions.
#[derive(Default)]
pub(super) struct TxStats {
    pub(super) attempted: AtomicU64,
    pub(super) committed: AtomicU64,
    pub(super) aborted: AtomicU64,
    pub(super) unknown: AtomicU64,
    pub(super) abort_codes: Mutex<BTreeMap<String, u64>>,
}

/// What clients were told, collected from every worker.
#[derive(Default)]
pub(super) struct Heard {
    /// One entry per purchase (request id): its first answer, or unknown
    /// when every attempt went unanswered.
    pub(super) told: Mutex<Vec<Told>>,
    /// Every answer to every send of every request id: first sends,
    /// retries after a timeout, re-sends of answered purchases.
    pub(super) replies: Mutex<Vec<KeyReply>>,
    /// What clients were told of their three-branch transactions (also in
    /// `told`).
    pub(super) told_three: Mutex<Vec<Told>>,
    /// Every key (as the decision log keys it) sent as a three-branch
    /// transaction, answered or not.
    pub(super) three_keys: Mutex<BTreeSet<String>>,
}

/// One request as sent, every time alike: a purchase on
/// `shop.<client>.purchase` or a three-branch transaction on
/// `shop.<client>.transaction`.
#[derive(Clone)]
struct Request {
    subject: String,
    body: Value,
}

/// Most answered purchases one worker keeps waiting for their re-send.
const RESEND_QUEUE_MAX: usize = 32;

/// Longest wait between a purchase's answer and its re-send. Faults hold
/// for 0.3–4 s, so a re-send often lands in a different fault (or after
/// the restart) than its first send.
pub(super) const RESEND_DELAY_MAX_MS: u64 = 5_000;

/// An answered purchase waiting to be sent again.
struct Resend {
    req: Request,
    /// The key sent; the reply's `request_id` is not trusted for it.
    key: String,
    /// The transaction of the key's first answer.
    first_tx: Uuid,
    due: Instant,
}

/// One client: purchases one after another until the deadline, retrying a
/// timed-out purchase with the same request id as a real client would, and
/// sending a share of answered purchases again later, interleaved with new
/// ones, as a client does that lost an answer it had in fact received.
pub(super) async fn worker(
    id: usize,
    cfg: Config,
    shop: Shop,
    catalogue: Vec<(String, u64)>,
    deadline: Instant,
    stats: Arc<Stats>,
    heard: Arc<Heard>,
) {
    let mut rng =
        StdRng::seed_from_u64(cfg.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(id as u64 + 1)));
    let mut n = 0u64;
    let mut queue: Vec<Resend> = vec![];
    while Instant::now() < deadline {
        // A due re-send goes first; a full queue gives up its earliest one
        // early rather than growing.
        let earliest = (0..queue.len()).min_by_key(|&i| queue[i].due);
        if let Some(i) = earliest {
            if queue[i].due <= Instant::now() || queue.len() >= RESEND_QUEUE_MAX {
                let r = queue.swap_remove(i);
                resend(&cfg, &shop, r, &stats, &heard).await;
                continue;
            }
        }
        n += 1;
        let user = format!("user-{}", rng.random_range(0..cfg.users));
        let (sku, price) = catalogue[rng.random_range(0..catalogue.len())].clone();
        let qty = rng.random_range(1..=3u64);
        let amount = if rng.random_bool(cfg.bad_share) {
            price * qty + 1
        } else {
            price * qty
        };
        let key = format!("chaos-{}-{id}-{n}", cfg.seed);
        // Drawn only with shipping in the run, so that the purchases of a
        // seed without it stay as they were.
        let three = cfg.shipping.is_some() && rng.random_bool(cfg.transaction_share);
        let req = if three {
            let slot = format!("slot-{}", rng.random_range(0..cfg.slots.max(1)));
            let ship_qty = rng.random_range(1..=3u64);
            heard
                .three_keys
                .lock()
                .expect("lock")
                .insert(shop.log_key(&key));
            Request {
                subject: twopc_schemas::subjects::transaction(&shop.name),
                body: json!({"branches": [
                    {"participant": "wallet", "op": {"user": user, "amount": amount}},
                    {"participant": "order", "op": {"user": user, "sku": sku, "qty": qty, "amount": amount}},
                    {"participant": "shipping", "op": {"user": user, "slot": slot, "qty": ship_qty}},
                ], "request_id": key}),
            }
        } else {
            let purchase = PurchaseRequest {
                user,
                sku,
                qty,
                amount,
                request_id: Some(key.clone()),
            };
            Request {
                subject: shop.purchase_subject(),
                body: serde_json::to_value(&purchase).expect("a purchase is JSON"),
            }
        };
        let counts = Counts::of(&stats, three);
        counts.attempted.fetch_add(1, Ordering::Relaxed);
        let answer = send_until_answered(&cfg, &shop, &req, &key, &stats, &heard).await;
        let outcome = match &answer {
            Some(r) => {
                let tx = r.tx.parse().expect("tx id");
                match r.outcome {
                    Outcome::Committed => Told::Committed(tx),
                    Outcome::Aborted => {
                        let code = r.reason.as_ref().map_or("none", |r| r.code.as_str());
                        *counts
                            .abort_codes
                            .lock()
                            .expect("lock")
                            .entry(code.into())
                            .or_default() += 1;
                        Told::Aborted(tx)
                    }
                }
            }
            None => Told::Unknown,
        };
        match outcome {
            Told::Committed(_) => counts.committed.fetch_add(1, Ordering::Relaxed),
            Told::Aborted(_) => counts.aborted.fetch_add(1, Ordering::Relaxed),
            Told::Unknown => counts.unknown.fetch_add(1, Ordering::Relaxed),
        };
        if let (Told::Committed(tx) | Told::Aborted(tx), true) =
            (&outcome, rng.random_bool(cfg.resend_share))
        {
            let delay = Duration::from_millis(rng.random_range(0..=RESEND_DELAY_MAX_MS));
            queue.push(Resend {
                req: req.clone(),
                key,
                first_tx: *tx,
                due: Instant::now() + delay,
            });
        }
        if three {
            heard.told_three.lock().expect("lock").push(outcome.clone());
        }
        heard.told.lock().expect("lock").push(outcome);
    }
    // Keys answered shortly before the deadline are re-sent too, now, while
    // the last faults heal: a key the coordinator forgot during a fault would
    // run again exactly then.
    queue.sort_by_key(|r| r.due);
    for r in queue {
        resend(&cfg, &shop, r, &stats, &heard).await;
    }
}

/// The counters of one kind of request.
struct Counts<'a> {
    attempted: &'a AtomicU64,
    committed: &'a AtomicU64,
    aborted: &'a AtomicU64,
    unknown: &'a AtomicU64,
    abort_codes: &'a Mutex<BTreeMap<String, u64>>,
}

impl Counts<'_> {
    fn of(stats: &Stats, three: bool) -> Counts<'_> {
        if three {
            Counts {
                attempted: &stats.tx.attempted,
                committed: &stats.tx.committed,
                aborted: &stats.tx.aborted,
                unknown: &stats.tx.unknown,
                abort_codes: &stats.tx.abort_codes,
            }
        } else {
            Counts {
                attempted: &stats.attempted,
                committed: &stats.committed,
                aborted: &stats.aborted,
                unknown: &stats.unknown,
                abort_codes: &stats.abort_codes,
            }
        }
    }
}

/// Sends an answered purchase again, unchanged, and counts an answer that
/// names another transaction than the first (the checker reports it too).
async fn resend(cfg: &Config, shop: &Shop, r: Resend, stats: &Stats, heard: &Heard) {
    stats.resends.fetch_add(1, Ordering::Relaxed);
    let answer = send_until_answered(cfg, shop, &r.req, &r.key, stats, heard).await;
    if let Some(a) = answer {
        let tx: Uuid = a.tx.parse().expect("tx id");
        if tx != r.first_tx {
            stats.resends_different_tx.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends `req` until it is answered: after a timeout, no responders or an
/// error reply (`busy`, or an outcome the coordinator could not establish)
/// the outcome is unknown, and the same request id is sent again, at most
/// `cfg.max_retries` more times. The answer, if any, is recorded in
/// `heard.replies` under `key`, the key this client sent.
async fn send_until_answered(
    cfg: &Config,
    shop: &Shop,
    req: &Request,
    key: &str,
    stats: &Stats,
    heard: &Heard,
) -> Option<PurchaseReply> {
    for attempt in 0..=cfg.max_retries {
        if attempt > 0 {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
        }
        match request::<_, PurchaseReply>(&shop.client, &req.subject, &req.body, cfg.client_timeout)
            .await
        {
            Ok(Reply::Ok(r)) => {
                heard.replies.lock().expect("lock").push(KeyReply {
                    // As the decision log keys it (the checker reads it).
                    request_id: shop.log_key(key),
                    tx: r.tx.parse().expect("tx id"),
                    outcome: r.outcome,
                    duplicate: r.duplicate,
                });
                let code = r.reason.as_ref().map(|r| r.code.as_str());
                if matches!(code, Some("unavailable" | "timeout" | "busy")) {
                    // As a real client would, back off a little before
                    // buying again from a sick system.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return Some(r);
            }
            Ok(Reply::Err(_)) => {
                stats.error_replies.fetch_add(1, Ordering::Relaxed);
            }
            // A timeout or no responders: unknown; retry the same id.
            Err(_) => {}
        }
    }
    None
}
