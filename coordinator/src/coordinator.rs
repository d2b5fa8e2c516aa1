//! The coordinator's driver: NATS and the decision log around the protocol
//! core ([`crate::core`]). It holds no protocol rule: each NATS message or
//! I/O result becomes an [`Event`] for `Core::step`, and each [`Cmd`] it
//! returns is carried out here, its result fed back as the next event.
//!
//! Subjects served (queue group `twopc-coordinator`):
//! * `shop.<client>.purchase` — a client's JSON purchase → JSON reply;
//! * `shop.<client>.tx` — the status of one of the client's transactions;
//! * `shop.tx` — (admin) the status of any transaction;
//! * `shop.in_doubt` — (admin) what this coordinator has not finished;
//! * `twopc.decision.*` — participants' in-doubt queries (postcard), each
//!   on its sender's subject (`twopc.decision.<participant>`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{error, info, warn, Instrument};
use twopc_common::backoff::Backoff;
use twopc_common::fault::crash_point;
use twopc_common::now_ms;
use twopc_common::refusals::refused;
use twopc_common::trace::TraceContext;
use twopc_schemas::api::{
    ApiError, CoordinatorInDoubt, Delivery as ApiDelivery, PurchaseReply, PurchaseRequest, TxQuery,
    TxStatus, Undelivered, MAX_IN_DOUBT_LISTED,
};
use twopc_schemas::client::{self, ClientName};
use twopc_schemas::points::CoordinatorCrash;
use twopc_schemas::protocol::{
    self, Decide, DecideReply, Decision, DecisionQuery, DecisionReply, Message, Prepare, TxId,
    Unsupported, Vote,
};
use twopc_schemas::tx::{self, Op, Transaction, TxSubmit};
use twopc_schemas::{subjects, Code, ParticipantName};

use crate::admission::Admission;
use crate::config::{CoordinatorArgs, Store};
use crate::core::{log_error, ClientId, Cmd, Core, CoreConfig, Delivery, Event, QueryId};
use crate::kv::{KvConfig, KvLog};
use crate::log::{DecisionLog, LogError, Record, SqliteLog};
use crate::phase::Ballot;
use twopc_common::micro::Registry;
use twopc_common::serve::{serve, Endpoint, Response, Shutdown};

const SERVICE: &str = "coordinator";

pub use crate::core::REFUSALS_BEFORE_ALERT;

/// Most decision deliveries (`twopc.<p>.decide` requests) awaiting their
/// answer at once. More wait for a place: a restart with many undelivered
/// decisions, or a participant that is down while purchases go on, cannot
/// put an unbounded number of requests (and reply subscriptions) on the
/// connection at once.
pub const MAX_DELIVERIES_IN_FLIGHT: usize = 1_024;

/// Backoff of noting acknowledgements while the decision log is overloaded.
const ACK_RETRY_BASE_MS: u64 = 20;
const ACK_RETRY_CAP_MS: u64 = 2_000;

/// Counters for the status page (Prometheus has the same and more).
#[derive(Debug, Default)]
pub struct Counts {
    pub begun: AtomicU64,
    pub committed: AtomicU64,
    pub aborted: AtomicU64,
}

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
    /// Every protocol rule. Locked only for one pure `step`.
    core: Mutex<Core>,
    /// Clients waiting for a purchase reply, by the id the core knows them by.
    clients: Mutex<HashMap<ClientId, oneshot::Sender<Result<PurchaseReply, ApiError>>>>,
    /// Participants waiting for a decision-query answer.
    queries: Mutex<HashMap<QueryId, oneshot::Sender<DecisionReply>>>,
    /// Source of client and query ids.
    next_id: AtomicU64,
    /// This coordinator's shutdown signal (endpoints drain on it).
    shutdown: Shutdown,
    /// Places for deliveries in flight ([`MAX_DELIVERIES_IN_FLIGHT`]).
    deliveries: tokio::sync::Semaphore,
    /// Which participants a transaction may name, and which a client may.
    admission: Admission,
}

impl<L: DecisionLog> Coordinator<L> {
    pub fn new(
        log: L,
        client: Client,
        args: CoordinatorArgs,
        registry: Arc<Registry>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let base = args.retry_base_ms.max(1);
        let core = Core::new(CoreConfig {
            retry_base_ms: base,
            retry_cap_ms: args.retry_cap_ms.max(base),
            reply_after: args.reply_after,
            seed: rand::random(),
            window: args
                .tx_window()
                .expect("the window settings are checked before the service starts"),
        });
        let admission = Admission::new(args.participants.clone(), args.client_grants.clone());
        Arc::new(Coordinator {
            admission,
            log,
            client,
            args,
            registry,
            counts: Counts::default(),
            core: Mutex::new(core),
            clients: Mutex::new(HashMap::new()),
            queries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown,
            deliveries: tokio::sync::Semaphore::new(MAX_DELIVERIES_IN_FLIGHT),
        })
    }

