//! The coordinator's protocol core: every coordinator rule, and no I/O.
//!
//! The core takes one [`Event`] at a time, with the time it happened, and
//! returns the [`Cmd`]s to carry out; the driver (`coordinator.rs`) does the
//! NATS and decision-log I/O and feeds each result back as an event. This is
//! the openraft / raft-rs shape: the rules are unit-tested here by feeding
//! events and asserting on commands, with explicit time and a seeded random
//! source, and the same code runs in the service.
//!
//! Rules, and where they are (one handler per event, reached from
//! [`Core::step`]):
//! * a request id in flight here makes a retry wait for the first attempt;
//!   a new one is looked up in the log first (`on_purchase`,
//!   `on_key_found`);
//! * a purchase is two branches, a debit at the wallet and a reservation at
//!   the order service, prepared in parallel (`start`);
//! * commit only if every participant voted yes; who must hear the
//!   decision (`phase::decide`, called from `on_voted`);
//! * the decision is recorded before anyone hears it (`on_voted` emits
//!   `Record`; only `on_recorded` replies or delivers);
//! * every way an attempt ends — its own decision, a presumed abort recorded
//!   first, a request id held by another transaction, a log failure — goes
//!   through `phase::conclude` (`on_recorded`);
//! * the client hears the outcome at the durable decision, or after the
//!   first delivery round (`ReplyAfter`);
//! * delivery until every participant acknowledges, rounds spaced by capped
//!   jittered backoff; refusals counted and reported as stuck past
//!   [`REFUSALS_BEFORE_ALERT`] (`on_delivered`, `on_retry_due`);
//! * undelivered decisions are delivered again after a restart
//!   (`on_resume`);
//! * a decision query for an undecided transaction records abort first
//!   (presumed abort), and is answered with whatever the log holds
//!   (`on_decision_query`, `on_query_recorded`).

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::SeedableRng;
use twopc_common::backoff::Backoff;
use twopc_common::trace::TraceContext;
use twopc_schemas::api::{
    AbortReason, ApiError, PurchaseReply, PurchaseRequest, Refusal, VoteSummary,
};
use twopc_schemas::protocol::{BranchOp, Decision, DecisionReply, TxId, Vote};
use twopc_schemas::{subjects, Code};

use crate::config::ReplyAfter;
use crate::log::{LogError, Record, Recorded};
use crate::phase::{conclude, decide, reply_from_record, Ballot, Outcome};

/// Refusals in a row after which a delivery is reported as stuck (an error
/// in the log, the `twopc_decisions_refused` gauge, `refused_by` in
/// `shop.in_doubt`). Delivery still goes on: an operator may repair the
/// participant.
pub const REFUSALS_BEFORE_ALERT: u32 = 5;

/// Names a client waiting for a purchase reply (the driver maps it to the
/// NATS reply).
pub type ClientId = u64;
/// Names a participant waiting for a decision-query answer.
pub type QueryId = u64;

/// What the core needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// First delay between delivery rounds; doubles up to the cap.
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
    pub reply_after: ReplyAfter,
    /// Seed of the jitter of retry delays (fixed in tests).
    pub seed: u64,
}

/// What one delivery attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Acked,
    /// The participant answered, and refused.
    Refused(Code, String),
    /// No answer (timeout, no responders, a reply that does not decode).
    Failed,
}

