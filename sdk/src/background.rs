//! The participant's two background loops: recovery, which asks the
//! coordinator about every branch in doubt until it is answered (never
//! deciding alone), and retention, which collects decided branches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use twopc_common::fault::crash_point;
use twopc_common::now_ms;
use twopc_schemas::points::ParticipantCrash;
use twopc_schemas::protocol::{self, DecideReply, Decision, DecisionQuery, DecisionReply, TxId};
use twopc_schemas::subjects;

use crate::recovery::{Tracker, MAX_QUERIES_PER_PASS, RECOVERY_PAGE_ROWS};
use crate::resource::Resource;
use crate::service::Participant;
use crate::store::{collect_branches, list_prepared, COLLECT_BATCH};

impl<R: Resource> Participant<R> {
    /// Deletes decided branches older than the retention, now and then
    /// (every tenth of the retention, at most a minute apart).
    pub(crate) async fn collection_loop(self: Arc<Self>) -> anyhow::Result<()> {
        let every =
            Duration::from_millis((self.window.retention_ms / 10).clamp(100, 60_000) as u64);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.shutdown.begun() => return Ok(()),
            }
            let before = now_ms() - self.window.retention_ms;
            loop {
                match self.db.run(move |c| collect_branches(c, before)).await {
                    Ok(n) => {
                        if n > 0 {
                            info!(participant = %self.name(), rows = n, "collected decided branches past retention");
                        }
                        if (n as i64) < COLLECT_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "collecting old branches failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// In-doubt recovery. Branches prepared before this process started are
    /// in doubt at once; those prepared since, `in_doubt_after_ms` after
    /// recovery first listed them, measured on the monotonic clock (see
    /// [`crate::recovery`]). Each is asked about with its own capped,
    /// jittered backoff until answered, a bounded number per pass.
    pub(crate) async fn recovery_loop(
        self: Arc<Self>,
        started_after_rowid: i64,
    ) -> anyhow::Result<()> {
        let name = self.name();
        let interval = Duration::from_millis(self.args.recovery_interval_ms.max(10));
        let threshold = Duration::from_millis(self.args.in_doubt_after_ms);
        let mut tracker = Tracker::new();
        loop {
            let after = tracker.cursor();
            let page = self
                .db
                .run(move |c| list_prepared(c, after, started_after_rowid, RECOVERY_PAGE_ROWS))
                .await;
            let now = Instant::now();
            let due = match page {
                Ok(page) => tracker.select_due(
                    now,
                    &page,
                    RECOVERY_PAGE_ROWS,
                    threshold,
                    MAX_QUERIES_PER_PASS,
                ),
                Err(e) => {
                    warn!(participant = %name, error = %e, "could not list in-doubt branches");
                    vec![]
                }
            };
            metrics::gauge!("twopc_in_doubt").set(tracker.in_doubt(now) as f64);
            if !due.is_empty() {
                info!(
                    participant = %name,
                    count = due.len(),
                    "resolving in-doubt transactions"
                );
            }
            let results =
                futures::future::join_all(due.iter().map(|&tx| self.clone().resolve_in_doubt(tx)))
                    .await;
            let now = Instant::now();
            for (tx, resolved) in due.into_iter().zip(results) {
                tracker.record(now, tx, resolved);
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.shutdown.begun() => return Ok(()),
            }
        }
    }

    /// Asks the coordinator once; applies the answer. True when resolved.
    pub(crate) async fn resolve_in_doubt(self: Arc<Self>, tx: TxId) -> bool {
        let name = self.name();
        if twopc_common::fault::broken("decide_alone") {
            // DELIBERATELY BROKEN (tests only): a participant in doubt
            // aborts on its own instead of asking the coordinator.
            warn!(participant = %name, %tx, "BROKEN: aborting an in-doubt transaction alone");
            return matches!(
                self.apply_decision(tx, Decision::Abort, "").await,
                DecideReply::Ack
            );
        }
        let query = protocol::encode(&DecisionQuery {
            tx,
            participant: name.to_owned(),
        });
        let request = async_nats::Request::new().payload(query.into());
        let timeout = Duration::from_millis(self.args.decision_timeout_ms);
        let reply = match twopc_common::nats::request(
            &self.client,
            subjects::decision_query(&name),
            request,
            timeout,
        )
        .await
        {
            Ok(m) => m,
            Err(e) => {
                // A timeout is "unknown": ask again later, never guess.
                warn!(participant = %name, %tx, error = %e, "decision query unanswered; will retry");
                return false;
            }
        };
        match protocol::decode::<DecisionReply>(&reply.payload) {
            Ok(DecisionReply::Decided { tx: got, decision }) if got == tx => {
                info!(participant = %name, %tx, decision = decision.as_str(), "in-doubt transaction resolved by the coordinator");
                crash_point(ParticipantCrash::RecoverBeforeApply.at(&name));
                metrics::counter!("twopc_recoveries_total").increment(1);
                matches!(
                    self.apply_decision(tx, decision, "").await,
                    DecideReply::Ack
                )
            }
            Ok(DecisionReply::Decided { tx: got, .. }) => {
                error!(participant = %name, %tx, %got, "decision reply for another transaction; ignored");
                false
            }
            Ok(DecisionReply::Rejected { code, message }) => {
                warn!(participant = %name, %tx, %code, %message, "decision query refused; will retry");
                false
            }
            Err(e) => {
                warn!(participant = %name, %tx, error = %e, "decision reply does not decode; will retry");
                false
            }
        }
    }
}
