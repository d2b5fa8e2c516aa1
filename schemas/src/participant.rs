//! The vocabulary of participants: their names and the states of their
//! branches.
//!
//! The set of participants is open (a later step lets any service join a
//! transaction), so a name is a validated string, not an enum: it becomes a
//! token of NATS subjects (`twopc.{name}.prepare`) and a queue group, so it
//! is checked once, where it is made, and carried typed from then on.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest participant name, in bytes.
pub const MAX_NAME_BYTES: usize = 32;

/// A participant's name: 1 to [`MAX_NAME_BYTES`] bytes of `[a-z0-9_-]`,
/// starting with a letter — one NATS subject token, never a wildcard or a
/// separator. On the wire (postcard and JSON) it is a plain string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ParticipantName(Cow<'static, str>);

/// The wallet: user balances.
pub const WALLET: ParticipantName = ParticipantName(Cow::Borrowed("wallet"));
/// The order service: products, prices, stock.
pub const ORDER: ParticipantName = ParticipantName(Cow::Borrowed("order"));
/// The participants of a purchase, in the order the coordinator lists them.
pub const PURCHASE_PARTICIPANTS: [ParticipantName; 2] = [WALLET, ORDER];

/// Not a participant name: `twopc.decision.*` is the coordinator's
/// (`subjects::decision_query`), and this participant's prepares would be
/// `twopc.decision.prepare`.
const RESERVED: &str = "decision";

/// Why a string is not a participant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("participant name {name:?}: {why}")]
pub struct BadName {
    pub name: String,
    pub why: &'static str,
}

impl ParticipantName {
    /// Checks `name` against the naming rule.
    pub fn new(name: impl Into<String>) -> Result<Self, BadName> {
        let name = name.into();
        let why = if name.is_empty() || name.len() > MAX_NAME_BYTES {
            Some("must be 1 to 32 bytes long")
        } else if !name.as_bytes()[0].is_ascii_lowercase() {
            Some("must start with a lowercase letter")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            Some("may contain only a-z, 0-9, _ and -")
        } else if name == RESERVED {
            Some("is reserved: twopc.decision.* are the coordinator's decision queries")
        } else {
            None
        };
        match why {
            Some(why) => Err(BadName { name, why }),
            None => Ok(ParticipantName(Cow::Owned(name))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ParticipantName {
    type Error = BadName;
    fn try_from(s: String) -> Result<Self, BadName> {
        ParticipantName::new(s)
    }
}

impl std::str::FromStr for ParticipantName {
    type Err = BadName;
    fn from_str(s: &str) -> Result<Self, BadName> {
        ParticipantName::new(s)
    }
}

impl From<ParticipantName> for String {
    fn from(n: ParticipantName) -> String {
        n.0.into_owned()
    }
}

impl fmt::Display for ParticipantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ParticipantName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ParticipantName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ParticipantName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A branch is one participant's part of one transaction: (working, not
/// stored) → prepared → committed | aborted. An aborted branch with nothing
/// held is also a tombstone: the abort came before (or instead of) the
/// prepare, so a late prepare must vote no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchState {
    Prepared,
    Committed,
    Aborted,
}

impl BranchState {
    /// The snake_case name, as stored and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BranchState::Prepared => "prepared",
            BranchState::Committed => "committed",
            BranchState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            BranchState::Prepared,
            BranchState::Committed,
            BranchState::Aborted,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
    }
}

impl fmt::Display for BranchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_safe_subject_token() {
        for ok in ["wallet", "order", "a", "ledger-eu_2", &"x".repeat(32)] {
            assert_eq!(ParticipantName::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "Wallet",
            "1wallet",
            "wal.let",
            "wal*",
            ">",
            "wal let",
            "wal\nlet",
            "é",
            &"x".repeat(33),
        ] {
            assert!(ParticipantName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_constants_obey_the_rule() {
        for n in PURCHASE_PARTICIPANTS {
            assert_eq!(ParticipantName::new(n.as_str()).unwrap(), n);
        }
    }

    #[test]
    fn a_name_is_a_plain_string_on_the_wire_and_checked_when_read() {
        assert_eq!(
            postcard::to_allocvec(&WALLET).unwrap(),
            postcard::to_allocvec("wallet").unwrap()
        );
        assert_eq!(serde_json::to_string(&ORDER).unwrap(), r#""order""#);
        assert!(serde_json::from_str::<ParticipantName>(r#""wal.let""#).is_err());
        let bytes = postcard::to_allocvec("a.b").unwrap();
        assert!(postcard::from_bytes::<ParticipantName>(&bytes).is_err());
    }

    #[test]
    fn branch_states_round_trip_by_name() {
        for s in [
            BranchState::Prepared,
            BranchState::Committed,
            BranchState::Aborted,
        ] {
            assert_eq!(BranchState::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
        }
        assert_eq!(BranchState::parse("working"), None);
    }
}