/// Something that happened, as the driver saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// A valid purchase request. `tx` is a fresh id the driver drew; it is
    /// used if this purchase starts a transaction at once (no request id).
    Purchase {
        client: ClientId,
        req: PurchaseRequest,
        tx: TxId,
        trace: TraceContext,
    },
    /// The log's answer to [`Cmd::LookUpKey`], with a fresh transaction id
    /// to use if the key is free (drawn now, so that a transaction's id
    /// says when it started).
    KeyFound {
        key: String,
        found: Result<Option<Record>, LogError>,
        tx: TxId,
    },
    /// A participant's answer to [`Cmd::Prepare`] (or its absence).
    Voted {
        tx: TxId,
        participant: String,
        ballot: Ballot,
    },
    /// The log's answer to [`Cmd::Record`].
    Recorded {
        tx: TxId,
        result: Result<Recorded, LogError>,
    },
    /// A participant's answer to [`Cmd::Decide`].
    Delivered {
        tx: TxId,
        participant: String,
        result: Delivery,
    },
    /// The delay asked for by [`Cmd::RetryAfter`] is over.
    RetryDue { tx: TxId },
    /// At start: recorded decisions not acknowledged by every participant.
    Resume { records: Vec<Record> },
    /// A participant in doubt asks for the decision.
    DecisionQuery {
        query: QueryId,
        tx: TxId,
        participant: String,
    },
    /// The log's answer to [`Cmd::RecordPresumedAbort`].
    QueryRecorded {
        query: QueryId,
        tx: TxId,
        result: Result<Recorded, LogError>,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// Find the record bound to a request id → [`Event::KeyFound`].
    LookUpKey { key: String },
    /// Send a prepare, bounded by the prepare timeout → [`Event::Voted`].
    Prepare {
        tx: TxId,
        participant: String,
        op: BranchOp,
        trace: TraceContext,
    },
    /// Record the decision durably (first writer wins) →
    /// [`Event::Recorded`]. Nobody hears it before.
    Record { rec: Record },
    /// Record abort unless a decision exists → [`Event::QueryRecorded`].
    RecordPresumedAbort { query: QueryId, rec: Record },
    /// Deliver a decision once → [`Event::Delivered`].
    Decide {
        tx: TxId,
        participant: String,
        decision: Decision,
        trace: TraceContext,
    },
    /// Note acknowledgements in the log (losing this write only causes an
    /// idempotent redelivery after a restart).
    NoteAcks {
        tx: TxId,
        participants: Vec<String>,
        attempts: u32,
    },
    /// Answer a purchase.
    Reply {
        client: ClientId,
        reply: Result<PurchaseReply, ApiError>,
    },
    /// Answer a decision query.
    Answer {
        query: QueryId,
        reply: DecisionReply,
    },
    /// Wake the core with [`Event::RetryDue`] after a delay.
    RetryAfter { tx: TxId, delay_ms: u64 },
    /// For logs and metrics: a transaction began (phase 1).
    Begun {
        tx: TxId,
        req: PurchaseRequest,
        trace: TraceContext,
    },
    /// For logs and metrics: how phase 1 ended (`None`: unknown).
    Concluded {
        tx: TxId,
        decision: Option<Decision>,
        reason: Option<Code>,
        trace: TraceContext,
    },
    /// For logs and metrics: every participant has the decision.
    DeliveredAll {
        tx: TxId,
        decision: Decision,
        trace: TraceContext,
    },
    /// For logs and metrics: a participant refused the decision
    /// [`REFUSALS_BEFORE_ALERT`] times in a row.
    Stuck {
        tx: TxId,
        decision: Decision,
        refusal: Refusal,
    },
}

/// A request id being served here: the purchase and who waits for it. The
/// first client is the one whose request started the attempt.
#[derive(Debug)]
struct KeyInFlight {
    req: PurchaseRequest,
    waiting: Vec<ClientId>,
}

/// Who hears a transaction's outcome.
#[derive(Debug, Clone)]
enum Asker {
    /// A purchase without a request id.
    Client(ClientId),
    /// Everyone waiting on this request id.
    Key(String),
}

#[derive(Debug)]
struct Voting {
    req: PurchaseRequest,
    asker: Asker,
    /// Each participant with its ballot, once in.
    ballots: Vec<(String, Option<Ballot>)>,
}

#[derive(Debug)]
struct Recording {
    req: PurchaseRequest,
    asker: Asker,
    outcome: Outcome,
}

#[derive(Debug)]
struct Delivering {
    decision: Decision,
    /// Participants that have not acknowledged.
    pending: Vec<String>,
    /// This round's answers (a round is outstanding while any is `None`).
    round: BTreeMap<String, Option<Delivery>>,
    backoff: Backoff,
    /// Rounds sent so far.
    rounds: u32,
    /// A reply held until the first round ends (`ReplyAfter::Delivery`).
    reply_after_first_round: Option<(Asker, Result<PurchaseReply, ApiError>)>,
    refusals: Vec<Refusal>,
}

