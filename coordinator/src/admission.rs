//! Which transactions the coordinator takes: every branch names a
//! participant it knows, and one the submitting client may name.
//!
//! The server sees only subjects: it lets client C publish only
//! `shop.C.purchase` and `shop.C.transaction` (launcher::auth), so the
//! subject's client token is the authenticated sender, and this check,
//! made before anything is sent, is where a client's grant is enforced. A
//! participant learns the client in its prepare, for its own rules.

use std::collections::BTreeSet;

use twopc_schemas::api::ApiError;
use twopc_schemas::tx::{Grants, Transaction};
use twopc_schemas::{Code, ParticipantName};

/// The known participants and the clients' grants (`None`: every client
/// may name every known participant).
#[derive(Debug, Clone)]
pub struct Admission {
    known: BTreeSet<ParticipantName>,
    grants: Option<Grants>,
}

impl Admission {
    pub fn new(known: impl IntoIterator<Item = ParticipantName>, grants: Option<Grants>) -> Self {
        Admission {
            known: known.into_iter().collect(),
            grants,
        }
    }

    /// `unknown_participant` for a name nobody was configured to serve,
    /// `forbidden` for one the client may not name; the first branch that
    /// fails is named.
    pub fn check(&self, txn: &Transaction) -> Result<(), ApiError> {
        for b in &txn.branches {
            if !self.known.contains(&b.participant) {
                return Err(ApiError::new(
                    Code::UnknownParticipant,
                    format!(
                        "no participant {} (known: {})",
                        b.participant,
                        self.known_list()
                    ),
                ));
            }
            if let Some(g) = &self.grants {
                g.check(&txn.client, &b.participant)?;
            }
        }
        Ok(())
    }

    fn known_list(&self) -> String {
        let names: Vec<&str> = self.known.iter().map(|p| p.as_str()).collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twopc_schemas::tx::{Branch, Op};
    use twopc_schemas::ClientName;

    fn txn(client: &str, participants: &[&str]) -> Transaction {
        Transaction {
            client: ClientName::new(client).unwrap(),
            branches: participants
                .iter()
                .map(|p| Branch {
                    participant: ParticipantName::new(*p).unwrap(),
                    op: Op::parse(b"{}").unwrap(),
                })
                .collect(),
            request_id: None,
        }
    }

    fn known() -> Vec<ParticipantName> {
        ["wallet", "order", "shipping"]
            .iter()
            .map(|p| ParticipantName::new(*p).unwrap())
            .collect()
    }

    #[test]
    fn a_transaction_names_known_participants_only() {
        let a = Admission::new(known(), None);
        assert!(a.check(&txn("web", &["wallet", "shipping"])).is_ok());
        let e = a.check(&txn("web", &["wallet", "bank"])).unwrap_err();
        assert_eq!(e.code, Code::UnknownParticipant);
        assert!(e.message.contains("bank"), "{}", e.message);
    }

    #[test]
    fn a_client_names_only_what_its_grant_lists() {
        let a = Admission::new(
            known(),
            Some(Grants::parse("web=wallet,order;ops=*").unwrap()),
        );
        assert!(a.check(&txn("web", &["wallet", "order"])).is_ok());
        assert_eq!(
            a.check(&txn("web", &["wallet", "shipping"]))
                .unwrap_err()
                .code,
            Code::Forbidden
        );
        assert!(a.check(&txn("ops", &["shipping"])).is_ok());
        assert_eq!(
            a.check(&txn("guest", &["wallet"])).unwrap_err().code,
            Code::Forbidden
        );
        // Unknown wins over forbidden: the name does not exist at all.
        assert_eq!(
            a.check(&txn("guest", &["bank"])).unwrap_err().code,
            Code::UnknownParticipant
        );
    }
}
