//! Phase 1: a prepare, checked, then held and logged in one durable write
//! ([`prepare_job`]), and the vote sent only after it
//! (`Participant::on_prepare`).

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
use twopc_schemas::protocol::{self, Prepare, TxAge, TxWindow, Vote};
use twopc_schemas::Code;

use crate::branch::{on_prepare, OnPrepare};
use crate::resource::Resource;
use crate::service::{unsupported, Participant};
use crate::store::load_branch;

/// Phase 1 inside one SQLite transaction: returns the vote to send once the
/// batch is durable. `now` is the wall clock (ms) as the caller reads it:
/// the service passes [`now_ms`], the simulation its own clock.
pub fn prepare_job<R: Resource>(
    resource: &R,
    conn: &Connection,
    msg: &Prepare,
    window: TxWindow,
    now: i64,
) -> rusqlite::Result<Vote> {
    let tx = msg.tx;
    // The op as it came; stored as it came, so a repeated prepare is
    // recognised byte for byte (the coordinator sends canonical JSON).
    let Ok(op) = std::str::from_utf8(&msg.op) else {
        return Ok(Vote::No {
            code: Code::BadMessage,
            message: "the op is not UTF-8 JSON".into(),
        });
    };
    // The handler checked the message already; check again right before
    // writing, so that no path can hold what cannot commit. Its age is
    // taken inside the write transaction, which also serialises with the
    // collection of old rows: a row is either here or the prepare is
    // refused.
    let age = match msg.check(now, &window) {
        Ok(age) => age,
        Err(refused) => {
            return Ok(Vote::No {
                code: refused.code,
                message: refused.message,
            })
        }
    };
    let stored = load_branch(conn, tx)?;
    match on_prepare(stored.as_ref(), op, age == TxAge::Expired) {
        OnPrepare::Repeat(vote) => Ok(vote),
        OnPrepare::Hold => {
            // The service's own code runs contained: a panic there fails
            // this job (rolled back to its savepoint: nothing it wrote
            // stays), and the writer thread and the service go on.
            let parsed = match contained("parse_op", || resource.parse_op(op))
                .map_err(Panicked::into_sqlite)?
            {
                Ok(parsed) => parsed,
                // Refused before anything is held or written: a no vote is
                // always safe, and a retry gets the same answer.
                Err(message) => {
                    return Ok(Vote::No {
                        code: Code::BadMessage,
                        message,
                    })
                }
            };
            let op_json = op;
            match contained("hold", || resource.hold(conn, tx, &msg.client, &parsed))
                .map_err(Panicked::into_sqlite)??
            {
                Ok(()) => {
                    db::exec(
                        conn,
                        "INSERT INTO branches (tx, state, op, prepared_at_ms, updated_at_ms)
                         VALUES (?1, 'prepared', ?2, ?3, ?3)",
                        params![tx.as_bytes().as_slice(), op_json, now],
                    )?;
                    Ok(Vote::Yes)
                }
                Err((code, message)) => {
                    // Remember the no vote, so a repeated prepare gets the
                    // same answer even if the resource changed meanwhile.
                    db::exec(
                        conn,
                        "INSERT INTO branches (tx, state, op, code, message, updated_at_ms)
                         VALUES (?1, 'aborted', ?2, ?3, ?4, ?5)",
                        params![
                            tx.as_bytes().as_slice(),
                            op_json,
                            code.as_str(),
                            message,
                            now
                        ],
                    )?;
                    Ok(Vote::No { code, message })
                }
            }
        }
    }
}

impl<R: Resource> Participant<R> {
    /// `twopc.<name>.prepare`: decode and check, run [`prepare_job`] in the
    /// writer's next batch, and vote once it is durable.
    pub(crate) async fn on_prepare(&self, msg: async_nats::Message) -> Response {
        let name = self.name();
        let trace_id = TraceContext::from_headers(msg.headers.as_ref())
            .map(|t| t.trace_id)
            .unwrap_or_default();
        let payload = msg.payload;
        let msg = match protocol::decode::<Prepare>(&payload) {
            Ok(m) => m,
            Err(e) if e.is_unsupported() => return unsupported(&name, "prepare", &e),
            Err(e) => {
                // Nothing is written for either: the message is refused
                // before anything is held, so a no vote is always safe.
                refused("prepare", Code::BadMessage.as_str(), || {
                    if matches!(e, protocol::DecodeError::Invalid(_)) {
                        warn!(participant = %name, error = %e, "rejected prepare outside the protocol's limits");
                    } else {
                        warn!(participant = %name, error = %e, "rejected prepare that does not decode");
                    }
                });
                let body = protocol::encode(&Vote::No {
                    code: Code::BadMessage,
                    message: e.to_string(),
                });
                return Response::error(body, 400, format!("bad_message: {e}"));
            }
        };
        // An id that is not a UUIDv7, or from the future: refused before
        // the writer's queue, nothing written. (Past the window is for the
        // write transaction to see: a stored branch still answers.)
        if let Err(why) = msg.check(now_ms(), &self.window) {
            refused(
                "prepare",
                why.code.as_str(),
                || warn!(participant = %name, tx = %msg.tx, code = %why.code, message = %why.message, "refused prepare"),
            );
            let body = protocol::encode(&Vote::No {
                code: why.code,
                message: why.message.clone(),
            });
            return Response::error(body, why.code.status(), why.to_string());
        }
        let span = tracing::info_span!("prepare", participant = %name, tx = %msg.tx, %trace_id);
        async move {
            let delay = delay_for(ParticipantDelay::Prepare.at(&name));
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let resource = self.resource.clone();
            let window = self.window;
            if twopc_common::fault::broken("vote_before_durable") {
                // DELIBERATELY BROKEN (tests only): vote yes before the
                // prepare is written, or even known to be possible.
                let db = self.db.clone();
                tokio::spawn(async move {
                    db.run(move |c| prepare_job(&*resource, c, &msg, window, now_ms()))
                        .await
                });
                return Response::ok(protocol::encode(&Vote::Yes));
            }
            let started = std::time::Instant::now();
            let vote = match self
                .db
                .run(move |c| prepare_job(&*resource, c, &msg, window, now_ms()))
                .await
            {
                Ok(v) => v,
                Err(DbError::Busy) => Vote::No {
                    code: Code::Busy,
                    message: format!("{name}'s log is at its queue limit"),
                },
                Err(DbError::Fenced(why)) => Vote::No {
                    code: Code::NotOwner,
                    message: format!("this {name} instance wrote nothing: {why}"),
                },
                Err(e) => {
                    error!(error = %e, "prepare failed; voting no");
                    Vote::No {
                        code: Code::Internal,
                        message: format!("{name} could not prepare: {e}"),
                    }
                }
            };
            // Durable point: `db.run` returned only after the batch holding
            // this prepare was fsynced, so the yes vote below announces a
            // durable prepared record.
            crash_point(ParticipantCrash::PrepareAfterDurable.at(&name));
            tracing::debug!(log_us = started.elapsed().as_micros() as u64, "timings");
            metrics::counter!(
                "twopc_votes_total",
                "vote" => if vote == Vote::Yes { "yes" } else { "no" }
            )
            .increment(1);
            match &vote {
                Vote::Yes => info!("prepared, voting yes"),
                Vote::No { code, message } => info!(%code, %message, "voting no"),
            }
            Response::ok(protocol::encode(&vote))
        }
        .instrument(span)
        .await
    }
}