#[derive(Debug)]
enum Phase {
    Voting(Voting),
    Recording(Recording),
    Delivering(Delivering),
}

#[derive(Debug)]
struct Tx {
    trace: TraceContext,
    phase: Phase,
}

/// The coordinator's state: transactions in flight here and request ids
/// being served. Nothing here is durable; the decision log is.
pub struct Core {
    config: CoreConfig,
    rng: StdRng,
    keys: HashMap<String, KeyInFlight>,
    /// Request ids being looked up in the log, with the trace to use if
    /// the key is free.
    parked: HashMap<String, TraceContext>,
    txs: HashMap<TxId, Tx>,
    /// How many of `txs` are delivering (kept, not counted, because the
    /// driver reads it after every step).
    delivering: usize,
}

/// A transaction still in phase 1 here, for status queries.
#[derive(Debug, Clone)]
pub struct Active {
    pub tx: TxId,
    pub req: PurchaseRequest,
}

fn same_purchase(a: &PurchaseRequest, b: &PurchaseRequest) -> bool {
    a.user == b.user && a.sku == b.sku && a.qty == b.qty && a.amount == b.amount
}

/// A purchase as branches: what each participant must prepare.
pub fn branches(req: &PurchaseRequest) -> Vec<(String, BranchOp)> {
    vec![
        (
            subjects::WALLET.to_owned(),
            BranchOp::Debit {
                user: req.user.clone(),
                amount: req.amount,
            },
        ),
        (
            subjects::ORDER.to_owned(),
            BranchOp::Reserve {
                user: req.user.clone(),
                sku: req.sku.clone(),
                qty: u32::try_from(req.qty).expect("qty is validated below u32::MAX"),
                amount: req.amount,
            },
        ),
    ]
}

/// How a ballot is stored with the decision, for `twopc tx`.
pub fn summarize(participant: &str, ballot: &Ballot) -> VoteSummary {
    let (vote, code, message) = match ballot {
        Ballot::Voted(Vote::Yes) => ("yes", None, None),
        Ballot::Voted(Vote::No { code, message }) => ("no", Some(*code), Some(message.clone())),
        Ballot::TimedOut => ("timeout", Some(Code::Timeout), None),
        Ballot::NoResponders => ("no_responders", Some(Code::Unavailable), None),
        Ballot::Garbled(e) => ("garbled", Some(Code::BadMessage), Some(e.clone())),
    };
    VoteSummary {
        participant: participant.to_owned(),
        vote: vote.to_owned(),
        code,
        message,
    }
}

/// A storage failure as the client sees it, where nothing was started.
pub fn log_error(e: &LogError) -> ApiError {
    match e {
        LogError::Busy => ApiError::new(Code::Busy, "the decision log is overloaded; retry"),
        LogError::Failed(m) => ApiError::new(Code::Internal, m.clone()),
    }
}

impl Core {
    pub fn new(config: CoreConfig) -> Self {
        assert!(config.retry_base_ms > 0 && config.retry_cap_ms >= config.retry_base_ms);
        Core {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            keys: HashMap::new(),
            parked: HashMap::new(),
            txs: HashMap::new(),
            delivering: 0,
        }
    }

    /// The one entry point: an event in, commands out.
    pub fn step(&mut self, now_ms: i64, event: Event) -> Vec<Cmd> {
        let mut out = vec![];
        let touched = match &event {
            Event::Purchase { tx, .. }
            | Event::Voted { tx, .. }
            | Event::Recorded { tx, .. }
            | Event::Delivered { tx, .. }
            | Event::RetryDue { tx }
            | Event::QueryRecorded { tx, .. }
            | Event::DecisionQuery { tx, .. } => Some(*tx),
            Event::KeyFound { tx, .. } => Some(*tx),
            Event::Resume { .. } => None,
        };
        match event {
            Event::Purchase {
                client,
                req,
                tx,
                trace,
            } => self.on_purchase(client, req, tx, trace, &mut out),
            Event::KeyFound { key, found, tx } => self.on_key_found(key, found, tx, &mut out),
            Event::Voted {
                tx,
                participant,
                ballot,
            } => self.on_voted(now_ms, tx, participant, ballot, &mut out),
            Event::Recorded { tx, result } => self.on_recorded(tx, result, &mut out),
            Event::Delivered {
                tx,
                participant,
                result,
            } => self.on_delivered(tx, participant, result, &mut out),
            Event::RetryDue { tx } => self.on_retry_due(tx, &mut out),
            Event::Resume { records } => self.on_resume(records, &mut out),
            Event::DecisionQuery {
                query,
                tx,
                participant,
            } => self.on_decision_query(now_ms, query, tx, participant, &mut out),
            Event::QueryRecorded { query, tx, result } => {
                self.on_query_recorded(query, tx, result, &mut out)
            }
        }
        self.check_invariants(touched);
        out
    }

