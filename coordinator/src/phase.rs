//! From votes to a decision, without I/O.

use twopc_schemas::api::AbortReason;
use twopc_schemas::protocol::{Decision, Vote};
use twopc_schemas::Code;

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
    pub deliver_to: Vec<String>,
}

/// Commit only if every participant voted yes (presumed abort otherwise).
pub fn decide(ballots: &[(String, Ballot)]) -> Outcome {
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
                participant: name.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, ballot: Ballot) -> (String, Ballot) {
        (name.to_owned(), ballot)
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
}