    /// Serves until the NATS client closes or a task fails.
    pub async fn serve(self: Arc<Self>) -> anyhow::Result<()> {
        // Undelivered decisions to resume. A store electing a leader (a
        // node just died, as this replica restarted) refuses for a few
        // seconds: keep asking rather than exit and be restarted into the
        // same election.
        let mut backoff = Backoff::new(200, 5_000);
        let incomplete = loop {
            match self.log.incomplete().await {
                Ok(records) => break records,
                Err(e) => {
                    warn!(error = %e, "reading undelivered decisions failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = self.shutdown.begun() => return Ok(()),
                    }
                }
            }
        };
        if !incomplete.is_empty() {
            info!(
                count = incomplete.len(),
                "resuming delivery of recorded decisions"
            );
        }
        self.step(Event::Resume {
            records: incomplete,
        });
        let queue = subjects::queue_group(SERVICE);
        let endpoint = |name: &'static str, subject: &str, busy: Response| Endpoint {
            client: self.client.clone(),
            registry: self.registry.clone(),
            shutdown: self.shutdown.clone(),
            name,
            subject: subject.into(),
            queue: queue.clone(),
            max_inflight: self.args.max_inflight,
            busy,
        };
        let busy_json = refusal(&ApiError::new(
            Code::Busy,
            "too many transactions in flight",
        ));
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
            endpoint("purchase", subjects::PURCHASES, busy_json.clone()),
            move |m| {
                let c = c.clone();
                async move { c.on_purchase(m).await }
            },
        );
        let c = self.clone();
        let transaction = serve(
            endpoint("transaction", subjects::TRANSACTIONS, busy_json.clone()),
            move |m| {
                let c = c.clone();
                async move { c.on_transaction(m).await }
            },
        );
        let c = self.clone();
        let status = serve(
            endpoint("tx-status", subjects::TX_STATUS, busy_json.clone()),
            move |m| {
                let c = c.clone();
                async move { c.on_tx_status(m.payload, None).await }
            },
        );
        let c = self.clone();
        let client_status = serve(
            endpoint("client-tx-status", subjects::CLIENT_TXS, busy_json),
            move |m| {
                let c = c.clone();
                async move {
                    match client_of(&m.subject) {
                        Ok(client) => c.on_tx_status(m.payload, Some(client)).await,
                        Err(e) => refusal(&e),
                    }
                }
            },
        );
        let c = self.clone();
        let decision = serve(
            endpoint("decision-query", subjects::DECISION_QUERIES, busy_decision),
            move |m| {
                let c = c.clone();
                async move { c.on_decision_query(m.subject.to_string(), m.payload).await }
            },
        );
        let c = self.clone();
        let in_doubt_busy = refusal(&ApiError::new(Code::Busy, "too many requests in flight"));
        let in_doubt = serve(
            endpoint("in-doubt", subjects::IN_DOUBT, in_doubt_busy),
            move |_m| {
                let c = c.clone();
                async move { Response::json(c.in_doubt().await, refusal) }
            },
        );
        let sweep = self.clone().sweep();
        let collection = self.clone().collection();
        info!(faults = ?twopc_common::fault::armed(), "coordinator serving");
        tokio::try_join!(
            purchase,
            transaction,
            status,
            client_status,
            decision,
            in_doubt,
            sweep,
            collection
        )?;
        Ok(())
    }

    /// Now and then (every tenth of the retention, at most a minute apart),
    /// deletes what the retention rule lets go: records every participant
    /// acknowledged, decided more than the retention ago, and request-id
    /// claims as old. Replicas may all do it; deleting is idempotent.
    async fn collection(self: Arc<Self>) -> anyhow::Result<()> {
        let window = self.args.tx_window().map_err(anyhow::Error::msg)?;
        let every = Duration::from_millis((window.retention_ms / 10).clamp(100, 60_000) as u64);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.shutdown.begun() => return Ok(()),
            }
            let before = twopc_common::now_ms() - window.retention_ms;
            // Until the backlog is gone: a flood that made more than a
            // batch per interval must not outgrow collection.
            loop {
                match self.log.collect(before).await {
                    Ok(0) => break,
                    Ok(n) => {
                        info!(records = n, "collected decisions past retention");
                        if n < crate::log::COLLECT_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "collecting old decisions failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// Now and then, delivers recorded decisions that nobody here is
    /// delivering and that are older than one sweep interval: those of a
    /// replica that died mid-delivery, or whose acknowledgements were not
    /// noted. Several replicas may deliver one decision at once; delivery is
    /// idempotent and acknowledgements merge (compare-and-set), so they
    /// finish together instead of fighting.
    async fn sweep(self: Arc<Self>) -> anyhow::Result<()> {
        let every = Duration::from_millis(self.args.sweep_interval_ms.max(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.shutdown.begun() => return Ok(()),
            }
            let older_than = twopc_common::now_ms() - every.as_millis() as i64;
            match self.log.incomplete().await {
                Ok(records) => {
                    let records: Vec<Record> = records
                        .into_iter()
                        .filter(|r| r.decided_at_ms < older_than)
                        .collect();
                    if !records.is_empty() {
                        self.step(Event::Resume { records });
                    }
                }
                Err(e) => warn!(error = %e, "could not list undelivered decisions; will retry"),
            }
        }
    }

    /// What this coordinator has not finished: transactions in phase 1 and
    /// decisions not yet acknowledged by every participant, at most
    /// [`MAX_IN_DOUBT_LISTED`] of each (the oldest), `truncated` if there
    /// are more.
    pub async fn in_doubt(&self) -> Result<CoordinatorInDoubt, ApiError> {
        let mut in_progress: Vec<String> = self
            .core()
            .active()
            .into_iter()
            .take(MAX_IN_DOUBT_LISTED + 1)
            .map(|a| a.tx.to_string())
            .collect();
        // One more than shown: its presence is what `truncated` says.
        let mut incomplete = self
            .log
            .incomplete_listing(MAX_IN_DOUBT_LISTED + 1)
            .await
            .map_err(|e| log_error(&e))?;
        let truncated =
            in_progress.len() > MAX_IN_DOUBT_LISTED || incomplete.len() > MAX_IN_DOUBT_LISTED;
        in_progress.truncate(MAX_IN_DOUBT_LISTED);
        incomplete.truncate(MAX_IN_DOUBT_LISTED);
        let core = self.core();
        let undelivered = incomplete
            .into_iter()
            .map(|r| Undelivered {
                tx: r.tx.to_string(),
                decision: r.decision.as_str().into(),
                refused_by: core.refusals(r.tx),
                pending: r.pending.iter().map(ToString::to_string).collect(),
                decided_at_ms: r.decided_at_ms,
            })
            .collect();
        Ok(CoordinatorInDoubt {
            in_progress,
            undelivered,
            truncated,
        })
    }

    pub fn log(&self) -> &L {
        &self.log
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The protocol core. A replica whose core failed an assertion cannot
    /// go on (its state is unknown) and must not linger subscribed and
    /// answering nothing: it exits, and a healthy replica serves (issue 18,
    /// finding 2).
    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        match self.core.lock() {
            Ok(core) => core,
            Err(_) => exit_core_failed("the protocol core's lock is poisoned"),
        }
    }

    /// Feeds one event to the core and carries out what it asks for.
    fn step(self: &Arc<Self>, event: Event) {
        let cmds = {
            let mut core = self.core();
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                core.step(now_ms(), event)
            }));
            let Ok(cmds) = stepped else {
                exit_core_failed("the protocol core failed an assertion");
            };
            metrics::gauge!("twopc_decisions_undelivered").set(core.delivering() as f64);
            cmds
        };
        // A step's sends to participants go out from one task (a phase-1
        // fan-out, or a delivery round): one spawn per step instead of one
        // per participant, which measurably costs throughput.
        let mut sends = vec![];
        for cmd in cmds {
            match cmd {
                Cmd::Prepare { .. } | Cmd::Decide { .. } => sends.push(cmd),
                other => self.exec(other),
            }
        }
        if !sends.is_empty() {
            let c = self.clone();
            tokio::spawn(async move {
                futures::future::join_all(sends.into_iter().map(|cmd| c.send(cmd))).await;
            });
        }
    }

    /// Sends one prepare or decision and feeds the answer back as an event.
    async fn send(self: &Arc<Self>, cmd: Cmd) {
        match cmd {
            Cmd::Prepare {
                tx,
                participant,
                client,
                op,
                trace,
            } => {
                let span = tx_span(tx, &trace);
                let ballot = self
                    .prepare(&participant, tx, client, op, &trace)
                    .instrument(span.clone())
                    .await;
                span.in_scope(|| info!(%participant, ?ballot, "vote"));
                self.step(Event::Voted {
                    tx,
                    participant,
                    ballot,
                });
            }
            Cmd::Decide {
                tx,
                participant,
                decision,
                trace,
            } => {
                let place = self
                    .deliveries
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                let result = self
                    .send_decision(&participant, tx, decision, &trace)
                    .instrument(tx_span(tx, &trace))
                    .await;
                drop(place);
                if let Delivery::Refused(code, _) = &result {
                    metrics::counter!(
                        "twopc_deliveries_refused_total",
                        "participant" => participant.to_string(),
                        "code" => code.as_str()
                    )
                    .increment(1);
                }
                self.step(Event::Delivered {
                    tx,
                    participant,
                    result,
                });
            }
            other => unreachable!("only sends are batched: {other:?}"),
        }
    }

    /// Carries out one command. I/O runs on its own task and comes back as
    /// an event; nothing here decides anything.
    fn exec(self: &Arc<Self>, cmd: Cmd) {
        match cmd {
            Cmd::LookUpKey { key } => {
                let c = self.clone();
                tokio::spawn(async move {
                    let found = c.log.by_request_id(key.clone()).await;
                    if let Ok(Some(rec)) = &found {
                        info!(request_id = %key, tx = %rec.tx, "repeated request; returning the first outcome");
                    }
                    c.step(Event::KeyFound {
                        key,
                        found,
                        tx: TxId::now_v7(),
                    });
                });
            }
            Cmd::Record { rec, write_by_ms } => {
                let c = self.clone();
                tokio::spawn(async move {
                    let tx = rec.tx;
                    // Between the window check (made in the core when the
                    // votes came in) and the write. Also a stop point
                    // (`TWOPC_STOP_AT`): a test holds a replica here.
                    crash_point(CoordinatorCrash::AfterVotes);
                    // Durable point: `record` returns after the decision is
                    // fsynced (or after finding an earlier decision, which
                    // wins, with the request id bound to it in the same
                    // fsynced write). The core lets nobody hear a decision
                    // before this event.
                    let result = c.log.record_until(rec, write_by_ms).await;
                    if result.is_ok() {
                        crash_point(CoordinatorCrash::AfterDecision);
                    }
                    c.step(Event::Recorded { tx, result });
                });
            }
            Cmd::LookUpDecision {
                query,
                tx,
                participant,
            } => {
                let c = self.clone();
                tokio::spawn(async move {
                    let found = c.log.get(tx).await;
                    c.step(Event::DecisionFound {
                        query,
                        tx,
                        participant,
                        found,
                    });
                });
            }
            Cmd::RecordPresumedAbort {
                query,
                rec,
                participant,
                write_by_ms,
            } => {
                let c = self.clone();
                tokio::spawn(async move {
                    let tx = rec.tx;
                    let result = c.log.record_until(rec, write_by_ms).await;
                    match &result {
                        Ok(crate::log::Recorded::New(_)) => {
                            info!(%tx, "no decision recorded; recorded abort (presumed abort)")
                        }
                        Ok(r) => info!(%tx, decision = ?r, "answered decision query"),
                        Err(e) => warn!(%tx, error = %e, "decision query not answered"),
                    }
                    c.step(Event::QueryRecorded {
                        query,
                        tx,
                        participant,
                        result,
                    });
                });
            }
            Cmd::Prepare { .. } | Cmd::Decide { .. } => {
                unreachable!("sends go out through Coordinator::send")
            }
            Cmd::NoteAcks {
                tx,
                participants,
                attempts,
            } => {
                let c = self.clone();
                tokio::spawn(async move {
                    crash_point(CoordinatorCrash::AfterAck);
                    // The write is idempotent. An overloaded log (`Busy`:
                    // its queue was full, nothing written) is retried with
                    // capped backoff, or the record would say "undelivered"
                    // until the next restart (seen under a 20,000-purchase
                    // burst); any other failure is logged, and a restart
                    // redelivers, which is harmless.
                    let mut backoff = Backoff::new(ACK_RETRY_BASE_MS, ACK_RETRY_CAP_MS);
                    loop {
                        match c.log.acked(tx, participants.clone(), attempts).await {
                            Ok(()) => break,
                            Err(LogError::Busy) => {
                                tokio::time::sleep(backoff.next_delay()).await;
                            }
                            Err(e) => {
                                warn!(%tx, error = %e, "acknowledgement not noted; a restart will redeliver");
                                break;
                            }
                        }
                    }
                });
            }
            Cmd::Reply { client, reply } => {
                if let Some(waiting) = self.clients.lock().expect("lock").remove(&client) {
                    let _ = waiting.send(reply);
                }
            }
            Cmd::Answer { query, reply } => {
                if let Some(waiting) = self.queries.lock().expect("lock").remove(&query) {
                    let _ = waiting.send(reply);
                }
            }
            Cmd::RetryAfter { tx, delay_ms } => {
                metrics::counter!("twopc_delivery_retries_total").increment(1);
                let c = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    c.step(Event::RetryDue { tx });
                });
            }
            Cmd::Begun { tx, req, trace } => {
                let _span = tx_span(tx, &trace).entered();
                let participants: Vec<&str> = req
                    .branches
                    .iter()
                    .map(|b| b.participant.as_str())
                    .collect();
                info!(client = %req.client, participants = ?participants, request_id = ?req.request_id, "transaction begun");
                self.counts.begun.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("twopc_transactions_begun_total").increment(1);
            }
            Cmd::Concluded {
                tx,
                decision,
                reason,
                trace,
            } => {
                let _span = tx_span(tx, &trace).entered();
                match decision {
                    Some(Decision::Commit) => {
                        self.counts.committed.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("twopc_transactions_committed_total").increment(1);
                    }
                    Some(Decision::Abort) => {
                        self.counts.aborted.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(
                            "twopc_transactions_aborted_total",
                            "reason" => reason.map_or("none", |c| c.as_str())
                        )
                        .increment(1);
                    }
                    None => {
                        metrics::counter!("twopc_transactions_outcome_unknown_total").increment(1)
                    }
                }
                match decision {
                    Some(d) => info!(decision = d.as_str(), reason = ?reason, "decision durable"),
                    None => error!(
                        "decision not recorded; the outcome is unknown until a participant asks"
                    ),
                }
            }
            Cmd::DeliveredAll {
                tx,
                decision,
                trace,
            } => {
                let _span = tx_span(tx, &trace).entered();
                info!(
                    decision = decision.as_str(),
                    "decision delivered to every participant"
                );
            }
            Cmd::Stuck {
                tx,
                decision,
                refusal,
            } => {
                metrics::gauge!("twopc_decisions_refused").increment(1);
                error!(
                    %tx,
                    participant = %refusal.participant,
                    decision = decision.as_str(),
                    code = %refusal.code,
                    message = %refusal.message,
                    times = refusal.times,
                    "participant keeps refusing the recorded decision; delivery goes on, \
                     but it needs an operator (see twopc in-doubt)"
                );
            }
        }
    }

    /// `shop.<client>.purchase`: the purchase, one transaction type, as
    /// its branches ([`tx::purchase`]).
    async fn on_purchase(self: Arc<Self>, msg: async_nats::Message) -> Response {
        let buyer = match client_of(&msg.subject) {
            Ok(c) => c,
            Err(e) => return refusal(&e),
        };
        let req = match PurchaseRequest::parse(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                refused(
                    "purchase",
                    e.code.as_str(),
                    || info!(code = %e.code, message = %e.message, "purchase refused"),
                );
                return refusal(&e);
            }
        };
        let txn = tx::purchase(&buyer, &req);
        self.submit(&msg, txn).await
    }

    /// `shop.<client>.transaction`: any branches at any participants the
    /// client may name.
    async fn on_transaction(self: Arc<Self>, msg: async_nats::Message) -> Response {
        let client = match client_of(&msg.subject) {
            Ok(c) => c,
            Err(e) => return refusal(&e),
        };
        let req = match TxSubmit::parse(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                refused(
                    "transaction",
                    e.code.as_str(),
                    || info!(code = %e.code, message = %e.message, "transaction refused"),
                );
                return refusal(&e);
            }
        };
        let txn = Transaction {
            client,
            branches: req.branches,
            request_id: req.request_id,
        };
        self.submit(&msg, txn).await
    }

    /// Runs a transaction and answers its client: the participants checked
    /// ([`Admission`]), the request id scoped to the client.
    async fn submit(self: Arc<Self>, msg: &async_nats::Message, mut txn: Transaction) -> Response {
        // Continue the client's trace, or start one for this transaction.
        let trace =
            TraceContext::from_headers(msg.headers.as_ref()).unwrap_or_else(TraceContext::root);
        if let Err(e) = self.admission.check(&txn) {
            refused(
                "transaction",
                e.code.as_str(),
                || info!(code = %e.code, message = %e.message, "transaction refused"),
            );
            return refusal(&e);
        }
        // Request ids are the client's own namespace: the log keys them as
        // `<client>/<request_id>` (the subject's client token is the
        // authenticated sender; see launcher::auth).
        txn.request_id = txn
            .request_id
            .map(|r| client::scope_request_id(&txn.client, &r));
        if twopc_common::fault::broken("forget_request_ids") {
            // DELIBERATELY BROKEN (tests only): ignore the idempotency key,
            // so a re-send runs a new transaction.
            txn.request_id = None;
        }
        let client = self.fresh_id();
        let (sender, reply) = oneshot::channel();
        self.clients.lock().expect("lock").insert(client, sender);
        let tx = TxId::now_v7();
        let started = std::time::Instant::now();
        self.step(Event::Submit {
            client,
            req: txn,
            tx,
            trace,
        });
        let reply = reply.await.unwrap_or_else(|_| {
            Err(ApiError::new(
                Code::OutcomeUnknown,
                "the coordinator stopped before answering; retry with the same request_id",
            ))
        });
        metrics::histogram!("twopc_purchase_seconds").record(started.elapsed().as_secs_f64());
        let reply = reply.map(|mut r| {
            r.request_id = r.request_id.map(|k| unscoped(&k).to_owned());
            r
        });
        Response::json(reply, refusal)
    }

    async fn prepare(
        &self,
        participant: &ParticipantName,
        tx: TxId,
        client: ClientName,
        op: Op,
        trace: &TraceContext,
    ) -> Ballot {
        let payload: bytes::Bytes = protocol::encode(&Prepare {
            tx,
            client,
            op: op.as_bytes().to_vec(),
        })
        .into();
        let timeout = Duration::from_millis(self.args.prepare_timeout_ms);
        let started = std::time::Instant::now();
        // "No responders" is certain non-delivery (nobody subscribes: a
        // participant restarting, or one owner handing over to the next),
        // so it is asked again within the prepare timeout: a restart costs
        // latency, not an abort. Anything else ends the ballot.
        let mut pause = Duration::from_millis(10);
        let ballot = loop {
            let left = timeout.saturating_sub(started.elapsed());
            let request = async_nats::Request::new()
                .headers(trace.child().headers())
                .payload(payload.clone());
            // Bounded even while disconnected, so phase 1 always ends (in a
            // durable decision) within the prepare timeout plus a margin.
            match twopc_common::nats::request(
                &self.client,
                subjects::prepare(participant),
                request,
                left,
            )
            .await
            {
                Ok(msg) => {
                    break match protocol::decode::<Vote>(&msg.payload) {
                        Ok(vote) => Ballot::Voted(vote),
                        // It does not speak this prepare: a no vote that
                        // says so (nothing was held).
                        Err(_) if is_unsupported(&msg.payload) => Ballot::Voted(Vote::No {
                            code: Code::Unsupported,
                            message: protocol::decode::<Unsupported>(&msg.payload)
                                .map(|u| u.message)
                                .unwrap_or_default(),
                        }),
                        Err(e) => Ballot::Garbled(e.to_string()),
                    };
                }
                Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                    let left = timeout.saturating_sub(started.elapsed());
                    if left <= pause {
                        break Ballot::NoResponders;
                    }
                    metrics::counter!("twopc_prepare_no_responders_retries_total").increment(1);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                // A timeout, or a connection lost mid-request: the prepare may
                // have arrived. Unknown, so the participant must hear the abort.
                Err(_) => break Ballot::TimedOut,
            }
        };
        metrics::histogram!("twopc_prepare_seconds").record(started.elapsed().as_secs_f64());
        ballot
    }

    /// One delivery attempt.
    async fn send_decision(
        &self,
        participant: &ParticipantName,
        tx: TxId,
        decision: Decision,
        trace: &TraceContext,
    ) -> Delivery {
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
                Ok(DecideReply::Ack) => Delivery::Acked,
                Ok(DecideReply::Rejected { code, message }) => {
                    warn!(%participant, %code, %message, "decision refused; will retry");
                    Delivery::Refused(code, message)
                }
                Err(e) => {
                    warn!(%participant, error = %e, "acknowledgement does not decode");
                    Delivery::Failed
                }
            },
            Err(e) => {
                warn!(%participant, error = %e, "decision delivery failed; will retry");
                Delivery::Failed
            }
        }
    }

    /// A participant in doubt asks for the decision, on `subject`, which
    /// names it (the core checks it against the body).
    async fn on_decision_query(self: Arc<Self>, subject: String, payload: Bytes) -> Response {
        let q = match protocol::decode::<DecisionQuery>(&payload) {
            Ok(q) => q,
            Err(e) if e.is_unsupported() => {
                refused(
                    "decision-query",
                    Code::Unsupported.as_str(),
                    || warn!(error = %e, "refused a decision query this build does not speak"),
                );
                return Response::error(
                    protocol::encode(&Unsupported::to(&e)),
                    Code::Unsupported.status(),
                    format!("unsupported: {e}"),
                );
            }
            Err(e) => {
                refused(
                    "decision-query",
                    Code::BadMessage.as_str(),
                    || warn!(error = %e, "rejected decision query that does not decode"),
                );
                let body = protocol::encode(&DecisionReply::Rejected {
                    code: Code::BadMessage,
                    message: e.to_string(),
                });
                return Response::error(body, 400, format!("bad_message: {e}"));
            }
        };
        let query = self.fresh_id();
        let (sender, answer) = oneshot::channel();
        self.queries.lock().expect("lock").insert(query, sender);
        info!(tx = %q.tx, participant = %q.participant, %subject, "decision query");
        let tx = q.tx;
        self.step(Event::DecisionQuery {
            query,
            subject,
            msg: q,
        });
        let reply = answer.await.unwrap_or_else(|_| DecisionReply::Rejected {
            code: Code::ShuttingDown,
            message: "the coordinator stopped before answering".into(),
        });
        match &reply {
            DecisionReply::Decided { .. } => Response::ok(protocol::encode(&reply)),
            DecisionReply::Rejected { code, message } => {
                if *code != Code::Busy && *code != Code::ShuttingDown {
                    refused(
                        "decision-query",
                        code.as_str(),
                        || warn!(%tx, %code, %message, "refused decision query"),
                    );
                }
                Response::error(
                    protocol::encode(&reply),
                    code.status(),
                    format!("{code}: {message}"),
                )
            }
        }
    }

    /// A transaction's status: any transaction for admin (`shop.tx`,
    /// `client` `None`); for a client (`shop.<client>.tx`) only its own —
    /// one it bought with a request id — and `unknown` for any other, as
    /// for a transaction that does not exist.
    async fn on_tx_status(self: Arc<Self>, payload: Bytes, client: Option<ClientName>) -> Response {
        let tx = match TxQuery::parse(&payload) {
            Ok(tx) => tx,
            Err(e) => return refusal(&e),
        };
        let status = match self.tx_status(tx).await {
            Ok(s) => s,
            Err(e) => return refusal(&e),
        };
        let status = match client {
            None => status,
            Some(client) => for_client(status, &client),
        };
        Response::ok(serde_json::to_vec(&status).expect("serialises"))
    }

    async fn tx_status(&self, tx: TxId) -> Result<TxStatus, ApiError> {
        let in_phase_1 = self.core().in_phase_1(tx);
        if let Some(p) = in_phase_1 {
            return Ok(TxStatus {
                state: "in_progress".into(),
                request_id: p.request_id.clone(),
                client: Some(p.client.to_string()),
                branches: p.branches,
                ..TxStatus::unknown(tx.to_string())
            });
        }
        match self.log.read(tx).await {
            Ok(rec) => {
                let status = match rec {
                    None => TxStatus::unknown(tx.to_string()),
                    Some(r) => TxStatus {
                        tx: tx.to_string(),
                        state: match r.decision {
                            Decision::Commit => "committed",
                            Decision::Abort => "aborted",
                        }
                        .into(),
                        request_id: r.request_id.clone(),
                        client: r.transaction.as_ref().map(|t| t.client.to_string()),
                        branches: r
                            .transaction
                            .as_ref()
                            .map(|t| t.branches.clone())
                            .unwrap_or_default(),
                        reason: r.reason.clone(),
                        deliveries: r
                            .deliver_to
                            .iter()
                            .map(|p| ApiDelivery {
                                participant: p.to_string(),
                                acked: !r.pending.contains(p),
                            })
                            .collect(),
                        decided_at_ms: Some(r.decided_at_ms),
                        completed_at_ms: r.completed_at_ms,
                        votes: r.votes.clone(),
                        delivery_attempts: r.delivery_attempts,
                    },
                };
                Ok(status)
            }
            Err(e) => Err(log_error(&e)),
        }
    }
}

