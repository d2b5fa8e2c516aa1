//! The names of crash and delay points (`TWOPC_CRASH_AT`, `TWOPC_DELAY`,
//! the chaos runner's faults file): one vocabulary for the services that
//! reach them, the chaos runner that arms them, the tests and the docs.
//! They are operator-facing names, so they live with the other names that
//! cross process boundaries.

use std::fmt;

use crate::ParticipantName;

/// Where the coordinator can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordinatorCrash {
    /// Votes in, nothing decided.
    AfterVotes,
    /// Decision durable, nobody told.
    AfterDecision,
    /// Some acknowledgements in, not noted.
    AfterAck,
}

impl CoordinatorCrash {
    pub const ALL: [CoordinatorCrash; 3] = [
        CoordinatorCrash::AfterVotes,
        CoordinatorCrash::AfterDecision,
        CoordinatorCrash::AfterAck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CoordinatorCrash::AfterVotes => "coordinator.phase1.after_votes",
            CoordinatorCrash::AfterDecision => "coordinator.decision.after_durable",
            CoordinatorCrash::AfterAck => "coordinator.phase2.after_ack",
        }
    }
}

impl fmt::Display for CoordinatorCrash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a participant can be made to crash; named `<participant>.<step>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParticipantCrash {
    /// Prepare durable, vote not sent.
    PrepareAfterDurable,
    /// Decision received, not applied.
    DecideBeforeApply,
    /// Decision applied durably, acknowledgement not sent.
    DecideAfterDurable,
    /// Recovery got the decision, not applied.
    RecoverBeforeApply,
}

impl ParticipantCrash {
    pub const ALL: [ParticipantCrash; 4] = [
        ParticipantCrash::PrepareAfterDurable,
        ParticipantCrash::DecideBeforeApply,
        ParticipantCrash::DecideAfterDurable,
        ParticipantCrash::RecoverBeforeApply,
    ];

    pub fn step(self) -> &'static str {
        match self {
            ParticipantCrash::PrepareAfterDurable => "prepare.after_durable",
            ParticipantCrash::DecideBeforeApply => "decide.before_apply",
            ParticipantCrash::DecideAfterDurable => "decide.after_durable",
            ParticipantCrash::RecoverBeforeApply => "recover.before_apply",
        }
    }

    /// The point's name at `participant`, formatted only when displayed
    /// (the fault module formats names only when some fault is armed).
    pub fn at(self, participant: &ParticipantName) -> PointName<'_> {
        PointName {
            participant,
            step: self.step(),
        }
    }
}

/// Where a participant can be slowed; named `<participant>.<step>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParticipantDelay {
    /// Before handling a prepare.
    Prepare,
    /// Before handling a decision.
    Decide,
    /// In the database's writer thread, before each batch's `COMMIT` (its
    /// fsync): a slow disk, which every job in the writer's queue waits for.
    Commit,
}

impl ParticipantDelay {
    pub const ALL: [ParticipantDelay; 3] = [
        ParticipantDelay::Prepare,
        ParticipantDelay::Decide,
        ParticipantDelay::Commit,
    ];

    pub fn step(self) -> &'static str {
        match self {
            ParticipantDelay::Prepare => "prepare",
            ParticipantDelay::Decide => "decide",
            ParticipantDelay::Commit => "commit",
        }
    }

    pub fn at(self, participant: &ParticipantName) -> PointName<'_> {
        PointName {
            participant,
            step: self.step(),
        }
    }
}

/// `<participant>.<step>`.
#[derive(Debug, Clone, Copy)]
pub struct PointName<'a> {
    participant: &'a ParticipantName,
    step: &'static str,
}

impl fmt::Display for PointName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.participant, self.step)
    }
}

/// Every crash point of a system whose participants are `participants`.
pub fn crash_points(participants: &[ParticipantName]) -> Vec<String> {
    let mut v: Vec<String> = CoordinatorCrash::ALL
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    for p in participants {
        v.extend(ParticipantCrash::ALL.iter().map(|c| c.at(p).to_string()));
    }
    v
}

/// Every delay point of a system whose participants are `participants`.
pub fn delay_points(participants: &[ParticipantName]) -> Vec<String> {
    participants
        .iter()
        .flat_map(|p| ParticipantDelay::ALL.iter().map(|d| d.at(p).to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::{ORDER, PURCHASE_PARTICIPANTS, WALLET};
    use std::collections::BTreeSet;

    /// The backticked names in the first column of the ARCHITECTURE.md
    /// table whose header starts with `header`.
    fn documented(header: &str) -> BTreeSet<String> {
        let doc = include_str!("../../ARCHITECTURE.md");
        let table = doc
            .split(&format!("| {header} |"))
            .nth(1)
            .unwrap_or_else(|| panic!("ARCHITECTURE.md has a {header:?} table"));
        table
            .lines()
            .skip(2) // the rest of the header row, and the separator
            .take_while(|l| l.starts_with('|'))
            .flat_map(|row| {
                let first = row.split('|').nth(1).unwrap_or("");
                first
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn architecture_md_lists_exactly_the_crash_points_in_the_code() {
        let code: BTreeSet<String> = crash_points(&PURCHASE_PARTICIPANTS).into_iter().collect();
        assert_eq!(documented("crash point"), code);
    }

    #[test]
    fn architecture_md_lists_exactly_the_delay_points_in_the_code() {
        let code: BTreeSet<String> = delay_points(&PURCHASE_PARTICIPANTS).into_iter().collect();
        assert_eq!(documented("delay point"), code);
    }

    #[test]
    fn names_are_formatted_as_documented() {
        assert_eq!(
            ParticipantCrash::DecideBeforeApply.at(&WALLET).to_string(),
            "wallet.decide.before_apply"
        );
        assert_eq!(
            ParticipantDelay::Prepare.at(&ORDER).to_string(),
            "order.prepare"
        );
    }
}
