//! Phase 2: a decision, applied idempotently by the stored branch's state
//! ([`decide_job`]), acknowledged only once durable
//! (`Participant::on_decide`); recovery applies answers the same way.

use rusqlite::{params, Connection};
use tracing::{error, info, warn, Instrument};
use twopc_common::contain::{contained, Panicked};
use twopc_common::db::{self, DbError};
use twopc_common::fault::{crash_point, delay_for};
use twopc_common::now_ms;
use twopc_common::refusals::refused;
use twopc_common::serve::Response;
use twopc_common::trace::TraceContext;
use twopc_schemas::points::{ParticipantCrash, ParticipantDelay};
use twopc_schemas::protocol::{self, Decide, DecideReply, Decision, TxAge, TxId, TxWindow};
use twopc_schemas::Code;

use crate::branch::{on_decide, BranchState, OnDecide};
use crate::resource::Resource;
use crate::service::{unsupported, Participant};
use crate::store::{load_branch, set_state};

/// Phase 2 inside one SQLite transaction (`now` as for [`prepare_job`]).
pub fn decide_job<R: Resource>(
    resource: &R,
    conn: &Connection,
    msg: Decide,
    window: TxWindow,
    now: i64,
) -> rusqlite::Result<DecideReply> {
    let Decide { tx, decision } = msg;
    let stored = load_branch(conn, tx)?;
    // Checked (again) inside the write transaction, like a prepare's age,
    // and knowing whether the branch is stored.
    let age = match msg.check(now, &window, stored.is_some()) {
        Ok(age) => age,
        Err(refused) => {
            return Ok(DecideReply::Rejected {
                code: refused.code,
                message: refused.message,
            })
        }
    };
    // Old enough that a decided branch may have been collected (its age by
    // this clock, allowing for the skew of the clock that stamped the id).
    let collectable = window.past_retention(tx, now + window.max_skew_ms);
    match on_decide(
        stored.as_ref(),
        decision,
        age == TxAge::Expired,
        collectable,
    ) {
        OnDecide::Ack => Ok(DecideReply::Ack),
        OnDecide::Reject(code, message) => Ok(DecideReply::Rejected { code, message }),
        OnDecide::Tombstone => {
            db::exec(
                conn,
                "INSERT INTO branches (tx, state, code, message, updated_at_ms)
                 VALUES (?1, 'aborted', ?2, ?3, ?4)",
                params![
                    tx.as_bytes().as_slice(),
                    Code::AlreadyAborted.as_str(),
                    "aborted before it was prepared here",
                    now
                ],
            )?;
            Ok(DecideReply::Ack)
        }
        OnDecide::Apply(d) => {
            let stored_op = stored
                .and_then(|b| b.op)
                .expect("a prepared branch has its operation");
            let op = contained("stored_op", || resource.stored_op(&stored_op))
                .map_err(Panicked::into_sqlite)?;
            // A panic or an error in apply or release rolls this job back:
            // the branch stays prepared and the coordinator delivers again.
            match d {
                Decision::Commit => {
                    contained("apply", || resource.apply(conn, tx, &op))
                        .map_err(Panicked::into_sqlite)??;
                    set_state(conn, tx, BranchState::Committed, now)?;
                }
                Decision::Abort => {
                    contained("release", || resource.release(conn, tx, &op))
                        .map_err(Panicked::into_sqlite)??;
                    set_state(conn, tx, BranchState::Aborted, now)?;
                }
            }
            Ok(DecideReply::Ack)
        }
    }
}

impl<R: Resource> Participant<R> {
    /// `twopc.<name>.decide`: decode and check, apply with [`decide_job`],
    /// acknowledge once durable.
    pub(crate) async fn on_decide(&self, msg: async_nats::Message) -> Response {
        let name = self.name();
        let trace_id = TraceContext::from_headers(msg.headers.as_ref())
            .map(|t| t.trace_id)
            .unwrap_or_default();
        let payload = msg.payload;
        let msg = match protocol::decode::<Decide>(&payload) {
            Ok(m) => m,
            Err(e) if e.is_unsupported() => return unsupported(&name, "decide", &e),
            Err(e) => {
                refused(
                    "decide",
                    Code::BadMessage.as_str(),
                    || warn!(participant = %name, error = %e, "rejected decision that does not decode"),
                );
                let body = protocol::encode(&DecideReply::Rejected {
                    code: Code::BadMessage,
                    message: e.to_string(),
                });
                return Response::error(body, 400, format!("bad_message: {e}"));
            }
        };
        // Impossible ids only: whether one from the future is refused
        // depends on the stored branch (`decide_job`).
        if let Err(why) = msg.check(now_ms(), &self.window, true) {
            refused(
                "decide",
                why.code.as_str(),
                || warn!(participant = %name, tx = %msg.tx, code = %why.code, message = %why.message, "refused decision"),
            );
            let body = protocol::encode(&DecideReply::Rejected {
                code: why.code,
                message: why.message.clone(),
            });
            return Response::error(body, why.code.status(), why.to_string());
        }
        let delay = delay_for(ParticipantDelay::Decide.at(&name));
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        // Crash point: the decision arrived but is not applied (the
        // participant stays prepared, in doubt, until it recovers).
        crash_point(ParticipantCrash::DecideBeforeApply.at(&name));
        let reply = self.apply_decision(msg.tx, msg.decision, &trace_id).await;
        match &reply {
            DecideReply::Ack => Response::ok(protocol::encode(&reply)),
            DecideReply::Rejected { code, message } => Response::error(
                protocol::encode(&reply),
                code.status(),
                format!("{code}: {message}"),
            ),
        }
    }

    /// Applies a decision durably (phase 2 delivery and recovery share it).
    pub(crate) async fn apply_decision(
        &self,
        tx: TxId,
        decision: Decision,
        trace_id: &str,
    ) -> DecideReply {
        let name = self.name();
        let span = tracing::info_span!("decide", participant = %name, %tx, decision = decision.as_str(), trace_id);
        async move {
            let resource = self.resource.clone();
            let window = self.window;
            let reply = match self
                .db
                .run(move |c| decide_job(&*resource, c, Decide { tx, decision }, window, now_ms()))
                .await
            {
                Ok(r) => r,
                Err(DbError::Busy) => DecideReply::Rejected {
                    code: Code::Busy,
                    message: format!("{name}'s log is at its queue limit"),
                },
                Err(DbError::Fenced(why)) => DecideReply::Rejected {
                    code: Code::NotOwner,
                    message: format!("this {name} instance wrote nothing: {why}"),
                },
                Err(e) => {
                    error!(error = %e, "applying the decision failed");
                    DecideReply::Rejected {
                        code: Code::Internal,
                        message: e.to_string(),
                    }
                }
            };
            // Durable point: the decision's effect is fsynced before the ack
            // leaves, so the coordinator may forget the transaction after it.
            crash_point(ParticipantCrash::DecideAfterDurable.at(&name));
            match &reply {
                DecideReply::Ack => {
                    metrics::counter!("twopc_decisions_applied_total", "decision" => decision.as_str())
                        .increment(1);
                    info!("decision applied")
                }
                DecideReply::Rejected { code, message } => {
                    refused("decide", code.as_str(), || {
                        warn!(%code, %message, "decision rejected")
                    })
                }
            }
            reply
        }
        .instrument(span)
        .await
    }
}
