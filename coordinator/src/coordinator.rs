//! The coordinator's driver: NATS and the decision log around [`phase`].
//!
//! Subjects served (queue group `twopc-coordinator`):
//! * `shop.purchase` — public JSON purchase → JSON reply;
//! * `shop.tx` — public JSON status of one transaction;
//! * `twopc.decision` — participants' in-doubt queries (postcard).
//!
//! A purchase: phase 1 (prepare to every participant in parallel, each with
//! the prepare timeout) → decision → durable record → phase 2 (deliver to
//! every participant that may have prepared, retried with capped, jittered
//! backoff until acknowledged, also across restarts) → reply to the client
//! after the first delivery round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn, Instrument};
use twopc_common::backoff::Backoff;
use twopc_common::fault::crash_point;
use twopc_common::now_ms;
use twopc_schemas::api::{
    AbortReason, ApiError, CoordinatorInDoubt, Delivery, PurchaseReply, PurchaseRequest, Refusal,
    TxQuery, TxStatus, Undelivered, VoteSummary,
};
use twopc_schemas::protocol::{
    self, BranchOp, Decide, DecideReply, Decision, DecisionQuery, DecisionReply, Prepare, TxId,
    Vote,
};
use twopc_schemas::{subjects, Code};

use crate::config::{CoordinatorArgs, ReplyAfter};
use crate::log::{DecisionLog, LogError, Record, Recorded, SqliteLog};
use crate::phase::{conclude, decide, reply_from_record, Ballot};
use twopc_common::micro::Registry;
use twopc_common::serve::{serve, Endpoint, Response};
use twopc_common::trace::TraceContext;

const SERVICE: &str = "coordinator";

/// Refusals in a row after which a delivery is reported as stuck (an error
/// in the log, the `twopc_decisions_refused` gauge). Delivery still goes on:
/// an operator may repair the participant.
pub const REFUSALS_BEFORE_ALERT: u32 = 5;

/// What one delivery attempt got.
enum Delivered {
    Acked,
    /// The participant answered, and refused.
    Refused(Code, String),
    /// No answer (timeout, no responders, a reply that does not decode).
    Failed,
}

/// Counters for the status page (Prometheus has the same and more).
#[derive(Debug, Default)]
pub struct Counts {
    pub begun: std::sync::atomic::AtomicU64,
    pub committed: std::sync::atomic::AtomicU64,
    pub aborted: std::sync::atomic::AtomicU64,
}

/// A purchase in flight under a request id: what it buys, and its answer
/// once there is one.
type InFlight = (
    PurchaseRequest,
    watch::Receiver<Option<Result<PurchaseReply, ApiError>>>,
);

/// The coordinator's shared state.
pub struct Coordinator<L: DecisionLog> {
    /// The durable decision log.
    log: L,
    /// Connection to NATS.
    client: Client,
    /// Flags and environment.
    args: CoordinatorArgs,
    /// Service-protocol identity and statistics (`nats micro`).
    registry: Arc<Registry>,
    /// Decisions made by this process since it started, for the status page.
    pub counts: Counts,
    /// Transactions in phase 1 here, for status queries. Not durable: after
    /// a crash they have no record and are aborted by presumption.
    active: Mutex<HashMap<TxId, PurchaseRequest>>,
    /// Request ids whose purchase is in flight here, with the reply to come,
    /// so a client retry waits for the first attempt instead of racing it.
    requests: Mutex<HashMap<String, InFlight>>,
    /// Deliveries that participants refuse, by transaction, so that a
    /// decision refused again and again is visible (`shop.in_doubt`, the
    /// status page) instead of retried silently. Not durable: refusals are
    /// counted again after a restart.
    refusals: Mutex<HashMap<TxId, Vec<Refusal>>>,
}

fn same_purchase(a: &PurchaseRequest, b: &PurchaseRequest) -> bool {
    a.user == b.user && a.sku == b.sku && a.qty == b.qty && a.amount == b.amount
}

impl<L: DecisionLog> Coordinator<L> {
    pub fn new(
        log: L,
        client: Client,
        args: CoordinatorArgs,
        registry: Arc<Registry>,
    ) -> Arc<Self> {
        Arc::new(Coordinator {
            log,
            client,
            args,
            registry,
            counts: Counts::default(),
            active: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            refusals: Mutex::new(HashMap::new()),
        })
    }