    /// Transactions in phase 1 (voting or being recorded).
    pub fn active(&self) -> Vec<Active> {
        self.txs
            .iter()
            .filter_map(|(tx, t)| match &t.phase {
                Phase::Voting(v) => Some(Active {
                    tx: *tx,
                    req: v.req.clone(),
                }),
                Phase::Recording(r) => Some(Active {
                    tx: *tx,
                    req: r.req.clone(),
                }),
                Phase::Delivering(_) => None,
            })
            .collect()
    }

    /// Whether `tx` is in phase 1 here, and its purchase.
    pub fn in_phase_1(&self, tx: TxId) -> Option<PurchaseRequest> {
        match &self.txs.get(&tx)?.phase {
            Phase::Voting(v) => Some(v.req.clone()),
            Phase::Recording(r) => Some(r.req.clone()),
            Phase::Delivering(_) => None,
        }
    }

    /// Decisions being delivered here.
    pub fn delivering(&self) -> usize {
        self.delivering
    }

    /// The refusals of `tx`'s decision so far.
    pub fn refusals(&self, tx: TxId) -> Vec<Refusal> {
        match self.txs.get(&tx).map(|t| &t.phase) {
            Some(Phase::Delivering(d)) => d.refusals.clone(),
            _ => vec![],
        }
    }

    fn on_purchase(
        &mut self,
        client: ClientId,
        req: PurchaseRequest,
        tx: TxId,
        trace: TraceContext,
        out: &mut Vec<Cmd>,
    ) {
        let Some(key) = req.request_id.clone() else {
            self.start(tx, req, Asker::Client(client), trace, out);
            return;
        };
        if let Some(k) = self.keys.get_mut(&key) {
            // The first attempt is still running here: wait for it.
            if same_purchase(&k.req, &req) {
                k.waiting.push(client);
            } else {
                out.push(Cmd::Reply {
                    client,
                    reply: Err(ApiError::new(
                        Code::Conflict,
                        format!("request_id {key:?} is in use by a different purchase"),
                    )),
                });
            }
            return;
        }
        self.keys.insert(
            key.clone(),
            KeyInFlight {
                req,
                waiting: vec![client],
            },
        );
        // Parked until the log says whether the key is bound already.
        let _ = tx;
        self.parked.insert(key.clone(), trace);
        out.push(Cmd::LookUpKey { key });
    }

    fn on_key_found(
        &mut self,
        key: String,
        found: Result<Option<Record>, LogError>,
        tx: TxId,
        out: &mut Vec<Cmd>,
    ) {
        let Some(trace) = self.parked.remove(&key) else {
            return;
        };
        let req = self
            .keys
            .get(&key)
            .expect("a parked key is in flight")
            .req
            .clone();
        match found {
            Ok(None) => self.start(tx, req, Asker::Key(key), trace, out),
            Ok(Some(rec)) => {
                let reply = if rec
                    .purchase
                    .as_ref()
                    .is_some_and(|p| !same_purchase(p, &req))
                {
                    Err(ApiError::new(
                        Code::Conflict,
                        format!(
                            "request_id {key:?} was used for a different purchase (tx {})",
                            rec.tx
                        ),
                    ))
                } else {
                    Ok(reply_from_record(&rec, true))
                };
                self.answer(&Asker::Key(key), reply, out);
            }
            // Nothing started: the client may retry.
            Err(e) => self.answer(&Asker::Key(key), Err(log_error(&e)), out),
        }
    }

