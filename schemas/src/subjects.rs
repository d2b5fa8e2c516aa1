//! NATS subjects. Public subjects carry JSON; `twopc.` subjects carry the
//! internal postcard protocol.

use crate::client::ClientName;

/// Public: a purchase by `client` (JSON [`crate::api::PurchaseRequest`]),
/// served by the coordinator. Only the client's credentials may publish
/// it, so the token is the authenticated buyer: its `request_id`s are its
/// own namespace.
pub fn purchase(client: &ClientName) -> String {
    format!("shop.{client}.purchase")
}

/// Public: the status of one of `client`'s transactions (JSON
/// `{"tx": ...}`); another client's transaction reads `unknown`.
pub fn client_tx(client: &ClientName) -> String {
    format!("shop.{client}.tx")
}

/// Public: a transaction by `client` (JSON [`crate::tx::TxSubmit`]): any
/// branches at participants the client may name. Only the client's
/// credentials may publish it, as for [`purchase`].
pub fn transaction(client: &ClientName) -> String {
    format!("shop.{client}.transaction")
}

/// Every client's purchase subject (the coordinator's subscription).
pub const PURCHASES: &str = "shop.*.purchase";
/// Every client's transaction subject.
pub const TRANSACTIONS: &str = "shop.*.transaction";
/// Every client's transaction-status subject.
pub const CLIENT_TXS: &str = "shop.*.tx";

/// The client a `shop.<client>.<verb>` subject names, if it is one.
pub fn client_of(subject: &str) -> Option<ClientName> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some("shop"), Some(client), Some(_verb), None) => ClientName::new(client).ok(),
        _ => None,
    }
}

/// Admin: any transaction's status at the coordinator (JSON `{"tx": ...}`).
pub const TX_STATUS: &str = "shop.tx";
/// Admin: transactions not yet resolved at the coordinator (JSON `{}`).
pub const IN_DOUBT: &str = "shop.in_doubt";
/// Internal: the coordinator serves every participant's decision queries
/// ([`decision_query`]).
pub const DECISION_QUERIES: &str = "twopc.decision.*";

/// Public: a user's balance (JSON `{"user": ...}`), served by the wallet.
pub const WALLET_BALANCE: &str = "wallet.balance";
/// Public: create a user with an opening balance, served by the wallet.
pub const WALLET_CREATE_USER: &str = "wallet.users.create";
/// Public: a product's price and stock (JSON `{"sku": ...}`), served by order.
pub const ORDER_STOCK: &str = "order.stock";
/// Public: create a product with price and stock, served by order.
pub const ORDER_CREATE_PRODUCT: &str = "order.products.create";

use crate::participant::ParticipantName;

/// Internal: phase 1 requests to one participant.
pub fn prepare(participant: &ParticipantName) -> String {
    format!("twopc.{participant}.prepare")
}

/// Internal: phase 2 (decision delivery) to one participant.
pub fn decide(participant: &ParticipantName) -> String {
    format!("twopc.{participant}.decide")
}

/// Internal: `participant` asks the coordinator for a transaction's
/// decision. The subject names the sender: the server lets participant P
/// publish only `twopc.decision.P`, and the coordinator refuses a query
/// whose body names anyone else ([`crate::protocol::DecisionQuery::check`]).
/// (So no participant may be called `decision`: its prepares would be
/// `twopc.decision.prepare`.)
pub fn decision_query(participant: &ParticipantName) -> String {
    format!("{DECISION_QUERY_PREFIX}{participant}")
}

const DECISION_QUERY_PREFIX: &str = "twopc.decision.";

/// The participant a decision query's subject names, if it is one
/// ([`decision_query`]).
pub fn decision_query_sender(subject: &str) -> Option<ParticipantName> {
    ParticipantName::new(subject.strip_prefix(DECISION_QUERY_PREFIX)?).ok()
}

/// Public: a transaction's state at one participant (JSON `{"tx": ...}`).
pub fn participant_tx(participant: &ParticipantName) -> String {
    format!("{participant}.tx")
}

/// Public: a participant's prepared, undecided transactions (JSON `{}`).
pub fn participant_in_doubt(participant: &ParticipantName) -> String {
    format!("{participant}.in_doubt")
}

/// Queue group shared by all instances of one service, so each request is
/// handled once.
pub fn queue_group(service: &str) -> String {
    format!("twopc-{service}")
}

/// The JetStream KV bucket of the coordinators' decision log (a cluster's
/// `--store kv`); its stream is `KV_<bucket>`, its subjects `$KV.<bucket>.>`.
pub const DECISION_BUCKET: &str = "twopc_decisions";

/// The JetStream KV bucket of the participants' owner leases
/// ([`crate::ownership::Lease`]), one key per participant name; its stream
/// is `KV_<bucket>`. Participant P may write only `$KV.<bucket>.P`.
pub const OWNER_BUCKET: &str = "twopc_owners";

/// Internal: instances of one participant ask who serves it, when the
/// server has no JetStream to hold a lease (every instance subscribes, not
/// in a queue group, and answers with what it is).
pub fn owner_ping(participant: &ParticipantName) -> String {
    format!("twopc.{participant}.owner")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::{ORDER, WALLET};

    #[test]
    fn a_decision_query_subject_names_its_sender() {
        assert_eq!(decision_query(&WALLET), "twopc.decision.wallet");
        for p in [WALLET, ORDER, ParticipantName::new("x-1_y").unwrap()] {
            assert_eq!(decision_query_sender(&decision_query(&p)), Some(p));
        }
        for bad in [
            "twopc.decision",
            "twopc.decision.",
            "twopc.decision.Wallet",
            "twopc.decision.wallet.x",
            "twopc.wallet.decide",
            "xtwopc.decision.wallet",
        ] {
            assert_eq!(decision_query_sender(bad), None, "{bad}");
        }
    }

    #[test]
    fn no_participant_subject_is_a_decision_query() {
        // The coordinator subscribes `twopc.decision.*`: a participant's
        // own subjects must never match it.
        assert!(ParticipantName::new("decision").is_err());
        for p in [WALLET, ORDER] {
            for s in [prepare(&p), decide(&p)] {
                assert_eq!(decision_query_sender(&s), None, "{s}");
            }
        }
    }
}
