//! From votes to a decision, and from the log's answer to what happens
//! next, without I/O.

use twopc_schemas::api::{AbortReason, ApiError, Outcome as ApiOutcome, TxReply};
use twopc_schemas::protocol::{Decision, TxId, Vote};
use twopc_schemas::{Code, ParticipantName};

use crate::log::{LogError, Record, Recorded};

/// One participant's answer to phase 1, as the coordinator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ballot {
    /// The participant answered.
    Voted(Vote),
    /// No answer in time. The participant may have prepared: it must hear
    /// the decision.
    TimedOut,
    /// Nobody serves the subject: the request reached no one, so nothing was
    /// prepared and nothing needs to be delivered.
    NoResponders,
    /// The reply did not decode (counts as no; the participant may have
    /// prepared, so it hears the decision).
    Garbled(String),
}

/// The outcome of phase 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    /// The first refusal, for the client (abort only).
    pub reason: Option<AbortReason>,
    /// Participants the decision must reach: all but those that voted no
    /// or that no request reached.
    pub deliver_to: Vec<ParticipantName>,
}

/// Commit only if every participant voted yes (presumed abort otherwise).
pub fn decide(ballots: &[(ParticipantName, Ballot)]) -> Outcome {
    assert!(!ballots.is_empty(), "a transaction has participants");
    let mut reason = None;
    let mut deliver_to = vec![];
    for (name, ballot) in ballots {
        let refusal = match ballot {
            Ballot::Voted(Vote::Yes) => None,
            Ballot::Voted(Vote::No { code, message }) => Some((*code, message.clone())),
            Ballot::TimedOut => Some((Code::Timeout, format!("{name} did not vote in time"))),
            Ballot::NoResponders => {
                Some((Code::Unavailable, format!("no {name} service is running")))
            }
            Ballot::Garbled(e) => Some((
                Code::BadMessage,
                format!("{name}'s vote does not decode: {e}"),
            )),
        };
        let needs_decision = matches!(
            ballot,
            Ballot::Voted(Vote::Yes) | Ballot::TimedOut | Ballot::Garbled(_)
        );
        if needs_decision {
            deliver_to.push(name.clone());
        }
        if let (None, Some((code, message))) = (&reason, refusal) {
            reason = Some(AbortReason {
                participant: name.to_string(),
                code,
                message,
            });
        }
    }
    Outcome {
        decision: if reason.is_none() {
            Decision::Commit
        } else {
            Decision::Abort
        },
        reason,
        deliver_to,
    }
}

/// The client's view of a durable record.
pub fn reply_from_record(rec: &Record, duplicate: bool) -> TxReply {
    TxReply {
        tx: rec.tx.to_string(),
        outcome: match rec.decision {
            Decision::Commit => ApiOutcome::Committed,
            Decision::Abort => ApiOutcome::Aborted,
        },
        request_id: rec.request_id.clone(),
        reason: rec.reason.clone(),
        delivered: rec.pending.is_empty(),
        duplicate,
    }
}

/// What follows once phase 1 has ended and the log has answered the
/// attempt's `record`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conclusion {
    /// The transaction's final decision, to deliver to every participant
    /// that may have prepared; `None` when it is unknown (the log failed):
    /// then nothing is delivered, and participants in doubt ask, learning
    /// whatever the log holds, or abort by presumption.
    pub deliver: Option<Decision>,
    /// The client's answer. For a transaction with a request id it is always
    /// the outcome of the transaction durably bound to that id (the key's
    /// first outcome), or an `outcome_unknown` error: never an `aborted`
    /// that a retry could contradict.
    pub reply: Result<TxReply, ApiError>,
}