    /// Phase 1: every branch prepared in parallel.
    fn start(
        &mut self,
        tx: TxId,
        req: PurchaseRequest,
        asker: Asker,
        trace: TraceContext,
        out: &mut Vec<Cmd>,
    ) {
        assert!(!self.txs.contains_key(&tx), "transaction ids are fresh");
        out.push(Cmd::Begun {
            tx,
            req: req.clone(),
            trace: trace.clone(),
        });
        let branches = branches(&req);
        for (participant, op) in &branches {
            out.push(Cmd::Prepare {
                tx,
                participant: participant.clone(),
                op: op.clone(),
                trace: trace.clone(),
            });
        }
        self.txs.insert(
            tx,
            Tx {
                trace,
                phase: Phase::Voting(Voting {
                    req,
                    asker,
                    ballots: branches.into_iter().map(|(p, _)| (p, None)).collect(),
                }),
            },
        );
    }

    fn on_voted(
        &mut self,
        now_ms: i64,
        tx: TxId,
        participant: String,
        ballot: Ballot,
        out: &mut Vec<Cmd>,
    ) {
        let Some(t) = self.txs.get_mut(&tx) else {
            return;
        };
        let Phase::Voting(v) = &mut t.phase else {
            return;
        };
        let Some(slot) = v.ballots.iter_mut().find(|(p, _)| *p == participant) else {
            return; // not a participant of this transaction
        };
        if slot.1.is_some() {
            return; // a repeated answer; the first counts
        }
        slot.1 = Some(ballot);
        if v.ballots.iter().any(|(_, b)| b.is_none()) {
            return;
        }
        let ballots: Vec<(String, Ballot)> = v
            .ballots
            .iter()
            .map(|(p, b)| (p.clone(), b.clone().expect("all in")))
            .collect();
        let outcome = decide(&ballots);
        let rec = Record {
            tx,
            decision: outcome.decision,
            request_id: v.req.request_id.clone(),
            purchase: Some(v.req.clone()),
            reason: outcome.reason.clone(),
            deliver_to: outcome.deliver_to.clone(),
            pending: outcome.deliver_to.clone(),
            decided_at_ms: now_ms,
            completed_at_ms: None,
            votes: ballots.iter().map(|(p, b)| summarize(p, b)).collect(),
            delivery_attempts: 0,
        };
        let (req, asker) = (v.req.clone(), v.asker.clone());
        t.phase = Phase::Recording(Recording {
            req,
            asker,
            outcome,
        });
        out.push(Cmd::Record { rec });
    }

    fn on_recorded(&mut self, tx: TxId, result: Result<Recorded, LogError>, out: &mut Vec<Cmd>) {
        let Some(t) = self.txs.remove(&tx) else {
            return;
        };
        let Phase::Recording(r) = t.phase else {
            self.txs.insert(tx, t);
            return;
        };
        let conclusion = conclude(tx, result);
        let reason = match &conclusion.reply {
            Ok(reply) if reply.tx == tx.to_string() => reply.reason.as_ref().map(|r| r.code),
            Ok(_) => Some(Code::AlreadyExists),
            Err(e) => Some(e.code),
        };
        out.push(Cmd::Concluded {
            tx,
            decision: conclusion.deliver,
            reason,
            trace: t.trace.clone(),
        });
        let Some(decision) = conclusion.deliver else {
            // Unknown: nothing is delivered; participants in doubt ask.
            self.answer(&r.asker, conclusion.reply, out);
            return;
        };
        let pending = r.outcome.deliver_to.clone();
        let mut reply = conclusion.reply;
        let hold = self.config.reply_after == ReplyAfter::Delivery && !pending.is_empty();
        if let Ok(reply) = &mut reply {
            if reply.tx == tx.to_string() {
                // At the decision, "delivered" is true only with nobody to
                // tell; after the first round it says whether all acked.
                reply.delivered = pending.is_empty();
            }
        }
        let reply_after_first_round = if hold {
            Some((r.asker.clone(), reply))
        } else {
            self.answer(&r.asker, reply, out);
            None
        };
        if pending.is_empty() {
            return;
        }
        let mut d = Delivering {
            decision,
            pending,
            round: BTreeMap::new(),
            backoff: Backoff::new(self.config.retry_base_ms, self.config.retry_cap_ms),
            rounds: 0,
            reply_after_first_round,
            refusals: vec![],
        };
        Self::send_round(tx, &t.trace, &mut d, out);
        self.delivering += 1;
        self.txs.insert(
            tx,
            Tx {
                trace: t.trace,
                phase: Phase::Delivering(d),
            },
        );
    }

