//! The participant's protocol state machine, without I/O.
//!
//! A branch is one participant's part of one transaction. Its states are
//! the literature's: (Working, not stored) → Prepared → Committed | Aborted.
//! An Aborted row with no hold is also a tombstone: the abort arrived before
//! (or instead of) the prepare, so a late prepare must vote no.
//!
//! Each handler takes the stored state and the message and says what to do;
//! the driver in [`crate::participant`] does it inside one SQLite
//! transaction.

use twopc_schemas::protocol::{Decision, Vote};
pub use twopc_schemas::BranchState;
use twopc_schemas::Code;

/// A stored branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    pub state: BranchState,
    /// The operation prepared, as it came (the coordinator's canonical
    /// JSON); `None` for a tombstone.
    pub op: Option<String>,
    /// Why it aborted here, if it did.
    pub code: Option<Code>,
    pub message: Option<String>,
}

/// What to do with a prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnPrepare {
    /// First prepare of this transaction: ask the resource to hold.
    Hold,
    /// Already answered: repeat the vote, write nothing.
    Repeat(Vote),
}

/// `expired`: the transaction is past the window ([`TxWindow`]); with
/// nothing stored it is refused and nothing is written (its rows may have
/// been collected: holding now could apply an old transaction twice).
///
/// [`TxWindow`]: twopc_schemas::protocol::TxWindow
pub fn on_prepare(stored: Option<&Branch>, op: &str, expired: bool) -> OnPrepare {
    let Some(b) = stored else {
        if expired {
            return OnPrepare::Repeat(Vote::No {
                code: Code::Expired,
                message: "transaction is older than the prepare window".into(),
            });
        }
        return OnPrepare::Hold;
    };
    match b.state {
        BranchState::Prepared | BranchState::Committed => {
            if b.op.as_deref() == Some(op) {
                OnPrepare::Repeat(Vote::Yes)
            } else {
                // Same id, other content: forged or corrupt. Never say yes to
                // something that was not prepared.
                OnPrepare::Repeat(Vote::No {
                    code: Code::Conflict,
                    message: "transaction id already prepared with another operation".into(),
                })
            }
        }
        BranchState::Aborted => OnPrepare::Repeat(Vote::No {
            code: b.code.unwrap_or(Code::AlreadyAborted),
            message: b
                .message
                .clone()
                .unwrap_or_else(|| "transaction already aborted here".into()),
        }),
    }
}

/// What to do with a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDecide {
    /// Prepared: apply the decision to the resource and store the new state.
    Apply(Decision),
    /// Already in the decided state: acknowledge again, write nothing.
    Ack,
    /// Abort of a transaction never prepared here: store a tombstone so a
    /// late prepare votes no, and acknowledge.
    Tombstone,
    /// The decision contradicts the stored state, or commits a transaction
    /// never prepared. Reply with an error and change nothing.
    Reject(Code, String),
}