    /// Serves until the NATS client closes or a task fails.
    pub async fn serve(self: Arc<Self>) -> anyhow::Result<()> {
        self.clone().resume_deliveries().await?;
        let queue = subjects::queue_group(SERVICE);
        let endpoint = |name: &'static str, subject: &str, busy: Response| Endpoint {
            client: self.client.clone(),
            registry: self.registry.clone(),
            name,
            subject: subject.into(),
            queue: queue.clone(),
            max_inflight: self.args.max_inflight,
            busy,
        };
        let busy_json =
            Response::api_error(&ApiError::new(Code::Busy, "too many purchases in flight"));
        let busy_decision = Response::error(
            protocol::encode(&DecisionReply::Rejected {
                code: Code::Busy,
                message: "coordinator is at its in-flight limit".into(),
            }),
            503,
            "busy: coordinator is at its in-flight limit",
        );
        let c = self.clone();
        let purchase = serve(
            endpoint("purchase", subjects::PURCHASE, busy_json.clone()),
            move |m| {
                let c = c.clone();
                async move { c.on_purchase(m).await }
            },
        );
        let c = self.clone();
        let status = serve(
            endpoint("tx-status", subjects::TX_STATUS, busy_json),
            move |m| {
                let c = c.clone();
                async move { c.on_tx_status(m.payload).await }
            },
        );
        let c = self.clone();
        let decision = serve(
            endpoint("decision-query", subjects::DECISION_QUERY, busy_decision),
            move |m| {
                let c = c.clone();
                async move { c.on_decision_query(m.payload).await }
            },
        );
        let c = self.clone();
        let in_doubt_busy =
            Response::api_error(&ApiError::new(Code::Busy, "too many requests in flight"));
        let in_doubt = serve(
            endpoint("in-doubt", subjects::IN_DOUBT, in_doubt_busy),
            move |_m| {
                let c = c.clone();
                async move { Response::json(c.in_doubt().await) }
            },
        );
        info!(faults = ?twopc_common::fault::armed(), "coordinator serving");
        tokio::try_join!(purchase, status, decision, in_doubt)?;
        Ok(())
    }

    /// What this coordinator has not finished: transactions in phase 1 and
    /// decisions not yet acknowledged by every participant.
    pub async fn in_doubt(&self) -> Result<CoordinatorInDoubt, ApiError> {
        let in_progress = self
            .active
            .lock()
            .expect("lock")
            .keys()
            .map(|t| t.to_string())
            .collect();
        let undelivered = self
            .log
            .incomplete()
            .await
            .map_err(log_error)?
            .into_iter()
            .map(|r| Undelivered {
                tx: r.tx.to_string(),
                decision: r.decision.as_str().into(),
                pending: r.pending,
                decided_at_ms: r.decided_at_ms,
                refused_by: self
                    .refusals
                    .lock()
                    .expect("lock")
                    .get(&r.tx)
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        Ok(CoordinatorInDoubt {
            in_progress,
            undelivered,
        })
    }

    pub fn log(&self) -> &L {
        &self.log
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// After a restart: every recorded decision not yet acknowledged by all
    /// its participants is delivered again.
    async fn resume_deliveries(self: Arc<Self>) -> anyhow::Result<()> {
        let incomplete = self.log.incomplete().await?;
        if !incomplete.is_empty() {
            info!(
                count = incomplete.len(),
                "resuming delivery of recorded decisions"
            );
        }
        for rec in incomplete {
            let (done, _) = oneshot::channel();
            let span = tracing::info_span!("tx", tx = %rec.tx);
            tokio::spawn(
                self.clone()
                    .deliver(
                        rec.tx,
                        rec.decision,
                        rec.pending,
                        done,
                        TraceContext::root(),
                    )
                    .instrument(span),
            );
        }
        Ok(())
    }

    async fn on_purchase(self: Arc<Self>, msg: async_nats::Message) -> Response {
        // Continue the client's trace, or start one for this purchase.
        let trace =
            TraceContext::from_headers(msg.headers.as_ref()).unwrap_or_else(TraceContext::root);
        let mut req = match PurchaseRequest::parse(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                info!(code = %e.code, message = %e.message, "purchase refused");
                return Response::api_error(&e);
            }
        };
        if twopc_common::fault::broken("forget_request_ids") {
            // DELIBERATELY BROKEN (tests only): ignore the idempotency key, so a re-send runs a new transaction.
            req.request_id = None;
        }
        let reply = match req.request_id.clone() {
            None => self.transact(req, trace).await,
            Some(rid) => self.transact_once(rid, req, trace).await,
        };
        Response::json(reply)
    }

    /// A purchase with a request id: at most one transaction per id commits,
    /// and every retry gets the first outcome.
    async fn transact_once(
        self: Arc<Self>,
        rid: String,
        req: PurchaseRequest,
        trace: TraceContext,
    ) -> Result<PurchaseReply, ApiError> {
        let first = {
            let mut requests = self.requests.lock().expect("lock");
            match requests.get(&rid) {
                Some((first, rx)) => Err((first.clone(), rx.clone())),
                None => {
                    let (tx, rx) = watch::channel(None);
                    requests.insert(rid.clone(), (req.clone(), rx));
                    Ok(tx)
                }
            }
        };
        let sender = match first {
            Ok(sender) => sender,
            Err((first, mut rx)) => {
                if !same_purchase(&first, &req) {
                    return Err(ApiError::new(
                        Code::Conflict,
                        format!("request_id {rid:?} is in use by a different purchase"),
                    ));
                }
                // The first attempt is still running here: wait for it.
                info!(request_id = %rid, "retry of a purchase in flight; waiting for it");
                let r = rx.wait_for(|r| r.is_some()).await;
                return match r {
                    Ok(r) => r.clone().expect("waited for Some").map(|mut reply| {
                        reply.duplicate = true;
                        reply
                    }),
                    Err(_) => Err(ApiError::new(
                        Code::OutcomeUnknown,
                        "the first attempt of this request ended without an answer; \
                         retry with the same request_id",
                    )),
                };
            }
        };
        let result = match self.log.by_request_id(rid.clone()).await {
            Ok(Some(rec)) => {
                if rec
                    .purchase
                    .as_ref()
                    .is_some_and(|p| !same_purchase(p, &req))
                {
                    Err(ApiError::new(
                        Code::Conflict,
                        format!(
                            "request_id {rid:?} was used for a different purchase (tx {})",
                            rec.tx
                        ),
                    ))
                } else {
                    info!(request_id = %rid, tx = %rec.tx, "repeated request; returning the first outcome");
                    Ok(reply_from_record(&rec, true))
                }
            }
            Ok(None) => self.clone().transact(req, trace).await,
            // Nothing started: the caller may retry.
            Err(e) => Err(log_error(e)),
        };
        // Waiting retries hear the same answer, an error included. The key
        // is bound durably (or nothing was decided) before it leaves the
        // in-flight map, so a later retry finds it in the log.
        let _ = sender.send(Some(result.clone()));
        self.requests.lock().expect("lock").remove(&rid);
        result
    }

    /// One transaction, start to reply.
    async fn transact(
        self: Arc<Self>,
        req: PurchaseRequest,
        trace: TraceContext,
    ) -> Result<PurchaseReply, ApiError> {
        let tx = TxId::now_v7();
        metrics::counter!("twopc_transactions_begun_total").increment(1);
        self.counts
            .begun
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = tracing::info_span!("tx", %tx, trace_id = %trace.trace_id);
        self.active.lock().expect("lock").insert(tx, req.clone());
        let reply = self
            .clone()
            .run_phases(tx, req, trace)
            .instrument(span)
            .await;
        self.active.lock().expect("lock").remove(&tx);
        reply
    }

    async fn run_phases(
        self: Arc<Self>,
        tx: TxId,
        req: PurchaseRequest,
        trace: TraceContext,
    ) -> Result<PurchaseReply, ApiError> {
        info!(user = %req.user, sku = %req.sku, qty = req.qty, amount = req.amount, request_id = ?req.request_id, "transaction begun");
        let branches = [
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
        ];
        let started = std::time::Instant::now();
        // Phase 1: all prepares in parallel, each bounded by the timeout.
        let ballots = futures::future::join_all(branches.into_iter().map(|(name, op)| {
            let c = self.clone();
            let trace = trace.clone();
            async move {
                let ballot = c.prepare(&name, tx, op, &trace).await;
                (name, ballot)
            }
        }))
        .await;
        for (name, ballot) in &ballots {
            info!(participant = %name, ?ballot, "vote");
        }
        crash_point("coordinator.phase1.after_votes");
        let phase1_us = started.elapsed().as_micros() as u64;
        metrics::histogram!("twopc_prepare_seconds").record(started.elapsed().as_secs_f64());

        let outcome = decide(&ballots);
        let rec = Record {
            tx,
            decision: outcome.decision,
            request_id: req.request_id.clone(),
            purchase: Some(req),
            reason: outcome.reason.clone(),
            deliver_to: outcome.deliver_to.clone(),
            pending: outcome.deliver_to.clone(),
            decided_at_ms: now_ms(),
            completed_at_ms: None,
            votes: ballots.iter().map(|(p, b)| summarize(p, b)).collect(),
            delivery_attempts: 0,
        };
        // Durable point: `record` returns after the decision is fsynced (or
        // after finding an earlier decision, which wins, with the request id
        // bound to it in the same fsynced write). Nothing below may run
        // before it: no participant and no client hears a decision that is
        // not durable. (The one abort delivered without a record of its own
        // is a presumed abort, which needs none; see `conclude`.)
        let recorded = self.log.record(rec).await;
        match &recorded {
            Ok(Recorded::New(_)) => {}
            Ok(Recorded::Existing(_)) => warn!(
                "a participant asked for the decision during phase 1; the transaction is aborted"
            ),
            Ok(Recorded::KeyTaken(other)) => {
                warn!(other = %other.tx, "request id taken by another transaction; this one aborts")
            }
            Err(e) => error!(
                error = %e,
                "decision not recorded; the outcome is unknown until a participant asks"
            ),
        }
        let conclusion = conclude(tx, recorded);
        crash_point("coordinator.decision.after_durable");
        metrics::histogram!("twopc_decision_seconds")
            .record(started.elapsed().as_secs_f64() - phase1_us as f64 / 1e6);
        match conclusion.deliver {
            Some(Decision::Commit) => {
                self.counts
                    .committed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!("twopc_transactions_committed_total").increment(1)
            }
            Some(Decision::Abort) => {
                self.counts
                    .aborted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let reason = match &conclusion.reply {
                    Ok(r) if r.tx == tx.to_string() => r.reason.as_ref().map(|r| r.code),
                    _ => Some(Code::AlreadyExists),
                };
                metrics::counter!(
                    "twopc_transactions_aborted_total",
                    "reason" => reason.map_or("none", |c| c.as_str())
                )
                .increment(1)
            }
            None => metrics::counter!("twopc_transactions_outcome_unknown_total").increment(1),
        }
        tracing::debug!(
            phase1_us,
            decision_us = started.elapsed().as_micros() as u64 - phase1_us,
            "timings"
        );
        let Some(decision) = conclusion.deliver else {
            return conclusion.reply;
        };
        info!(decision = decision.as_str(), "decision durable");

        // Phase 2 runs on its own task until every participant has the
        // decision; the client hears back now (the decision is durable) or
        // after the first delivery round, as configured.
        let (done, first_round) = oneshot::channel();
        let nothing_to_deliver = outcome.deliver_to.is_empty();
        tokio::spawn(
            self.clone()
                .deliver(tx, decision, outcome.deliver_to, done, trace.clone())
                .in_current_span(),
        );
        let delivered = match self.args.reply_after {
            ReplyAfter::Decision => nothing_to_deliver,
            ReplyAfter::Delivery => first_round.await.unwrap_or(false),
        };
        metrics::histogram!("twopc_purchase_seconds").record(started.elapsed().as_secs_f64());
        conclusion.reply.map(|mut reply| {
            if reply.tx == tx.to_string() {
                reply.delivered = delivered;
            }
            reply
        })
    }

    async fn prepare(
        &self,
        participant: &str,
        tx: TxId,
        op: BranchOp,
        trace: &TraceContext,
    ) -> Ballot {
        let request = async_nats::Request::new()
            .headers(trace.child().headers())
            .payload(protocol::encode(&Prepare { tx, op }).into());
        let timeout = Duration::from_millis(self.args.prepare_timeout_ms);
        // Bounded even while disconnected, so phase 1 always ends (in a
        // durable decision) within the prepare timeout plus a margin.
        match twopc_common::nats::request(
            &self.client,
            subjects::prepare(participant),
            request,
            timeout,
        )
        .await
        {
            Ok(msg) => match protocol::decode::<Vote>(&msg.payload) {
                Ok(vote) => Ballot::Voted(vote),
                Err(e) => Ballot::Garbled(e.to_string()),
            },
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Ballot::NoResponders,
            // A timeout, or a connection lost mid-request: the prepare may
            // have arrived. Unknown, so the participant must hear the abort.
            Err(_) => Ballot::TimedOut,
        }
    }

    /// Phase 2 for one transaction: delivers `decision` to `participants`
    /// until each acknowledges. `first_round` learns whether the first round
    /// reached everyone.
    async fn deliver(
        self: Arc<Self>,
        tx: TxId,
        decision: Decision,
        participants: Vec<String>,
        first_round: oneshot::Sender<bool>,
        trace: TraceContext,
    ) {
        let mut first_round = Some(first_round);
        let mut pending = participants;
        let undelivered = metrics::gauge!("twopc_decisions_undelivered");
        if !pending.is_empty() {
            undelivered.increment(1);
        }
        let mut backoff = Backoff::new(
            self.args.retry_base_ms.max(1),
            self.args.retry_cap_ms.max(self.args.retry_base_ms.max(1)),
        );
        loop {
            if pending.is_empty() {
                if let Some(f) = first_round.take() {
                    let _ = f.send(true);
                }
                return;
            }
            let results = futures::future::join_all(
                pending
                    .iter()
                    .map(|p| self.send_decision(p, tx, decision, &trace)),
            )
            .await;
            let mut acked: Vec<String> = vec![];
            for (p, result) in pending.iter().zip(results) {
                match result {
                    Delivered::Acked => acked.push(p.clone()),
                    Delivered::Refused(code, message) => {
                        self.note_refusal(tx, decision, p, code, message)
                    }
                    Delivered::Failed => {}
                }
            }
            self.forget_refusals(tx, &acked);
            pending.retain(|p| !acked.contains(p));
            // The client need not wait for the acknowledgements to be noted:
            // losing that write only causes an idempotent redelivery.
            if let Some(f) = first_round.take() {
                let _ = f.send(pending.is_empty());
            }
            if !acked.is_empty() {
                crash_point("coordinator.phase2.after_ack");
                if let Err(e) = self.log.acked(tx, acked, backoff.attempt() + 1).await {
                    warn!(error = %e, "acknowledgement not noted; a restart will redeliver");
                }
            }
            if pending.is_empty() {
                info!(
                    decision = decision.as_str(),
                    "decision delivered to every participant"
                );
                undelivered.decrement(1);
                return;
            }
            let delay = backoff.next_delay();
            metrics::counter!("twopc_delivery_retries_total").increment(1);
            warn!(
                ?pending,
                attempt = backoff.attempt(),
                delay_ms = delay.as_millis() as u64,
                "decision not acknowledged; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Counts a participant's refusal of `decision`; past
    /// [`REFUSALS_BEFORE_ALERT`] in a row the delivery is reported as stuck.
    fn note_refusal(
        &self,
        tx: TxId,
        decision: Decision,
        participant: &str,
        code: Code,
        message: String,
    ) {
        metrics::counter!(
            "twopc_deliveries_refused_total",
            "participant" => participant.to_owned(),
            "code" => code.as_str()
        )
        .increment(1);
        let mut all = self.refusals.lock().expect("lock");
        let list = all.entry(tx).or_default();
        let times = match list.iter_mut().find(|r| r.participant == participant) {
            Some(r) => {
                r.times += 1;
                r.code = code;
                r.message = message.clone();
                r.times
            }
            None => {
                list.push(Refusal {
                    participant: participant.to_owned(),
                    code,
                    message: message.clone(),
                    times: 1,
                });
                1
            }
        };
        if times == REFUSALS_BEFORE_ALERT {
            metrics::gauge!("twopc_decisions_refused").increment(1);
            error!(
                %participant,
                decision = decision.as_str(),
                %code,
                %message,
                times,
                "participant keeps refusing the recorded decision; delivery goes on, \
                 but it needs an operator (see twopc in-doubt)"
            );
        }
    }

    /// Acknowledged at last: the participants' refusals are over.
    fn forget_refusals(&self, tx: TxId, acked: &[String]) {
        let mut all = self.refusals.lock().expect("lock");
        let Some(list) = all.get_mut(&tx) else {
            return;
        };
        list.retain(|r| {
            let over = acked.contains(&r.participant);
            if over && r.times >= REFUSALS_BEFORE_ALERT {
                metrics::gauge!("twopc_decisions_refused").decrement(1);
            }
            !over
        });
        if list.is_empty() {
            all.remove(&tx);
        }
    }

    /// One delivery attempt.
    async fn send_decision(
        &self,
        participant: &str,
        tx: TxId,
        decision: Decision,
        trace: &TraceContext,
    ) -> Delivered {
        let request = async_nats::Request::new()
            .headers(trace.child().headers())
            .payload(protocol::encode(&Decide { tx, decision }).into());
        let timeout = Duration::from_millis(self.args.decide_timeout_ms);
        match twopc_common::nats::request(
            &self.client,
            subjects::decide(participant),
            request,
            timeout,
        )
        .await
        {
            Ok(msg) => match protocol::decode::<DecideReply>(&msg.payload) {
                Ok(DecideReply::Ack) => Delivered::Acked,
                Ok(DecideReply::Rejected { code, message }) => {
                    if matches!(code, Code::Conflict | Code::UnknownTx) {
                        warn!(%participant, %code, %message, "participant contradicts the recorded decision; will retry");
                    } else {
                        warn!(%participant, %code, %message, "decision refused; will retry");
                    }
                    Delivered::Refused(code, message)
                }
                Err(e) => {
                    warn!(%participant, error = %e, "acknowledgement does not decode");
                    Delivered::Failed
                }
            },
            Err(e) => {
                warn!(%participant, error = %e, "decision delivery failed; will retry");
                Delivered::Failed
            }
        }
    }

    /// A participant in doubt asks for the decision. With none recorded, the
    /// answer is abort, recorded first so the transaction can never commit.
    async fn on_decision_query(self: Arc<Self>, payload: Bytes) -> Response {
        let q = match protocol::decode::<DecisionQuery>(&payload) {
            Ok(q) => q,
            Err(e) => {
                warn!(error = %e, "rejected decision query that does not decode");
                let body = protocol::encode(&DecisionReply::Rejected {
                    code: Code::BadMessage,
                    message: e.to_string(),
                });
                return Response::error(body, 400, format!("bad_message: {e}"));
            }
        };
        let rec = Record {
            tx: q.tx,
            decision: Decision::Abort,
            request_id: None,
            purchase: None,
            reason: Some(AbortReason {
                participant: SERVICE.into(),
                code: Code::PresumedAbort,
                message: format!("{} asked before a decision was recorded", q.participant),
            }),
            deliver_to: vec![],
            pending: vec![],
            decided_at_ms: now_ms(),
            completed_at_ms: None,
            votes: vec![],
            delivery_attempts: 0,
        };
        let reply = match self.log.record(rec).await {
            Ok(Recorded::New(r)) => {
                info!(tx = %q.tx, participant = %q.participant, "no decision recorded; recorded abort (presumed abort)");
                DecisionReply::Decided {
                    tx: q.tx,
                    decision: r.decision,
                }
            }
            Ok(Recorded::Existing(r)) => {
                info!(tx = %q.tx, participant = %q.participant, decision = r.decision.as_str(), "answered decision query");
                DecisionReply::Decided {
                    tx: q.tx,
                    decision: r.decision,
                }
            }
            Ok(Recorded::KeyTaken(_)) => {
                unreachable!("a decision query carries no request id")
            }
            Err(e) => DecisionReply::Rejected {
                code: Code::Busy,
                message: e.to_string(),
            },
        };
        match &reply {
            DecisionReply::Decided { .. } => Response::ok(protocol::encode(&reply)),
            DecisionReply::Rejected { code, message } => Response::error(
                protocol::encode(&reply),
                twopc_common::serve::status_of(*code),
                format!("{code}: {message}"),
            ),
        }
    }

    async fn on_tx_status(self: Arc<Self>, payload: Bytes) -> Response {
        let tx = match TxQuery::parse(&payload) {
            Ok(tx) => tx,
            Err(e) => return Response::api_error(&e),
        };
        if let Some(p) = self.active.lock().expect("lock").get(&tx).cloned() {
            let status = TxStatus {
                tx: tx.to_string(),
                state: "in_progress".into(),
                request_id: p.request_id.clone(),
                purchase: Some(p),
                reason: None,
                deliveries: vec![],
                decided_at_ms: None,
                completed_at_ms: None,
                votes: vec![],
                delivery_attempts: 0,
            };
            return Response::ok(serde_json::to_vec(&status).expect("serialises"));
        }
        match self.log.get(tx).await {
            Ok(rec) => {
                let status = match rec {
                    None => TxStatus {
                        tx: tx.to_string(),
                        state: "unknown".into(),
                        request_id: None,
                        purchase: None,
                        reason: None,
                        deliveries: vec![],
                        decided_at_ms: None,
                        completed_at_ms: None,
                        votes: vec![],
                        delivery_attempts: 0,
                    },
                    Some(r) => TxStatus {
                        tx: tx.to_string(),
                        state: match r.decision {
                            Decision::Commit => "committed",
                            Decision::Abort => "aborted",
                        }
                        .into(),
                        request_id: r.request_id.clone(),
                        purchase: r.purchase.clone(),
                        reason: r.reason.clone(),
                        deliveries: r
                            .deliver_to
                            .iter()
                            .map(|p| Delivery {
                                participant: p.clone(),
                                acked: !r.pending.contains(p),
                            })
                            .collect(),
                        decided_at_ms: Some(r.decided_at_ms),
                        completed_at_ms: r.completed_at_ms,
                        votes: r.votes.clone(),
                        delivery_attempts: r.delivery_attempts,
                    },
                };
                Response::ok(serde_json::to_vec(&status).expect("serialises"))
            }
            Err(e) => Response::api_error(&log_error(e)),
        }
    }
}

fn summarize(participant: &str, ballot: &Ballot) -> VoteSummary {
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

fn log_error(e: LogError) -> ApiError {
    match e {
        LogError::Busy => ApiError::new(Code::Busy, "the decision log is overloaded; retry"),
        LogError::Failed(m) => ApiError::new(Code::Internal, m),
    }
}

/// Opens the log, connects and serves until SIGTERM/SIGINT, then drains:
/// no new purchases; those in flight finish (their decisions are durable
/// and delivery resumes at the next start if it was cut short).
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)?;
    let log = SqliteLog::open(&args.data_dir.join("coordinator.db"))?;
    info!(db = %log.path().display(), "decision log open (WAL, synchronous=FULL)");
    if let Some(addr) = args.metrics_addr {
        twopc_common::telemetry::install(addr)?;
    }
    let client = twopc_common::nats::connect(&args.nats_url, SERVICE).await?;
    let registry = Arc::new(Registry::new(
        SERVICE,
        env!("CARGO_PKG_VERSION"),
        "twopc coordinator: purchases as two-phase-commit transactions",
    ));
    let discovery = registry.clone().serve_discovery(client.clone());
    let http_addr = args.http_addr;
    let c = Coordinator::new(log, client.clone(), args, registry);
    let page = {
        let c = c.clone();
        async move {
            match http_addr {
                Some(addr) => crate::status::serve_http(addr, c).await,
                None => Ok(()),
            }
        }
    };
    let work = async { tokio::try_join!(c.serve(), discovery, page).map(|_| ()) };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        _ = twopc_common::nats::shutdown_signal() => {
            info!("SIGTERM: draining (no new purchases; in-flight ones finish)");
            twopc_common::serve::begin_shutdown();
            let _ = tokio::time::timeout(twopc_common::serve::DRAIN_TIMEOUT, &mut work).await;
            let _ = client.flush().await;
            info!("drained; exiting");
            Ok(())
        }
    }
}