    fn send_round(tx: TxId, trace: &TraceContext, d: &mut Delivering, out: &mut Vec<Cmd>) {
        assert!(!d.pending.is_empty());
        d.rounds += 1;
        d.round = d.pending.iter().map(|p| (p.clone(), None)).collect();
        for p in &d.pending {
            out.push(Cmd::Decide {
                tx,
                participant: p.clone(),
                decision: d.decision,
                trace: trace.clone(),
            });
        }
    }

    fn on_delivered(
        &mut self,
        tx: TxId,
        participant: String,
        result: Delivery,
        out: &mut Vec<Cmd>,
    ) {
        let Some(t) = self.txs.get_mut(&tx) else {
            return;
        };
        let Phase::Delivering(d) = &mut t.phase else {
            return;
        };
        match d.round.get_mut(&participant) {
            Some(slot @ None) => *slot = Some(result),
            _ => return, // not asked in this round, or answered already
        }
        if d.round.values().any(Option::is_none) {
            return;
        }
        let mut acked = vec![];
        for (p, r) in std::mem::take(&mut d.round) {
            match r.expect("round complete") {
                Delivery::Acked => acked.push(p),
                Delivery::Refused(code, message) => {
                    let times = match d.refusals.iter_mut().find(|r| r.participant == p) {
                        Some(r) => {
                            r.times += 1;
                            r.code = code;
                            r.message = message;
                            r.times
                        }
                        None => {
                            d.refusals.push(Refusal {
                                participant: p.clone(),
                                code,
                                message,
                                times: 1,
                            });
                            1
                        }
                    };
                    if times == REFUSALS_BEFORE_ALERT {
                        let refusal = d
                            .refusals
                            .iter()
                            .find(|r| r.participant == p)
                            .expect("just counted")
                            .clone();
                        out.push(Cmd::Stuck {
                            tx,
                            decision: d.decision,
                            refusal,
                        });
                    }
                }
                Delivery::Failed => {}
            }
        }
        d.pending.retain(|p| !acked.contains(p));
        d.refusals.retain(|r| !acked.contains(&r.participant));
        if let Some((asker, mut reply)) = d.reply_after_first_round.take() {
            if let Ok(r) = &mut reply {
                if r.tx == tx.to_string() {
                    r.delivered = d.pending.is_empty();
                }
            }
            Self::answer_with(&mut self.keys, &asker, reply, out);
        }
        if !acked.is_empty() {
            out.push(Cmd::NoteAcks {
                tx,
                participants: acked,
                attempts: d.rounds,
            });
        }
        if d.pending.is_empty() {
            out.push(Cmd::DeliveredAll {
                tx,
                decision: d.decision,
                trace: t.trace.clone(),
            });
            self.txs.remove(&tx);
            self.delivering -= 1;
            return;
        }
        let delay = d.backoff.next_delay_with(&mut self.rng);
        out.push(Cmd::RetryAfter {
            tx,
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        });
    }

    fn on_retry_due(&mut self, tx: TxId, out: &mut Vec<Cmd>) {
        let Some(t) = self.txs.get_mut(&tx) else {
            return;
        };
        let Phase::Delivering(d) = &mut t.phase else {
            return;
        };
        if !d.round.is_empty() {
            return; // a round is outstanding already
        }
        Self::send_round(tx, &t.trace, d, out);
    }