/// The client a `shop.<client>.<verb>` subject names (the server lets
/// only that client publish it).
fn client_of(subject: &str) -> Result<ClientName, ApiError> {
    subjects::client_of(subject)
        .ok_or_else(|| ApiError::invalid(format!("{subject:?} names no client")))
}

/// Whether a reply is an [`Unsupported`] answer.
fn is_unsupported(payload: &[u8]) -> bool {
    protocol::peek(payload).is_some_and(|(_, kind)| kind == Unsupported::KIND)
}

/// A client's own request id, from the log's scoped key.
fn unscoped(key: &str) -> &str {
    client::split_request_id(key).map_or(key, |(_, rid)| rid)
}

/// What `client` may see of `status`: all of it, request ids unscoped, if
/// it is the client's; else the reply for a transaction that does not
/// exist.
fn for_client(mut status: TxStatus, client: &ClientName) -> TxStatus {
    // The transaction's client, or (a presumed abort holds no transaction)
    // its scoped request id's.
    let owner = status.client.clone().or_else(|| {
        status
            .request_id
            .as_deref()
            .and_then(client::split_request_id)
            .map(|(c, _)| c.to_owned())
    });
    if owner.as_deref() == Some(client.as_str()) {
        status.request_id = status.request_id.map(|k| unscoped(&k).to_owned());
        return status;
    }
    TxStatus::unknown(status.tx)
}

