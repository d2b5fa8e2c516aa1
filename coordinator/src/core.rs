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
//!   a new one is looked up in the log first (`on_submit`,
//!   `on_key_found`);
//! * every branch of a transaction is prepared in parallel, each at its
//!   participant with its own op, opaque here (`start`);
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
//! * a decision query is checked first: its subject names the sender and
//!   its body must name the same participant, its id must be a UUIDv7 not
//!   from the future (`DecisionQuery::check`), and a participant that is
//!   not a branch of a transaction known here (in phase 1, or in the log)
//!   is refused; a refused query writes nothing (`on_decision_query`,
//!   `is_branch`);
//! * a decision query for an undecided transaction records abort first
//!   (presumed abort), and is answered with whatever the log holds
//!   (`on_decision_query`, `on_query_recorded`);
//! * the transaction window: all yes past it records abort (`on_voted`);
//! * nothing of a transaction — a request-id claim, a decision, a presumed
//!   abort — is sent to the log later than half the retention after its
//!   start (`write_by_ms` on `Cmd::Record` and `Cmd::RecordPresumedAbort`;
//!   the log answers `TooLate` instead, and the outcome is unknown);
//! * a decision query up to that point records abort first (a commit
//!   write may still land); later it reads the log: a record answers, and
//!   no record means abort only once the transaction is older than the
//!   retention — no decision can land that late — and "ask again" before
//!   (`on_decision_query`, `on_decision_found`, `on_query_recorded`). With
//!   the participants refusing prepares past the window, this is what lets
//!   old records be collected (ARCHITECTURE.md, "The retention rule").

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::SeedableRng;
use twopc_common::backoff::Backoff;
use twopc_common::trace::TraceContext;
use twopc_schemas::api::{AbortReason, ApiError, Refusal, TxReply, VoteSummary};
use twopc_schemas::participant::ParticipantName;
use twopc_schemas::protocol::{Decision, DecisionQuery, DecisionReply, TxId, TxWindow, Vote};
use twopc_schemas::tx::{Op, Transaction};
use twopc_schemas::ClientName;
use twopc_schemas::Code;

use crate::config::ReplyAfter;
use crate::log::{LogError, Record, Recorded};
use crate::phase::{conclude, decide, reply_from_record, Ballot, Outcome};

/// Refusals in a row after which a delivery is reported as stuck (an error
/// in the log, the `twopc_decisions_refused` gauge, `refused_by` in
/// `shop.in_doubt`). Delivery still goes on: an operator may repair the
/// participant.
pub const REFUSALS_BEFORE_ALERT: u32 = 5;