    fn on_resume(&mut self, records: Vec<Record>, out: &mut Vec<Cmd>) {
        for rec in records {
            if rec.pending.is_empty() || self.txs.contains_key(&rec.tx) {
                continue;
            }
            let trace = TraceContext::root();
            let mut d = Delivering {
                decision: rec.decision,
                pending: rec.pending,
                round: BTreeMap::new(),
                backoff: Backoff::new(self.config.retry_base_ms, self.config.retry_cap_ms),
                rounds: rec.delivery_attempts,
                reply_after_first_round: None,
                refusals: vec![],
            };
            Self::send_round(rec.tx, &trace, &mut d, out);
            self.delivering += 1;
            self.txs.insert(
                rec.tx,
                Tx {
                    trace,
                    phase: Phase::Delivering(d),
                },
            );
        }
    }

    fn on_decision_query(
        &mut self,
        now_ms: i64,
        query: QueryId,
        tx: TxId,
        participant: String,
        out: &mut Vec<Cmd>,
    ) {
        // With no decision recorded, abort is recorded first, so that the
        // transaction can never commit (presumed abort).
        let rec = Record {
            tx,
            decision: Decision::Abort,
            request_id: None,
            purchase: None,
            reason: Some(AbortReason {
                participant: "coordinator".into(),
                code: Code::PresumedAbort,
                message: format!("{participant} asked before a decision was recorded"),
            }),
            deliver_to: vec![],
            pending: vec![],
            decided_at_ms: now_ms,
            completed_at_ms: None,
            votes: vec![],
            delivery_attempts: 0,
        };
        out.push(Cmd::RecordPresumedAbort { query, rec });
    }

    fn on_query_recorded(
        &mut self,
        query: QueryId,
        tx: TxId,
        result: Result<Recorded, LogError>,
        out: &mut Vec<Cmd>,
    ) {
        let reply = match result {
            Ok(Recorded::New(r) | Recorded::Existing(r)) => DecisionReply::Decided {
                tx,
                decision: r.decision,
            },
            Ok(Recorded::KeyTaken(_)) => unreachable!("a decision query carries no request id"),
            // Unknown: the participant asks again later.
            Err(e) => DecisionReply::Rejected {
                code: Code::Busy,
                message: e.to_string(),
            },
        };
        out.push(Cmd::Answer { query, reply });
    }

    fn answer(
        &mut self,
        asker: &Asker,
        reply: Result<PurchaseReply, ApiError>,
        out: &mut Vec<Cmd>,
    ) {
        Self::answer_with(&mut self.keys, asker, reply, out);
    }

    /// Replies to everyone waiting; a request id leaves the in-flight map
    /// here, after its outcome is durable (or nothing was decided), so a
    /// later retry finds it in the log.
    fn answer_with(
        keys: &mut HashMap<String, KeyInFlight>,
        asker: &Asker,
        reply: Result<PurchaseReply, ApiError>,
        out: &mut Vec<Cmd>,
    ) {
        match asker {
            Asker::Client(client) => out.push(Cmd::Reply {
                client: *client,
                reply,
            }),
            Asker::Key(key) => {
                let k = keys.remove(key).expect("an answered key is in flight");
                for (i, client) in k.waiting.into_iter().enumerate() {
                    let mut reply = reply.clone();
                    if i > 0 {
                        // Retries that waited for the first attempt.
                        if let Ok(r) = &mut reply {
                            r.duplicate = true;
                        }
                    }
                    out.push(Cmd::Reply { client, reply });
                }
            }
        }
    }

    /// Paired with every state change: what must always hold of the
    /// transaction an event touched (checking all of them at every step
    /// would make each step cost as much as the whole table).
    fn check_invariants(&self, tx: Option<TxId>) {
        let Some(t) = tx.and_then(|tx| self.txs.get(&tx)) else {
            return;
        };
        match &t.phase {
            Phase::Voting(Voting { asker, .. }) | Phase::Recording(Recording { asker, .. }) => {
                if let Asker::Key(k) = asker {
                    assert!(
                        self.keys.contains_key(k),
                        "a transaction's key is in flight"
                    );
                }
            }
            Phase::Delivering(d) => {
                assert!(!d.pending.is_empty(), "delivered transactions leave");
                assert!(d.round.keys().all(|p| d.pending.contains(p)));
            }
        }
    }
}