/// `expired`: the transaction is past the window; an abort of one never
/// prepared here needs no tombstone then (a late prepare is refused anyway).
///
/// `collectable`: the transaction is old enough that its decided branch may
/// have been collected (older than the retention less the skew). A commit
/// for a branch not stored is then acknowledged: a commit decision means
/// this participant voted yes, which it did only with the prepare durable,
/// and a prepared branch is never collected — so the branch was committed
/// and collected, and the coordinator lost the acknowledgement (issue 18:
/// the simulation found such a commit refused forever). Younger, a missing
/// branch for a commit is a lost store, refused as before.
pub fn on_decide(
    stored: Option<&Branch>,
    decision: Decision,
    expired: bool,
    collectable: bool,
) -> OnDecide {
    match (stored.map(|b| b.state), decision) {
        (Some(BranchState::Prepared), d) => OnDecide::Apply(d),
        (Some(BranchState::Committed), Decision::Commit) => OnDecide::Ack,
        (Some(BranchState::Aborted), Decision::Abort) => OnDecide::Ack,
        (None, Decision::Abort) if expired => OnDecide::Ack,
        (None, Decision::Commit) if collectable => OnDecide::Ack,
        (None, Decision::Abort) => OnDecide::Tombstone,
        (None, Decision::Commit) => OnDecide::Reject(
            Code::UnknownTx,
            "commit for a transaction never prepared here".into(),
        ),
        (Some(BranchState::Committed), Decision::Abort) => OnDecide::Reject(
            Code::Conflict,
            "abort for a transaction committed here".into(),
        ),
        (Some(BranchState::Aborted), Decision::Commit) => OnDecide::Reject(
            Code::Conflict,
            "commit for a transaction aborted here".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 (found by the simulation): a committed branch collected
    /// while its acknowledgement was lost must not make the commit
    /// undeliverable for ever; within the retention a missing branch for a
    /// commit is still refused.
    #[test]
    fn a_commit_for_a_collected_branch_is_acknowledged() {
        assert_eq!(on_decide(None, Decision::Commit, true, true), OnDecide::Ack);
        assert!(matches!(
            on_decide(None, Decision::Commit, true, false),
            OnDecide::Reject(Code::UnknownTx, _)
        ));
    }

    fn op() -> String {
        r#"{"amount":1,"user":"a"}"#.into()
    }
    fn branch(state: BranchState) -> Branch {
        Branch {
            state,
            op: Some(op()),
            code: None,
            message: None,
        }
    }

    #[test]
    fn first_prepare_holds_repeat_gets_same_vote() {
        assert_eq!(on_prepare(None, &op(), false), OnPrepare::Hold);
        assert_eq!(
            on_prepare(Some(&branch(BranchState::Prepared)), &op(), false),
            OnPrepare::Repeat(Vote::Yes)
        );
        assert_eq!(
            on_prepare(Some(&branch(BranchState::Committed)), &op(), false),
            OnPrepare::Repeat(Vote::Yes)
        );
    }

    #[test]
    fn prepare_with_other_op_is_refused() {
        let other = r#"{"amount":2,"user":"a"}"#;
        assert!(matches!(
            on_prepare(Some(&branch(BranchState::Prepared)), other, false),
            OnPrepare::Repeat(Vote::No {
                code: Code::Conflict,
                ..
            })
        ));
    }

    #[test]
    fn late_prepare_after_tombstone_votes_no() {
        let tomb = Branch {
            state: BranchState::Aborted,
            op: None,
            code: None,
            message: None,
        };
        assert!(matches!(
            on_prepare(Some(&tomb), &op(), false),
            OnPrepare::Repeat(Vote::No {
                code: Code::AlreadyAborted,
                ..
            })
        ));
    }

    #[test]
    fn decisions_are_idempotent_and_never_flip() {
        use BranchState::*;
        use Decision::*;
        assert_eq!(
            on_decide(Some(&branch(Prepared)), Commit, false, false),
            OnDecide::Apply(Commit)
        );
        assert_eq!(
            on_decide(Some(&branch(Prepared)), Abort, false, false),
            OnDecide::Apply(Abort)
        );
        assert_eq!(
            on_decide(Some(&branch(Committed)), Commit, false, false),
            OnDecide::Ack
        );
        assert_eq!(
            on_decide(Some(&branch(Aborted)), Abort, false, false),
            OnDecide::Ack
        );
        assert_eq!(on_decide(None, Abort, false, false), OnDecide::Tombstone);
        assert!(matches!(
            on_decide(None, Commit, false, false),
            OnDecide::Reject(Code::UnknownTx, _)
        ));
        assert!(matches!(
            on_decide(Some(&branch(Committed)), Abort, false, false),
            OnDecide::Reject(Code::Conflict, _)
        ));
        assert!(matches!(
            on_decide(Some(&branch(Aborted)), Commit, false, false),
            OnDecide::Reject(Code::Conflict, _)
        ));
    }

    #[test]
    fn an_expired_transaction_is_refused_unless_stored() {
        use BranchState::*;
        use Decision::*;
        assert_eq!(
            on_prepare(None, &op(), true),
            OnPrepare::Repeat(Vote::No {
                code: Code::Expired,
                message: "transaction is older than the prepare window".into(),
            })
        );
        // Stored: the answer is the stored one, whatever its age.
        assert_eq!(
            on_prepare(Some(&branch(Prepared)), &op(), true),
            OnPrepare::Repeat(Vote::Yes)
        );
        assert_eq!(
            on_decide(Some(&branch(Prepared)), Commit, true, false),
            OnDecide::Apply(Commit)
        );
        // An old abort of something never prepared here writes nothing.
        assert_eq!(on_decide(None, Abort, true, false), OnDecide::Ack);
        assert!(matches!(
            on_decide(None, Commit, true, false),
            OnDecide::Reject(Code::UnknownTx, _)
        ));
    }
}