/// Names a client waiting for a transaction's reply (the driver maps it to the
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
    /// The transaction window: no commit is recorded past it.
    pub window: TxWindow,
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
    /// A valid transaction (the driver checked its participants and the
    /// client's grant). `tx` is a fresh id the driver drew; it is used if
    /// this submission starts a transaction at once (no request id).
    Submit {
        client: ClientId,
        req: Transaction,
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
        participant: ParticipantName,
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
        participant: ParticipantName,
        result: Delivery,
    },
    /// The delay asked for by [`Cmd::RetryAfter`] is over.
    RetryDue { tx: TxId },
    /// At start: recorded decisions not acknowledged by every participant.
    Resume { records: Vec<Record> },
    /// A participant in doubt asks for the decision: the query as decoded,
    /// and the subject it came on, which names the sender.
    DecisionQuery {
        query: QueryId,
        subject: String,
        msg: DecisionQuery,
    },
    /// The log's answer to [`Cmd::LookUpDecision`].
    DecisionFound {
        query: QueryId,
        tx: TxId,
        participant: ParticipantName,
        found: Result<Option<Record>, LogError>,
    },
    /// The log's answer to [`Cmd::RecordPresumedAbort`].
    QueryRecorded {
        query: QueryId,
        tx: TxId,
        participant: ParticipantName,
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
        participant: ParticipantName,
        /// Who submitted the transaction; the participant learns it.
        client: ClientName,
        op: Op,
        trace: TraceContext,
    },
    /// Record the decision durably (first writer wins) →
    /// [`Event::Recorded`]. Nobody hears it before. `write_by_ms` is the
    /// wall-clock time after which the log must not send it any more
    /// ([`TxWindow::decision_write_by_ms`]); the log answers
    /// [`LogError::TooLate`] then, having sent nothing new.
    Record {
        rec: Record,
        write_by_ms: Option<i64>,
    },
    /// Read a transaction's decision, writing nothing →
    /// [`Event::DecisionFound`] (with `participant`, who asked).
    LookUpDecision {
        query: QueryId,
        tx: TxId,
        participant: ParticipantName,
    },
    /// Record abort unless a decision exists → [`Event::QueryRecorded`]
    /// (with `participant`, who asked); not sent after `write_by_ms`, as
    /// for [`Cmd::Record`].
    RecordPresumedAbort {
        query: QueryId,
        rec: Record,
        participant: ParticipantName,
        write_by_ms: Option<i64>,
    },
    /// Deliver a decision once → [`Event::Delivered`].
    Decide {
        tx: TxId,
        participant: ParticipantName,
        decision: Decision,
        trace: TraceContext,
    },
    /// Note acknowledgements in the log (losing this write only causes an
    /// idempotent redelivery after a restart).
    NoteAcks {
        tx: TxId,
        participants: Vec<ParticipantName>,
        attempts: u32,
    },
    /// Answer a transaction's client.
    Reply {
        client: ClientId,
        reply: Result<TxReply, ApiError>,
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
        req: Transaction,
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

/// A request id being served here: the transaction and who waits for it. The
/// first client is the one whose request started the attempt.
#[derive(Debug)]
struct KeyInFlight {
    req: Transaction,
    waiting: Vec<ClientId>,
}

/// Who hears a transaction's outcome.
#[derive(Debug, Clone)]
enum Asker {
    /// A transaction without a request id.
    Client(ClientId),
    /// Everyone waiting on this request id.
    Key(String),
}

#[derive(Debug)]
struct Voting {
    req: Transaction,
    asker: Asker,
    /// Each participant with its ballot, once in.
    ballots: Vec<(ParticipantName, Option<Ballot>)>,
}

#[derive(Debug)]
struct Recording {
    req: Transaction,
    asker: Asker,
    outcome: Outcome,
}

#[derive(Debug)]
struct Delivering {
    decision: Decision,
    /// Participants that have not acknowledged.
    pending: Vec<ParticipantName>,
    /// This round's answers (a round is outstanding while any is `None`).
    round: BTreeMap<ParticipantName, Option<Delivery>>,
    backoff: Backoff,
    /// Rounds sent so far.
    rounds: u32,
    /// A reply held until the first round ends (`ReplyAfter::Delivery`),
    /// and whether it is about this transaction.
    reply_after_first_round: Option<(Asker, Result<TxReply, ApiError>, bool)>,
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
    pub req: Transaction,
}

/// Whether `participant` is a branch of the transaction `rec` decided. A
/// presumed abort names no branches (nobody said who they were): anyone
/// asking hears abort, which is every branch's answer.
pub fn is_branch(rec: &Record, participant: &ParticipantName) -> bool {
    match &rec.transaction {
        Some(req) => req.branches.iter().any(|b| b.participant == *participant),
        None => true,
    }
}

/// The refusal of a decision query from a participant that is not a branch
/// of the transaction.
fn not_a_branch(query: QueryId, tx: TxId, participant: &ParticipantName) -> Cmd {
    Cmd::Answer {
        query,
        reply: DecisionReply::Rejected {
            code: Code::NotABranch,
            message: format!("{participant} is not a branch of {tx}"),
        },
    }
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
        // Nothing was started or changed; a replicated log that is electing
        // a leader answers again in seconds: retry.
        LogError::Failed(m) => ApiError::new(
            Code::Unavailable,
            format!("the decision log did not answer ({m}); nothing was started: retry"),
        ),
        LogError::TooLate => ApiError::new(
            Code::Unavailable,
            "the decision log answered too late; nothing was started: retry",
        ),
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
            Event::Submit { tx, .. }
            | Event::Voted { tx, .. }
            | Event::Recorded { tx, .. }
            | Event::Delivered { tx, .. }
            | Event::RetryDue { tx }
            | Event::QueryRecorded { tx, .. }
            | Event::DecisionFound { tx, .. } => Some(*tx),
            Event::DecisionQuery { msg, .. } => Some(msg.tx),
            Event::KeyFound { tx, .. } => Some(*tx),
            Event::Resume { .. } => None,
        };
        match event {
            Event::Submit {
                client,
                req,
                tx,
                trace,
            } => self.on_submit(client, req, tx, trace, &mut out),
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
                subject,
                msg,
            } => self.on_decision_query(now_ms, query, &subject, msg, &mut out),
            Event::QueryRecorded {
                query,
                tx,
                participant,
                result,
            } => self.on_query_recorded(query, tx, participant, result, &mut out),
            Event::DecisionFound {
                query,
                tx,
                participant,
                found,
            } => self.on_decision_found(now_ms, query, tx, participant, found, &mut out),
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

    /// Whether `tx` is in phase 1 here, and its transaction.
    pub fn in_phase_1(&self, tx: TxId) -> Option<Transaction> {
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

    fn on_submit(
        &mut self,
        client: ClientId,
        req: Transaction,
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
            if k.req.same_as(&req) {
                k.waiting.push(client);
            } else {
                out.push(Cmd::Reply {
                    client,
                    reply: Err(ApiError::new(
                        Code::Conflict,
                        format!("request_id {key:?} is in use by a different transaction"),
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
                let reply = if rec.transaction.as_ref().is_some_and(|p| !p.same_as(&req)) {
                    Err(ApiError::new(
                        Code::Conflict,
                        format!(
                            "request_id {key:?} was used for a different transaction (tx {})",
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
        req: Transaction,
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
        for b in &req.branches {
            out.push(Cmd::Prepare {
                tx,
                participant: b.participant.clone(),
                client: req.client.clone(),
                op: b.op.clone(),
                trace: trace.clone(),
            });
        }
        let ballots = req.participants().into_iter().map(|p| (p, None)).collect();
        self.txs.insert(
            tx,
            Tx {
                trace,
                phase: Phase::Voting(Voting {
                    req,
                    asker,
                    ballots,
                }),
            },
        );
    }

    fn on_voted(
        &mut self,
        now_ms: i64,
        tx: TxId,
        participant: ParticipantName,
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
        let ballots: Vec<(ParticipantName, Ballot)> = v
            .ballots
            .iter()
            .map(|(p, b)| (p.clone(), b.clone().expect("all in")))
            .collect();
        let mut outcome = decide(&ballots);
        if outcome.decision == Decision::Commit && self.config.window.expired(tx, now_ms) {
            // Too late to commit: a participant may have given up on it and
            // its rows may be collected (the retention rule). Everyone voted
            // yes, so everyone hears the abort.
            outcome.decision = Decision::Abort;
            outcome.reason = Some(AbortReason {
                participant: "coordinator".into(),
                code: Code::Expired,
                message: format!(
                    "all voted yes, but later than {} ms after the transaction began",
                    self.config.window.window_ms
                ),
            });
        }
        let rec = Record {
            tx,
            decision: outcome.decision,
            request_id: v.req.request_id.clone(),
            transaction: Some(v.req.clone()),
            reason: outcome.reason.clone(),
            deliver_to: outcome.deliver_to.clone(),
            pending: outcome.deliver_to.clone(),
            decided_at_ms: now_ms,
            completed_at_ms: None,
            votes: ballots
                .iter()
                .map(|(p, b)| summarize(p.as_str(), b))
                .collect(),
            delivery_attempts: 0,
        };
        let (req, asker) = (v.req.clone(), v.asker.clone());
        // Nothing of this attempt — its request-id claim, its decision — is
        // sent after the deadline: a claim sent later could land after the
        // key's first transaction was collected (found by the simulation:
        // a retry stalled past it bound the key a second time).
        let write_by_ms = self.config.window.decision_write_by_ms(tx);
        t.phase = Phase::Recording(Recording {
            req,
            asker,
            outcome,
        });
        out.push(Cmd::Record { rec, write_by_ms });
    }

    fn on_recorded(&mut self, tx: TxId, result: Result<Recorded, LogError>, out: &mut Vec<Cmd>) {
        let Some(t) = self.txs.remove(&tx) else {
            return;
        };
        if !matches!(t.phase, Phase::Recording(_)) {
            self.txs.insert(tx, t);
            return;
        }
        let Phase::Recording(r) = t.phase else {
            unreachable!("checked above");
        };
        // Whether the reply is about this transaction (not the key's holder).
        let own = !matches!(&result, Ok(Recorded::KeyTaken(_)));
        // The key is another transaction's: its outcome is this transaction's
        // only if it is the same transaction (another replica may have served
        // the first attempt, so the in-flight check missed it).
        let other_txn = match &result {
            Ok(Recorded::KeyTaken(holder)) => holder
                .transaction
                .as_ref()
                .filter(|p| !p.same_as(&r.req))
                .map(|_| holder.tx),
            _ => None,
        };
        let mut conclusion = conclude(tx, result);
        if let Some(holder) = other_txn {
            let key = r.req.request_id.clone().unwrap_or_default();
            conclusion.reply = Err(ApiError::new(
                Code::Conflict,
                format!("request_id {key:?} was used for a different transaction (tx {holder})"),
            ));
        }
        let reason = match &conclusion.reply {
            Ok(reply) if own => reply.reason.as_ref().map(|r| r.code),
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
            if own {
                // At the decision, "delivered" is true only with nobody to
                // tell; after the first round it says whether all acked.
                reply.delivered = pending.is_empty();
            }
        }
        let reply_after_first_round = if hold {
            Some((r.asker.clone(), reply, own))
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
        participant: ParticipantName,
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
                    let times = match d.refusals.iter_mut().find(|r| r.participant == p.as_str()) {
                        Some(r) => {
                            r.times += 1;
                            r.code = code;
                            r.message = message;
                            r.times
                        }
                        None => {
                            d.refusals.push(Refusal {
                                participant: p.to_string(),
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
                            .find(|r| r.participant == p.as_str())
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
        d.refusals
            .retain(|r| !acked.iter().any(|a| a == r.participant.as_str()));
        if let Some((asker, mut reply, own)) = d.reply_after_first_round.take() {
            if let Ok(r) = &mut reply {
                if own {
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
        subject: &str,
        msg: DecisionQuery,
        out: &mut Vec<Cmd>,
    ) {
        // The sender, the id and its age: a refused query writes nothing.
        if let Err(refused) = msg.check(subject, now_ms, &self.config.window) {
            out.push(Cmd::Answer {
                query,
                reply: DecisionReply::Rejected {
                    code: refused.code,
                    message: refused.message,
                },
            });
            return;
        }
        let DecisionQuery { tx, participant } = msg;
        // A transaction in phase 1 here knows its branches; anyone else
        // asking must not be able to abort it by presumption.
        if let Some(req) = self.in_phase_1(tx) {
            if !req.branches.iter().any(|b| b.participant == participant) {
                out.push(not_a_branch(query, tx, &participant));
                return;
            }
        }
        let write_by_ms = self.config.window.decision_write_by_ms(tx);
        if write_by_ms.is_none_or(|by| now_ms > by) {
            // Too late to write anything for it: read. What a record says
            // answers; absence means abort only past the retention, when no
            // decision write can land any more (they are sent within half
            // of it, and land within the other half less the skew, or
            // never); before, the participant asks again (see the
            // retention rule). A flood of queries for old ids writes
            // nothing.
            out.push(Cmd::LookUpDecision {
                query,
                tx,
                participant,
            });
            return;
        }
        // With no decision recorded, abort is recorded first, so that the
        // transaction can never commit (presumed abort). A transaction
        // unknown here may be another replica's, or one whose coordinator
        // died in phase 1: who its branches are is not known, and a branch
        // that prepared needs this abort to ever finish. So any
        // participant may cause it (the subject check above says which
        // participant did); the record is collected like any other.
        let rec = Record {
            tx,
            decision: Decision::Abort,
            request_id: None,
            transaction: None,
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
        out.push(Cmd::RecordPresumedAbort {
            query,
            rec,
            participant,
            write_by_ms,
        });
    }

    fn on_query_recorded(
        &mut self,
        query: QueryId,
        tx: TxId,
        participant: ParticipantName,
        result: Result<Recorded, LogError>,
        out: &mut Vec<Cmd>,
    ) {
        let reply = match result {
            // An existing record was there first: nothing was written, and
            // a participant that is not one of its branches learns nothing.
            Ok(Recorded::Existing(r)) if !is_branch(&r, &participant) => {
                out.push(not_a_branch(query, tx, &participant));
                return;
            }
            Ok(Recorded::New(r) | Recorded::Existing(r)) => DecisionReply::Decided {
                tx,
                decision: r.decision,
            },
            // A decision query carries no request id, so no key can be
            // taken; were one, the participant would learn nothing and ask
            // again: no assertion a store's answer can reach.
            Ok(Recorded::KeyTaken(_)) => DecisionReply::Rejected {
                code: Code::Internal,
                message: "the decision log answered about a request id".into(),
            },
            // Unknown (or too late to write, then it reads next time): the
            // participant asks again later.
            Err(e) => DecisionReply::Rejected {
                code: Code::Busy,
                message: e.to_string(),
            },
        };
        out.push(Cmd::Answer { query, reply });
    }

    fn on_decision_found(
        &mut self,
        now_ms: i64,
        query: QueryId,
        tx: TxId,
        participant: ParticipantName,
        found: Result<Option<Record>, LogError>,
        out: &mut Vec<Cmd>,
    ) {
        let reply = match found {
            Ok(Some(r)) if !is_branch(&r, &participant) => {
                out.push(not_a_branch(query, tx, &participant));
                return;
            }
            Ok(Some(r)) => DecisionReply::Decided {
                tx,
                decision: r.decision,
            },
            Ok(None) if self.config.window.past_retention(tx, now_ms) => DecisionReply::Decided {
                tx,
                decision: Decision::Abort,
            },
            // A decision may still land: neither abort nor commit yet.
            Ok(None) => DecisionReply::Rejected {
                code: Code::Busy,
                message: format!(
                    "no decision recorded for {tx} yet, and too late to record one: ask again \
                     once it is older than the retention"
                ),
            },
            Err(e) => DecisionReply::Rejected {
                code: Code::Busy,
                message: e.to_string(),
            },
        };
        out.push(Cmd::Answer { query, reply });
    }

    fn answer(&mut self, asker: &Asker, reply: Result<TxReply, ApiError>, out: &mut Vec<Cmd>) {
        Self::answer_with(&mut self.keys, asker, reply, out);
    }

    /// Replies to everyone waiting; a request id leaves the in-flight map
    /// here, after its outcome is durable (or nothing was decided), so a
    /// later retry finds it in the log.
    fn answer_with(
        keys: &mut HashMap<String, KeyInFlight>,
        asker: &Asker,
        reply: Result<TxReply, ApiError>,
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

#[cfg(test)]
mod tests {
    //! Every coordinator rule, event by event, with explicit time and a
    //! seeded random source: no NATS, no SQLite.
    use super::*;
    use twopc_schemas::participant;

    const NOW: i64 = 1_000;

    fn core(reply_after: ReplyAfter) -> Core {
        Core::new(CoreConfig {
            retry_base_ms: 100,
            retry_cap_ms: 1_000,
            reply_after,
            seed: 7,
            window: TxWindow::DEFAULT,
        })
    }

    fn trace() -> TraceContext {
        TraceContext {
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            span_id: "b7ad6b7169203331".into(),
        }
    }

    fn book(key: Option<&str>) -> Transaction {
        book_of(2, key)
    }

    /// A purchase of `qty` books as its transaction.
    fn book_of(qty: u64, key: Option<&str>) -> Transaction {
        twopc_schemas::tx::purchase(
            &ClientName::new("web").unwrap(),
            &twopc_schemas::api::PurchaseRequest {
                user: "alice".into(),
                sku: "book-1".into(),
                qty,
                amount: 2_500,
                request_id: key.map(Into::into),
            },
        )
    }

    fn purchase(client: ClientId, req: Transaction, tx: TxId) -> Event {
        Event::Submit {
            client,
            req,
            tx,
            trace: trace(),
        }
    }

    fn voted(tx: TxId, p: &str, ballot: Ballot) -> Event {
        Event::Voted {
            tx,
            participant: ParticipantName::new(p).unwrap(),
            ballot,
        }
    }

    fn yes() -> Ballot {
        Ballot::Voted(Vote::Yes)
    }

    fn delivered(tx: TxId, p: &str, result: Delivery) -> Event {
        Event::Delivered {
            tx,
            participant: ParticipantName::new(p).unwrap(),
            result,
        }
    }

    /// The record a `Cmd::Record` in `cmds` asks to write.
    fn record_of(cmds: &[Cmd]) -> Record {
        cmds.iter()
            .find_map(|c| match c {
                Cmd::Record { rec, .. } => Some(rec.clone()),
                _ => None,
            })
            .expect("a Record command")
    }

    fn replies(cmds: &[Cmd]) -> Vec<(ClientId, Result<TxReply, ApiError>)> {
        cmds.iter()
            .filter_map(|c| match c {
                Cmd::Reply { client, reply } => Some((*client, reply.clone())),
                _ => None,
            })
            .collect()
    }

    fn decides(cmds: &[Cmd]) -> Vec<(ParticipantName, Decision)> {
        cmds.iter()
            .filter_map(|c| match c {
                Cmd::Decide {
                    participant,
                    decision,
                    ..
                } => Some((participant.clone(), *decision)),
                _ => None,
            })
            .collect()
    }

    fn prepares(cmds: &[Cmd]) -> Vec<(ParticipantName, String)> {
        cmds.iter()
            .filter_map(|c| match c {
                Cmd::Prepare {
                    participant,
                    op,
                    client,
                    ..
                } => {
                    assert_eq!(client.as_str(), "web");
                    Some((participant.clone(), op.to_string()))
                }
                _ => None,
            })
            .collect()
    }

    /// A purchase without a request id through both votes; returns the
    /// commands of the last vote (the `Record`).
    fn through_votes(c: &mut Core, tx: TxId, wallet: Ballot, order: Ballot) -> Vec<Cmd> {
        c.step(NOW, purchase(1, book(None), tx));
        assert!(c.step(NOW, voted(tx, "wallet", wallet)).is_empty());
        c.step(NOW + 5, voted(tx, "order", order))
    }

    #[test]
    fn a_purchase_prepares_a_debit_and_a_reservation_in_parallel() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let cmds = c.step(NOW, purchase(1, book(None), tx));
        assert!(matches!(cmds[0], Cmd::Begun { tx: t, .. } if t == tx));
        assert_eq!(
            prepares(&cmds),
            vec![
                (
                    participant::WALLET,
                    r#"{"amount":2500,"user":"alice"}"#.to_owned()
                ),
                (
                    participant::ORDER,
                    r#"{"amount":2500,"qty":2,"sku":"book-1","user":"alice"}"#.to_owned()
                ),
            ]
        );
        assert_eq!(c.active().len(), 1);
        assert_eq!(c.in_phase_1(tx), Some(book(None)));
    }

    #[test]
    fn nothing_is_heard_before_the_decision_is_recorded() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let cmds = through_votes(&mut c, tx, yes(), yes());
        assert_eq!(cmds.len(), 1, "only the Record: {cmds:?}");
        let rec = record_of(&cmds);
        assert_eq!(rec.decision, Decision::Commit);
        assert_eq!(rec.decided_at_ms, NOW + 5, "explicit time is recorded");
        assert_eq!(rec.deliver_to, vec!["wallet", "order"]);
        assert_eq!(rec.votes.len(), 2);
    }

    #[test]
    fn a_commit_is_answered_at_the_decision_then_delivered_until_acknowledged() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let rec = record_of(&through_votes(&mut c, tx, yes(), yes()));
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::New(rec)),
            },
        );
        let r = replies(&cmds);
        assert_eq!(r.len(), 1);
        let reply = r[0].1.clone().unwrap();
        assert_eq!(reply.outcome, twopc_schemas::api::Outcome::Committed);
        assert!(!reply.delivered, "delivery is still to come");
        assert_eq!(
            decides(&cmds),
            vec![
                (participant::WALLET, Decision::Commit),
                (participant::ORDER, Decision::Commit)
            ]
        );
        assert!(c
            .step(NOW, delivered(tx, "wallet", Delivery::Acked))
            .is_empty());
        let cmds = c.step(NOW, delivered(tx, "order", Delivery::Acked));
        assert!(cmds.contains(&Cmd::NoteAcks {
            tx,
            participants: vec![participant::ORDER, participant::WALLET],
            attempts: 1
        }));
        assert!(matches!(cmds.last(), Some(Cmd::DeliveredAll { .. })));
        assert_eq!(c.delivering(), 0);
    }

    /// Any number of branches at any participants: each prepared with its
    /// own op and the client's name; one no vote aborts them all, and the
    /// abort goes to those that voted yes (or did not answer).
    #[test]
    fn every_branch_of_a_transaction_is_prepared_and_one_no_aborts_all() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let branch = |p: &str, op: &str| twopc_schemas::tx::Branch {
            participant: ParticipantName::new(p).unwrap(),
            op: Op::parse(op.as_bytes()).unwrap(),
        };
        let txn = Transaction {
            client: ClientName::new("web").unwrap(),
            branches: vec![
                branch("wallet", r#"{"user":"al","amount":5}"#),
                branch("order", r#"{"user":"al","sku":"b","qty":1,"amount":5}"#),
                branch("shipping", r#"{"slot":"mon-9","qty":1}"#),
            ],
            request_id: None,
        };
        let cmds = c.step(NOW, purchase(1, txn.clone(), tx));
        let sent = prepares(&cmds);
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[2].0.as_str(), "shipping");
        assert_eq!(sent[2].1, r#"{"qty":1,"slot":"mon-9"}"#);
        assert!(c.step(NOW, voted(tx, "wallet", yes())).is_empty());
        assert!(c.step(NOW, voted(tx, "order", Ballot::TimedOut)).is_empty());
        let no = Ballot::Voted(Vote::No {
            code: Code::OutOfStock,
            message: "no slot".into(),
        });
        let rec = record_of(&c.step(NOW, voted(tx, "shipping", no)));
        assert_eq!(rec.decision, Decision::Abort);
        assert_eq!(rec.deliver_to, vec!["wallet", "order"]);
        assert_eq!(rec.transaction, Some(txn));
        assert_eq!(rec.votes.len(), 3);
    }

    #[test]
    fn a_no_vote_aborts_and_only_the_yes_voter_hears_it() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let no = Ballot::Voted(Vote::No {
            code: Code::InsufficientFunds,
            message: "poor".into(),
        });
        let rec = record_of(&through_votes(&mut c, tx, no, yes()));
        assert_eq!(rec.decision, Decision::Abort);
        assert_eq!(rec.deliver_to, vec!["order"]);
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::New(rec)),
            },
        );
        let reply = replies(&cmds)[0].1.clone().unwrap();
        assert_eq!(reply.reason.unwrap().code, Code::InsufficientFunds);
        assert_eq!(decides(&cmds), vec![(participant::ORDER, Decision::Abort)]);
    }

    #[test]
    fn a_silent_participant_still_hears_the_abort() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let rec = record_of(&through_votes(&mut c, tx, Ballot::TimedOut, yes()));
        assert_eq!(rec.decision, Decision::Abort);
        assert_eq!(rec.deliver_to, vec!["wallet", "order"]);
    }

    #[test]
    fn nobody_to_tell_means_delivered_at_once() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let rec = record_of(&through_votes(
            &mut c,
            tx,
            Ballot::NoResponders,
            Ballot::NoResponders,
        ));
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::New(rec)),
            },
        );
        assert!(replies(&cmds)[0].1.as_ref().unwrap().delivered);
        assert!(decides(&cmds).is_empty());
        assert_eq!(c.delivering(), 0);
        assert!(c.active().is_empty());
    }

    #[test]
    fn repeated_and_stray_votes_change_nothing() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        c.step(NOW, purchase(1, book(None), tx));
        assert!(c.step(NOW, voted(tx, "wallet", yes())).is_empty());
        assert!(c
            .step(NOW, voted(tx, "wallet", Ballot::TimedOut))
            .is_empty());
        assert!(c.step(NOW, voted(tx, "mallory", yes())).is_empty());
        assert!(c
            .step(NOW, voted(TxId::now_v7(), "order", yes()))
            .is_empty());
        let rec = record_of(&c.step(NOW, voted(tx, "order", yes())));
        assert_eq!(
            rec.decision,
            Decision::Commit,
            "the first wallet vote counts"
        );
    }

    // --- request ids ---

    #[test]
    fn a_new_key_is_looked_up_before_anything_starts() {
        let mut c = core(ReplyAfter::Decision);
        let cmds = c.step(NOW, purchase(1, book(Some("k")), TxId::now_v7()));
        assert_eq!(cmds, vec![Cmd::LookUpKey { key: "k".into() }]);
        assert!(c.active().is_empty());
    }

    #[test]
    fn a_retry_in_flight_waits_and_hears_the_first_outcome_as_a_duplicate() {
        let mut c = core(ReplyAfter::Decision);
        c.step(NOW, purchase(1, book(Some("k")), TxId::now_v7()));
        assert!(c
            .step(NOW, purchase(2, book(Some("k")), TxId::now_v7()))
            .is_empty());
        let tx = TxId::now_v7();
        let cmds = c.step(
            NOW,
            Event::KeyFound {
                key: "k".into(),
                found: Ok(None),
                tx,
            },
        );
        assert_eq!(prepares(&cmds).len(), 2);
        assert!(c
            .step(NOW, purchase(3, book(Some("k")), TxId::now_v7()))
            .is_empty());
        c.step(NOW, voted(tx, "wallet", yes()));
        let rec = record_of(&c.step(NOW, voted(tx, "order", yes())));
        assert_eq!(rec.request_id.as_deref(), Some("k"));
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::New(rec)),
            },
        );
        let r = replies(&cmds);
        assert_eq!(r.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![1, 2, 3]);
        for (client, reply) in r {
            let reply = reply.unwrap();
            assert_eq!(reply.tx, tx.to_string());
            assert_eq!(reply.duplicate, client != 1);
        }
        // The key has left the in-flight map: a later retry asks the log.
        assert_eq!(
            c.step(NOW, purchase(4, book(Some("k")), TxId::now_v7())),
            vec![Cmd::LookUpKey { key: "k".into() }]
        );
    }

    #[test]
    fn a_key_in_flight_with_another_purchase_is_a_conflict() {
        let mut c = core(ReplyAfter::Decision);
        c.step(NOW, purchase(1, book(Some("k")), TxId::now_v7()));
        let other = book_of(3, Some("k"));
        let r = replies(&c.step(NOW, purchase(2, other, TxId::now_v7())));
        assert_eq!(r[0].0, 2);
        assert_eq!(r[0].1.as_ref().unwrap_err().code, Code::Conflict);
    }

    #[test]
    fn a_bound_key_answers_its_record_and_starts_nothing() {
        let mut c = core(ReplyAfter::Decision);
        c.step(NOW, purchase(1, book(Some("k")), TxId::now_v7()));
        let first = TxId::now_v7();
        let mut rec = record_for(first, Decision::Abort, Some("k"));
        rec.transaction = Some(book(Some("k")));
        let cmds = c.step(
            NOW,
            Event::KeyFound {
                key: "k".into(),
                found: Ok(Some(rec.clone())),
                tx: TxId::now_v7(),
            },
        );
        let r = replies(&cmds)[0].1.clone().unwrap();
        assert_eq!((r.tx, r.duplicate), (first.to_string(), true));
        assert!(prepares(&cmds).is_empty());

        // The same key for a different purchase: conflict.
        let other = book_of(1, Some("k"));
        c.step(NOW, purchase(2, other, TxId::now_v7()));
        let cmds = c.step(
            NOW,
            Event::KeyFound {
                key: "k".into(),
                found: Ok(Some(rec)),
                tx: TxId::now_v7(),
            },
        );
        assert_eq!(
            replies(&cmds)[0].1.as_ref().unwrap_err().code,
            Code::Conflict
        );
    }

    #[test]
    fn a_failed_lookup_starts_nothing_and_says_so() {
        let mut c = core(ReplyAfter::Decision);
        c.step(NOW, purchase(1, book(Some("k")), TxId::now_v7()));
        let cmds = c.step(
            NOW,
            Event::KeyFound {
                key: "k".into(),
                found: Err(LogError::Busy),
                tx: TxId::now_v7(),
            },
        );
        assert_eq!(replies(&cmds)[0].1.as_ref().unwrap_err().code, Code::Busy);
        assert!(c.active().is_empty());
    }

    use crate::phase::tests::record as record_for;

    /// Keyed purchase through its votes; returns its tx and the record.
    fn keyed_through_votes(c: &mut Core) -> (TxId, Record) {
        c.step(NOW, purchase(1, book(Some("k")), TxId::now_v7()));
        let tx = TxId::now_v7();
        c.step(
            NOW,
            Event::KeyFound {
                key: "k".into(),
                found: Ok(None),
                tx,
            },
        );
        c.step(NOW, voted(tx, "wallet", yes()));
        let rec = record_of(&c.step(NOW, voted(tx, "order", yes())));
        (tx, rec)
    }

    #[test]
    fn issue_8_a_presumed_abort_recorded_first_is_the_keys_final_outcome() {
        let mut c = core(ReplyAfter::Decision);
        let (tx, _) = keyed_through_votes(&mut c);
        // The log bound the key to the presumed abort in the same write.
        let existing = record_for(tx, Decision::Abort, Some("k"));
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::Existing(existing)),
            },
        );
        let reply = replies(&cmds)[0].1.clone().unwrap();
        assert_eq!(reply.outcome, twopc_schemas::api::Outcome::Aborted);
        assert_eq!(reply.request_id.as_deref(), Some("k"));
        assert_eq!(reply.reason.unwrap().code, Code::PresumedAbort);
        // Both voted yes and may hold: both hear the abort.
        assert_eq!(
            decides(&cmds),
            vec![
                (participant::WALLET, Decision::Abort),
                (participant::ORDER, Decision::Abort)
            ]
        );
    }

    #[test]
    fn a_key_taken_by_another_transaction_aborts_this_one_and_answers_the_first() {
        let mut c = core(ReplyAfter::Decision);
        let (tx, _) = keyed_through_votes(&mut c);
        let holder = TxId::now_v7();
        let mut h = record_for(holder, Decision::Commit, Some("k"));
        h.reason = None;
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::KeyTaken(h)),
            },
        );
        let reply = replies(&cmds)[0].1.clone().unwrap();
        assert_eq!((reply.tx, reply.duplicate), (holder.to_string(), true));
        assert_eq!(
            decides(&cmds),
            vec![
                (participant::WALLET, Decision::Abort),
                (participant::ORDER, Decision::Abort)
            ]
        );
    }

    #[test]
    fn a_log_failure_is_unknown_never_aborted_and_nothing_is_delivered() {
        let mut c = core(ReplyAfter::Decision);
        let (tx, _) = keyed_through_votes(&mut c);
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Err(LogError::Busy),
            },
        );
        let e = replies(&cmds)[0].1.clone().unwrap_err();
        assert_eq!(e.code, Code::OutcomeUnknown);
        assert!(decides(&cmds).is_empty());
        assert!(matches!(cmds[0], Cmd::Concluded { decision: None, .. }));
        // The key is free again: a retry asks the log.
        assert_eq!(
            c.step(NOW, purchase(2, book(Some("k")), TxId::now_v7())),
            vec![Cmd::LookUpKey { key: "k".into() }]
        );
    }

    // --- reply after delivery ---

    #[test]
    fn reply_after_delivery_waits_for_the_first_round() {
        let mut c = core(ReplyAfter::Delivery);
        let tx = TxId::now_v7();
        let rec = record_of(&through_votes(&mut c, tx, yes(), yes()));
        let cmds = c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::New(rec)),
            },
        );
        assert!(replies(&cmds).is_empty());
        c.step(NOW, delivered(tx, "wallet", Delivery::Acked));
        let cmds = c.step(NOW, delivered(tx, "order", Delivery::Failed));
        let reply = replies(&cmds)[0].1.clone().unwrap();
        assert!(!reply.delivered, "the order service did not acknowledge");
        assert!(matches!(cmds.last(), Some(Cmd::RetryAfter { .. })));
    }

    // --- delivery ---

    #[test]
    fn delivery_retries_only_the_silent_with_growing_capped_delays() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let rec = record_of(&through_votes(&mut c, tx, yes(), yes()));
        c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::New(rec)),
            },
        );
        c.step(NOW, delivered(tx, "wallet", Delivery::Acked));
        let mut delays = vec![];
        let mut cmds = c.step(NOW, delivered(tx, "order", Delivery::Failed));
        for _ in 0..8 {
            let Some(Cmd::RetryAfter { delay_ms, .. }) = cmds.last().cloned() else {
                panic!("{cmds:?}")
            };
            delays.push(delay_ms);
            // A retry due while nothing is outstanding sends one round, to
            // the one that has not acknowledged.
            let round = c.step(NOW, Event::RetryDue { tx });
            assert_eq!(
                decides(&round),
                vec![(participant::ORDER, Decision::Commit)]
            );
            assert!(
                c.step(NOW, Event::RetryDue { tx }).is_empty(),
                "one round at a time"
            );
            cmds = c.step(NOW, delivered(tx, "order", Delivery::Failed));
        }
        let ceilings = [100, 200, 400, 800, 1_000, 1_000, 1_000, 1_000];
        for (d, ceiling) in delays.iter().zip(ceilings) {
            assert!(*d >= ceiling / 2 && *d <= ceiling, "{delays:?}");
        }
        let cmds = {
            c.step(NOW, Event::RetryDue { tx });
            c.step(NOW, delivered(tx, "order", Delivery::Acked))
        };
        assert!(cmds.contains(&Cmd::NoteAcks {
            tx,
            participants: vec![participant::ORDER],
            attempts: 10
        }));
    }

    #[test]
    fn a_participant_refusing_again_and_again_is_reported_once() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let rec = record_of(&through_votes(&mut c, tx, yes(), yes()));
        c.step(
            NOW,
            Event::Recorded {
                tx,
                result: Ok(Recorded::New(rec)),
            },
        );
        c.step(NOW, delivered(tx, "wallet", Delivery::Acked));
        let refuse = || {
            delivered(
                tx,
                "order",
                Delivery::Refused(Code::Conflict, "aborted".into()),
            )
        };
        let mut stuck = 0;
        for i in 1..=REFUSALS_BEFORE_ALERT + 3 {
            if i > 1 {
                c.step(NOW, Event::RetryDue { tx });
            }
            let cmds = c.step(NOW, refuse());
            stuck += cmds
                .iter()
                .filter(|c| matches!(c, Cmd::Stuck { .. }))
                .count();
            assert_eq!(c.refusals(tx)[0].times, i);
        }
        assert_eq!(stuck, 1);
        assert_eq!(c.refusals(tx)[0].code, Code::Conflict);
        c.step(NOW, Event::RetryDue { tx });
        c.step(NOW, delivered(tx, "order", Delivery::Acked));
        assert!(c.refusals(tx).is_empty());
        assert_eq!(c.delivering(), 0);
    }

    #[test]
    fn undelivered_decisions_are_delivered_again_after_a_restart() {
        let mut c = core(ReplyAfter::Decision);
        let tx = TxId::now_v7();
        let mut rec = record_for(tx, Decision::Commit, None);
        rec.reason = None;
        rec.deliver_to = vec![participant::WALLET, participant::ORDER];
        rec.pending = vec![participant::ORDER];
        rec.delivery_attempts = 3;
        let done = record_for(TxId::now_v7(), Decision::Abort, None);
        let cmds = c.step(
            NOW,
            Event::Resume {
                records: vec![rec, done],
            },
        );
        assert_eq!(decides(&cmds), vec![(participant::ORDER, Decision::Commit)]);
        assert_eq!(c.delivering(), 1);
        let cmds = c.step(NOW, delivered(tx, "order", Delivery::Acked));
        assert!(cmds.contains(&Cmd::NoteAcks {
            tx,
            participants: vec![participant::ORDER],
            attempts: 4
        }));
    }

    // --- decision queries ---

    /// `participant` asks about `tx` on its own subject.
    fn ask(query: QueryId, tx: TxId, participant: &ParticipantName) -> Event {
        Event::DecisionQuery {
            query,
            subject: twopc_schemas::subjects::decision_query(participant),
            msg: DecisionQuery {
                tx,
                participant: participant.clone(),
            },
        }
    }

    /// The code of the one `Rejected` answer in `cmds`, which must be all
    /// there is: nothing written, nothing looked up.
    fn refusal_code(cmds: &[Cmd]) -> Code {
        match cmds {
            [Cmd::Answer {
                reply: DecisionReply::Rejected { code, message },
                ..
            }] => {
                assert!(!message.is_empty());
                *code
            }
            other => panic!("expected one refusal and nothing else: {other:?}"),
        }
    }

    #[test]
    fn a_query_whose_body_names_another_participant_than_its_subject_is_refused() {
        let mut c = core(ReplyAfter::Decision);
        let tx = tx_at(NOW);
        // The wallet's connection may publish only on its own subject, and
        // names the order service in the body.
        let forged = Event::DecisionQuery {
            query: 1,
            subject: twopc_schemas::subjects::decision_query(&participant::WALLET),
            msg: DecisionQuery {
                tx,
                participant: participant::ORDER,
            },
        };
        assert_eq!(refusal_code(&c.step(NOW, forged)), Code::WrongSender);
        let nowhere = Event::DecisionQuery {
            query: 2,
            subject: "twopc.decision".into(),
            msg: DecisionQuery {
                tx,
                participant: participant::WALLET,
            },
        };
        assert_eq!(refusal_code(&c.step(NOW, nowhere)), Code::WrongSender);
    }

    #[test]
    fn a_query_with_an_id_that_is_not_a_recent_uuidv7_is_refused() {
        let mut c = core(ReplyAfter::Decision);
        let skew = TxWindow::DEFAULT.max_skew_ms;
        for (tx, code) in [
            (TxId::nil(), Code::BadTxId),
            (
                TxId::from_u128(0x0193_0000_0000_4000_8000_0000_0000_002a),
                Code::BadTxId,
            ),
            (tx_at(NOW + skew + 1), Code::TxInFuture),
            (tx_at(NOW + 3_600_000), Code::TxInFuture),
        ] {
            assert_eq!(
                refusal_code(&c.step(NOW, ask(1, tx, &participant::WALLET))),
                code,
                "{tx}"
            );
        }
        // Within the skew it is a fresh transaction, presumed aborted.
        assert!(matches!(
            c.step(NOW, ask(2, tx_at(NOW + skew), &participant::WALLET))
                .as_slice(),
            [Cmd::RecordPresumedAbort { query: 2, .. }]
        ));
    }

    #[test]
    fn a_participant_that_is_not_a_branch_of_a_known_transaction_is_refused() {
        let ledger = ParticipantName::new("ledger").unwrap();
        let mut c = core(ReplyAfter::Decision);
        // In phase 1 here: refused before anything is written.
        let tx = tx_at(NOW);
        c.step(NOW, purchase(1, book(None), tx));
        assert_eq!(
            refusal_code(&c.step(NOW, ask(2, tx, &ledger))),
            Code::NotABranch
        );
        assert_eq!(c.in_phase_1(tx), Some(book(None)));
        // Decided (the record was there first, so the presumed abort wrote
        // nothing): refused too.
        let rec = record_of(&through_votes(&mut c, tx_at(NOW + 1), yes(), yes()));
        let existing = Event::QueryRecorded {
            query: 3,
            tx: rec.tx,
            participant: ledger.clone(),
            result: Ok(Recorded::Existing(rec.clone())),
        };
        assert_eq!(refusal_code(&c.step(NOW, existing)), Code::NotABranch);
        let found = Event::DecisionFound {
            query: 4,
            tx: rec.tx,
            participant: ledger.clone(),
            found: Ok(Some(rec.clone())),
        };
        assert_eq!(refusal_code(&c.step(NOW, found)), Code::NotABranch);
        // A branch of it hears the decision.
        let cmds = c.step(
            NOW,
            Event::DecisionFound {
                query: 5,
                tx: rec.tx,
                participant: participant::ORDER,
                found: Ok(Some(rec.clone())),
            },
        );
        assert_eq!(
            cmds,
            vec![Cmd::Answer {
                query: 5,
                reply: DecisionReply::Decided {
                    tx: rec.tx,
                    decision: Decision::Commit
                }
            }]
        );
    }

    #[test]
    fn a_query_for_an_unknown_transaction_presumes_abort_whoever_asks() {
        // Nobody here knows its branches (another replica's, or its
        // coordinator died in phase 1), and a branch that prepared needs
        // the abort: the query records it. The subject check says who
        // asked; the retention rule collects the record.
        let ledger = ParticipantName::new("ledger").unwrap();
        let mut c = core(ReplyAfter::Decision);
        let tx = tx_at(NOW);
        let cmds = c.step(NOW, ask(1, tx, &ledger));
        let [Cmd::RecordPresumedAbort {
            query: 1,
            rec,
            participant,
            ..
        }] = cmds.as_slice()
        else {
            panic!("{cmds:?}")
        };
        assert_eq!(participant, &ledger);
        // A presumed abort names no branches: everyone asking hears abort.
        for p in [ledger.clone(), participant::WALLET] {
            let cmds = c.step(
                NOW,
                Event::QueryRecorded {
                    query: 2,
                    tx,
                    participant: p,
                    result: Ok(Recorded::Existing(rec.clone())),
                },
            );
            assert_eq!(
                cmds,
                vec![Cmd::Answer {
                    query: 2,
                    reply: DecisionReply::Decided {
                        tx,
                        decision: Decision::Abort
                    }
                }]
            );
        }
    }

    #[test]
    fn a_decision_query_records_abort_unless_decided_and_answers_the_log() {
        let mut c = core(ReplyAfter::Decision);
        let tx = tx_at(NOW);
        let cmds = c.step(NOW, ask(9, tx, &participant::WALLET));
        let [Cmd::RecordPresumedAbort { query: 9, rec, .. }] = cmds.as_slice() else {
            panic!("{cmds:?}")
        };
        assert_eq!(
            (rec.tx, rec.decision, rec.request_id.clone()),
            (tx, Decision::Abort, None)
        );
        assert_eq!(rec.reason.as_ref().unwrap().code, Code::PresumedAbort);
        assert!(rec.deliver_to.is_empty());

        let mut commit = record_for(tx, Decision::Commit, None);
        commit.reason = None;
        let cmds = c.step(
            NOW,
            Event::QueryRecorded {
                query: 9,
                tx,
                participant: participant::WALLET,
                result: Ok(Recorded::Existing(commit)),
            },
        );
        assert_eq!(
            cmds,
            vec![Cmd::Answer {
                query: 9,
                reply: DecisionReply::Decided {
                    tx,
                    decision: Decision::Commit
                }
            }]
        );
        let cmds = c.step(
            NOW,
            Event::QueryRecorded {
                query: 10,
                tx,
                participant: participant::WALLET,
                result: Err(LogError::Busy),
            },
        );
        assert!(matches!(
            cmds.as_slice(),
            [Cmd::Answer {
                query: 10,
                reply: DecisionReply::Rejected {
                    code: Code::Busy,
                    ..
                }
            }]
        ));
    }

    #[test]
    fn a_decision_query_during_phase_1_does_not_disturb_the_attempt() {
        let mut c = core(ReplyAfter::Decision);
        let tx = tx_at(NOW);
        c.step(NOW, purchase(1, book(None), tx));
        let cmds = c.step(NOW, ask(1, tx, &participant::WALLET));
        assert!(matches!(
            cmds.as_slice(),
            [Cmd::RecordPresumedAbort { query: 1, .. }]
        ));
        assert_eq!(c.in_phase_1(tx), Some(book(None)));
    }

    /// A UUIDv7 made at `ms`.
    fn tx_at(ms: i64) -> TxId {
        uuid::Builder::from_unix_timestamp_millis(ms as u64, &[7; 10]).into_uuid()
    }

    #[test]
    fn all_yes_past_the_window_aborts_and_tells_everyone() {
        let mut c = core(ReplyAfter::Decision);
        let w = TxWindow::DEFAULT.window_ms;
        let tx = tx_at(NOW);
        c.step(NOW, purchase(1, book(None), tx));
        c.step(NOW + w, voted(tx, "wallet", yes()));
        // One millisecond inside the window the same votes commit...
        let inside = tx_at(NOW + 1);
        c.step(NOW + 1, purchase(2, book(None), inside));
        c.step(NOW + 1, voted(inside, "wallet", yes()));
        let rec = record_of(&c.step(NOW + w, voted(inside, "order", yes())));
        assert_eq!(rec.decision, Decision::Commit);
        // ...and past it they abort, delivered to both (both are prepared).
        let rec = record_of(&c.step(NOW + w + 1, voted(tx, "order", yes())));
        assert_eq!(rec.decision, Decision::Abort);
        assert_eq!(rec.reason.as_ref().unwrap().code, Code::Expired);
        assert_eq!(rec.deliver_to.len(), 2);
    }

    /// Issue 18, finding 1: past the window a decision write may still be
    /// in flight (decisions are sent until half the retention), so a query
    /// past the window records abort first, as within it; after that it
    /// reads, and takes absence for abort only past the retention.
    #[test]
    fn a_decision_query_records_abort_first_until_half_the_retention() {
        let mut c = core(ReplyAfter::Decision);
        let (w, h) = (TxWindow::DEFAULT.window_ms, TxWindow::DEFAULT.retention_ms);
        let tx = tx_at(NOW);
        let cmds = c.step(NOW + w + 1, ask(9, tx, &participant::WALLET));
        assert!(
            matches!(&cmds[..], [Cmd::RecordPresumedAbort { query: 9, rec, write_by_ms, .. }]
                if rec.decision == Decision::Abort && rec.tx == tx
                    && *write_by_ms == Some(NOW + h / 2)),
            "{cmds:?}"
        );
        // Past half the retention: read, nothing written...
        let lookup = |q| Cmd::LookUpDecision {
            query: q,
            tx,
            participant: participant::WALLET,
        };
        assert_eq!(
            c.step(NOW + h / 2 + 1, ask(10, tx, &participant::WALLET)),
            vec![lookup(10)]
        );
        let found = |q| Event::DecisionFound {
            query: q,
            tx,
            participant: participant::WALLET,
            found: Ok(None),
        };
        // ...and absence is not yet abort: a decision may still land.
        let cmds = c.step(NOW + h / 2 + 2, found(10));
        assert!(
            matches!(
                &cmds[..],
                [Cmd::Answer {
                    query: 10,
                    reply: DecisionReply::Rejected {
                        code: Code::Busy,
                        ..
                    }
                }]
            ),
            "{cmds:?}"
        );
        // Past the retention no decision can land: absence is abort.
        assert_eq!(
            c.step(NOW + h + 1, ask(11, tx, &participant::WALLET)),
            vec![lookup(11)]
        );
        assert_eq!(
            c.step(NOW + h + 2, found(11)),
            vec![Cmd::Answer {
                query: 11,
                reply: DecisionReply::Decided {
                    tx,
                    decision: Decision::Abort
                }
            }]
        );
    }

    /// Every decision carries the time after which it must not be sent;
    /// one the log could not send in time leaves the outcome unknown.
    #[test]
    fn a_decision_too_late_to_write_is_unknown() {
        let mut c = core(ReplyAfter::Decision);
        let tx = tx_at(NOW);
        c.step(NOW, purchase(1, book(None), tx));
        c.step(NOW, voted(tx, "wallet", yes()));
        let cmds = c.step(NOW, voted(tx, "order", yes()));
        let by = cmds.iter().find_map(|c| match c {
            Cmd::Record { write_by_ms, .. } => Some(*write_by_ms),
            _ => None,
        });
        assert_eq!(by, Some(Some(NOW + TxWindow::DEFAULT.retention_ms / 2)));
        let cmds = c.step(
            NOW + 1,
            Event::Recorded {
                tx,
                result: Err(LogError::TooLate),
            },
        );
        let r = replies(&cmds);
        assert_eq!(r[0].1.as_ref().unwrap_err().code, Code::OutcomeUnknown);
        assert!(decides(&cmds).is_empty(), "nothing is delivered");
    }

    /// Issue 18, finding 7: a key taken on another replica by a different
    /// purchase is a conflict, not that purchase's outcome.
    #[test]
    fn a_key_taken_elsewhere_by_another_purchase_is_a_conflict() {
        let mut c = core(ReplyAfter::Decision);
        let (tx, _) = keyed_through_votes(&mut c);
        let other = book_of(7, Some("k"));
        let holder = Record {
            tx: tx_at(NOW - 5),
            decision: Decision::Commit,
            request_id: Some("k".into()),
            transaction: Some(other),
            reason: None,
            deliver_to: vec![],
            pending: vec![],
            decided_at_ms: NOW,
            completed_at_ms: Some(NOW),
            votes: vec![],
            delivery_attempts: 0,
        };
        let cmds = c.step(
            NOW + 2,
            Event::Recorded {
                tx,
                result: Ok(Recorded::KeyTaken(holder)),
            },
        );
        let r = replies(&cmds);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1.as_ref().unwrap_err().code, Code::Conflict);
        // This attempt is aborted (it must not commit), as before.
        assert!(decides(&cmds).iter().all(|(_, d)| *d == Decision::Abort));
    }
}