/// The one place that turns the log's answer into a delivery and a reply.
/// Every way an attempt can end goes through here: its own decision, a
/// presumed abort recorded first by a participant's query (the key is bound
/// to it by the same write), a request id held by another transaction, and
/// a log failure.
pub fn conclude(tx: TxId, recorded: Result<Recorded, LogError>) -> Conclusion {
    match recorded {
        Ok(Recorded::New(r)) => {
            assert_eq!(r.tx, tx);
            Conclusion {
                deliver: Some(r.decision),
                reply: Ok(reply_from_record(&r, false)),
            }
        }
        Ok(Recorded::Existing(r)) => {
            // Usually a presumed abort that a decision query recorded first.
            // It may also be this attempt's own commit, written by a create
            // whose answer was lost, if the store could not say so; or an
            // abort recorded in its place. Whatever it is, it is the
            // transaction's one decision: deliver it, never assume which.
            assert_eq!(r.tx, tx, "the log answers about the transaction asked");
            Conclusion {
                deliver: Some(r.decision),
                reply: Ok(reply_from_record(&r, false)),
            }
        }
        Ok(Recorded::KeyTaken(holder)) => {
            // Another transaction holds the key, so this one must not
            // commit. Nothing was written for it, and nothing needs to be:
            // by presumed abort an unrecorded transaction is aborted, and
            // only this attempt could have recorded commit. The client
            // hears the key's first outcome.
            assert_ne!(holder.tx, tx);
            Conclusion {
                deliver: Some(Decision::Abort),
                reply: Ok(reply_from_record(&holder, true)),
            }
        }
        Err(e) => Conclusion {
            deliver: None,
            reply: Err(ApiError::new(
                Code::OutcomeUnknown,
                format!(
                    "transaction {tx}: the decision could not be recorded ({e}); \
                     the outcome is unknown: retry with the same request_id, or ask shop.tx"
                ),
            )),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Issue 18, finding 2: an existing record may be this attempt's own
    /// commit (a create whose answer was lost); it is delivered, not
    /// asserted away.
    #[test]
    fn an_existing_commit_is_the_decision_delivered() {
        let tx = TxId::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        let rec = Record {
            tx,
            decision: Decision::Commit,
            request_id: None,
            transaction: None,
            reason: None,
            deliver_to: vec![twopc_schemas::participant::WALLET],
            pending: vec![twopc_schemas::participant::WALLET],
            decided_at_ms: 1,
            completed_at_ms: None,
            votes: vec![],
            delivery_attempts: 0,
        };
        let c = conclude(tx, Ok(Recorded::Existing(rec)));
        assert_eq!(c.deliver, Some(Decision::Commit));
        assert_eq!(
            c.reply.unwrap().outcome,
            twopc_schemas::api::Outcome::Committed
        );
    }

    fn b(name: &str, ballot: Ballot) -> (ParticipantName, Ballot) {
        (ParticipantName::new(name).unwrap(), ballot)
    }

    #[test]
    fn all_yes_commits_to_all() {
        let o = decide(&[
            b("wallet", Ballot::Voted(Vote::Yes)),
            b("order", Ballot::Voted(Vote::Yes)),
        ]);
        assert_eq!(o.decision, Decision::Commit);
        assert_eq!(o.reason, None);
        assert_eq!(o.deliver_to, vec!["wallet", "order"]);
    }

    #[test]
    fn a_no_aborts_and_skips_the_no_voter() {
        let no = Vote::No {
            code: Code::OutOfStock,
            message: "none".into(),
        };
        let o = decide(&[
            b("wallet", Ballot::Voted(Vote::Yes)),
            b("order", Ballot::Voted(no)),
        ]);
        assert_eq!(o.decision, Decision::Abort);
        assert_eq!(o.reason.as_ref().unwrap().code, Code::OutOfStock);
        assert_eq!(o.reason.unwrap().participant, "order");
        assert_eq!(o.deliver_to, vec!["wallet"]);
    }

    #[test]
    fn a_timeout_aborts_and_still_delivers_to_the_silent_one() {
        let o = decide(&[
            b("wallet", Ballot::TimedOut),
            b("order", Ballot::Voted(Vote::Yes)),
        ]);
        assert_eq!(o.decision, Decision::Abort);
        assert_eq!(o.reason.unwrap().code, Code::Timeout);
        assert_eq!(o.deliver_to, vec!["wallet", "order"]);
    }

    #[test]
    fn no_responders_abort_without_delivery_to_the_absent() {
        let o = decide(&[
            b("wallet", Ballot::NoResponders),
            b("order", Ballot::Garbled("x".into())),
        ]);
        assert_eq!(o.decision, Decision::Abort);
        assert_eq!(o.reason.unwrap().code, Code::Unavailable);
        assert_eq!(o.deliver_to, vec!["order"]);
    }

    /// A completed record with nothing to deliver; an abort carries the
    /// reason a presumed abort has. Shared with the core's tests.
    pub(crate) fn record(tx: TxId, decision: Decision, rid: Option<&str>) -> Record {
        Record {
            tx,
            decision,
            request_id: rid.map(Into::into),
            transaction: None,
            reason: (decision == Decision::Abort).then(|| AbortReason {
                participant: "coordinator".into(),
                code: Code::PresumedAbort,
                message: "order asked before a decision was recorded".into(),
            }),
            deliver_to: vec![],
            pending: vec![],
            decided_at_ms: 1,
            completed_at_ms: Some(1),
            votes: vec![],
            delivery_attempts: 0,
        }
    }

    #[test]
    fn a_new_record_is_delivered_and_answered() {
        let tx = TxId::now_v7();
        let c = conclude(
            tx,
            Ok(Recorded::New(record(tx, Decision::Commit, Some("k")))),
        );
        assert_eq!(c.deliver, Some(Decision::Commit));
        let r = c.reply.unwrap();
        assert_eq!(
            (r.outcome, r.request_id.as_deref(), r.duplicate),
            (ApiOutcome::Committed, Some("k"), false)
        );
    }

    #[test]
    fn a_presumed_abort_recorded_first_ends_the_attempt_with_the_key_bound() {
        let tx = TxId::now_v7();
        // The log bound the key to the presumed abort in the same write.
        let c = conclude(
            tx,
            Ok(Recorded::Existing(record(tx, Decision::Abort, Some("k")))),
        );
        assert_eq!(c.deliver, Some(Decision::Abort));
        let r = c.reply.unwrap();
        assert_eq!(r.outcome, ApiOutcome::Aborted);
        assert_eq!(r.request_id.as_deref(), Some("k"));
        assert_eq!(r.reason.unwrap().code, Code::PresumedAbort);
    }

    #[test]
    fn a_taken_key_aborts_this_transaction_and_answers_the_first_outcome() {
        let tx = TxId::now_v7();
        let first = TxId::now_v7();
        let c = conclude(
            tx,
            Ok(Recorded::KeyTaken(record(
                first,
                Decision::Commit,
                Some("k"),
            ))),
        );
        assert_eq!(c.deliver, Some(Decision::Abort));
        let r = c.reply.unwrap();
        assert_eq!(r.tx, first.to_string());
        assert_eq!((r.outcome, r.duplicate), (ApiOutcome::Committed, true));
    }

    #[test]
    fn a_log_failure_is_an_unknown_outcome_never_an_abort() {
        let tx = TxId::now_v7();
        for e in [LogError::Busy, LogError::Failed("disk".into())] {
            let c = conclude(tx, Err(e));
            assert_eq!(
                c.deliver, None,
                "nothing is delivered without a durable decision"
            );
            let e = c.reply.unwrap_err();
            assert_eq!(e.code, Code::OutcomeUnknown);
            assert!(e.message.contains(&tx.to_string()), "{e}");
        }
    }
}