/// Ends the process after the core failed: logs why and exits with 70
/// (EX_SOFTWARE), so that a supervisor restarts it and the other replicas
/// serve meanwhile; a replica that stayed subscribed would swallow its share
/// of purchases and queries.
fn exit_core_failed(why: &str) -> ! {
    error!("{why}: exiting (this replica cannot go on; others serve)");
    std::process::exit(70)
}

/// The span every log line of one transaction carries.
fn tx_span(tx: TxId, trace: &TraceContext) -> tracing::Span {
    tracing::info_span!("tx", %tx, trace_id = %trace.trace_id)
}

/// Opens the log, connects and serves until `stop` resolves (the binary
/// passes SIGTERM/SIGINT; a test, whatever it likes), then drains:
/// no new purchases; those in flight finish (their decisions are durable
/// and delivery resumes at the next start if it was cut short).
pub async fn run(
    args: CoordinatorArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    args.tx_window().map_err(anyhow::Error::msg)?;
    if let Some(addr) = args.metrics_addr {
        twopc_common::telemetry::install(addr)?;
    }
    let client = twopc_common::nats::connect(&args.nats_url, SERVICE, &args.auth).await?;
    tokio::spawn(crate::kv::ensure_owner_bucket(
        client.clone(),
        args.kv_replicas,
    ));
    match args.store {
        Store::Sqlite => {
            std::fs::create_dir_all(&args.data_dir)?;
            let log = SqliteLog::open(&args.data_dir.join("coordinator.db"))?;
            info!(db = %log.path().display(), "decision log open (SQLite: WAL, synchronous=FULL)");
            run_with(log, client, args, stop).await
        }
        Store::Kv => {
            check_jetstream_sync(&args.nats_monitor, args.allow_unsynced_jetstream).await?;
            let config = KvConfig {
                bucket: args.kv_bucket.clone(),
                replicas: args.kv_replicas,
                timeout: Duration::from_millis(args.kv_timeout_ms),
            };
            // A cluster electing a leader (a node just died) refuses for a
            // few seconds: keep trying for a while before giving up.
            let mut backoff = Backoff::new(200, 5_000);
            let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
            let log = loop {
                match KvLog::open(client.clone(), config.clone()).await {
                    Ok(log) => break log,
                    Err(e) if tokio::time::Instant::now() < give_up => {
                        warn!(error = %format!("{e:#}"), "decision bucket not reachable yet; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => return Err(e.context("opening the decision bucket")),
                }
            };
            info!(
                bucket = %args.kv_bucket,
                replicas = args.kv_replicas,
                "decision log open (JetStream KV)"
            );
            run_with(log, client, args, stop).await
        }
    }
}

/// Refuses to start on JetStream that acknowledges writes before they are
/// on disk: reads each server's `/varz` (`jetstream.config.sync_always`).
/// Without monitoring URLs nothing can be checked, and the log says so.
async fn check_jetstream_sync(monitors: &[String], allow_unsynced: bool) -> anyhow::Result<()> {
    if monitors.is_empty() {
        warn!(
            "cannot confirm that JetStream fsyncs every write (no --nats-monitor given): \
             unless every server runs with `jetstream {{ sync_interval: always }}`, \
             acknowledged decisions can be lost in a power failure"
        );
        return Ok(());
    }
    let mut unsynced = vec![];
    let mut unreachable = vec![];
    for m in monitors {
        let url = format!("{}/varz", m.trim_end_matches('/'));
        let varz = match twopc_common::http::http_get(&url, Duration::from_secs(2)).await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)?,
            Ok((status, _)) => {
                unreachable.push(format!("{m} (status {status})"));
                continue;
            }
            Err(e) => {
                unreachable.push(format!("{m} ({e:#})"));
                continue;
            }
        };
        let config = &varz["jetstream"]["config"];
        anyhow::ensure!(
            !config.is_null(),
            "{m}: JetStream is not enabled on this server"
        );
        if config["sync_always"].as_bool() != Some(true) {
            unsynced.push(m.clone());
        }
    }
    if !unreachable.is_empty() {
        // A node down while a replica starts must not keep it down; what
        // can be read is checked, and what cannot is said.
        warn!(
            servers = ?unreachable,
            "could not read these servers' JetStream settings; their fsync setting is unconfirmed"
        );
        anyhow::ensure!(
            unreachable.len() < monitors.len(),
            "no NATS server's monitoring answered ({unreachable:?}): cannot confirm \
             that JetStream fsyncs every write"
        );
    }
    if unsynced.is_empty() {
        info!(
            checked = monitors.len() - unreachable.len(),
            of = monitors.len(),
            "JetStream fsyncs every write (sync_interval: always) on every server checked"
        );
        return Ok(());
    }
    if allow_unsynced {
        error!(
            servers = ?unsynced,
            "JetStream does NOT fsync every write on these servers: acknowledged decisions \
             can be lost in a power failure (starting anyway: --allow-unsynced-jetstream)"
        );
        Ok(())
    } else {
        anyhow::bail!(
            "JetStream does not fsync every write on {unsynced:?}: set \
             `jetstream {{ sync_interval: always }}` in their configuration (or start with \
             --allow-unsynced-jetstream to accept losing acknowledged decisions in a power failure)"
        )
    }
}

async fn run_with<L: DecisionLog>(
    log: L,
    client: Client,
    args: CoordinatorArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let registry = Arc::new(
        Registry::new(
            SERVICE,
            env!("CARGO_PKG_VERSION"),
            "twopc coordinator: purchases as two-phase-commit transactions",
        )
        .with_metadata("twopc_speaks", twopc_schemas::protocol::speaks_text()),
    );
    let shutdown = Shutdown::new();
    let discovery = registry
        .clone()
        .serve_discovery(client.clone(), shutdown.clone());
    let http_addr = args.http_addr;
    let c = Coordinator::new(log, client.clone(), args, registry, shutdown.clone());
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
        _ = stop => {
            info!("SIGTERM: draining (no new purchases; in-flight ones finish)");
            shutdown.begin();
            let _ = tokio::time::timeout(twopc_common::serve::DRAIN_TIMEOUT, &mut work).await;
            let _ = client.flush().await;
            info!("drained; exiting");
            Ok(())
        }
    }
}

/// The reply refusing a request: `{"error": ...}` with the service-protocol
/// error headers.
fn refusal(e: &ApiError) -> Response {
    Response::error(e.to_json(), e.code.status(), e.to_string())
}
